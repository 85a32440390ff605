// The client port: a subset of the Redis protocol over TCP, so redis-cli,
// redis-benchmark and Redis client libraries work against a node unchanged
// (docs/replication.md lists the commands and how they map to the engine).
//
// Event-driven: one Asio I/O thread serves every connection; SETs, MSETs,
// DELs and UNLINKs from all connections are gathered into shared writes by
// two writer threads, and
// commands that wait on the engine run on worker threads (docs/replication.md,
// "Client port"). At most max_clients connections at once. Protocol errors
// get a Redis-style error and close that connection only.
//
// Thread-safety: Start and Stop from one thread; Stop joins every thread.
// Call the engine's Interrupt before Stop, so that a write or WAIT under way
// returns.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "replica/engine.h"

namespace replica {

struct RespServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 6380;  // 0: any free port
  int max_clients = 1000;
  size_t max_bulk = 64u << 20;
  // A thread for commands that wait (WAIT, SCAN, DBSIZE) that has had
  // nothing to do this long ends, unless it is one of the last two.
  std::chrono::milliseconds worker_idle_timeout{30000};
};

struct RespStats {
  std::atomic<uint64_t> connected{0};    // open now
  std::atomic<uint64_t> connections{0};  // accepted since start
  std::atomic<uint64_t> commands{0};
  std::atomic<uint64_t> protocol_errors{0};
  std::atomic<uint64_t> rejected_clients{0};
};

class RespServer {
 public:
  static Result<std::unique_ptr<RespServer>> Start(Engine* engine, const RespServerOptions& options);
  virtual ~RespServer() = default;
  virtual uint16_t port() const = 0;
  virtual void Stop() = 0;
  virtual const RespStats& stats() const = 0;
};

}  // namespace replica
