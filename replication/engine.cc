// The replication engine (static mode): the active logs, ships and applies;
// standbys copy the log byte for byte and apply it (docs/replication.md).
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <map>
#include <thread>

#include "base/coding.h"
#include "base/log.h"
#include "base/mutex.h"
#include "replica/engine.h"
#include "transport/transport.h"
#include "wal/wal.h"

namespace replica {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr char kMetaColumnFamily[] = "replica_meta";
constexpr char kAppliedKey[] = "applied_lsn";
constexpr size_t kMaxShipBytes = 1u << 20;
constexpr size_t kMaxApplyRecords = 256;

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::OK();
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  return Status::IOError(what + ": " + s.ToString());
}

// One connected standby, as the active sees it.
struct Standby {
  std::shared_ptr<transport::Session> session;
  std::string id;
  std::string address;
  wal::Lsn flushed = 0;  // guarded by EngineImpl::mu_
  wal::Lsn applied = 0;  // guarded by EngineImpl::mu_
  // Last LSN shipped on this session: acks are never credited beyond it.
  std::atomic<wal::Lsn> shipped{0};
  std::atomic<bool> done{false};  // the shipper thread has returned
  // When its flushed LSN last reached the active's last LSN (lag in time).
  std::chrono::steady_clock::time_point caught_up_at = std::chrono::steady_clock::now();  // mu_
  std::atomic<bool> stop{false};
  std::thread shipper;
  Mutex writable_mu;
  CondVar writable_cv{&writable_mu};
};

// Lock order: EngineImpl::mu_ before Wal's internal lock (the Wal never calls
// back). Handler callbacks run on transport I/O threads and never block on
// anything but mu_ and the WAL.
class EngineImpl final : public Engine, public transport::Handler {
 public:
  explicit EngineImpl(EngineOptions o) : opts_(std::move(o)) {}
  ~EngineImpl() override { (void)Close(); }
  Status Init();

  Result<uint64_t> Write(const WriteBatch& batch) override;
  Result<std::optional<std::string>> Get(const std::string& key) override;
  Result<std::vector<std::pair<std::string, std::string>>> Scan(const std::string& start, size_t limit) override;
  Status WaitForApplied(uint64_t lsn, std::chrono::milliseconds timeout) override;
  Result<int> WaitForReplicas(uint64_t lsn, int count, std::chrono::milliseconds timeout) override;
  EngineStatus status() const override;
  Status SetCommitRule(const CommitRule& rule) override;
  std::string PrometheusMetrics() const override;
  uint16_t listen_port() const override { return port_; }
  Status Close() override;
  void Interrupt() override;

  void OnEstablished(const std::shared_ptr<transport::Session>& s) override;
  void OnControl(const std::shared_ptr<transport::Session>& s, const proto::Control& msg) override;
  void OnData(const std::shared_ptr<transport::Session>& s, std::string_view payload) override;
  void OnWritable(const std::shared_ptr<transport::Session>& s) override;
  void OnClosed(const std::shared_ptr<transport::Session>& s, const Status& why) override;
  void FillHeartbeat(proto::Heartbeat* hb) override;

 private:
  void ApplierLoop();
  void ShipperLoop(std::shared_ptr<Standby> standby, wal::Lsn from);
  void FollowerLoop();
  void AdvanceCommit() REQUIRES(mu_);
  wal::Lsn ComputeCommit() REQUIRES(mu_);
  void SendAck(const std::shared_ptr<transport::Session>& s);
  // The last LSN that may be applied or counted as committed locally: durable
  // in the WAL, so RocksDB never gets ahead of the log (under wal_sync
  // "none" nothing is promised: the last written LSN).
  wal::Lsn LocalDurable() const {
    return wal_->options().sync_policy == wal::SyncPolicy::kNone ? wal_->last_lsn() : wal_->durable_lsn();
  }
  void SendSubscribe(const std::shared_ptr<transport::Session>& s);
  void OnSubscribe(const std::shared_ptr<transport::Session>& s, const proto::Subscribe& msg);
  // Credits a standby's flushed/applied LSNs (from an ack or a heartbeat),
  // never beyond what was shipped to it on this session.
  void Credit(const transport::Session* s, wal::Lsn flushed, wal::Lsn applied) EXCLUDES(mu_);
  std::shared_ptr<Standby> FindBySession(const transport::Session* s) REQUIRES(mu_);
  Status ValidateRule(const CommitRule& rule) const;
  Status ApplyRecords(const std::vector<std::pair<wal::Lsn, std::string>>& records, wal::Lsn last);

  const EngineOptions opts_;
  std::unique_ptr<wal::Wal> wal_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;  // default, meta
  std::unique_ptr<transport::Endpoint> endpoint_;
  uint16_t port_ = 0;
  std::atomic<Role> role_{Role::kStandby};
  wal::Epoch epoch_ = 1;

