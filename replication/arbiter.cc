#include "replication/arbiter.h"

#include <boost/json.hpp>

#include <algorithm>
#include <atomic>
#include <thread>

#include "base/log.h"
#include "base/numbers.h"
#include "base/mutex.h"
#include "base/thread_name.h"
#include "replication/etcd.h"

namespace replica {
namespace {

namespace json = boost::json;
using namespace std::chrono_literals;

Result<json::object> ParseObject(const std::string& text, const char* what) {
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) return Status::Corruption(std::string(what) + " is not a JSON object: " + text.substr(0, 200));
  return std::move(v.as_object());
}

// A count or LSN published in JSON; 0 (unknown) for anything that is not a
// number from 0 to 2^63 - 1. Such a value is described in *bad, if given.
uint64_t U64(const json::object& o, const char* f, std::string* bad = nullptr) {
  auto it = o.find(f);
  if (it == o.end()) return 0;
  const json::value& v = it->value();
  std::optional<uint64_t> n;
  if (v.is_uint64() && v.as_uint64() <= kMaxEpoch) n = v.as_uint64();
  if (v.is_int64() && v.as_int64() >= 0) n = static_cast<uint64_t>(v.as_int64());
  if (v.is_string()) n = ParseEpoch(v.as_string());
  if (!n && bad) {
    *bad += (bad->empty() ? "" : "; ") + std::string(f) + " is " + json::serialize(v).substr(0, 40) +
            ", not a whole number 0..2^63-1";
  }
  return n.value_or(0);
}

}  // namespace

std::optional<uint64_t> ParseEpoch(std::string_view text) {
  const auto v = ParseDecimal(text);
  if (!v || *v > kMaxEpoch) return std::nullopt;
  return v;
}

std::string OperatorRequest(const std::string& node, uint64_t epoch) { return node + "@" + std::to_string(epoch); }

std::pair<std::string, uint64_t> ParseOperatorRequest(const std::string& value) {
  const auto at = value.rfind('@');
  if (at == std::string::npos || at == 0) return {"", 0};
  const auto epoch = ParseEpoch(std::string_view(value).substr(at + 1));
  if (!epoch) return {"", 0};
  return {value.substr(0, at), *epoch};
}

namespace {

std::string S(const json::object& o, const char* f) {
  auto it = o.find(f);
  return it != o.end() && it->value().is_string() ? std::string(it->value().as_string()) : std::string();
}

class EtcdArbiter final : public Arbiter {
 public:
  explicit EtcdArbiter(EtcdArbiterOptions o) : opts_(std::move(o)), prefix_(ClusterPrefix(opts_.cluster)) {}
  ~EtcdArbiter() override { Stop(); }

  Status Init() {
    etcd::Options eo;
    eo.endpoints = opts_.endpoints;
    eo.timeout = opts_.request_timeout;
    REPLICA_ASSIGN_OR_RETURN(client_, etcd::Client::Create(eo));
    // The keep-alive has a client of its own, so that a slow request of the
    // engine never delays a renewal.
    REPLICA_ASSIGN_OR_RETURN(keepalive_client_, etcd::Client::Create(eo));
    return Status::OK();
  }

  Status Start(const NodeInfo& me) override {
    {
      MutexLock l(&mu_);
      me_ = me;
    }
    REPLICA_RETURN_IF_ERROR(NewSession());
    StartWatch();  // the first one before Start returns; the watch thread keeps one up after
    keepalive_ = NamedThread("etcd-keepalive", [this] { KeepAliveLoop(); });
    watcher_ = NamedThread("etcd-watch", [this] { WatchLoop(); });
    return Status::OK();
  }

  Status Publish(const NodeInfo& me) override {
    int64_t lease;
    {
      MutexLock l(&mu_);
      me_ = me;
      lease = lease_;
    }
    return client_->Put(NodeKey(me.id), me.ToJson(), lease).status();
  }

  Result<std::optional<ActiveInfo>> GetActive() override {
    REPLICA_ASSIGN_OR_RETURN(auto kv, client_->Get(prefix_ + "active"));
    if (!kv) return std::optional<ActiveInfo>();
    REPLICA_ASSIGN_OR_RETURN(ActiveInfo a, ActiveInfo::FromJson(kv->value));
    return std::optional<ActiveInfo>(std::move(a));
  }

