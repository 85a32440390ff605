// The Redis commands of the client port, mapped to the engine
// (docs/replication.md lists them). The connection handling is in
// resp_server.cc; this is what a parsed command does and answers.
//
// Thread-safety: Execute may run on several threads at once; each
// connection's CommandState is touched by one thread at a time (its owner's).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "base/mutex.h"
#include "replica/engine.h"
#include "replication/resp_server.h"

namespace replica::resp {

// Per-connection state kept between commands.
struct CommandState {
  uint64_t last_write_lsn = 0;  // WAIT counts the standbys that hold it
  bool quit = false;            // QUIT ran: close once the replies are sent
  uint64_t id = 0;              // CLIENT ID
};

class Commands {
 public:
  // `stats` and `options` describe the port for INFO; they outlive this.
  Commands(Engine* engine, const RespStats* stats, const RespServerOptions* options)
      : engine_(engine), stats_(stats), options_(options), started_(std::chrono::steady_clock::now()) {}
  // The port actually listened on (INFO's tcp_port), once known.
  void set_port(uint16_t port) { port_ = port; }

  // Runs one command and appends its reply to *out. May block: WAIT waits
  // for the standbys, DBSIZE and SCAN read much of the store (see MayBlock).
  // Writes are not run here: the client port gathers the well-formed ones
  // (IsPlainSet, IsPlainDel) into shared batches; here the others get their
  // error.
  void Execute(const std::vector<std::string>& args, CommandState* conn, std::string* out);

  // Whether a command (its name in upper case) can wait on the engine or
  // read much of the store, and so must not run on a connection I/O thread.
  static bool MayBlock(const std::string& name);
  // Whether `args` is a SET without options or a well-formed MSET: their
  // pairs may share one write with other such commands, each staying atomic
  // inside the larger atomic batch.
  static bool IsPlainSet(const std::vector<std::string>& args);
  // Whether `args` is a well-formed DEL or UNLINK: its deletes may share one
  // write with other connections' SETs and DELs (WriteReportingDeletes
  // tells each its own count).
  static bool IsPlainDel(const std::vector<std::string>& args);

  // The reply to a failed call: -READONLY naming the active for a write on
  // a standby, else -ERR with the status.
  void AppendStatusError(const Status& st, std::string* out);

 private:
  void Info(const std::vector<std::string>& sections, std::string* out);
  void Replication(std::string* out);  // INFO's replication section
  void Role(std::string* out);
  void Scan(const std::vector<std::string>& args, std::string* out);

  Engine* const engine_;
  const RespStats* const stats_;
  const RespServerOptions* const options_;
  const std::chrono::steady_clock::time_point started_;
  std::atomic<uint16_t> port_{0};
  // SCAN cursors: a number the client passes back, standing for the last key
  // returned, so the next page starts after it whatever was deleted since.
  // Shared by all connections; the oldest are forgotten past kMaxCursors,
  // or past kMaxCursorBytes of keys (keys can be large).
  static constexpr size_t kMaxCursors = 100000;
  static constexpr size_t kMaxCursorBytes = 64u << 20;
  Mutex cursor_mu_;
  std::map<uint64_t, std::string> cursors_ GUARDED_BY(cursor_mu_);
  size_t cursor_bytes_ GUARDED_BY(cursor_mu_) = 0;
  uint64_t next_cursor_ GUARDED_BY(cursor_mu_) = 1;
};

std::string Upper(std::string s);

}  // namespace replica::resp