  mutable Mutex mu_;
  CondVar cv_{&mu_};  // applied_lsn_, commit_lsn_, acks, upstream, closing_
  wal::Lsn applied_lsn_ GUARDED_BY(mu_) = 0;
  wal::Lsn commit_lsn_ GUARDED_BY(mu_) = 0;
  CommitRule rule_ GUARDED_BY(mu_);
  bool degraded_ GUARDED_BY(mu_) = false;  // async fallback after a commit timeout
  wal::Lsn degraded_at_ GUARDED_BY(mu_) = 0;  // the local LSN when it fell back
  uint64_t fallbacks_ GUARDED_BY(mu_) = 0;
  std::atomic<uint64_t> refused_{0};
  bool closing_ GUARDED_BY(mu_) = false;   // Interrupt or Close began
  bool close_started_ GUARDED_BY(mu_) = false;
  std::atomic<bool> db_closed_{false};
  Status apply_error_ GUARDED_BY(mu_);
  // Keyed by node id: a reconnecting standby replaces its old session, so one
  // node is never counted twice toward the commit rule.
  std::map<std::string, std::shared_ptr<Standby>> standbys_ GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Standby>> finished_ GUARDED_BY(mu_);  // shippers to join
  std::shared_ptr<transport::Session> upstream_ GUARDED_BY(mu_);     // standby: to the active

  std::thread applier_;
  std::thread follower_;
};

Status EngineImpl::Init() {
  if (opts_.node_id.empty()) return Status::InvalidArgument("node_id is required");
  if (opts_.data_dir.empty()) return Status::InvalidArgument("data_dir is required");
  if (opts_.secret.empty()) return Status::InvalidArgument("the cluster secret is required");
  if (opts_.commit_fallback != "strict" && opts_.commit_fallback != "async") {
    return Status::InvalidArgument("commit_fallback '" + opts_.commit_fallback + "': expected strict or async");
  }
  REPLICA_RETURN_IF_ERROR(ValidateRule(opts_.commit));
  {
    MutexLock l(&mu_);
    rule_ = opts_.commit;
  }
  wal::Options wo;
  if (!wal::ParseSyncPolicy(opts_.wal_sync, &wo.sync_policy)) {
    return Status::InvalidArgument("wal_sync '" + opts_.wal_sync + "': expected every, interval or none");
  }
  wo.segment_size = opts_.wal_segment_size;
  REPLICA_RETURN_IF_ERROR(Env::Default()->CreateDirIfMissing(opts_.data_dir));
  REPLICA_ASSIGN_OR_RETURN(wal_, wal::Wal::Open(JoinPath(opts_.data_dir, "wal"), wo));

  rocksdb::Options ro;
  ro.create_if_missing = true;
  ro.create_missing_column_families = true;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {kMetaColumnFamily, rocksdb::ColumnFamilyOptions()}};
  rocksdb::DB* raw = nullptr;
  const std::string db_path = JoinPath(opts_.data_dir, "db");
  REPLICA_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(ro, db_path, cfs, &handles_, &raw), "open RocksDB " + db_path));
  db_.reset(raw);

  std::string v;
  auto s = db_->Get(rocksdb::ReadOptions(), handles_[1], kAppliedKey, &v);
  wal::Lsn applied = 0;
  if (s.ok() && v.size() == 8) {
    applied = DecodeFixed64(v.data());
  } else if (!s.IsNotFound()) {
    return FromRocks(s.ok() ? rocksdb::Status::Corruption("bad applied_lsn") : s, "read applied LSN");
  }
  if (applied > wal_->last_lsn()) {
    return Status::Corruption("RocksDB has applied LSN " + std::to_string(applied) + " but the WAL ends at LSN " +
                              std::to_string(wal_->last_lsn()));
  }
  if (applied + 1 < wal_->first_lsn()) {
    return Status::Corruption("the WAL starts at LSN " + std::to_string(wal_->first_lsn()) +
                              " but RocksDB has applied only up to LSN " + std::to_string(applied));
  }
  {
    MutexLock l(&mu_);
    applied_lsn_ = applied;
    commit_lsn_ = applied;
  }
  role_ = opts_.follow.empty() ? Role::kActive : Role::kStandby;
  epoch_ = std::max<wal::Epoch>(1, wal_->last_epoch());

  transport::Options to;
  to.node_id = opts_.node_id;
  to.cluster = opts_.cluster;
  to.secret = opts_.secret;
  REPLICA_ASSIGN_OR_RETURN(endpoint_, transport::Endpoint::Create(to, this));
  REPLICA_ASSIGN_OR_RETURN(port_, endpoint_->Listen(opts_.listen_host, opts_.listen_port));
  RLOG(kInfo, "engine.open") << "node=" << opts_.node_id << " role=" << RoleName(role_.load()) << " epoch=" << epoch_
                             << " last_lsn=" << wal_->last_lsn() << " applied_lsn=" << applied
                             << " listen=" << opts_.listen_host << ":" << port_ << " commit=" << opts_.commit.ToString()
                             << " fallback=" << opts_.commit_fallback;
  applier_ = std::thread([this] { ApplierLoop(); });
  if (role_ == Role::kStandby) follower_ = std::thread([this] { FollowerLoop(); });
  if (opts_.on_role_change) opts_.on_role_change(role_.load());
  return Status::OK();
}