  Result<std::vector<NodeInfo>> GetNodes() override {
    REPLICA_ASSIGN_OR_RETURN(auto kvs, client_->GetPrefix(prefix_ + "nodes/"));
    std::vector<NodeInfo> out;
    for (const auto& kv : kvs) {
      auto n = NodeInfo::FromJson(kv.value);
      if (n.ok()) out.push_back(std::move(n).value());
    }
    return out;
  }

  Result<std::vector<UnreadableSession>> GetUnreadableNodes() override {
    REPLICA_ASSIGN_OR_RETURN(auto kvs, client_->GetPrefix(prefix_ + "nodes/"));
    std::vector<UnreadableSession> out;
    for (const auto& kv : kvs) {
      auto n = NodeInfo::FromJson(kv.value);
      if (!n.ok()) out.push_back({kv.key.substr(std::min(kv.key.size(), prefix_.size() + 6)), n.status().ToString()});
    }
    return out;
  }

  Result<std::optional<uint64_t>> Campaign(const NodeInfo& me, uint64_t min_epoch) override {
    const std::string epoch_key = prefix_ + "epoch";
    REPLICA_ASSIGN_OR_RETURN(auto current, client_->Get(epoch_key));
    REPLICA_ASSIGN_OR_RETURN(uint64_t stored, StoredEpoch(current));
    if (std::max(stored, min_epoch) >= kMaxEpoch) {
      return Status::Corruption("epoch " + std::to_string(std::max(stored, min_epoch)) + " has no successor below 2^63");
    }
    const uint64_t epoch = std::max(stored, min_epoch) + 1;
    int64_t lease;
    {
      MutexLock l(&mu_);
      lease = lease_;
    }
    ActiveInfo a{me.id, me.address, epoch};
    std::vector<etcd::Compare> cmp = {
        {prefix_ + "active", etcd::Compare::Target::kVersion, etcd::Compare::Result::kEqual, 0, {}}};
    if (current) {
      cmp.push_back({epoch_key, etcd::Compare::Target::kModRevision, etcd::Compare::Result::kEqual,
                     current->mod_revision, {}});
    } else {
      cmp.push_back({epoch_key, etcd::Compare::Target::kVersion, etcd::Compare::Result::kEqual, 0, {}});
    }
    REPLICA_ASSIGN_OR_RETURN(auto r, client_->Txn(cmp,
                                                  {etcd::Op::Put(epoch_key, std::to_string(epoch)),
                                                   etcd::Op::Put(prefix_ + "active", a.ToJson(), lease)},
                                                  {}));
    if (!r.succeeded) return std::optional<uint64_t>();
    MutexLock l(&mu_);
    won_ = a.ToJson();
    won_lease_ = lease;  // the key lives exactly as long as this lease
    return std::optional<uint64_t>(epoch);
  }

  Result<uint64_t> GetEpoch() override {
    REPLICA_ASSIGN_OR_RETURN(auto kv, client_->Get(prefix_ + "epoch"));
    return StoredEpoch(kv);
  }

  Status Resign(const std::string& id) override {
    REPLICA_ASSIGN_OR_RETURN(auto kv, client_->Get(prefix_ + "active"));
    if (!kv) return Status::OK();
    // Another node's key is not this node's to free (a key that does not
    // parse is nobody's: it goes).
    if (auto holder = ActiveInfo::FromJson(kv->value); holder.ok() && holder->id != id) return Status::OK();
    REPLICA_ASSIGN_OR_RETURN(auto r, client_->Txn({{prefix_ + "active", etcd::Compare::Target::kModRevision,
                                                    etcd::Compare::Result::kEqual, kv->mod_revision, {}}},
                                                  {etcd::Op::Delete(prefix_ + "active")}, {}));
    (void)r;
    return Status::OK();
  }

  Status PublishSyncSet(const std::vector<std::string>& ids) override {
    json::array a;
    for (const auto& id : ids) a.push_back(json::string(id));
    std::string won;
    {
      MutexLock l(&mu_);
      won = won_;
    }
    // Only while the active key is still the one this node won: a deposed
    // active must never overwrite its successor's set.
    REPLICA_ASSIGN_OR_RETURN(auto r, client_->Txn({{prefix_ + "active", etcd::Compare::Target::kValue,
                                                    etcd::Compare::Result::kEqual, 0, won}},
                                                  {etcd::Op::Put(prefix_ + "sync", json::serialize(a))}, {}));
    if (won.empty() || !r.succeeded) {
      return Status::NotActive("the active key in etcd no longer names this node; the sync set is not its to publish");
    }
    return Status::OK();
  }

