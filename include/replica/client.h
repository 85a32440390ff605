// The C++ client of a replicated cluster: finds the active through etcd and
// follows it across failovers and switchovers (docs/failover.md, "Clients").
// It speaks the Redis protocol to replicad's client port; no Boost or
// RocksDB types here.
//
//   replica::ClientOptions o;
//   o.etcd = {"10.0.0.9:2379"};
//   o.cluster = "prod";
//   auto client = replica::Client::Open(o);
//   (*client)->Set("k", "v");
//
// Retries: a call that meets a standby (-READONLY), a node that stopped
// answering, or a connection that broke, looks the active up again (the
// -READONLY reply names it; etcd otherwise) and is sent there, until
// ClientOptions::timeout has passed. A write whose acknowledgement was lost
// with its connection may so be applied twice; SET and DEL give the same
// result either way. An Aborted error (a node shutting down) is retried the
// same way. Any other error reply is returned at once, with the code of the
// engine error it reports (IOError for a full disk, say); an error of the
// request itself (arity, an unknown command) is InvalidArgument.
//
// Thread-safety: one Client may be used from several threads; calls are
// serialised on its one connection. Use one Client per thread for
// parallelism.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "replica/status.h"

namespace replica {

struct ClientOptions {
  std::vector<std::string> etcd;  // etcd client URLs (HOST:PORT or http://HOST:PORT)
  std::string cluster = "default";
  // A call gives up after this long in all, retries included. A failover
  // takes about the lease TTL (2 s) plus half a second.
  std::chrono::milliseconds timeout{10000};
  // One request on one connection: connect, send, and read the reply.
  std::chrono::milliseconds io_timeout{3000};
};

class Client {
 public:
  static Result<std::unique_ptr<Client>> Open(const ClientOptions& options);
  virtual ~Client() = default;

  // Written on the active and acknowledged under its commit rule.
  virtual Status Set(const std::string& key, const std::string& value) = 0;
  // Whether the key existed (false too when a retried DEL finds it already
  // deleted by the attempt whose reply was lost).
  virtual Result<bool> Del(const std::string& key) = 0;
  // Read on the active (so a client reads its own writes); nullopt if absent.
  // Reads ask etcd again at most once a second, so a client that only reads
  // moves off a demoted node within about a second.
  virtual Result<std::optional<std::string>> Get(const std::string& key) = 0;
  // The client address of the node the client sends to now ("" before the first call).
  virtual std::string active() const = 0;
  // How often the client moved to another node.
  virtual uint64_t moves() const = 0;
};

}  // namespace replica