wal::Lsn EngineImpl::ComputeCommit() {
  const wal::Lsn local = LocalDurable();
  if (rule_.mode == CommitRule::Mode::kAsync) return local;
  std::vector<wal::Lsn> remote;
  for (const auto& [_, sb] : standbys_) {
    remote.push_back(rule_.mode == CommitRule::Mode::kRemoteWrite ? sb->flushed : sb->applied);
  }
  if (remote.size() < static_cast<size_t>(rule_.count)) {
    return degraded_ ? local : commit_lsn_;  // too few standbys to judge the rule
  }
  std::sort(remote.begin(), remote.end(), std::greater<>());
  const wal::Lsn by_rule = std::min(local, remote[static_cast<size_t>(rule_.count) - 1]);
  if (degraded_ && by_rule >= degraded_at_) {
    // The standbys hold everything up to where the fallback began: the rule
    // applies again. Under a load they cannot follow, later writes wait for
    // them again (or time out and fall back again, logged and counted).
    degraded_ = false;
    RLOG(kWarn, "engine.commit_restored") << "node=" << opts_.node_id << " rule=" << rule_.ToString()
                                          << " lsn=" << local;
  }
  return degraded_ ? local : std::max(by_rule, commit_lsn_);
}

Status EngineImpl::ValidateRule(const CommitRule& rule) const {
  if (rule.mode != CommitRule::Mode::kAsync && (rule.count < 1 || rule.count > 999)) {
    return Status::InvalidArgument("commit rule " + rule.ToString() + ": N must be 1..999");
  }
  return Status::OK();
}

Status EngineImpl::SetCommitRule(const CommitRule& rule) {
  REPLICA_RETURN_IF_ERROR(ValidateRule(rule));
  MutexLock l(&mu_);
  RLOG(kInfo, "engine.commit_rule") << "node=" << opts_.node_id << " from=" << rule_.ToString()
                                    << " to=" << rule.ToString();
  rule_ = rule;
  AdvanceCommit();
  cv_.SignalAll();
  return Status::OK();
}

void EngineImpl::AdvanceCommit() {
  wal::Lsn c = ComputeCommit();
  if (c > commit_lsn_) {
    commit_lsn_ = c;
    cv_.SignalAll();
  }
}

Result<uint64_t> EngineImpl::Write(const WriteBatch& batch) {
  if (role_.load() != Role::kActive) {
    return Status::NotActive("node " + opts_.node_id + " is a standby; the active is at " + opts_.follow);
  }
  if (batch.empty()) return Status::InvalidArgument("empty write batch");
  {
    MutexLock l(&mu_);
    if (closing_) return Status::Aborted("the engine is shutting down");
  }
  REPLICA_ASSIGN_OR_RETURN(wal::Lsn lsn, wal_->Append(epoch_, wal::RecordType::kData, batch.Encode()));
  MutexLock l(&mu_);
  AdvanceCommit();
  // After-sync: acknowledged only once applied, which waits for the commit rule.
  auto deadline = Clock::now() + opts_.commit_timeout;
  bool warned = false;
  while (applied_lsn_ < lsn && !closing_ && apply_error_.ok()) {
    if (commit_lsn_ >= lsn) {
      cv_.Wait();  // committed; the applier signals once it is applied
      continue;
    }
    if (cv_.WaitUntil(deadline) || Clock::now() < deadline) continue;
    if (opts_.commit_fallback == "async") {
      if (!degraded_) {
        degraded_ = true;
        degraded_at_ = wal_->last_lsn();
        ++fallbacks_;
        RLOG(kWarn, "engine.commit_fallback") << "node=" << opts_.node_id << " rule=" << rule_.ToString()
                                              << " lsn=" << lsn << " waited_ms=" << opts_.commit_timeout.count()
                                              << " standbys=" << standbys_.size() << " (acknowledging as async)";
      }
      AdvanceCommit();
    } else if (!warned) {
      warned = true;  // strict: keep waiting, say so once per write
      RLOG(kWarn, "engine.commit_waiting") << "node=" << opts_.node_id << " rule=" << rule_.ToString()
                                           << " lsn=" << lsn << " waited_ms=" << opts_.commit_timeout.count()
                                           << " standbys=" << standbys_.size();
    }
    deadline = Clock::now() + opts_.commit_timeout;
  }
  if (!apply_error_.ok()) return apply_error_;
  if (applied_lsn_ < lsn) return Status::Aborted("the engine is closing");
  return lsn;
}

Result<std::optional<std::string>> EngineImpl::Get(const std::string& key) {
  if (db_closed_.load()) return Status::Aborted("the engine is closed");
  std::string value;
  auto s = db_->Get(rocksdb::ReadOptions(), handles_[0], key, &value);
  if (s.IsNotFound()) return std::optional<std::string>();
  REPLICA_RETURN_IF_ERROR(FromRocks(s, "get"));
  return std::optional<std::string>(std::move(value));
}