  Result<std::optional<std::vector<std::string>>> GetSyncSet() override {
    REPLICA_ASSIGN_OR_RETURN(auto kv, client_->Get(prefix_ + "sync"));
    if (!kv) return std::optional<std::vector<std::string>>();
    boost::system::error_code ec;
    json::value v = json::parse(kv->value, ec);
    if (ec || !v.is_array()) return Status::Corruption("etcd key " + prefix_ + "sync is not a JSON array");
    std::vector<std::string> out;
    for (const auto& e : v.as_array()) {
      if (e.is_string()) out.emplace_back(e.as_string());
    }
    return std::optional<std::vector<std::string>>(std::move(out));
  }

  Result<std::vector<std::pair<std::string, std::string>>> GetControls() override {
    REPLICA_ASSIGN_OR_RETURN(auto kvs, client_->GetPrefix(prefix_ + "ctl/"));
    std::vector<std::pair<std::string, std::string>> out;
    for (auto& kv : kvs) out.emplace_back(kv.key.substr(prefix_.size() + 4), std::move(kv.value));
    return out;
  }

  Status PutControl(const std::string& name, const std::string& value) override {
    return client_->Put(prefix_ + "ctl/" + name, value).status();
  }

  Status ClearControl(const std::string& name) override { return client_->Delete(prefix_ + "ctl/" + name); }

  Clock::time_point LeaseDeadline() const override {
    return Clock::time_point(Clock::duration(deadline_.load()));
  }

  bool WonLeaseCurrent() const override {
    MutexLock l(&mu_);
    return won_lease_ == 0 || won_lease_ == lease_;
  }

  uint64_t changes() const override {
    MutexLock l(&mu_);
    return changes_;
  }

  void Kick() override {
    MutexLock l(&mu_);
    ++changes_;
    cv_.SignalAll();
  }

  void WaitForChange(uint64_t seen, Clock::time_point deadline) override {
    MutexLock l(&mu_);
    while (changes_ == seen && !stopping_) {
      if (!cv_.WaitUntil(deadline) && Clock::now() >= deadline) break;
    }
  }

  void Stop() override {
    {
      MutexLock l(&mu_);
      if (stopping_) return;
      stopping_ = true;
      cv_.SignalAll();
    }
    if (keepalive_.joinable()) keepalive_.join();
    if (watcher_.joinable()) watcher_.join();
    std::unique_ptr<etcd::Watch> pending;
    {
      MutexLock l(&mu_);
      pending = std::move(pending_watch_);
    }
    pending.reset();  // its callbacks take mu_: stopped outside it
    int64_t lease;
    {
      MutexLock l(&mu_);
      lease = lease_;
    }
    if (lease != 0 && keepalive_client_) (void)keepalive_client_->LeaseRevoke(lease);
  }

 private:
  std::string NodeKey(const std::string& id) const { return prefix_ + "nodes/" + id; }

  // The value of the epoch key (0 when absent).
  Result<uint64_t> StoredEpoch(const std::optional<etcd::KeyValue>& kv) const {
    if (!kv) return uint64_t{0};
    if (auto e = ParseEpoch(kv->value)) return *e;
    return Status::Corruption("etcd key " + prefix_ + "epoch holds '" + kv->value +
                              "', not an epoch (decimal digits, below 2^63): no election can be held until an "
                              "operator corrects it");
  }

  Status NewSession() {
    const auto sent = Clock::now();
    REPLICA_ASSIGN_OR_RETURN(int64_t lease, keepalive_client_->LeaseGrant(opts_.lease_ttl.count()));
    NodeInfo me;
    {
      MutexLock l(&mu_);
      lease_ = lease;
      me = me_;
      // An active key won under the old lease is gone with it: whoever
      // waits for a change looks again (the engine steps down).
      ++changes_;
      cv_.SignalAll();
    }
    REPLICA_RETURN_IF_ERROR(keepalive_client_->Put(NodeKey(me.id), me.ToJson(), lease).status());
    deadline_.store((sent + opts_.lease_ttl - opts_.safety_margin).time_since_epoch().count());
    return Status::OK();
  }

