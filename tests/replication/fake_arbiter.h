// FakeArbiter: an in-memory stand-in for etcd, for unit tests only. Several
// engines share one FakeCluster; the test decides when a lease ends
// (ExpireLease), so role changes happen exactly when the test says.
#pragma once

#include <algorithm>
#include <map>
#include <optional>

#include "base/mutex.h"
#include "replication/arbiter.h"

namespace replica::test {

class FakeCluster {
 public:
  // Ends a node's lease: its session and, if it holds it, the active key go.
  void ExpireLease(const std::string& id) {
    MutexLock l(&mu_);
    lease_ok_[id] = false;
    nodes_.erase(id);
    if (active_ && active_->id == id) active_.reset();
    Changed();
  }
  // A new lease for a node whose lease ended (its keepalive got through
  // again): its deadline is in the future again, but an active key it held
  // went with the old lease.
  void RegrantLease(const std::string& id) {
    MutexLock l(&mu_);
    lease_ok_[id] = true;
    ++lease_gen_[id];
    if (auto it = last_published_.find(id); it != last_published_.end()) nodes_[id] = it->second;  // as etcd's NewSession puts it
  }
  // Cuts a node off from the arbiter, or reconnects it: while cut off, every
  // call but the lease's own (LeaseDeadline, WonLeaseCurrent) fails.
  void SetReachable(const std::string& id, bool reachable) {
    MutexLock l(&mu_);
    unreachable_[id] = !reachable;
  }
  std::optional<ActiveInfo> active() {
    MutexLock l(&mu_);
    return active_;
  }
  // The listed node ids (entries are ID#INCARNATION: SyncEntry).
  std::optional<std::vector<std::string>> sync() {
    MutexLock l(&mu_);
    if (!sync_) return std::nullopt;
    std::vector<std::string> ids;
    for (const auto& e : *sync_) ids.push_back(SyncEntry::Parse(e).id);
    return ids;
  }
  std::optional<std::vector<std::string>> sync_entries() {
    MutexLock l(&mu_);
    return sync_;
  }
  // While held, writes of the sync set wait (etcd slow to answer).
  void HoldSyncPublishes(bool hold) {
    MutexLock l(&mu_);
    hold_sync_ = hold;
    hold_cv_.SignalAll();
  }

 private:
  friend class FakeArbiter;
  void Changed() REQUIRES(mu_) {
    ++changes_;
    cv_.SignalAll();
  }
  Mutex mu_;
  CondVar cv_{&mu_};
  std::optional<ActiveInfo> active_ GUARDED_BY(mu_);
  uint64_t epoch_ GUARDED_BY(mu_) = 0;
  std::map<std::string, NodeInfo> nodes_ GUARDED_BY(mu_);
  std::map<std::string, bool> lease_ok_ GUARDED_BY(mu_);
  std::map<std::string, uint64_t> lease_gen_ GUARDED_BY(mu_);  // bumped by RegrantLease
  std::map<std::string, NodeInfo> last_published_ GUARDED_BY(mu_);
  std::map<std::string, bool> unreachable_ GUARDED_BY(mu_);
  std::optional<std::vector<std::string>> sync_ GUARDED_BY(mu_);
  bool hold_sync_ GUARDED_BY(mu_) = false;
  CondVar hold_cv_{&mu_};
  std::map<std::string, std::string> ctl_ GUARDED_BY(mu_);
  uint64_t changes_ GUARDED_BY(mu_) = 0;
};

class FakeArbiter final : public Arbiter {
 public:
  FakeArbiter(FakeCluster* c, std::string id) : c_(c), id_(std::move(id)) {}
  Status Start(const NodeInfo& me) override {
    MutexLock l(&c_->mu_);
    c_->lease_ok_[id_] = true;
    c_->nodes_[id_] = me;
    c_->last_published_[id_] = me;
    return Status::OK();
  }
  Status Publish(const NodeInfo& me) override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    if (c_->lease_ok_[id_]) c_->nodes_[id_] = me;
    c_->last_published_[id_] = me;
    return Status::OK();
  }
  Result<std::optional<ActiveInfo>> GetActive() override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    return c_->active_;
  }
  Result<std::vector<NodeInfo>> GetNodes() override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    std::vector<NodeInfo> out;
    for (const auto& [_, n] : c_->nodes_) out.push_back(n);
    return out;
  }
  Result<std::optional<uint64_t>> Campaign(const NodeInfo& me, uint64_t min_epoch) override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    if (c_->active_ || !c_->lease_ok_[id_]) return std::optional<uint64_t>();
    c_->epoch_ = std::max(c_->epoch_, min_epoch) + 1;
    c_->active_ = ActiveInfo{me.id, me.address, c_->epoch_};
    won_epoch_ = c_->epoch_;
    won_gen_ = c_->lease_gen_[id_];
    c_->Changed();
    return std::optional<uint64_t>(c_->epoch_);
  }
  Result<uint64_t> GetEpoch() override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    return c_->epoch_;
  }
  Status Resign(const std::string& id) override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    if (c_->active_ && c_->active_->id == id) {
      c_->active_.reset();
      c_->Changed();
    }
    return Status::OK();
  }
  Status PublishSyncSet(const std::vector<std::string>& ids) override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    while (c_->hold_sync_) c_->hold_cv_.Wait();
    if (!c_->active_ || c_->active_->id != id_ || c_->active_->epoch != won_epoch_) {
      return Status::NotActive("the active key is not the one this node won");
    }
    c_->sync_ = ids;
    return Status::OK();
  }
  Result<std::optional<std::vector<std::string>>> GetSyncSet() override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    return c_->sync_;
  }
  Result<std::vector<std::pair<std::string, std::string>>> GetControls() override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    return std::vector<std::pair<std::string, std::string>>(c_->ctl_.begin(), c_->ctl_.end());
  }
  Status PutControl(const std::string& name, const std::string& value) override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    c_->ctl_[name] = value;
    return Status::OK();
  }
  Status ClearControl(const std::string& name) override {
    MutexLock l(&c_->mu_);
    if (c_->unreachable_[id_]) return Unreachable();
    c_->ctl_.erase(name);
    return Status::OK();
  }
  Clock::time_point LeaseDeadline() const override {
    MutexLock l(&c_->mu_);
    auto it = c_->lease_ok_.find(id_);
    return it != c_->lease_ok_.end() && it->second ? Clock::now() + std::chrono::hours(1)
                                                   : Clock::now() - std::chrono::seconds(1);
  }
  bool WonLeaseCurrent() const override {
    MutexLock l(&c_->mu_);
    auto it = c_->lease_gen_.find(id_);
    return won_gen_ == (it == c_->lease_gen_.end() ? 0 : it->second);
  }
  uint64_t changes() const override {
    MutexLock l(&c_->mu_);
    return c_->changes_;
  }
  void WaitForChange(uint64_t since, Clock::time_point deadline) override {
    MutexLock l(&c_->mu_);
    while (c_->changes_ == since && Clock::now() < deadline) c_->cv_.WaitUntil(deadline);
  }
  void Kick() override {
    MutexLock l(&c_->mu_);
    c_->Changed();
  }
  void Stop() override { c_->ExpireLease(id_); }

 private:
  static Status Unreachable() { return Status::IOError("the arbiter cannot be reached (test)"); }
  FakeCluster* c_;
  std::string id_;
  uint64_t won_epoch_ = 0;  // guarded by c_->mu_
  uint64_t won_gen_ = 0;    // the lease generation won_epoch_ was won under; guarded by c_->mu_
};

}  // namespace replica::test