Result<std::vector<std::pair<std::string, std::string>>> EngineImpl::Scan(const std::string& start, size_t limit) {
  if (db_closed_.load()) return Status::Aborted("the engine is closed");
  std::vector<std::pair<std::string, std::string>> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[0]));
  for (it->Seek(start); it->Valid() && out.size() < limit; it->Next()) {
    out.emplace_back(it->key().ToString(), it->value().ToString());
  }
  REPLICA_RETURN_IF_ERROR(FromRocks(it->status(), "scan"));
  return out;
}

Result<int> EngineImpl::WaitForReplicas(uint64_t lsn, int count, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  MutexLock l(&mu_);
  for (;;) {
    int have = 0;
    for (const auto& [_, sb] : standbys_) have += sb->flushed >= lsn ? 1 : 0;
    if (have >= count || closing_) return have;
    if (!cv_.WaitUntil(deadline) && Clock::now() >= deadline) {
      have = 0;
      for (const auto& [_, sb] : standbys_) have += sb->flushed >= lsn ? 1 : 0;
      return have;
    }
  }
}

Status EngineImpl::WaitForApplied(uint64_t lsn, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  MutexLock l(&mu_);
  while (applied_lsn_ < lsn && !closing_ && apply_error_.ok()) {
    if (!cv_.WaitUntil(deadline) && Clock::now() >= deadline) break;
  }
  if (!apply_error_.ok()) return apply_error_;
  if (applied_lsn_ >= lsn) return Status::OK();
  return Status::TimedOut("LSN " + std::to_string(lsn) + " not applied within " + std::to_string(timeout.count()) +
                          " ms (applied " + std::to_string(applied_lsn_) + ")");
}

Status EngineImpl::ApplyRecords(const std::vector<std::pair<wal::Lsn, std::string>>& records, wal::Lsn last) {
  rocksdb::WriteBatch wb;
  for (const auto& [lsn, payload] : records) {
    auto batch = WriteBatch::Decode(payload);
    if (!batch.ok()) return batch.status().WithContext("record LSN " + std::to_string(lsn));
    for (const auto& op : batch->ops()) {
      if (op.is_delete) {
        wb.Delete(handles_[0], op.key);
      } else {
        wb.Put(handles_[0], op.key, op.value);
      }
    }
  }
  // The applied LSN goes in the same batch as the data it covers.
  char buf[8];
  EncodeFixed64(buf, last);
  wb.Put(handles_[1], kAppliedKey, rocksdb::Slice(buf, 8));
  return FromRocks(db_->Write(rocksdb::WriteOptions(), &wb), "apply to RocksDB");
}

void EngineImpl::ApplierLoop() {
  wal::Lsn from;
  {
    MutexLock l(&mu_);
    from = applied_lsn_ + 1;
  }
  auto reader_or = wal_->NewReader(from);
  if (!reader_or.ok()) {
    MutexLock l(&mu_);
    apply_error_ = reader_or.status();
    cv_.SignalAll();
    return;
  }
  auto reader = std::move(reader_or).value();
  std::vector<std::pair<wal::Lsn, std::string>> records;
  bool have_pending = false;
  wal::RecordView rec;
  for (;;) {
    {
      MutexLock l(&mu_);
      if (closing_) return;
    }
    // Take what is readable (and, on the active, committed), up to a batch.
    records.clear();
    wal::Lsn last = 0;
    Status error;
    while (records.size() < kMaxApplyRecords) {
      if (!have_pending) {
        auto got = records.empty() ? reader->NextWait(&rec, Clock::now() + 100ms) : reader->Next(&rec);
        if (!got.ok()) {
          error = got.status();
          break;
        }
        if (!*got) break;
        have_pending = true;
      }
      if (role_.load() == Role::kActive) {
        MutexLock l(&mu_);
        AdvanceCommit();
        if (commit_lsn_ < rec.lsn) {
          if (records.empty()) {
            if (LocalDurable() < rec.lsn) {
              mu_.Unlock();  // not yet durable here (interval sync): wait for the WAL
              wal_->WaitForDurable(rec.lsn, Clock::now() + 100ms);
              mu_.Lock();
              AdvanceCommit();
            } else {
              cv_.WaitUntil(Clock::now() + 100ms);
            }
          }
          break;  // not committed yet: apply what we have, then wait
        }
      } else if (LocalDurable() < rec.lsn) {
        // A standby applies only what its own WAL holds durably.
        if (records.empty()) wal_->WaitForDurable(rec.lsn, Clock::now() + 100ms);
        if (LocalDurable() < rec.lsn) break;
      }
      if (rec.type == static_cast<uint8_t>(wal::RecordType::kData)) records.emplace_back(rec.lsn, rec.payload);
      last = rec.lsn;
      have_pending = false;
    }
    if (error.ok() && last > 0) error = ApplyRecords(records, last);
    if (!error.ok()) {
      MutexLock l(&mu_);
      if (closing_) return;
      RLOG(kError, "engine.apply_failed") << "node=" << opts_.node_id << " error=\"" << error.ToString() << "\"";
      apply_error_ = error;
      cv_.SignalAll();
      return;
    }
    if (last == 0) continue;
    std::shared_ptr<transport::Session> upstream;
    {
      MutexLock l(&mu_);
      applied_lsn_ = last;
      cv_.SignalAll();
      upstream = upstream_;
    }
    if (upstream && role_.load() == Role::kStandby) SendAck(upstream);
  }
}