  void StartWatch() {
    // The whole cluster prefix, but only the active key and operator
    // requests (ctl/) count as changes: sessions are republished all the
    // time, and a request such as a switchover is acted on at once.
    auto w = client_->StartWatch(
        prefix_, true, 0,
        [this](const etcd::WatchEvent& e, int64_t) {
          const std::string_view key(e.kv.key);
          if (key != prefix_ + "active" && key.rfind(prefix_ + "ctl/", 0) != 0) return;
          MutexLock l(&mu_);
          ++changes_;
          cv_.SignalAll();
        },
        [this](const Status& st) {
          MutexLock l(&mu_);
          watch_broken_ = true;
          ++changes_;  // whoever waits looks again
          cv_.SignalAll();
        });
    MutexLock l(&mu_);
    if (w.ok()) {
      pending_watch_ = std::move(w).value();
      watch_broken_ = false;
    } else {
      watch_broken_ = true;
    }
  }

  // Keeps a watch up: starts a new one whenever the last one broke. On a
  // thread of its own, because starting one waits for etcd to confirm it,
  // up to the request timeout, which would delay the lease's renewals.
  void WatchLoop() {
    std::unique_ptr<etcd::Watch> current;
    for (;;) {
      std::unique_ptr<etcd::Watch> next;
      {
        MutexLock l(&mu_);
        while (!stopping_ && !pending_watch_ && !watch_broken_) cv_.Wait();
        if (stopping_) break;
        next = std::move(pending_watch_);
      }
      if (next) {
        current = std::move(next);  // the broken one, if any, is stopped here, outside mu_
        continue;
      }
      current.reset();
      StartWatch();
      MutexLock l(&mu_);
      if (watch_broken_ && !stopping_) cv_.WaitUntil(Clock::now() + std::chrono::milliseconds(200));  // etcd refused
    }
    current.reset();  // its callbacks take mu_
  }

  void KeepAliveLoop() {
    // Often, so that the last renewal that got through is recent when etcd
    // stalls (a leader election): the lease deadline counts from it.
    const auto every = std::max<Clock::duration>(std::chrono::milliseconds(100), opts_.lease_ttl / 8);
    for (;;) {
      {
        MutexLock l(&mu_);
        cv_.WaitUntil(Clock::now() + every);
        if (stopping_) return;
      }
      int64_t lease;
      {
        MutexLock l(&mu_);
        lease = lease_;
      }
      const auto sent = Clock::now();
      auto ttl = keepalive_client_->LeaseKeepAlive(lease);
      if (ttl.ok()) {
        deadline_.store((sent + opts_.lease_ttl - opts_.safety_margin).time_since_epoch().count());
      } else if (ttl.status().IsNotFound()) {
        RLOG(kWarn, "arbiter.lease_lost") << "lease=" << lease << " (taking a new one)";
        Status st = NewSession();
        if (!st.ok()) RLOG(kWarn, "arbiter.session_failed") << "error=\"" << st.ToString() << "\"";
      } else {
        RLOG(kDebug, "arbiter.keepalive_failed") << "error=\"" << ttl.status().ToString() << "\"";
      }
    }
  }

  const EtcdArbiterOptions opts_;
  const std::string prefix_;
  std::unique_ptr<etcd::Client> client_;
  std::unique_ptr<etcd::Client> keepalive_client_;
  std::atomic<Clock::rep> deadline_{0};
  mutable Mutex mu_;
  CondVar cv_{&mu_};
  NodeInfo me_ GUARDED_BY(mu_);
  int64_t lease_ GUARDED_BY(mu_) = 0;
  std::string won_ GUARDED_BY(mu_);  // the active key's value this node last wrote
  int64_t won_lease_ GUARDED_BY(mu_) = 0;  // the lease that key was put under
  uint64_t changes_ GUARDED_BY(mu_) = 0;
  bool stopping_ GUARDED_BY(mu_) = false;
  bool watch_broken_ GUARDED_BY(mu_) = false;
  std::unique_ptr<etcd::Watch> pending_watch_ GUARDED_BY(mu_);  // started, for the watch thread to hold
  std::thread keepalive_;
  std::thread watcher_;
};

}  // namespace

std::string ClusterPrefix(const std::string& cluster) { return "/replica/" + cluster + "/"; }

SyncEntry SyncEntry::Parse(const std::string& text) {
  const size_t hash = text.find('#');
  if (hash == std::string::npos) return SyncEntry{text, ""};
  return SyncEntry{text.substr(0, hash), text.substr(hash + 1)};
}

bool SyncListed(const std::vector<std::string>& entries, const std::string& id, const std::string& incarnation) {
  return std::any_of(entries.begin(), entries.end(), [&](const std::string& e) {
    const SyncEntry s = SyncEntry::Parse(e);
    return s.id == id && (s.incarnation.empty() || s.incarnation == incarnation);
  });
}

