// A small etcd v3 client over etcd's JSON gateway (HTTP/1.1 + JSON through
// Boost.Beast and Boost.JSON): KV, transactions, leases, and a watch stream.
// Why the gateway and not gRPC: docs/failover.md, "etcd client".
//
// Several endpoints may be given; a request that cannot reach one (connect
// error, reset, timeout) is retried once on each of the others, so losing one
// member of a three-member cluster is invisible to callers.
//
// Thread-safety: one request at a time per EtcdClient (calls are serialised
// by an internal mutex); a Watch runs on its own connection and thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/mutex.h"
#include "replica/status.h"

namespace replica::etcd {

struct KeyValue {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t version = 0;
  int64_t lease = 0;
};

// One comparison of a transaction (etcd's Compare, the subset we use).
struct Compare {
  enum class Target { kVersion, kModRevision, kValue };
  enum class Result { kEqual, kNotEqual, kGreater, kLess };
  std::string key;
  Target target = Target::kVersion;
  Result result = Result::kEqual;
  int64_t number = 0;  // for kVersion / kModRevision
  std::string value;   // for kValue
};

// One operation of a transaction.
struct Op {
  enum class Kind { kPut, kDelete, kGet };
  Kind kind = Kind::kPut;
  std::string key;
  std::string value;
  int64_t lease = 0;
  static Op Put(std::string k, std::string v, int64_t lease = 0) { return {Kind::kPut, std::move(k), std::move(v), lease}; }
  static Op Delete(std::string k) { return {Kind::kDelete, std::move(k), {}, 0}; }
  static Op Get(std::string k) { return {Kind::kGet, std::move(k), {}, 0}; }
};

struct TxnResult {
  bool succeeded = false;
  int64_t revision = 0;  // the store's revision after the transaction
  // Results of kGet operations, in order (empty optional: key absent).
  std::vector<std::optional<KeyValue>> gets;
};

struct WatchEvent {
  enum class Type { kPut, kDelete };
  Type type = Type::kPut;
  KeyValue kv;
};

struct Options {
  // "http://HOST:PORT" or "HOST:PORT", at least one.
  std::vector<std::string> endpoints;
  // Per request, connection included.
  std::chrono::milliseconds timeout{2000};
};

// Parses "a:1,http://b:2" into endpoints.
Result<std::vector<std::string>> ParseEndpoints(const std::string& list);

class Watch;

class Client {
 public:
  static Result<std::unique_ptr<Client>> Create(const Options& options);
  ~Client();

  Result<std::optional<KeyValue>> Get(const std::string& key);
  // Every key with this prefix, in key order.
  Result<std::vector<KeyValue>> GetPrefix(const std::string& prefix);
  // Returns the revision after the put.
  Result<int64_t> Put(const std::string& key, const std::string& value, int64_t lease = 0);
  Status Delete(const std::string& key);
  Result<TxnResult> Txn(const std::vector<Compare>& compares, const std::vector<Op>& success,
                        const std::vector<Op>& failure);

  // A lease of ttl seconds (etcd raises it to its minimum, 2 s in 3.4).
  // Returns the lease id.
  Result<int64_t> LeaseGrant(int64_t ttl_seconds);
  // Refreshes a lease once; returns its TTL in seconds, or NotFound if the
  // lease has expired or was revoked.
  Result<int64_t> LeaseKeepAlive(int64_t lease);
  Status LeaseRevoke(int64_t lease);

  // Starts watching key (or every key under it, if prefix) from revision
  // start_revision (0: from now). Returns once etcd has confirmed the watch,
  // so that every change after the return is reported. on_event runs on the
  // watch's thread; on_error once if the stream breaks later (the caller
  // decides whether to watch again).
  Result<std::unique_ptr<Watch>> StartWatch(const std::string& key, bool prefix, int64_t start_revision,
                                            std::function<void(const WatchEvent&, int64_t revision)> on_event,
                                            std::function<void(const Status&)> on_error);

  const std::vector<std::string>& endpoints() const { return endpoints_; }

 private:
  friend class Watch;
  explicit Client(const Options& options);
  // POSTs body to path, trying each endpoint from the last good one; returns
  // the response body of a 200, or an error naming the endpoint and reason.
  Result<std::string> Post(const std::string& path, const std::string& body);

  struct Conn;
  const Options options_;
  std::vector<std::string> endpoints_;  // "HOST:PORT"
  Mutex mu_;
  size_t current_ GUARDED_BY(mu_) = 0;
  std::unique_ptr<Conn> conn_ GUARDED_BY(mu_);
};

// A running watch; destroying it stops the stream and joins its thread.
class Watch {
 public:
  ~Watch();
  void Stop();

 private:
  friend class Client;
  Watch() = default;
  struct State;
  std::shared_ptr<State> state_;
  std::thread thread_;
};

// The end of a prefix range ("/a/" -> "/a0"), as etcd's clientv3 computes it.
std::string PrefixEnd(const std::string& prefix);

}  // namespace replica::etcd