void EngineImpl::SendAck(const std::shared_ptr<transport::Session>& s) {
  proto::Control msg;
  auto* ack = msg.mutable_ack();
  ack->set_flushed_lsn(wal_->durable_lsn());
  {
    MutexLock l(&mu_);
    ack->set_applied_lsn(applied_lsn_);
  }
  ack->set_epoch(epoch_);
  (void)s->SendControl(msg);
}

void EngineImpl::ShipperLoop(std::shared_ptr<Standby> sb, wal::Lsn from) {
  struct Done {
    Standby* sb;
    ~Done() { sb->done.store(true); }
  } done{sb.get()};
  auto reader_or = wal_->NewReader(from);
  if (!reader_or.ok()) {
    Status st = reader_or.status().IsPurged()
                    ? Status::Purged("standby " + sb->id + " needs LSN " + std::to_string(from) +
                                     ", which this node no longer retains (snapshot resync not yet supported)")
                    : reader_or.status();
    RLOG(kWarn, "engine.ship_refused") << "standby=" << sb->id << " reason=\"" << st.ToString() << "\"";
    sb->session->Close(st);
    return;
  }
  auto reader = std::move(reader_or).value();
  while (!sb->stop.load()) {
    auto span = reader->NextRaw(kMaxShipBytes);
    if (!span.ok()) {
      sb->session->Close(span.status());
      return;
    }
    if (!span->has_value()) {
      auto more = reader->WaitForData(Clock::now() + 100ms);
      if (!more.ok()) return;  // the WAL is closing
      continue;
    }
    const wal::RawSpan& s = **span;
    std::shared_ptr<const void> keep = s.file;  // keeps the segment open until sent
    for (;;) {
      Status st = sb->session->SendFile(keep, s.file->NativeHandle(), s.offset, s.length);
      if (st.ok()) {
        sb->shipped.store(s.last_lsn);
        break;
      }
      if (st.code() != StatusCode::kBusy || sb->stop.load()) return;
      // The standby is slow: stop reading the log until the queue drains.
      MutexLock l(&sb->writable_mu);
      sb->writable_cv.WaitUntil(Clock::now() + 100ms);
    }
  }
}

void EngineImpl::FollowerLoop() {
  const auto colon = opts_.follow.rfind(':');
  const std::string host = opts_.follow.substr(0, colon);
  const int port = colon == std::string::npos ? 0 : std::atoi(opts_.follow.c_str() + colon + 1);
  for (;;) {
    std::shared_ptr<transport::Session> session;
    {
      MutexLock l(&mu_);
      if (closing_) return;
    }
    auto s = endpoint_->Connect(host, static_cast<uint16_t>(port));
    if (s.ok()) {
      session = *s;
      MutexLock l(&mu_);
      upstream_ = session;
      // OnEstablished and OnClosed signal cv_; the timed wait covers races.
      bool subscribed = false;
      while (!closing_ && !session->closed()) {
        if (!subscribed && session->established()) {
          subscribed = true;
          mu_.Unlock();
          SendSubscribe(session);
          mu_.Lock();
          continue;
        }
        cv_.WaitUntil(Clock::now() + 200ms);
      }
      if (upstream_ == session) upstream_.reset();
      if (closing_) return;
    } else {
      RLOG(kWarn, "engine.follow_failed") << "node=" << opts_.node_id << " error=\"" << s.status().ToString() << "\"";
    }
    MutexLock l(&mu_);
    if (!closing_) cv_.WaitUntil(Clock::now() + 200ms);  // back off before reconnecting
  }
}

void EngineImpl::OnEstablished(const std::shared_ptr<transport::Session>& s) {
  MutexLock l(&mu_);
  cv_.SignalAll();  // the follower thread subscribes on its upstream session
}

void EngineImpl::SendSubscribe(const std::shared_ptr<transport::Session>& s) {
  proto::Control msg;
  auto* sub = msg.mutable_subscribe();
  const wal::Lsn last = wal_->last_lsn();
  sub->set_from_lsn(last + 1);
  sub->set_last_epoch(wal_->last_epoch());
  if (last >= 1 && last >= wal_->first_lsn()) {
    auto reader = wal_->NewReader(last);
    wal::RecordView rec;
    if (reader.ok()) {
      auto got = (*reader)->Next(&rec);
      if (got.ok() && *got) sub->set_last_record_digest(wal::RecordDigest(rec));
    }
  }
  {
    MutexLock l(&mu_);
    sub->set_applied_lsn(applied_lsn_);
  }
  (void)s->SendControl(msg);
}