std::string NodeInfo::ToJson() const {
  json::object o{{"id", id},
                 {"address", address},
                 {"client_address", client_address},
                 {"role", role},
                 {"epoch", epoch},
                 {"last_lsn", last_lsn},
                 {"durable_lsn", durable_lsn},
                 {"applied_lsn", applied_lsn}};
  // Maps of node id to a number, left out when empty.
  auto put_map = [&](const char* name, const std::map<std::string, uint64_t>& m) {
    if (m.empty()) return;
    json::object v;
    for (const auto& [k, n] : m) v[k] = n;
    o[name] = std::move(v);
  };
  put_map("standby_lag_ms", standby_lag_ms);
  put_map("standby_lag_bytes", standby_lag_bytes);
  put_map("slots", slots);
  o["commit"] = commit;
  o["wal_first_lsn"] = wal_first_lsn;
  o["wal_bytes"] = wal_bytes;
  o["db_bytes"] = db_bytes;
  o["resyncs"] = resyncs;
  if (!progress.empty()) o["progress"] = progress;
  if (!failure.empty()) o["failure"] = failure;
  if (final_epoch != 0) o["final_epoch"] = final_epoch;
  if (!incarnation.empty()) o["incarnation"] = incarnation;
  return json::serialize(o);
}

Result<NodeInfo> NodeInfo::FromJson(const std::string& text) {
  REPLICA_ASSIGN_OR_RETURN(json::object o, ParseObject(text, "a node session"));
  NodeInfo n;
  n.id = S(o, "id");
  n.address = S(o, "address");
  n.client_address = S(o, "client_address");
  n.role = S(o, "role");
  std::string* bad = &n.unreadable;
  n.epoch = U64(o, "epoch", bad);
  n.last_lsn = U64(o, "last_lsn", bad);
  n.durable_lsn = U64(o, "durable_lsn", bad);
  n.applied_lsn = U64(o, "applied_lsn", bad);
  auto u64_map = [&](const char* name, std::map<std::string, uint64_t>* out) {
    auto it = o.find(name);
    if (it == o.end() || !it->value().is_object()) return;
    for (const auto& [id, v] : it->value().as_object()) {
      if (v.is_uint64()) (*out)[std::string(id)] = v.as_uint64();
      if (v.is_int64()) (*out)[std::string(id)] = static_cast<uint64_t>(std::max<int64_t>(0, v.as_int64()));
    }
  };
  u64_map("standby_lag_ms", &n.standby_lag_ms);
  u64_map("slots", &n.slots);
  u64_map("standby_lag_bytes", &n.standby_lag_bytes);
  n.commit = S(o, "commit");
  n.wal_first_lsn = U64(o, "wal_first_lsn", bad);
  n.wal_bytes = U64(o, "wal_bytes", bad);
  n.db_bytes = U64(o, "db_bytes", bad);
  n.resyncs = U64(o, "resyncs", bad);
  n.progress = S(o, "progress");
  n.failure = S(o, "failure");
  n.final_epoch = U64(o, "final_epoch", bad);
  n.incarnation = S(o, "incarnation");
  if (n.id.empty()) return Status::Corruption("a node session without an id");
  return n;
}

std::string ActiveInfo::ToJson() const {
  return json::serialize(json::object{{"id", id}, {"address", address}, {"epoch", epoch}});
}

Result<ActiveInfo> ActiveInfo::FromJson(const std::string& text) {
  REPLICA_ASSIGN_OR_RETURN(json::object o, ParseObject(text, "the active key"));
  ActiveInfo a{S(o, "id"), S(o, "address"), U64(o, "epoch")};
  if (a.id.empty() || a.address.empty()) return Status::Corruption("the active key lacks an id or address");
  return a;
}

Result<std::unique_ptr<Arbiter>> NewEtcdArbiter(const EtcdArbiterOptions& options) {
  if (options.lease_ttl < std::chrono::seconds(2)) {
    return Status::InvalidArgument("lease TTL must be at least 2 s (etcd's minimum)");
  }
  if (options.safety_margin < std::chrono::milliseconds(0) || options.safety_margin >= options.lease_ttl) {
    return Status::InvalidArgument("the fence margin must be at least 0 and shorter than the lease TTL");
  }
  auto a = std::make_unique<EtcdArbiter>(options);
  REPLICA_RETURN_IF_ERROR(a->Init());
  return std::unique_ptr<Arbiter>(std::move(a));
}

}  // namespace replica
