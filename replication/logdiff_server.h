// The node's side of `logdiff --live`: answers DiffRequests about the node's
// own replica over the replication port (docs/operations.md, "logdiff
// --live"). Internal to replication/: the engine owns one Server.
//
// Requests arrive on transport I/O threads and are queued; one worker thread
// answers them in order, so hashing a large database never stalls
// replication. A session first PINs an LSN: the node takes a RocksDB
// snapshot exactly when its applied LSN reaches it, and answers that
// session's database questions from the snapshot and its WAL questions up
// to that LSN, so that every node hashes the same point in the log.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/mutex.h"
#include "proto/replication.pb.h"
#include "replica/status.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
class Snapshot;
}  // namespace rocksdb

namespace replica::wal {
class Wal;
}

namespace replica::transport {
class Session;
}

namespace replica::logdiff {

// A node's open log and database, lent for one request.
struct Store {
  wal::Wal* wal = nullptr;
  rocksdb::DB* db = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  std::vector<std::string> names;  // column family names, same order
};

// What the engine lends the server.
class NodeHooks {
 public:
  virtual ~NodeHooks() = default;
  // Runs fn with the store held: not closed or replaced until fn returns.
  virtual Status WithStore(const std::function<Status(const Store&)>& fn) = 0;
  // Within WithStore: a snapshot of the database taken exactly when the
  // applied LSN reached lsn. Aborted if the node had already applied past
  // it; TimedOut if it did not reach it in time.
  virtual Result<const rocksdb::Snapshot*> PinAt(uint64_t lsn, std::chrono::milliseconds timeout) = 0;
};

class Server {
 public:
  explicit Server(NodeHooks* hooks) : hooks_(hooks) {}
  ~Server() { Stop(); }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Queues a request (never blocks; starts the worker on first use).
  void Submit(const std::shared_ptr<transport::Session>& session, const proto::DiffRequest& request) EXCLUDES(mu_);
  // Forgets a closed session; its snapshot is released after the requests
  // it queued (the worker owns every snapshot).
  void SessionClosed(const std::shared_ptr<transport::Session>& session) EXCLUDES(mu_);
  // The store is about to close or be replaced (no request runs: the caller
  // holds the store exclusively): releases every snapshot taken from db.
  void ReleaseAll(rocksdb::DB* db) EXCLUDES(mu_);
  // Joins the worker and releases every snapshot; later requests are
  // refused. Idempotent (the destructor calls it again).
  void Stop() EXCLUDES(mu_);

 private:
  struct Pin {
    uint64_t lsn = 0;
    rocksdb::DB* db = nullptr;
    const rocksdb::Snapshot* snapshot = nullptr;
  };
  struct Item {
    std::shared_ptr<transport::Session> session;
    proto::DiffRequest request;
    bool release = false;  // the session closed: release its snapshot
  };
  static constexpr size_t kMaxQueued = 256;
  void Run() EXCLUDES(mu_);
  void Release(const transport::Session* session) EXCLUDES(mu_);
  proto::DiffReply Answer(const transport::Session* session, const proto::DiffRequest& req) EXCLUDES(mu_);

  NodeHooks* const hooks_;
  Mutex mu_;
  CondVar cv_{&mu_};
  std::deque<Item> queue_ GUARDED_BY(mu_);
  std::map<const transport::Session*, Pin> pins_ GUARDED_BY(mu_);
  bool stop_ GUARDED_BY(mu_) = false;
  bool started_ GUARDED_BY(mu_) = false;
  bool stopped_ GUARDED_BY(mu_) = false;
  std::thread worker_;
};

}  // namespace replica::logdiff