std::shared_ptr<Standby> EngineImpl::FindBySession(const transport::Session* s) {
  for (const auto& [_, sb] : standbys_) {
    if (sb->session.get() == s) return sb;
  }
  return nullptr;
}

void EngineImpl::Credit(const transport::Session* s, wal::Lsn flushed, wal::Lsn applied) {
  MutexLock l(&mu_);
  auto sb = FindBySession(s);
  if (!sb) return;
  sb->flushed = std::max(sb->flushed, std::min(flushed, sb->shipped.load()));
  sb->applied = std::max(sb->applied, std::min(applied, sb->flushed));
  if (sb->flushed >= wal_->last_lsn()) sb->caught_up_at = Clock::now();
  AdvanceCommit();
  cv_.SignalAll();  // WaitForReplicas counts acks, not the commit point
}

void EngineImpl::OnSubscribe(const std::shared_ptr<transport::Session>& s, const proto::Subscribe& msg) {
  if (role_.load() != Role::kActive) {
    s->Close(Status::NotActive("node " + opts_.node_id + " is not the active"));
    return;
  }
  const wal::Lsn from = msg.from_lsn();
  if (from == 0 || from > wal_->last_lsn() + 1) {
    ++refused_;
    s->Close(Status::InvalidArgument("standby " + s->peer_id() + " asks for LSN " + std::to_string(from) +
                                     " but this log ends at LSN " + std::to_string(wal_->last_lsn())));
    return;
  }
  // The standby's last record must be ours too, or its log has diverged.
  if (from > 1) {
    if (from - 1 < wal_->first_lsn()) {
      ++refused_;
      s->Close(Status::Purged("cannot check standby " + s->peer_id() + "'s log: LSN " + std::to_string(from - 1) +
                              " is no longer retained here (snapshot resync is not built yet)"));
      return;
    }
    auto reader = wal_->NewReader(from - 1);
    wal::RecordView rec;
    Result<bool> got = reader.ok() ? (*reader)->Next(&rec) : Result<bool>(reader.status());
    if (!got.ok() || !*got || wal::RecordDigest(rec) != msg.last_record_digest()) {
      Status st = Status::InvalidArgument("standby " + s->peer_id() + " has diverged: its record at LSN " +
                                          std::to_string(from - 1) + " differs from this node's" +
                                          (got.ok() ? std::string() : " (" + got.status().ToString() + ")") +
                                          "; truncate or re-seed it");
      RLOG(kWarn, "engine.standby_diverged") << "standby=" << s->peer_id() << " lsn=" << from - 1;
      ++refused_;
      s->Close(st);
      return;
    }
  }
  auto sb = std::make_shared<Standby>();
  sb->session = s;
  sb->id = s->peer_id();
  sb->address = s->remote_address();
  sb->flushed = from - 1;  // its log matches ours up to here
  sb->applied = std::min<wal::Lsn>(msg.applied_lsn(), from - 1);
  sb->shipped.store(from - 1);
  std::shared_ptr<Standby> replaced;
  std::vector<std::shared_ptr<Standby>> reap;
  {
    MutexLock l(&mu_);
    if (closing_) return;
    if (FindBySession(s.get())) {
      mu_.Unlock();
      s->Close(Status::InvalidArgument("a second Subscribe on one session"));
      mu_.Lock();
      return;
    }
    auto it = standbys_.find(sb->id);
    if (it != standbys_.end()) {
      replaced = it->second;
      replaced->stop.store(true);
      finished_.push_back(replaced);
      standbys_.erase(it);
    }
    for (auto f = finished_.begin(); f != finished_.end();) {
      if ((*f)->done.load()) {
        reap.push_back(std::move(*f));
        f = finished_.erase(f);
      } else {
        ++f;
      }
    }
    RLOG(kInfo, "engine.standby_subscribed") << "standby=" << sb->id << " from_lsn=" << from
                                             << (replaced ? " (replaces its previous session)" : "");
    standbys_[sb->id] = sb;
    sb->shipper = std::thread([this, sb, from] { ShipperLoop(sb, from); });
  }
  if (replaced) replaced->session->Close(Status::Aborted("replaced by a new session of the same standby"));
  for (auto& r : reap) {
    if (r->shipper.joinable()) r->shipper.join();  // already returned: joins at once
  }
}

void EngineImpl::OnControl(const std::shared_ptr<transport::Session>& s, const proto::Control& msg) {
  if (msg.has_subscribe()) return OnSubscribe(s, msg.subscribe());
  if (msg.has_ack()) return Credit(s.get(), msg.ack().flushed_lsn(), msg.ack().applied_lsn());
  // A standby's heartbeats carry its flushed and applied LSNs too (its
  // interval sync advances them without any data arriving).
  if (msg.has_heartbeat() && role_.load() == Role::kActive) {
    return Credit(s.get(), msg.heartbeat().flushed_lsn(), msg.heartbeat().applied_lsn());
  }
}

void EngineImpl::OnData(const std::shared_ptr<transport::Session>& s, std::string_view payload) {
  if (role_.load() != Role::kStandby) {
    s->Close(Status::InvalidArgument("WAL data sent to the active"));
    return;
  }
  {
    MutexLock l(&mu_);
    if (s != upstream_) {
      mu_.Unlock();
      s->Close(Status::InvalidArgument("WAL data from a node this standby does not follow"));
      mu_.Lock();
      return;
    }
  }
  // Stored unchanged after every checksum and LSN is verified: the logs stay byte-identical.
  auto last = wal_->AppendRaw(payload);
  if (!last.ok()) {
    RLOG(kError, "engine.receive_failed") << "node=" << opts_.node_id << " error=\"" << last.status().ToString() << "\"";
    s->Close(last.status());
    return;
  }
  SendAck(s);
}

void EngineImpl::OnWritable(const std::shared_ptr<transport::Session>& s) {
  std::shared_ptr<Standby> sb;
  {
    MutexLock l(&mu_);
    sb = FindBySession(s.get());
    if (!sb) return;
  }
  MutexLock l(&sb->writable_mu);
  sb->writable_cv.SignalAll();
}

void EngineImpl::OnClosed(const std::shared_ptr<transport::Session>& s, const Status& why) {
  MutexLock l(&mu_);
  for (auto it = standbys_.begin(); it != standbys_.end(); ++it) {
    if (it->second->session.get() != s.get()) continue;
    it->second->stop.store(true);
    RLOG(kInfo, "engine.standby_gone") << "standby=" << it->second->id << " reason=\"" << why.ToString() << "\"";
    finished_.push_back(it->second);
    standbys_.erase(it);
    break;
  }
  cv_.SignalAll();
}

void EngineImpl::FillHeartbeat(proto::Heartbeat* hb) {
  hb->set_last_lsn(wal_->last_lsn());
  hb->set_flushed_lsn(wal_->durable_lsn());
  MutexLock l(&mu_);
  hb->set_applied_lsn(applied_lsn_);
  hb->set_epoch(epoch_);
}

std::string EngineImpl::PrometheusMetrics() const {
  const EngineStatus st = status();
  const wal::WalStats ws = wal_->stats();
  const transport::Stats& ts = endpoint_->stats();
  std::string out;
  auto metric = [&](const char* name, const char* type, const char* help, const std::string& labels, double v) {
    if (out.find(std::string("# TYPE ") + name + " ") == std::string::npos) {
      out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
    }
    char num[64];
    std::snprintf(num, sizeof num, "%.17g", v);
    out += std::string(name) + (labels.empty() ? "" : "{" + labels + "}") + " " + num + "\n";
  };
  const std::string node = "node=\"" + opts_.node_id + "\"";
  metric("replica_role_active", "gauge", "1 on the active, 0 on a standby", node, st.role == Role::kActive);
  metric("replica_epoch", "gauge", "current epoch", node, static_cast<double>(st.epoch));
  metric("replica_last_lsn", "gauge", "last LSN in the local WAL", node, static_cast<double>(st.last_lsn));
  metric("replica_durable_lsn", "gauge", "local WAL durable up to this LSN", node, static_cast<double>(st.durable_lsn));
  metric("replica_applied_lsn", "gauge", "applied to the local RocksDB up to this LSN", node,
         static_cast<double>(st.applied_lsn));
  metric("replica_commit_lsn", "gauge", "the commit rule holds up to this LSN (active)", node,
         static_cast<double>(st.commit_lsn));
  metric("replica_commit_degraded", "gauge", "1 while acknowledging as async after a commit timeout", node,
         st.commit_degraded);
  metric("replica_commit_fallbacks_total", "counter", "commit timeouts that fell back to async", node,
         static_cast<double>(st.commit_fallbacks));
  metric("replica_standbys", "gauge", "connected standbys (active)", node, static_cast<double>(st.standbys.size()));
  {
    MutexLock l(&mu_);
    for (const auto& [_, sb] : standbys_) {
      const std::string lab = node + ",standby=\"" + sb->id + "\"";
      const double behind = static_cast<double>(st.last_lsn - std::min(st.last_lsn, sb->flushed));
      metric("replica_standby_flushed_lsn", "gauge", "standby's WAL durable up to this LSN", lab,
             static_cast<double>(sb->flushed));
      metric("replica_standby_applied_lsn", "gauge", "standby applied up to this LSN", lab,
             static_cast<double>(sb->applied));
      metric("replica_standby_lag_records", "gauge", "records the standby does not hold durably yet", lab, behind);
      const double ms = behind == 0 ? 0.0
                                    : std::chrono::duration<double, std::milli>(Clock::now() - sb->caught_up_at).count();
      metric("replica_standby_lag_ms", "gauge", "time since the standby last held every record", lab, ms);
    }
  }
  metric("replica_wal_records_total", "counter", "records appended to the local WAL", node, static_cast<double>(ws.records));
  metric("replica_wal_bytes_total", "counter", "bytes written to the local WAL", node, static_cast<double>(ws.bytes));
  metric("replica_wal_group_commits_total", "counter", "group commits (writes)", node, static_cast<double>(ws.groups));
  metric("replica_wal_fsyncs_total", "counter", "group-commit fdatasync calls", node, static_cast<double>(ws.syncs));
  metric("replica_wal_fsync_seconds_total", "counter", "time spent in group-commit fdatasync", node,
         static_cast<double>(ws.sync_micros) / 1e6);
  metric("replica_wal_size_bytes", "gauge", "bytes of retained WAL segments", node,
         static_cast<double>(wal_->size_bytes()));
  metric("replica_wal_first_lsn", "gauge", "first retained LSN", node, static_cast<double>(wal_->first_lsn()));
  metric("replica_transport_sessions_established_total", "counter", "authenticated sessions", node,
         static_cast<double>(ts.sessions_established.load()));
  metric("replica_transport_auth_failures_total", "counter", "peers refused for a wrong secret or cluster", node,
         static_cast<double>(ts.auth_failures.load()));
  metric("replica_transport_tls_failures_total", "counter", "failed TLS handshakes", node,
         static_cast<double>(ts.tls_failures.load()));
  metric("replica_transport_version_mismatches_total", "counter", "peers of another protocol version", node,
         static_cast<double>(ts.version_mismatches.load()));
  metric("replica_transport_protocol_errors_total", "counter", "connections closed for bad input", node,
         static_cast<double>(ts.protocol_errors.load()));
  metric("replica_transport_timeouts_total", "counter", "handshake and silent-peer timeouts", node,
         static_cast<double>(ts.handshake_timeouts.load() + ts.peer_timeouts.load()));
  metric("replica_transport_data_bytes_sent_total", "counter", "WAL bytes shipped", node,
         static_cast<double>(ts.data_bytes_sent.load()));
  metric("replica_transport_data_bytes_received_total", "counter", "WAL bytes received", node,
         static_cast<double>(ts.data_bytes_received.load()));
  metric("replica_transport_payload_bytes_copied_total", "counter", "payload bytes copied on the send path", node,
         static_cast<double>(ts.payload_bytes_copied.load()));
  return out;
}

EngineStatus EngineImpl::status() const {
  EngineStatus st;
  st.role = role_.load();
  st.epoch = epoch_;
  MutexLock l(&mu_);
  // Applied first: it never passes durable, and both only grow, so reading
  // it first keeps applied <= durable in the snapshot too.
  st.applied_lsn = applied_lsn_;
  st.last_lsn = wal_->last_lsn();
  st.durable_lsn = wal_->durable_lsn();
  st.commit_lsn = commit_lsn_;
  st.commit = rule_;
  st.commit_degraded = degraded_;
  st.commit_fallbacks = fallbacks_;
  st.standbys_refused = refused_.load();
  for (const auto& [_, sb] : standbys_) st.standbys.push_back({sb->id, sb->address, sb->flushed, sb->applied});
  if (st.role == Role::kStandby) st.active_address = opts_.follow;
  return st;
}

void EngineImpl::Interrupt() {
  MutexLock l(&mu_);
  closing_ = true;
  cv_.SignalAll();
}

Status EngineImpl::Close() {
  {
    MutexLock l(&mu_);
    if (close_started_ || !wal_) return Status::OK();
    close_started_ = true;
    closing_ = true;
    for (auto& [_, sb] : standbys_) sb->stop.store(true);
    cv_.SignalAll();
  }
  if (follower_.joinable()) follower_.join();
  if (endpoint_) endpoint_->Stop();  // OnClosed moves every standby to finished_
  if (applier_.joinable()) applier_.join();
  std::vector<std::shared_ptr<Standby>> shippers;
  {
    MutexLock l(&mu_);
    shippers = std::move(finished_);
    for (auto& [_, sb] : standbys_) shippers.push_back(sb);
    standbys_.clear();
  }
  for (auto& sb : shippers) {
    if (sb->shipper.joinable()) sb->shipper.join();
  }
  Status st = wal_->Close();
  db_closed_.store(true);
  for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
  handles_.clear();
  if (db_) {
    Status cs = FromRocks(db_->Close(), "close RocksDB");
    if (st.ok()) st = cs;
    db_.reset();
  }
  return st;
}

}  // namespace

Result<std::unique_ptr<Engine>> Engine::Open(const EngineOptions& options) {
  auto engine = std::make_unique<EngineImpl>(options);
  Status st = engine->Init();
  if (!st.ok()) return st.WithContext("open node " + options.node_id + " at " + options.data_dir);
  return std::unique_ptr<Engine>(std::move(engine));
}

}  // namespace replica
