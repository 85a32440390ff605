// The replication engine (static mode): the active logs, ships and applies;
// standbys copy the log byte for byte and apply it (docs/replication.md).
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <array>
#include <deque>
#include <map>
#include <set>
#include <span>
#include <random>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <variant>

#include "base/coding.h"
#include "base/host_port.h"
#include "base/names.h"
#include "base/numbers.h"
#include "base/log.h"
#include "base/mutex.h"
#include "base/thread_name.h"
#include "base/wake_word.h"
#include "replica/engine.h"
#include "replication/arbiter.h"
#include "replication/db_logger.h"
#include "replication/logdiff_server.h"
#include "replication/snapshot.h"
#include "transport/transport.h"
#include "wal/segment.h"
#include "wal/wal.h"

namespace replica {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

using snapshot::kAppliedKey;
using snapshot::kMetaColumnFamily;
constexpr size_t kMaxShipBytes = 1u << 20;

// A reading of this node's own log that failed on the stored bytes: a frame
// that fails its checksum (Corruption), or a read the device refused (EIO,
// or the filesystem's EUCLEAN/EBADMSG). Not a purged segment or a closed
// WAL, nor an IOError of the moment (EMFILE, ENOMEM, EACCES), which is
// retried. A checksum failure stays; a read error may pass, so the place is
// read again when a standby next needs it (DamageFrom).
bool IsLogDamage(const Status& st) {
  if (st.IsCorruption()) return true;
  const int e = st.sys_errno();
  return st.IsIOError() && (e == EIO || e == EUCLEAN || e == EBADMSG);
}
// Long work (a snapshot transfer, a catch-up) logs its progress this often.
constexpr auto kProgressEvery = std::chrono::seconds(2);
// A standby this many records behind its active reports its catch-up.
constexpr uint64_t kCatchUpReportRecords = 20000;
constexpr size_t kMaxApplyRecords = 256;
// Delete counts kept for writers yet to take them (see delete_counts_).
constexpr wal::Lsn kKeepDeleteCounts = 65536;
constexpr char kSlotsFile[] = "slots";
// DATA_DIR/node: "id ID" and "incarnation HEX" lines, written when the
// directory is first opened (docs/operations.md, "Data directory").
constexpr char kNodeFile[] = "node";
constexpr auto kRetentionEvery = 250ms;
// How long the active waits for a standby's answer to a snapshot offer:
// the standby first hashes the files it may already hold (up to the
// checkpoint's size, in resync/ and in db/), so the wait grows with the
// checkpoint, at 25 MiB/s, a slow disk's pace, over this base.
constexpr auto kSnapshotRequestTimeout = 60s;
constexpr uint64_t kSnapshotHashBytesPerSecond = 25u << 20;
// Replication lag histogram buckets, in seconds (Prometheus `le`): fine
// around a millisecond, where a quantile interpolated within one wide
// bucket (1 to 2.5 ms) could be off by more than the figure itself.
constexpr std::array<double, 21> kLagBuckets = {0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125,
                                                0.0015,  0.002,  0.0025,  0.005,  0.01,    0.025, 0.05,
                                                0.1,     0.25,   0.5,     1,      2.5,     5,     10};

struct LagHistogram {
  std::array<uint64_t, kLagBuckets.size() + 1> counts{};  // the last one: +Inf
  uint64_t count = 0;
  double sum = 0;
  void Observe(double seconds) {
    size_t i = 0;
    while (i < kLagBuckets.size() && seconds > kLagBuckets[i]) ++i;
    ++counts[i];
    ++count;
    sum += seconds;
  }
};

// When each recent record became durable locally (for lag in time), by LSN
// modulo its size. Entries are overwritten; a stale one is recognised by its LSN.
class AppendTimes {
 public:
  void Record(wal::Lsn lsn, Clock::time_point t) {
    Slot& s = slots_[lsn & kMask];
    s.us.store(std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count(),
               std::memory_order_relaxed);
    s.lsn.store(lsn, std::memory_order_release);
  }
  // When lsn became durable here; `pending` (and nullopt) if it has not yet
  // (a standby may hold a record before the active's own fdatasync ends);
  // nullopt alone if it is too old to be remembered.
  std::optional<Clock::time_point> Get(wal::Lsn lsn, bool* pending) const {
    const Slot& s = slots_[lsn & kMask];
    const wal::Lsn held = s.lsn.load(std::memory_order_acquire);
    *pending = held < lsn;
    if (held != lsn) return std::nullopt;
    return Clock::time_point(std::chrono::microseconds(s.us.load(std::memory_order_relaxed)));
  }
  static constexpr size_t kSize = 1u << 16;

 private:
  static constexpr size_t kMask = kSize - 1;
  struct Slot {
    std::atomic<wal::Lsn> lsn{0};
    std::atomic<int64_t> us{0};
  };
  std::array<Slot, kSize> slots_;
};

using snapshot::FromRocks;

// One connected standby, as the active sees it.
struct Standby {
  std::shared_ptr<transport::Session> session;
  std::string id;
  std::string address;         // its replication connection's remote end
  std::string client_address;  // where its clients go, as it said (may be empty); guarded by EngineImpl::mu_
  std::string incarnation;     // its data directory's, as it said in Subscribe
  wal::Lsn flushed = 0;  // guarded by EngineImpl::mu_
  wal::Lsn applied = 0;  // guarded by EngineImpl::mu_
  // Last LSN shipped on this session: acks are never credited beyond it.
  std::atomic<wal::Lsn> shipped{0};
  std::atomic<bool> done{false};  // the shipper thread has returned
  // When its flushed LSN last reached the active's last LSN (lag in time).
  std::chrono::steady_clock::time_point caught_up_at = std::chrono::steady_clock::now();  // mu_
  std::atomic<bool> stop{false};
  // Being resynced from a snapshot: not counted by the commit rule.
  bool resync = false;
  std::thread shipper;
  // Shipping: the shipper thread's reader of the log, and a span it handed
  // out that the session's full queue refused. Whoever holds ship_mu
  // ships: the shipper thread, or the thread that has just written a group
  // (EngineImpl::ShipWritten), which only tries the lock and otherwise
  // bumps `kick` so that the shipper looks again.
  Mutex ship_mu;
  std::unique_ptr<wal::Reader> reader GUARDED_BY(ship_mu);
  std::optional<wal::RawSpan> unsent GUARDED_BY(ship_mu);
  // The last ShipSome sent everything there was: the standby is caught up,
  // and a writer sends it just the group it wrote. Otherwise (catching up,
  // or a full queue) a writer leaves it to the shipper and does not hold its
  // group's fdatasync back to read and send older spans.
  bool drained GUARDED_BY(ship_mu) = false;
  WakeWord kick;
  // Ends the shipper's loop (it wakes at once).
  void Stop() {
    stop.store(true);
    kick.Bump();
  }
  // Spans sent by the writer of a group, and by the shipper thread.
  std::atomic<uint64_t> sent_by_writer{0};
  std::atomic<uint64_t> sent_by_shipper{0};
  Mutex writable_mu;
  CondVar writable_cv{&writable_mu};  // also: snapshot_request arrived
  // Set by OnWritable, so that a send refused just before it still sees it.
  bool writable_signaled = false;  // guarded by writable_mu
  // After a send refused for a full queue: until the transport says the
  // queue drained (or 100 ms, then the caller tries again).
  void WaitWritable() {
    MutexLock l(&writable_mu);
    if (!writable_signaled) writable_cv.WaitUntil(std::chrono::steady_clock::now() + std::chrono::milliseconds(100));
    writable_signaled = false;
  }
  std::optional<proto::SnapshotRequest> snapshot_request;  // guarded by writable_mu
};

// The client address a standby gave (Subscribe, Heartbeat), if it is a
// HOST:PORT (reported in ROLE and INFO; anything else is dropped).
std::string ClientAddressOf(const std::string& given) {
  auto hp = ParseHostPort(given);
  return hp.ok() && hp->port != 0 ? hp->ToString() : std::string();
}

// A file's size in a snapshot offer (the seed's included).
uint64_t OfferedSize(const proto::SnapshotOffer& offer, const std::string& name) {
  if (name == snapshot::kSeedName) return offer.seed_size();
  for (const auto& f : offer.files()) {
    if (f.name() == name) return f.size();
  }
  return 0;
}

// A snapshot being received (standby). Guarded by EngineImpl::recv_mu_.
struct Receive {
  proto::SnapshotOffer offer;
  std::set<std::string> expected;  // file names requested (WAL-SEED included)
  std::map<std::string, uint64_t> received;  // name -> XXH3 of what arrived
  std::unique_ptr<WritableFile> file;  // the file being received
  std::string name;
  uint64_t remaining = 0;
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> hash{XXH3_createState(), &XXH3_freeState};
  uint64_t bytes = 0;
  uint64_t reused = 0;
  bool done = false;
  uint64_t total = 0;  // bytes requested (progress)
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point reported = started;
};

// Delivers the host's callbacks (EngineOptions::on_role_change and
// on_failure) on a thread of its own, one at a time and in the order the
// events happened: never on a thread of the host (Open, Write) nor on one
// that Close joins, and never under an engine lock, so that a callback may
// call any method of the engine, Close included, and may take the host's
// own locks. Its state outlives the engine if the host destroys the engine
// from inside a callback.
class Notifier {
 public:
  Notifier(std::function<void(Role)> on_role, std::function<void(const Status&)> on_failure)
      : st_(std::make_shared<State>()) {
    st_->on_role = std::move(on_role);
    st_->on_failure = std::move(on_failure);
  }
  ~Notifier() { Stop(); }
  void Start() {
    if (!st_->on_role && !st_->on_failure) return;
    thread_ = NamedThread("notify", [st = st_] {
      MutexLock l(&st->mu);
      st->id = std::this_thread::get_id();
      for (;;) {
        while (!st->stop && st->queue.empty()) st->cv.Wait();
        if (st->stop) return;
        Event ev = std::move(st->queue.front());
        st->queue.pop_front();
        st->mu.Unlock();
        if (const Role* r = std::get_if<Role>(&ev)) {
          if (st->on_role) st->on_role(*r);
        } else if (st->on_failure) {
          st->on_failure(std::get<Status>(ev));
        }
        st->mu.Lock();
      }
    });
  }
  void RoleChanged(Role r) { Push(r); }
  void Failed(const Status& why) { Push(why); }
  // Nothing more starts (queued events are dropped); Stop still joins.
  void Halt() {
    MutexLock l(&st_->mu);
    st_->stop = true;
    st_->queue.clear();
    st_->cv.SignalAll();
  }
  // No failure is reported from now on (Interrupt: the host is stopping).
  void DropFailures() {
    MutexLock l(&st_->mu);
    st_->no_failures = true;
    std::erase_if(st_->queue, [](const Event& ev) { return std::holds_alternative<Status>(ev); });
  }
  // Nothing more is delivered (events not yet delivered are dropped). Waits
  // for a callback under way to return, unless called from inside one: the
  // thread then ends once that callback returns.
  void Stop() {
    Halt();
    if (!thread_.joinable()) return;
    if (OnThread()) {
      thread_.detach();
    } else {
      thread_.join();
    }
  }
  // True on the callbacks' thread (read from the state: the thread object
  // may be being joined by another thread meanwhile).
  bool OnThread() const {
    MutexLock l(&st_->mu);
    return st_->id == std::this_thread::get_id();
  }

 private:
  using Event = std::variant<Role, Status>;
  struct State {
    Mutex mu;
    CondVar cv{&mu};
    std::deque<Event> queue GUARDED_BY(mu);
    bool stop GUARDED_BY(mu) = false;
    bool no_failures GUARDED_BY(mu) = false;
    std::thread::id id GUARDED_BY(mu);  // the thread's, once it runs
    std::function<void(Role)> on_role;
    std::function<void(const Status&)> on_failure;
  };
  void Push(Event ev) {
    MutexLock l(&st_->mu);
    if (st_->stop || (st_->no_failures && std::holds_alternative<Status>(ev))) return;
    st_->queue.push_back(std::move(ev));
    st_->cv.SignalAll();
  }
  std::shared_ptr<State> st_;
  std::thread thread_;
};

// Lock order: store_mu_, then retention_mu_, then mu_, then Wal's internal
// lock (the Wal never calls back); recv_mu_ and Standby::writable_mu are
// leaves; logdiff::Server's lock comes after store_mu_ (WithStore). Handler callbacks
// run on transport I/O threads and never block on anything but these and the
// WAL.
//
// wal_ and db_ are replaced only by a snapshot install on a standby, under
// store_mu_ held exclusively with the applier stopped; every other thread
// that uses them on a standby holds store_mu_ shared.
class EngineImpl final : public Engine, public transport::Handler, public logdiff::NodeHooks {
 public:
  explicit EngineImpl(EngineOptions o) : opts_(std::move(o)), notifier_(opts_.on_role_change, opts_.on_failure) {}
  ~EngineImpl() override { (void)Close(); }
  Status Init();

  Result<uint64_t> Write(const WriteBatch& batch) override { return DoWrite(batch, nullptr); }
  Result<uint64_t> WriteCountingDeletes(const WriteBatch& batch, std::optional<uint64_t>* existed) override {
    std::optional<std::vector<bool>> flags;
    auto lsn = WriteReportingDeletes(batch, &flags);
    *existed = std::nullopt;
    if (lsn.ok() && flags) *existed = std::count(flags->begin(), flags->end(), true);
    return lsn;
  }
  Result<uint64_t> WriteReportingDeletes(const WriteBatch& batch, std::optional<std::vector<bool>>* existed) override {
    *existed = std::nullopt;
    count_deletes_.store(true);  // before the append: the applier then counts this batch
    return DoWrite(batch, existed);
  }
  Result<std::optional<std::string>> Get(const std::string& key) override;
  Result<StatedRead> ReadWithStaleness(const std::string& key,
                                       std::optional<std::chrono::milliseconds> max_staleness) override;
  Result<std::vector<std::pair<std::string, std::string>>> Scan(const std::string& start, size_t limit) override;
  Result<std::vector<std::string>> ScanKeys(const std::string& start, size_t limit) override;
  Status WaitForApplied(uint64_t lsn, std::chrono::milliseconds timeout) override;
  Result<int> WaitForReplicas(uint64_t lsn, int count, std::chrono::milliseconds timeout) override;
  EngineStatus status() const override;
  EngineStatus StatusLocked() const;  // the caller holds store_mu_ (shared)
  Status SetCommitRule(const CommitRule& rule) override;
  std::string PrometheusMetrics() const override;
  uint16_t listen_port() const override { return port_; }
  void SetClientAddress(const std::string& address) override {
    {
      MutexLock l(&mu_);
      client_address_ = address;
    }
    if (arbiter_) (void)arbiter_->Publish(MyInfo());  // standbys point clients here at once
  }
  Status Close() override;
  void Interrupt() override;

  void OnEstablished(const std::shared_ptr<transport::Session>& s) override;
  void OnControl(const std::shared_ptr<transport::Session>& s, const proto::Control& msg) override;
  void OnData(const std::shared_ptr<transport::Session>& s, std::string_view payload) override;
  void OnReadIdle(const std::shared_ptr<transport::Session>& s) override;
  void OnWritable(const std::shared_ptr<transport::Session>& s) override;
  void OnClosed(const std::shared_ptr<transport::Session>& s, const Status& why) override;
  void FillHeartbeat(proto::Heartbeat* hb) override;

  // logdiff --live (replication/logdiff_server.h).
  Status WithStore(const std::function<Status(const logdiff::Store&)>& fn) override EXCLUDES(mu_);
  Result<const rocksdb::Snapshot*> PinAt(uint64_t lsn, std::chrono::milliseconds timeout) override EXCLUDES(mu_);

 private:
  // A logdiff session waiting for the applied LSN to reach lsn: the applier
  // ends a batch there and takes the snapshot, or marks it passed.
  struct PinWait {
    wal::Lsn lsn = 0;
    const rocksdb::Snapshot* snapshot = nullptr;
    bool passed = false;
  };
  std::vector<PinWait*> pin_waits_ GUARDED_BY(mu_);
  std::atomic<int> pins_pending_{0};
  bool PinWanted(wal::Lsn lsn) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    for (auto* w : pin_waits_) {
      if (w->lsn == lsn && !w->snapshot && !w->passed) return true;
    }
    return false;
  }
  logdiff::Server diff_{this};
  // Long work under way, for repctl status (NodeInfo::progress).
  std::string progress_ GUARDED_BY(mu_);
  // Standby: the active's last LSN, from its heartbeats (catch-up progress).
  std::atomic<wal::Lsn> upstream_last_{0};
  // Standby: upstream_last_ came from the current upstream session (a
  // heartbeat arrived on it). Until then, applying everything held locally
  // says nothing about how recent the data is.
  std::atomic<bool> upstream_head_known_{false};
  // Standby: when it last held everything the active's heartbeats named
  // (steady-clock microseconds), for its own view of its lag in time.
  std::atomic<int64_t> caught_up_us_{0};
  // Standby: when it last had *applied* everything the active's heartbeats
  // named (steady-clock microseconds; 0: never), for reads that state their
  // staleness.
  std::atomic<int64_t> applied_caught_up_us_{0};
  static int64_t NowMicros() {
    return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch()).count();
  }
  void NoteCaughtUp() {
    if (LocalDurable() >= upstream_last_.load()) {
      caught_up_us_.store(NowMicros());
    }
  }
  // Standby, follower thread only: a catch-up being reported.
  struct CatchUp {
    bool on = false;
    Clock::time_point started, reported;
    wal::Lsn from = 0;
  } catch_up_;
  void ReportCatchUp() EXCLUDES(mu_);
  // Operator requests (repctl, through the arbiter's ctl/ keys).
  void RequestReseed() EXCLUDES(mu_);
  void RemoveStandby(const std::string& id) EXCLUDES(mu_);
  std::string refused_rule_;  // role thread: a ctl/commit rule refused (logged once)

  Status OpenStorage();
  void CloseStorage();
  void StartApplier() EXCLUDES(mu_);
  void StopApplier() EXCLUDES(mu_);
  void ApplierLoop();
  void ShipperLoop(std::shared_ptr<Standby> standby, wal::Lsn from) EXCLUDES(mu_);
  // Sends what the standby's reader has, until none is left (OK), the
  // session's queue is full (Busy), or an error; `*from_log` says whether
  // the error came from reading this node's log (not from the session).
  Status ShipSome(Standby* sb, std::atomic<uint64_t>* sent, bool* from_log = nullptr) REQUIRES(sb->ship_mu);
  // Wal::Options::on_written: the writer of a group sends it to every
  // standby whose shipper is idle (one thread hand-off fewer per record).
  void ShipWritten() EXCLUDES(ship_list_mu_);
  // The standbys being shipped to (a leaf lock; ShipWritten only tries
  // each Standby::ship_mu under it).
  Mutex ship_list_mu_;
  std::vector<std::shared_ptr<Standby>> ship_list_ GUARDED_BY(ship_list_mu_);
  // Active: serves a snapshot to a standby whose log cannot be shipped.
  void SnapshotLoop(std::shared_ptr<Standby> standby, std::string reason) EXCLUDES(mu_);
  // Sends length bytes of fd from offset as data frames, waiting while the
  // standby's queue is full. False if the standby stopped or the session closed.
  bool SendFileRange(Standby* sb, const std::shared_ptr<const void>& keep, int fd, uint64_t offset,
                     uint64_t length);
  void StartResync(const std::shared_ptr<transport::Session>& s, const proto::Subscribe& msg,
                   const std::string& reason);
  // Damage in this node's own log, found while shipping or checking a
  // standby's log (a checksum that fails: the disk changed a stored frame;
  // or a read error): `at` is where reading failed. A standby that needs a
  // record from `at` on is resynced from a snapshot, which comes from
  // RocksDB, not from the log.
  void NoteLogDamage(const std::string& standby, wal::Lsn at, const Status& st) EXCLUDES(mu_);
  // The first LSN noted damaged at or after `from` where reading still
  // fails; entries that read well now (the log was cut back and rewritten,
  // or purged, or a read error passed) are forgotten.
  std::optional<wal::Lsn> DamageFrom(wal::Lsn from) EXCLUDES(mu_);
  // EngineOptions::test_fault's "log.read LSN" step: OK unless a test
  // fails this reading of the log, as a read error of the disk would.
  Status LogReadFault(wal::Lsn lsn) const;
  void AddStandby(const std::shared_ptr<transport::Session>& s, std::shared_ptr<Standby> sb, wal::Lsn slot,
                  const std::string& what, std::function<void()> run);
  // Standby: answers an offer (reusing the files it holds), then installs.
  Status PrepareResync(const std::shared_ptr<transport::Session>& s, const proto::SnapshotOffer& offer);
  Status InstallSnapshot();
  // Joins the shipper threads of standbys that were stopped (finished_).
  void JoinStoppedShippers();
  // Removes resync/, the files of an interrupted resync, once the node no
  // longer needs them (its log was accepted, or it became the active).
  void DropStaleStaging();
  void DropStaleStagingLocked() REQUIRES(staging_mu_);
  void OnSnapshotControl(const std::shared_ptr<transport::Session>& s, const proto::Control& msg);
  // Closes s (saying why) unless this node is a standby and s its upstream.
  bool FromUpstream(const std::shared_ptr<transport::Session>& s, const std::string& what) EXCLUDES(mu_);
  // The snapshot file being received is complete: made durable and hashed.
  static Status FinishFile(Receive& r);
  // Moves the WAL retention floor (slots, applied LSN) and drops slots past
  // their cap; persists the slots first. Throttled unless force.
  void MaintainRetention(bool force) EXCLUDES(mu_);
  Status LoadSlots();
  // Reads DATA_DIR/node (refusing a directory of another node id), or
  // writes it with a new incarnation for a directory that has none.
  Status LoadIdentity();
  void FollowerLoop();
  void AdvanceCommit() REQUIRES(mu_);
  wal::Lsn ComputeCommit() REQUIRES(mu_);
  void SendAck(const std::shared_ptr<transport::Session>& s);
  // The last LSN that may be applied or counted as committed locally: durable
  // in the WAL, so RocksDB never gets ahead of the log (under wal_sync
  // "none" nothing is promised: the last written LSN).
  wal::Lsn LocalDurable() const {
    if (!wal_) return 0;  // a failed snapshot install lost the storage
    return wal_->options().sync_policy == wal::SyncPolicy::kNone ? wal_->last_lsn() : wal_->durable_lsn();
  }
  void SendSubscribe(const std::shared_ptr<transport::Session>& s);
  void OnSubscribe(const std::shared_ptr<transport::Session>& s, const proto::Subscribe& msg) EXCLUDES(mu_);
  // Credits a standby's flushed/applied LSNs (from an ack or a heartbeat),
  // never beyond what was shipped to it on this session.
  void Credit(const transport::Session* s, wal::Lsn flushed, wal::Lsn applied) EXCLUDES(mu_);
  std::shared_ptr<Standby> FindBySession(const transport::Session* s) REQUIRES(mu_);
  // Time since the standby last held every record up to `last` (0 while it does).
  static uint64_t LagMs(const Standby& sb, wal::Lsn last, Clock::time_point now) {
    if (sb.flushed >= last) return 0;
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(now - sb.caught_up_at).count());
  }
  Status ValidateRule(const CommitRule& rule) const;
  Result<uint64_t> DoWrite(const WriteBatch& batch, std::optional<std::vector<bool>>* existed);
  // Applies `records` (and `last` as the applied LSN) in one RocksDB batch.
  // With `deleted`, also appends, for each record that deletes, its LSN and
  // whether each of its deletes found its key (looked up as of its place in
  // the log: after the ops before it).
  Status ApplyRecords(const std::vector<std::pair<wal::Lsn, std::string>>& records, wal::Lsn last,
                      std::vector<std::pair<wal::Lsn, std::vector<bool>>>* deleted);

  const EngineOptions opts_;
  wal::Options wal_options_;
  mutable SharedMutex store_mu_ ACQUIRED_BEFORE(mu_);
  Mutex retention_mu_ ACQUIRED_BEFORE(mu_);  // serialises MaintainRetention
  std::unique_ptr<wal::Wal> wal_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;  // default, meta
  std::unique_ptr<transport::Endpoint> endpoint_;
  uint16_t port_ = 0;
  std::atomic<Role> role_{Role::kStandby};
  std::atomic<wal::Epoch> epoch_{1};

  mutable Mutex mu_;
  // Upstream session, role and resync events, closing_ (the follower, the
  // role loop, Promote). Not the per-write progress below, so that a busy
  // log does not wake those threads.
  CondVar cv_{&mu_};
  CondVar apply_cv_{&mu_};    // the applier: commit_lsn_ or apply_cap_ moved, or stop
  CondVar applied_cv_{&mu_};  // applied_lsn_ moved or applying failed (WaitForApplied, logdiff pins)
  CondVar acks_cv_{&mu_};  // a standby's flushed LSN moved (WaitForReplicas)
  // Writers waiting for their LSN to be applied, each on its own condition
  // variable, so that an apply wakes only the writers it completes rather
  // than every client thread.
  struct WriteWaiter {
    explicit WriteWaiter(Mutex* mu) : cv(mu) {}
    CondVar cv;
  };
  std::multimap<wal::Lsn, WriteWaiter*> waiters_ GUARDED_BY(mu_);
  // Active, once a WriteReportingDeletes call was made: the applier notes,
  // per record, which of its deletes found their key, into delete_counts_,
  // where the writer takes its own (the writer may register only after its
  // record is applied, so the flags wait for it). Entries 65,536 LSNs
  // behind the applied LSN are dropped unclaimed.
  std::atomic<bool> count_deletes_{false};
  std::map<wal::Lsn, std::vector<bool>> delete_counts_ GUARDED_BY(mu_);
  void WakeWriters(wal::Lsn upto) REQUIRES(mu_) {
    for (auto it = waiters_.begin(); it != waiters_.end() && it->first <= upto; ++it) it->second->cv.Signal();
  }
  // Closing, stopping the applier: every waiter looks again.
  void WakeAllWaiters() REQUIRES(mu_) {
    cv_.SignalAll();
    apply_cv_.SignalAll();
    applied_cv_.SignalAll();
  }
  void WakeAllWriters() REQUIRES(mu_) {
    for (auto& [_, w] : waiters_) w->cv.Signal();
  }

  // Standby: frames received and not yet in the WAL. OnData queues them; at
  // the end of a burst (OnReadIdle: nothing more waits in the socket), or
  // when the next frame would take the queue past one write's worth
  // (max_group_bytes), the session's I/O thread stores the whole queue with
  // one AppendRaw (one write, one fdatasync) and acknowledges it. The
  // session's next frames wait in the socket meanwhile, so under load one
  // AppendRaw takes all that arrived during the previous fdatasync, and no
  // other thread has to be woken for a record to become durable.
  Mutex rx_mu_;
  CondVar rx_cv_{&rx_mu_};
  std::string rx_buf_ GUARDED_BY(rx_mu_);
  std::string rx_spare_ GUARDED_BY(rx_mu_);  // the last batch's buffer, reused
  std::shared_ptr<transport::Session> rx_session_ GUARDED_BY(rx_mu_);
  bool rx_busy_ GUARDED_BY(rx_mu_) = false;  // a store is in flight
  // Stores what s queued, if anything (waits for another thread's store first).
  void StoreReceived(const std::shared_ptr<transport::Session>& s) EXCLUDES(rx_mu_, mu_);
  // Forgets what a closed session queued and waits for a store in flight.
  void DrainReceiver() EXCLUDES(rx_mu_);
  wal::Lsn applied_lsn_ GUARDED_BY(mu_) = 0;
  wal::Lsn commit_lsn_ GUARDED_BY(mu_) = 0;
  CommitRule rule_ GUARDED_BY(mu_);
  bool degraded_ GUARDED_BY(mu_) = false;  // async fallback after a commit timeout
  wal::Lsn degraded_at_ GUARDED_BY(mu_) = 0;  // the local LSN when it fell back
  uint64_t fallbacks_ GUARDED_BY(mu_) = 0;
  std::atomic<uint64_t> refused_{0};
  bool closing_ GUARDED_BY(mu_) = false;   // Interrupt or Close began
  bool close_started_ GUARDED_BY(mu_) = false;
  bool close_done_ GUARDED_BY(mu_) = false;  // Close finished, with close_status_
  Status close_status_ GUARDED_BY(mu_);
  CondVar close_cv_{&mu_};
  Notifier notifier_;  // a leaf lock: events are queued under mu_, in order
  std::atomic<bool> db_closed_{false};
  // Set once (Fail): the WAL can no longer be written, the applier stopped
  // on an error, or a snapshot install lost the storage (wal_ and db_ are
  // null from then on, until the node is reopened). Every wait returns it.
  Status failure_ GUARDED_BY(mu_);
  std::atomic<bool> failed_{false};  // failure_ is set (read without mu_)
  // Set once Init opened the storage: Close has threads to join and files to
  // close (wal_ alone cannot tell: an install swaps it under store_mu_).
  std::atomic<bool> opened_{false};
  // Keyed by node id: a reconnecting standby replaces its old session, so one
  // node is never counted twice toward the commit rule.
  std::map<std::string, std::shared_ptr<Standby>> standbys_ GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Standby>> finished_ GUARDED_BY(mu_);  // shippers to join
  std::shared_ptr<transport::Session> upstream_ GUARDED_BY(mu_);     // standby: to the active
  bool applier_stop_ GUARDED_BY(mu_) = false;

  // Retention slots (active): standby id -> first LSN to keep for it.
  std::map<std::string, wal::Lsn> slots_ GUARDED_BY(mu_);
  std::map<std::string, wal::Lsn> persisted_slots_ GUARDED_BY(mu_);
  uint64_t slots_dropped_ GUARDED_BY(mu_) = 0;
  Clock::time_point last_retention_ GUARDED_BY(mu_);
  // Lag in time: standby id -> histogram of (its durable ack - local durable),
  // and of (its applied ack - local durable).
  std::map<std::string, LagHistogram> lag_ GUARDED_BY(mu_);
  std::map<std::string, LagHistogram> apply_lag_ GUARDED_BY(mu_);
  // Observes, for each LSN in (from, to], the time from its local durability
  // to `now` (0 for one the standby held before it was durable here).
  void ObserveLag(LagHistogram* h, wal::Lsn from, wal::Lsn to, Clock::time_point now) const;
  AppendTimes append_times_;

  // Snapshot resync.
  std::atomic<uint64_t> snapshot_seq_{0};
  // DATA_DIR/LOCK, held from the start of Open to the end of Close: a second
  // process (or engine) on the directory is refused before it changes
  // anything (finishes an install, removes checkpoints/, rewrites node).
  std::unique_ptr<FileLock> dir_lock_;
  // The table files' hashes, so that each checkpoint reads only the files
  // written since the last one (a resync tried again, a second standby).
  snapshot::HashCache checkpoint_hashes_;
  std::atomic<uint64_t> snapshots_sent_{0}, snapshot_files_sent_{0}, snapshot_bytes_sent_{0};
  std::atomic<uint64_t> snapshots_installed_{0}, snapshot_files_reused_{0}, snapshot_bytes_received_{0};
  std::optional<proto::SnapshotOffer> pending_offer_ GUARDED_BY(mu_);  // standby: for the follower thread
  bool snapshot_received_ GUARDED_BY(mu_) = false;
  std::optional<wal::Lsn> pending_rewind_ GUARDED_BY(mu_);  // standby: for the follower thread
  bool want_snapshot_ GUARDED_BY(mu_) = false;  // a rewind failed: ask for a snapshot
  std::atomic<uint64_t> rewinds_{0};
  std::set<wal::Lsn> damaged_ GUARDED_BY(mu_);  // NoteLogDamage
  std::atomic<uint64_t> wal_damage_found_{0};
  // Standby: drops its log after to (told by an active of a newer epoch).
  Status RewindTo(wal::Lsn to);
  Mutex recv_mu_;
  std::unique_ptr<Receive> recv_ GUARDED_BY(recv_mu_);
  // Held by the follower while it prepares or installs a resync (resync/ in
  // use); DropStaleStaging only tries it. Taken before every other lock.
  Mutex staging_mu_ ACQUIRED_BEFORE(store_mu_);
  bool drop_staging_ GUARDED_BY(mu_) = false;  // the follower removes resync/
  std::atomic<bool> receiving_{false};

  std::thread applier_;
  std::thread follower_;

  // High availability (opts_.etcd set).
  std::shared_ptr<Arbiter> arbiter_;
  Mutex sync_mu_ ACQUIRED_BEFORE(mu_);  // serialises publishing the sync set
  // The sync set (docs/failover.md). Listed: the standbys etcd may list as
  // eligible (the published set; after a failed write, the old one and the
  // new one together). Joining: standbys that held everything committed
  // when last checked, not listed yet. Both bound the commit point: it never
  // passes what one of them holds, and one that lags is dropped (from the
  // listed ones only once etcd no longer lists it).
  std::set<std::string> sync_listed_ GUARDED_BY(mu_);
  std::set<std::string> sync_joining_ GUARDED_BY(mu_);
  // The data directory incarnation each member was listed with (empty:
  // listed before incarnations, by id alone).
  std::map<std::string, std::string> member_incarnation_ GUARDED_BY(mu_);
  // Whether member id was listed with another data directory than incarnation.
  bool ListedElsewhere(const std::string& id, const std::string& incarnation) const REQUIRES(mu_) {
    auto listed = member_incarnation_.find(id);
    return listed != member_incarnation_.end() && !listed->second.empty() && listed->second != incarnation;
  }
  // Per standby id: the data directory its last session came from, and how
  // often that changed in the last minute (two processes with one id take
  // turns; an emptied directory changes it once).
  struct IncarnationWatch {
    std::string last;
    int changes = 0;
    Clock::time_point since;
    bool said = false;
  };
  std::map<std::string, IncarnationWatch> incarnation_watch_ GUARDED_BY(mu_);
  std::string incarnation_;  // this node's (DATA_DIR/node); set in Open, then constant
  // A standby dropped for lagging joins again no sooner than `until`: the
  // back-off doubles with each drop (from sync_rejoin_backoff, at most 64
  // times it) and starts over after a minute without one, so that a standby
  // that cannot keep up does not stall writes for a grace every second.
  struct Backoff {
    Clock::time_point until;
    int drops = 0;
  };
  std::map<std::string, Backoff> sync_backoff_ GUARDED_BY(mu_);
  void NoteDropped(const std::string& id) REQUIRES(mu_);
  bool sync_dirty_ GUARDED_BY(mu_) = false;  // the last write of the set failed
  bool sync_dropping_ GUARDED_BY(mu_) = false;  // a writer is removing laggards
  Clock::time_point sync_drop_retry_ GUARDED_BY(mu_);
  // False from a promotion, or a switch to a synchronous rule, until this
  // node has written the set: etcd may hold one it does not bound (or none,
  // which makes every node eligible), so nothing commits meanwhile.
  bool sync_confirmed_ GUARDED_BY(mu_) = true;
  // What a member surely holds durably; the lowest among the listed and
  // joining ones (UINT64_MAX when none).
  wal::Lsn MemberLsn(const std::string& id) const REQUIRES(mu_);
  wal::Lsn MembersHold() const REQUIRES(mu_);
  // A standby that holds everything committed joins (bounds the commit point
  // at once; the role loop lists it).
  void MaybeJoin(const Standby& sb) REQUIRES(mu_);
  // Whether what a member holds can be judged: it has a slot and is not
  // being resynced from a snapshot.
  bool Judged(const std::string& id) const REQUIRES(mu_);
  // The commit point the rule alone allows (nullopt: too few standbys).
  std::optional<wal::Lsn> QuorumLsn() const REQUIRES(mu_);
  // Under sync_mu_: publishes `next` as the sync set, holding commit to
  // every member of both sets until etcd has it. False if etcd refused.
  Status PublishSync(std::set<std::string> next) REQUIRES(sync_mu_) EXCLUDES(mu_);
  // A write waited past --sync-grace-ms for members that lack it while the
  // rule itself holds: removes them from the set (etcd first).
  void DropLaggingMembers(wal::Lsn lsn) REQUIRES(mu_);
  // A write waited commit_timeout under --commit-fallback async: acknowledge
  // as async from here (logged and counted) until the standbys catch up.
  void FallBackToAsync(wal::Lsn lsn) REQUIRES(mu_);
  std::thread role_thread_;
  // Set while there is no active: the epoch whose active this node saw go
  // (its published LSNs are final for the election); 0 otherwise.
  std::atomic<uint64_t> final_epoch_{0};
  // The role loop's last stale operator request and campaign error, each
  // logged once.
  std::string stale_request_;
  std::string campaign_error_;
  std::string active_key_error_;
  void NoteCampaign(const Status& st) {
    if (!st.IsCorruption()) {  // etcd unreachable: said elsewhere, and passes
      if (st.ok()) campaign_error_.clear();
      return;
    }
    if (campaign_error_ == st.ToString()) return;
    campaign_error_ = st.ToString();
    RLOG(kError, "engine.campaign_failed") << "node=" << opts_.node_id << " error=\"" << campaign_error_ << "\"";
  }
  std::string follow_ GUARDED_BY(mu_);     // standby: the active's replication address
  std::string unreachable_target_ GUARDED_BY(mu_);  // said once per target until it answers
  int appends_in_flight_ GUARDED_BY(mu_) = 0;  // DoWrite: past the role check, before its append returned
  bool demoting_ GUARDED_BY(mu_) = false;      // Demote: waiting for appends_in_flight_ to drain
  CondVar appends_cv_{&mu_};                   // signalled when appends_in_flight_ drops to 0
  uint64_t fenced_epoch_ GUARDED_BY(mu_) = 0;  // the highest epoch any fence received named
  uint64_t fences_received_ GUARDED_BY(mu_) = 0;
  std::optional<HostPort> advertise_;          // EngineOptions::advertise, parsed once (Init)
  std::string active_id_ GUARDED_BY(mu_);  // as the arbiter says
  std::string active_client_ GUARDED_BY(mu_);  // the active's published client address
  std::string client_address_ GUARDED_BY(mu_);  // this node's (SetClientAddress)
  // Where this node's clients go: as set at run time, else as opened.
  std::string ClientAddress() const REQUIRES(mu_) {
    return client_address_.empty() ? opts_.client_address : client_address_;
  }
  // A demoted active applies nothing past its last committed LSN until an
  // active accepts its log (its tail may not be in the new active's history).
  wal::Lsn apply_cap_ GUARDED_BY(mu_) = UINT64_MAX;
  void RoleLoop();
  // Planned switchover (repctl): refuse writes, wait for the target to hold
  // everything, step down and free the active key for it.
  void HandOver(const std::string& target);
  std::atomic<bool> handing_over_{false};
  NodeInfo MyInfo();
  CommitRule CurrentRule() EXCLUDES(mu_) {
    MutexLock l(&mu_);
    return rule_;
  }
  Status Promote(uint64_t epoch);
  // Promote; on failure step down, and campaign again only after a growing
  // pause (role thread; the loop runs on meanwhile: it follows a new active).
  void PromoteOrStepAside(uint64_t epoch);
  std::chrono::milliseconds promote_backoff_{0};  // role thread only
  Clock::time_point campaign_not_before_;         // role thread only
  void Demote(const std::string& reason);
  // The node cannot go on (see EngineOptions::on_failure): records why,
  // wakes every waiter, tells the role loop and the host.
  void Fail(const Status& why) EXCLUDES(mu_);
  // The epoch a campaign of `me` starts from (its log's last); nullopt if
  // it has failed or lost its storage: such a node never campaigns.
  std::optional<wal::Epoch> CampaignEpoch(const NodeInfo& me) const EXCLUDES(mu_) {
    if (!me.failure.empty()) return std::nullopt;
    ReaderLock store(&store_mu_);
    if (!wal_) return std::nullopt;
    return wal_->last_epoch();
  }
  // Reads refuse once the node failed, like writes (the data may be stale).
  Status FailedStatus() const EXCLUDES(mu_) {
    if (!failed_.load()) return Status::OK();
    MutexLock l(&mu_);
    return failure_;
  }
  // Why db_ is closed: the failure that lost the storage, or Close.
  Status StorageGone() const EXCLUDES(mu_) {
    MutexLock l(&mu_);
    return failure_.ok() ? Status::Aborted("the engine is closed") : failure_;
  }
  void SendFences(uint64_t epoch);
  // Self-fencing: false once the lease may have expired at etcd.
  bool LeaseHeld() const { return !arbiter_ || Clock::now() < arbiter_->LeaseDeadline(); }
  // For an active: its lease stands and is the one its active key was won
  // under. A lease lost and replaced (etcd expired it while the node was cut
  // off) holds no key: the node must not take writes on it, even before its
  // role loop hears of the new active.
  bool ActiveLeaseHeld() const { return !arbiter_ || (LeaseHeld() && arbiter_->WonLeaseCurrent()); }
  // Where the other nodes reach this one (EngineOptions::advertise).
  std::string PublishedAddress() const {
    if (!advertise_) return HostPort{opts_.listen_host, port_}.ToString();
    return HostPort{advertise_->host, advertise_->port != 0 ? advertise_->port : port_}.ToString();
  }
};

Status EngineImpl::Init() {
  REPLICA_RETURN_IF_ERROR(CheckName("node id", opts_.node_id));
  REPLICA_RETURN_IF_ERROR(CheckName("cluster name", opts_.cluster));
  if (opts_.data_dir.empty()) return Status::InvalidArgument("data_dir is required");
  if (opts_.secret.empty()) return Status::InvalidArgument("the cluster secret is required");
  if (opts_.commit_timeout.count() < 1) return Status::InvalidArgument("commit_timeout must be at least 1 ms");
  if (opts_.tls_cert_file.empty() != opts_.tls_key_file.empty() ||
      opts_.tls_cert_file.empty() != opts_.tls_ca_file.empty()) {
    return Status::InvalidArgument("TLS needs all three of the certificate, key and CA files, or none");
  }
  if (opts_.sync_grace.count() < 1) return Status::InvalidArgument("sync_grace must be at least 1 ms");
  if (opts_.transport_io_threads < 1 || opts_.transport_io_threads > 64) {
    return Status::InvalidArgument("transport_io_threads must be 1..64, got " +
                                   std::to_string(opts_.transport_io_threads));
  }
  if (opts_.sync_rejoin_backoff.count() < 0 || opts_.sync_rejoin_backoff > std::chrono::hours(1)) {
    return Status::InvalidArgument("sync_rejoin_backoff must be 0..1 h");
  }
  if (opts_.commit_fallback != "strict" && opts_.commit_fallback != "async") {
    return Status::InvalidArgument("commit_fallback '" + opts_.commit_fallback + "': expected strict or async");
  }
  if (!opts_.advertise.empty()) {
    auto hp = ParseHostPort(opts_.advertise);
    if (!hp.ok()) return hp.status().WithContext("advertise");
    if (IsWildcardHost(hp->host)) {
      return Status::InvalidArgument("advertise '" + opts_.advertise + "' names no host the other nodes can reach");
    }
    advertise_ = *hp;
  } else if ((!opts_.etcd.empty() || opts_.arbiter) && IsWildcardHost(opts_.listen_host)) {
    return Status::InvalidArgument("listen host '" + opts_.listen_host +
                                   "' (every interface) names no address the other nodes can reach: set the "
                                   "advertised address (replicad --advertise HOST:PORT)");
  }
  if (!opts_.follow.empty() && opts_.etcd.empty() && !opts_.arbiter) {
    auto hp = ParseHostPort(opts_.follow);
    if (!hp.ok() || hp->port == 0) {
      return Status::InvalidArgument("follow '" + opts_.follow + "': want HOST:PORT of the active, port 1..65535");
    }
  }
  REPLICA_RETURN_IF_ERROR(ValidateRule(opts_.commit));
  {
    MutexLock l(&mu_);
    rule_ = opts_.commit;
  }
  if (!wal::ParseSyncPolicy(opts_.wal_sync, &wal_options_.sync_policy)) {
    return Status::InvalidArgument("wal_sync '" + opts_.wal_sync + "': expected every, interval or none");
  }
  if (opts_.wal_sync_interval < 1ms || opts_.wal_sync_interval > 60s) {
    return Status::InvalidArgument("wal_sync_interval must be 1 ms to 60 s, got " +
                                   std::to_string(opts_.wal_sync_interval.count()) + " ms");
  }
  wal_options_.sync_interval = opts_.wal_sync_interval;
  // A log that can no longer be written (a full disk) refuses every append
  // until reopened, whoever appends (a writer, the receiver, the interval
  // sync): the node fails, and with etcd another takes over. Called outside
  // the Wal's lock; an appender may hold store_mu_ (shared), which comes
  // before mu_.
  wal_options_.on_error = [this](const Status& st) { Fail(st.WithContext("the local WAL")); };
  wal_options_.on_written = [this] { ShipWritten(); };
  wal_options_.segment_size = opts_.wal_segment_size;
  wal_options_.preallocate = opts_.wal_preallocate;
  wal_options_.retention_bytes = opts_.wal_keep_bytes;
  REPLICA_RETURN_IF_ERROR(Env::Default()->CreateDirIfMissing(opts_.data_dir));
  {
    const std::string lock_path = JoinPath(opts_.data_dir, "LOCK");
    auto lock = Env::Default()->LockFile(lock_path);
    if (!lock.ok() && lock.status().code() == StatusCode::kBusy) {
      return Status::Busy("data directory " + opts_.data_dir + " is in use by another running node (" + lock_path +
                          " is locked); stop it first, or give this node a directory of its own");
    }
    if (!lock.ok()) return lock.status();
    dir_lock_ = std::move(lock).value();
  }
  // A snapshot install that a crash interrupted is finished before anything opens.
  REPLICA_RETURN_IF_ERROR(snapshot::RecoverInstall(opts_.data_dir));
  REPLICA_RETURN_IF_ERROR(snapshot::RemoveTree(JoinPath(opts_.data_dir, "checkpoints")));
  REPLICA_RETURN_IF_ERROR(LoadIdentity());
  REPLICA_RETURN_IF_ERROR(LoadSlots());
  REPLICA_RETURN_IF_ERROR(OpenStorage());
  opened_.store(true);
  const bool ha = !opts_.etcd.empty() || opts_.arbiter != nullptr;
  role_ = !ha && opts_.follow.empty() ? Role::kActive : Role::kStandby;
  if (role_ == Role::kActive) DropStaleStaging();  // a static active never resyncs
  {
    MutexLock l(&mu_);
    notifier_.RoleChanged(role_.load());  // the first event, delivered once Open succeeds
    follow_ = ha ? std::string() : opts_.follow;
    // With an arbiter this node may have been an active whose last records
    // were never replicated: apply nothing more until an active accepts the
    // log (or this node is promoted), so that a rejoin can cut such a tail.
    if (ha) apply_cap_ = applied_lsn_;
  }

  transport::Options to;
  to.node_id = opts_.node_id;
  to.cluster = opts_.cluster;
  to.secret = opts_.secret;
  to.io_threads = opts_.transport_io_threads;
  to.tls.enabled = !opts_.tls_cert_file.empty();
  to.tls.cert_file = opts_.tls_cert_file;
  to.tls.key_file = opts_.tls_key_file;
  to.tls.ca_file = opts_.tls_ca_file;
  REPLICA_ASSIGN_OR_RETURN(endpoint_, transport::Endpoint::Create(to, this));
  REPLICA_ASSIGN_OR_RETURN(port_, endpoint_->Listen(opts_.listen_host, opts_.listen_port));
  RLOG(kInfo, "engine.open") << "node=" << opts_.node_id << " role=" << RoleName(role_.load()) << " epoch=" << epoch_
                             << " last_lsn=" << wal_->last_lsn() << " applied_lsn=" << status().applied_lsn
                             << " listen=" << opts_.listen_host << ":" << port_ << " commit=" << opts_.commit.ToString()
                             << " fallback=" << opts_.commit_fallback;
  if (opts_.arbiter) {
    arbiter_ = opts_.arbiter;
    REPLICA_RETURN_IF_ERROR_CTX(arbiter_->Start(MyInfo()), "register with the arbiter");
  } else if (!opts_.etcd.empty()) {
    EtcdArbiterOptions ao;
    ao.endpoints = opts_.etcd;
    ao.cluster = opts_.cluster;
    ao.lease_ttl = opts_.lease_ttl;
    ao.safety_margin = opts_.fence_margin;
    REPLICA_ASSIGN_OR_RETURN(arbiter_, NewEtcdArbiter(ao));
    REPLICA_RETURN_IF_ERROR_CTX(arbiter_->Start(MyInfo()), "register with etcd");
  }
  StartApplier();  // after arbiter_ is set: a failing applier reads it (Fail)
  if (role_ == Role::kStandby) {
    follower_ = NamedThread("follower", [this] { FollowerLoop(); });
  }
  if (arbiter_) {
    role_thread_ = NamedThread("role", [this] { RoleLoop(); });
  }
  notifier_.Start();  // delivers what was queued meanwhile, in order
  return Status::OK();
}

Status EngineImpl::OpenStorage() {
  REPLICA_ASSIGN_OR_RETURN(wal_, wal::Wal::Open(JoinPath(opts_.data_dir, "wal"), wal_options_));
  rocksdb::Options ro;
  ro.create_if_missing = true;
  ro.create_missing_column_families = true;
  // The meta column family takes a tiny write with every batch and would
  // hold every RocksDB log file alive until its memtable filled: past this
  // much log, RocksDB flushes the column families that pin the oldest file.
  ro.max_total_wal_size = 64ull << 20;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {kMetaColumnFamily, rocksdb::ColumnFamilyOptions()}};
  rocksdb::DB* raw = nullptr;
  const std::string db_path = JoinPath(opts_.data_dir, "db");
  ro.info_log = NewDbLogger(db_path);  // a full disk must not end the process (db_logger.h)
  REPLICA_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(ro, db_path, cfs, &handles_, &raw), "open RocksDB " + db_path));
  db_.reset(raw);
  db_closed_.store(false);

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
    apply_cap_ = UINT64_MAX;  // a log installed from a snapshot is the active's
  }
  epoch_ = std::max<wal::Epoch>(1, wal_->last_epoch());
  MaintainRetention(/*force=*/true);  // the floor must stand before the first segment roll
  return Status::OK();
}

void EngineImpl::CloseStorage() {
  db_closed_.store(true);
  if (wal_) (void)wal_->Close();
  wal_.reset();
  if (db_) {
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
    (void)db_->Close();
  }
  handles_.clear();
  db_.reset();
}

void EngineImpl::StartApplier() {
  {
    MutexLock l(&mu_);
    applier_stop_ = false;
  }
  applier_ = NamedThread("applier", [this] { ApplierLoop(); });
}

void EngineImpl::StopApplier() {
  {
    MutexLock l(&mu_);
    applier_stop_ = true;
    WakeAllWaiters();
  }
  if (applier_.joinable()) applier_.join();
}

Status EngineImpl::LoadIdentity() {
  const std::string path = JoinPath(opts_.data_dir, kNodeFile);
  // The incarnation stands for this log: a directory whose log is gone
  // (wal/ emptied, the node file left) gets a new one as well.
  // Only a missing wal/ is "no log": one that cannot be listed (EACCES,
  // EIO, a file of that name) fails the open before the node file is
  // touched, instead of giving the directory a new incarnation.
  bool has_log = false;
  if (auto children = Env::Default()->GetChildren(JoinPath(opts_.data_dir, "wal")); children.ok()) {
    has_log = std::any_of(children->begin(), children->end(),
                          [](const std::string& n) { return wal::ParseSegmentFileName(n).has_value(); });
  } else if (!children.status().IsNotFound()) {
    return children.status().WithContext("list " + JoinPath(opts_.data_dir, "wal"));
  }
  if (Env::Default()->FileExists(path)) {
    REPLICA_ASSIGN_OR_RETURN(std::string data, ReadWholeFile(Env::Default(), path));
    // Exactly as written below: "id ID\nincarnation HEX\n", HEX of 32
    // digits. Anything else (a duplicate or unknown line, a truncated
    // incarnation, which would be published to etcd as it is) is damage.
    std::istringstream in(data);
    std::string first, second, more, id, incarnation;
    const bool two_lines = std::getline(in, first) && std::getline(in, second) && !std::getline(in, more) &&
                           !data.empty() && data.back() == '\n';
    if (two_lines && first.rfind("id ", 0) == 0) id = first.substr(3);
    if (two_lines && second.rfind("incarnation ", 0) == 0) incarnation = second.substr(12);
    if (!CheckName("node id", id).ok() || incarnation.size() != 32 ||
        incarnation.find_first_not_of("0123456789abcdef") != std::string::npos) {
      return Status::Corruption(path + ": expected the lines \"id ID\" and \"incarnation HEX\"; if the directory is " +
                                "this node's, delete the file and the next start writes a new one (the node is " +
                                "then not eligible for promotion until it has caught up again)");
    }
    if (id != opts_.node_id) {
      return Status::InvalidArgument("data directory " + opts_.data_dir + " belongs to node '" + id + "' (" + path +
                                     "): start it with --id " + id + ", or give node '" + opts_.node_id +
                                     "' a directory of its own");
    }
    if (has_log) {
      incarnation_ = incarnation;
      return Status::OK();
    }
  }
  // New (or from a version without the file, or its log gone): a new incarnation. A sync
  // set lists members with theirs, so an emptied directory never passes
  // for the one a sync set listed.
  std::random_device rd;
  char hex[33];
  std::snprintf(hex, sizeof hex, "%08x%08x%08x%08x", rd(), rd(), rd(), rd());
  incarnation_ = hex;
  REPLICA_RETURN_IF_ERROR(WriteFileAtomically(Env::Default(), path,
                                              "id " + opts_.node_id + "\nincarnation " + incarnation_ + "\n"));
  RLOG(kInfo, "engine.data_dir_identity") << "node=" << opts_.node_id << " incarnation=" << incarnation_
                                          << " (new: " << path << (has_log ? "" : "; no log in wal/") << ")";
  return Status::OK();
}

Status EngineImpl::LoadSlots() {
  const std::string path = JoinPath(opts_.data_dir, kSlotsFile);
  if (!Env::Default()->FileExists(path)) return Status::OK();
  REPLICA_ASSIGN_OR_RETURN(std::string data, ReadWholeFile(Env::Default(), path));
  std::istringstream in(data);
  std::string line;
  std::map<std::string, wal::Lsn> slots;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    std::istringstream ls(line);
    std::string id, lsn, rest;
    std::optional<uint64_t> first;
    if (!(ls >> id >> lsn) || (ls >> rest) || !CheckName("standby id", id).ok() || !(first = ParseDecimal(lsn))) {
      return Status::Corruption(path + " line " + std::to_string(n) +
                                ": expected \"STANDBY_ID FIRST_LSN\" (a node id of 1 to 64 letters, digits, '.', '_' "
                                "or '-', then an LSN in decimal digits); a line for a standby that is gone for good may "
                                "be deleted");
    }
    slots[id] = *first;
  }
  MutexLock l(&mu_);
  slots_ = slots;
  persisted_slots_ = std::move(slots);
  return Status::OK();
}

void EngineImpl::MaintainRetention(bool force) {
  if (!wal_) return;
  // One at a time (the applier, the role thread, Close): each writes DATA_DIR/slots.
  MutexLock retention(&retention_mu_);
  {
    // Throttled first: the applier calls this on every batch.
    MutexLock l(&mu_);
    const auto now = Clock::now();
    if (!force && now - last_retention_ < kRetentionEvery) return;
    last_retention_ = now;
  }
  std::vector<wal::SegmentInfo> segs;
  if (opts_.slot_max_bytes > 0) segs = wal_->segments();
  std::map<std::string, wal::Lsn> to_persist;
  bool persist = false;
  wal::Lsn floor = 0;
  {
    MutexLock l(&mu_);
    // The last applied record stays: a snapshot at that LSN is seeded with it.
    floor = std::max<wal::Lsn>(1, applied_lsn_);
    for (auto it = slots_.begin(); it != slots_.end();) {
      uint64_t behind = 0;
      for (const auto& seg : segs) {
        if (seg.last_lsn + 1 > it->second) behind += seg.size;  // segments holding what it still needs
      }
      if (opts_.slot_max_bytes > 0 && behind > opts_.slot_max_bytes) {
        RLOG(kWarn, "engine.slot_dropped") << "node=" << opts_.node_id << " standby=" << it->first
                                           << " slot_lsn=" << it->second << " behind_bytes=" << behind
                                           << " cap_bytes=" << opts_.slot_max_bytes
                                           << " (it will be resynced from a snapshot if its log is gone)";
        ++slots_dropped_;
        it = slots_.erase(it);
        continue;
      }
      // Only the active ships: a standby keeps the slots it had as an active
      // (for a later promotion) without holding its log for them, which
      // would keep every segment since its demotion.
      if (role_.load() == Role::kActive) floor = std::min(floor, std::max<wal::Lsn>(1, it->second));
      ++it;
    }
    if (slots_ != persisted_slots_) {
      // Persisted before the floor moves, so a restart never keeps less than promised.
      to_persist = slots_;
      persist = true;
    }
  }
  if (persist) {
    std::string data;
    for (const auto& [id, lsn] : to_persist) data += id + " " + std::to_string(lsn) + "\n";
    Status st = WriteFileAtomically(Env::Default(), JoinPath(opts_.data_dir, kSlotsFile), data);
    if (!st.ok()) {
      RLOG(kError, "engine.slots_not_saved") << "node=" << opts_.node_id << " error=\"" << st.ToString() << "\"";
      return;  // the floor stays where it was
    }
    MutexLock l(&mu_);
    persisted_slots_ = std::move(to_persist);
  }
  wal_->SetRetentionFloor(floor);
}

std::optional<wal::Lsn> EngineImpl::QuorumLsn() const {
  if (rule_.mode == CommitRule::Mode::kAsync || rule_.count < 1) return std::nullopt;
  std::vector<wal::Lsn> remote;
  for (const auto& [_, sb] : standbys_) {
    if (sb->resync) continue;
    remote.push_back(rule_.mode == CommitRule::Mode::kRemoteWrite ? sb->flushed : sb->applied);
  }
  if (remote.size() < static_cast<size_t>(rule_.count)) return std::nullopt;
  std::nth_element(remote.begin(), remote.begin() + (rule_.count - 1), remote.end(), std::greater<>());
  return remote[static_cast<size_t>(rule_.count) - 1];
}

wal::Lsn EngineImpl::MemberLsn(const std::string& id) const {
  // Durable is what makes a member safe to promote, under either rule. One
  // being resynced holds nothing for sure; one disconnected holds what its
  // slot says.
  auto it = standbys_.find(id);
  auto slot = slots_.find(id);
  wal::Lsn held = slot == slots_.end() ? 0 : slot->second;
  if (it != standbys_.end()) {
    // Connected from another data directory than the one listed (emptied
    // or replaced since): it holds none of what the listed one held.
    if (ListedElsewhere(id, it->second->incarnation)) return 0;
    held = it->second->resync ? 0 : std::max(held, it->second->flushed);
  }
  return held;
}

wal::Lsn EngineImpl::MembersHold() const {
  wal::Lsn low = UINT64_MAX;
  for (const auto& id : sync_listed_) low = std::min(low, MemberLsn(id));
  for (const auto& id : sync_joining_) low = std::min(low, MemberLsn(id));
  return low;
}

void EngineImpl::NoteDropped(const std::string& id) {
  const auto now = Clock::now();
  Backoff& b = sync_backoff_[id];
  if (now - b.until > 60s) b.drops = 0;  // a quiet minute since it was let back
  b.drops = std::min(b.drops + 1, 7);
  b.until = now + opts_.sync_rejoin_backoff * (1 << (b.drops - 1));
}

bool EngineImpl::Judged(const std::string& id) const {
  auto it = standbys_.find(id);
  return slots_.count(id) && (it == standbys_.end() || !it->second->resync);
}

void EngineImpl::MaybeJoin(const Standby& sb) {
  if (!arbiter_ || role_.load() != Role::kActive || degraded_ || rule_.mode == CommitRule::Mode::kAsync) return;
  if (sb.resync || sb.flushed < commit_lsn_ || sync_joining_.count(sb.id)) return;
  if (sync_listed_.count(sb.id)) {
    // Listed with another data directory (emptied or replaced since): now
    // that this one holds everything too, it is listed again with its own,
    // without waiting for a write to drop it first (an idle cluster never
    // would, and until then this node is not eligible).
    if (!ListedElsewhere(sb.id, sb.incarnation)) return;
    sync_listed_.erase(sb.id);
  } else if (auto b = sync_backoff_.find(sb.id); b != sync_backoff_.end() && Clock::now() < b->second.until) {
    return;
  }
  sync_joining_.insert(sb.id);
  member_incarnation_[sb.id] = sb.incarnation;  // judged by this session's log
  arbiter_->Kick();
}

wal::Lsn EngineImpl::ComputeCommit() {
  const wal::Lsn local = LocalDurable();
  if (rule_.mode == CommitRule::Mode::kAsync) return local;
  const std::optional<wal::Lsn> quorum = QuorumLsn();
  if (!quorum) return degraded_ ? local : commit_lsn_;  // too few standbys to judge the rule
  const wal::Lsn by_rule = std::min(local, *quorum);
  if (degraded_ && by_rule >= degraded_at_) {
    // The standbys hold everything up to where the fallback began: the rule
    // applies again. Under a load they cannot follow, later writes wait for
    // them again (or time out and fall back again, logged and counted).
    degraded_ = false;
    RLOG(kWarn, "engine.commit_restored") << "node=" << opts_.node_id << " rule=" << rule_.ToString()
                                          << " lsn=" << local;
  }
  if (degraded_) return local;
  if (!sync_confirmed_) return commit_lsn_;
  return std::max(commit_lsn_, std::min(by_rule, MembersHold()));
}

Status EngineImpl::PublishSync(std::set<std::string> next) {
  std::vector<std::string> entries;
  {
    MutexLock l(&mu_);
    for (auto it = next.begin(); it != next.end();) {
      // Only standbys that bound the commit point already can be listed:
      // one checked earlier may have been dropped since.
      if (sync_listed_.count(*it) || (sync_joining_.count(*it) && Judged(*it))) {
        ++it;
      } else {
        it = next.erase(it);
      }
    }
    // Each is listed with the data directory whose log was judged (set
    // when it joined: its session's, or at promotion the last listing's).
    for (const auto& id : next) entries.push_back(SyncEntry{id, member_incarnation_[id]}.ToString());
    // They stay bound as listed from here; removed ones stay listed until
    // etcd no longer lists them.
    for (const auto& id : next) {
      sync_listed_.insert(id);
      sync_joining_.erase(id);
    }
  }
  Status st = arbiter_->PublishSyncSet(entries);
  MutexLock l(&mu_);
  if (!st.ok()) {
    sync_dirty_ = true;
    RLOG(kDebug, "engine.sync_set_not_published") << "node=" << opts_.node_id << " error=\"" << st.ToString() << "\"";
    return st;
  }
  sync_dirty_ = false;
  if (next != sync_listed_ || !sync_confirmed_) {
    std::string members;
    for (const auto& id : next) members += (members.empty() ? "" : ",") + id;
    RLOG(kInfo, "engine.sync_set") << "node=" << opts_.node_id << " standbys=" << members;
  }
  sync_confirmed_ = true;
  sync_listed_ = std::move(next);
  AdvanceCommit();
  return Status::OK();
}

void EngineImpl::DropLaggingMembers(wal::Lsn lsn) {
  const std::optional<wal::Lsn> quorum = QuorumLsn();
  if (degraded_ || !quorum || std::min(LocalDurable(), *quorum) < lsn || MembersHold() >= lsn) return;
  // Joining ones are not listed yet: dropped at once.
  for (auto it = sync_joining_.begin(); it != sync_joining_.end();) {
    if (MemberLsn(*it) < lsn) {
      NoteDropped(*it);
      it = sync_joining_.erase(it);
    } else {
      ++it;
    }
  }
  if (MembersHold() >= lsn) {
    AdvanceCommit();
    return;
  }
  // One drop at a time (the others wait for its outcome); after etcd
  // refused one, the next try waits a grace.
  if (sync_dropping_ || Clock::now() < sync_drop_retry_) return;
  sync_dropping_ = true;
  mu_.Unlock();
  {
    MutexLock sl(&sync_mu_);
    std::set<std::string> keep;
    std::string dropped;
    std::vector<std::string> dropped_ids;
    {
      MutexLock l(&mu_);
      for (const auto& id : sync_listed_) {
        // Another writer may have done it meanwhile; after a demotion the
        // set is the next active's business.
        if (MemberLsn(id) >= lsn || role_.load() != Role::kActive) {
          keep.insert(id);
        } else {
          dropped_ids.push_back(id);
          dropped += (dropped.empty() ? "" : ",") + id;
        }
      }
      if (!dropped.empty()) {
        // The same write lists every standby that holds this write (they
        // hold all that is committed, which is less): the rule's standbys
        // always stay eligible.
        for (const auto& [id, sb] : standbys_) {
          if (sb->resync || sb->flushed < lsn || keep.count(id)) continue;
          sync_joining_.insert(id);
          member_incarnation_[id] = sb->incarnation;
          Backoff& b = sync_backoff_[id];
          b.until = std::min(b.until, Clock::now());  // it holds the write: no wait
          keep.insert(id);
        }
      }
    }
    if (!dropped.empty()) {
      RLOG(kWarn, "engine.sync_member_lagging") << "node=" << opts_.node_id << " lsn=" << lsn << " standbys=" << dropped
                                                << " grace_ms=" << opts_.sync_grace.count()
                                                << " (no longer eligible for promotion until caught up)";
      const bool published = PublishSync(std::move(keep)).ok();
      MutexLock l(&mu_);
      if (published) {
        for (const auto& id : dropped_ids) NoteDropped(id);  // counted once etcd took it
      } else {
        sync_drop_retry_ = Clock::now() + opts_.sync_grace;
      }
    }
  }
  mu_.Lock();
  sync_dropping_ = false;
  WakeAllWriters();
}

void EngineImpl::FallBackToAsync(wal::Lsn lsn) {
  if (degraded_) return;
  degraded_ = true;
  degraded_at_ = wal_->last_lsn();
  ++fallbacks_;
  RLOG(kWarn, "engine.commit_fallback") << "node=" << opts_.node_id << " rule=" << rule_.ToString() << " lsn=" << lsn
                                        << " waited_ms=" << opts_.commit_timeout.count()
                                        << " standbys=" << standbys_.size()
                                        << (arbiter_ ? " (acknowledging as async; no standby is eligible now)"
                                                     : " (acknowledging as async)");
}

Status EngineImpl::ValidateRule(const CommitRule& rule) const {
  if (rule.mode != CommitRule::Mode::kAsync && (rule.count < 1 || rule.count > 999)) {
    return Status::InvalidArgument("commit rule " + rule.ToString() + ": N must be 1..999");
  }
  return Status::OK();
}

Status EngineImpl::SetCommitRule(const CommitRule& rule) {
  REPLICA_RETURN_IF_ERROR(ValidateRule(rule));
  ReaderLock store(&store_mu_);
  MutexLock l(&mu_);
  RLOG(kInfo, "engine.commit_rule") << "node=" << opts_.node_id << " from=" << rule_.ToString()
                                    << " to=" << rule.ToString();
  const bool to_sync = rule_.mode == CommitRule::Mode::kAsync && rule.mode != CommitRule::Mode::kAsync;
  const bool to_async = rule_.mode != CommitRule::Mode::kAsync && rule.mode == CommitRule::Mode::kAsync;
  rule_ = rule;
  if (to_sync || to_async) sync_joining_.clear();  // joined by what the other rule committed
  if (to_sync && arbiter_ && role_.load() == Role::kActive) {
    // The set in etcd is from before (or absent): nothing commits by the
    // new rule until the role loop has written a current one.
    sync_confirmed_ = false;
    arbiter_->Kick();
  }
  // A standby only keeps the rule (it judges eligibility by it); its commit
  // point is the active's business.
  if (role_.load() == Role::kActive) AdvanceCommit();
  WakeAllWaiters();
  WakeAllWriters();
  return Status::OK();
}

void EngineImpl::AdvanceCommit() {
  wal::Lsn c = ComputeCommit();
  if (c > commit_lsn_) {
    commit_lsn_ = c;
    apply_cv_.SignalAll();
  }
}

Result<uint64_t> EngineImpl::DoWrite(const WriteBatch& batch, std::optional<std::vector<bool>>* existed) {
  if (role_.load() != Role::kActive) {
    MutexLock l(&mu_);
    // The active's id and client address when known (etcd publishes them),
    // its replication address otherwise (static mode).
    std::string active = active_id_.empty() ? std::string("not known") : "node " + active_id_;
    if (!active_client_.empty()) active += ", clients at " + active_client_;
    if (!follow_.empty()) active += ", replication at " + follow_;
    return Status::NotActive("node " + opts_.node_id + " is a standby; the active is " + active);
  }
  if (!ActiveLeaseHeld()) {
    return Status::NotActive("node " + opts_.node_id +
                             " cannot renew the etcd lease it won the active role under: it accepts no writes");
  }
  if (handing_over_.load()) {
    return Status::NotActive("node " + opts_.node_id + " is handing the active role over (switchover)");
  }
  if (batch.empty()) return Status::InvalidArgument("empty write batch");
  {
    MutexLock l(&mu_);
    if (closing_) return Status::Aborted("the engine is shutting down");
    if (!failure_.ok()) return failure_;
    // Counted from here to the end of the append, under mu_ with the role:
    // Demote waits for such appends, so that none lands in the log after
    // the node followed another active (its tail would then hold it).
    if (role_.load() != Role::kActive) return Status::NotActive("node " + opts_.node_id + " is no longer the active");
    ++appends_in_flight_;
  }
  if (opts_.test_fault) (void)opts_.test_fault("write.append");
  // Acknowledged only while this node is still the active of the epoch it
  // wrote in: waiting may release mu_ (etcd calls), and a node demoted
  // meanwhile can apply another active's record at this LSN.
  const uint64_t term = epoch_.load();
  Result<wal::Lsn> appended = wal_->Append(term, wal::RecordType::kData, batch.Encode());
  if (appended.ok()) append_times_.Record(*appended, Clock::now());
  MutexLock l(&mu_);
  if (--appends_in_flight_ == 0) appends_cv_.SignalAll();
  if (!appended.ok()) return appended.status();
  const wal::Lsn lsn = *appended;
  AdvanceCommit();
  // After-sync: acknowledged only once applied, which waits for the commit rule.
  WriteWaiter waiter(&mu_);
  const auto registered = waiters_.emplace(lsn, &waiter);
  struct Unregister {
    EngineImpl* e;
    std::multimap<wal::Lsn, WriteWaiter*>::iterator it;
    ~Unregister() NO_THREAD_SAFETY_ANALYSIS { e->waiters_.erase(it); }  // mu_ is held
  } unregister{this, registered};
  auto deadline = Clock::now() + opts_.commit_timeout;
  auto grace = Clock::now() + opts_.sync_grace;
  bool warned = false;
  auto still_active = [&] { return role_.load() == Role::kActive && epoch_.load() == term; };
  while (applied_lsn_ < lsn && !closing_ && failure_.ok() && still_active()) {
    if (commit_lsn_ >= lsn) {
      waiter.cv.Wait();  // committed; the applier wakes it once it is applied
      continue;
    }
    if (rule_.mode != CommitRule::Mode::kAsync && (!sync_listed_.empty() || !sync_joining_.empty()) &&
        grace < deadline) {
      // Held back by a listed standby that lacks it (the rule may hold
      // without it): after the grace, it is removed from the set in etcd,
      // then the write is acknowledged without it.
      if (!waiter.cv.WaitUntil(grace) && Clock::now() >= grace) {
        // Another writer's drop under way: look again soon after it ends.
        const bool busy = sync_dropping_;
        DropLaggingMembers(lsn);
        grace = Clock::now() + (busy ? std::min<std::chrono::milliseconds>(opts_.sync_grace, 10ms) : opts_.sync_grace);
      }
      continue;
    }
    if (waiter.cv.WaitUntil(deadline) || Clock::now() < deadline) continue;
    if (opts_.commit_fallback == "async") {
      if (!degraded_ && arbiter_) {
        // Nothing is acknowledged without the standbys until etcd no longer
        // lists them as eligible for promotion (degraded_ is set under
        // sync_mu_, so that no role-loop write of the set comes between).
        mu_.Unlock();
        sync_mu_.Lock();
        {
          MutexLock jl(&mu_);
          sync_joining_.clear();
        }
        Status ps = PublishSync({});
        mu_.Lock();
        if (ps.ok()) FallBackToAsync(lsn);
        sync_mu_.Unlock();
        if (!ps.ok()) {
          RLOG(kWarn, "engine.commit_waiting") << "node=" << opts_.node_id << " lsn=" << lsn
                                               << " (cannot withdraw the standbys' eligibility from etcd: "
                                               << ps.ToString() << ")";
        }
      } else {
        FallBackToAsync(lsn);
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
  std::optional<std::vector<bool>> counted;
  if (existed != nullptr) {
    const size_t deletes = static_cast<size_t>(
        std::count_if(batch.ops().begin(), batch.ops().end(), [](const auto& op) { return op.is_delete; }));
    if (auto it = delete_counts_.find(lsn); it != delete_counts_.end()) {
      // Flags of another record at this LSN (one cut by a rewind and never
      // claimed) would not match the batch: then the count is lost.
      if (it->second.size() == deletes) counted = std::move(it->second);
      delete_counts_.erase(it);
    }
    if (deletes == 0) counted.emplace();  // nothing to report
  }
  if (!failure_.ok()) return failure_;
  if (!still_active()) {
    return Status::NotActive("node " + opts_.node_id + " was fenced before LSN " + std::to_string(lsn) +
                             " was acknowledged; the write may be lost");
  }
  if (applied_lsn_ < lsn) {
    return Status::Aborted("the engine is closing; the write is in the log at LSN " + std::to_string(lsn) +
                           " but was not acknowledged: its outcome is unknown (it is applied if the node, or "
                           "a standby that holds it, goes on)");
  }
  if (!ActiveLeaseHeld()) {
    // Acknowledged only while the lease certainly stands, so that no two
    // nodes ever acknowledge writes in overlapping intervals.
    return Status::NotActive("node " + opts_.node_id + " lost its etcd lease before LSN " + std::to_string(lsn) +
                             " was acknowledged; the write may be lost");
  }
  if (existed != nullptr) *existed = std::move(counted);
  return lsn;
}

Result<std::optional<std::string>> EngineImpl::Get(const std::string& key) {
  REPLICA_RETURN_IF_ERROR(FailedStatus());
  ReaderLock store(&store_mu_);
  if (db_closed_.load()) return StorageGone();
  std::string value;
  auto s = db_->Get(rocksdb::ReadOptions(), handles_[0], key, &value);
  if (s.IsNotFound()) return std::optional<std::string>();
  REPLICA_RETURN_IF_ERROR(FromRocks(s, "get"));
  return std::optional<std::string>(std::move(value));
}

Result<StatedRead> EngineImpl::ReadWithStaleness(const std::string& key,
                                                 std::optional<std::chrono::milliseconds> max_staleness) {
  REPLICA_RETURN_IF_ERROR(FailedStatus());  // the failure, not a staleness
  StatedRead r;
  {
    MutexLock l(&mu_);
    r.applied_lsn = applied_lsn_;  // read first: the data read below is at least this recent
  }
  const bool active = role_.load() == Role::kActive;
  if (active && ActiveLeaseHeld()) {
    r.staleness = std::chrono::milliseconds(0);
  } else if (active) {
    // Self-fenced (its lease renewal is overdue): its data was the
    // cluster's newest until the deadline; since then another node may
    // have been elected and be writing. Unknown if the lease it won is gone.
    if (arbiter_->WonLeaseCurrent()) {
      r.staleness = std::max(std::chrono::milliseconds(0), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                               Clock::now() - arbiter_->LeaseDeadline()));
    }
  } else {
    const wal::Lsn head = upstream_last_.load();
    r.behind_records = head > r.applied_lsn ? head - r.applied_lsn : 0;
    if (const int64_t since = applied_caught_up_us_.load(); since != 0) {
      r.staleness = std::chrono::milliseconds(std::max<int64_t>(0, NowMicros() - since) / 1000);
    }
  }
  if (max_staleness && (!r.staleness || *r.staleness > *max_staleness)) {
    const std::string age = r.staleness ? std::to_string(r.staleness->count()) + " ms" : std::string("of unknown age");
    if (active) {
      return Status::TooStale("node " + opts_.node_id +
                              " is an active that cannot renew its lease (self-fenced): another node may be writing, "
                              "its data may be " + age + " old; the bound is " +
                              std::to_string(max_staleness->count()) + " ms");
    }
    return Status::TooStale(
        "node " + opts_.node_id + " is a standby whose data is " +
        (r.staleness ? age : std::string("of unknown age (not caught up with a live active)")) + " behind its active (" +
        std::to_string(r.behind_records) + " records as of its last report); the bound is " +
        std::to_string(max_staleness->count()) + " ms");
  }
  REPLICA_ASSIGN_OR_RETURN(r.value, Get(key));
  return r;
}

Result<std::vector<std::pair<std::string, std::string>>> EngineImpl::Scan(const std::string& start, size_t limit) {
  REPLICA_RETURN_IF_ERROR(FailedStatus());
  ReaderLock store(&store_mu_);
  if (db_closed_.load()) return StorageGone();
  std::vector<std::pair<std::string, std::string>> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[0]));
  for (it->Seek(start); it->Valid() && out.size() < limit; it->Next()) {
    out.emplace_back(it->key().ToString(), it->value().ToString());
  }
  REPLICA_RETURN_IF_ERROR(FromRocks(it->status(), "scan"));
  return out;
}

Result<std::vector<std::string>> EngineImpl::ScanKeys(const std::string& start, size_t limit) {
  REPLICA_RETURN_IF_ERROR(FailedStatus());
  ReaderLock store(&store_mu_);
  if (db_closed_.load()) return StorageGone();
  std::vector<std::string> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[0]));
  for (it->Seek(start); it->Valid() && out.size() < limit; it->Next()) out.push_back(it->key().ToString());
  REPLICA_RETURN_IF_ERROR(FromRocks(it->status(), "scan"));
  return out;
}

// now + timeout, for a caller's timeout: at most a year, so that a huge one
// cannot overflow the clock into the past.
Clock::time_point DeadlineAfter(std::chrono::milliseconds timeout) {
  return Clock::now() + std::clamp<std::chrono::milliseconds>(timeout, 0ms, std::chrono::hours(24 * 365));
}

Result<int> EngineImpl::WaitForReplicas(uint64_t lsn, int count, std::chrono::milliseconds timeout) {
  auto deadline = DeadlineAfter(timeout);
  MutexLock l(&mu_);
  for (;;) {
    int have = 0;
    for (const auto& [_, sb] : standbys_) have += !sb->resync && sb->flushed >= lsn ? 1 : 0;
    if (!failure_.ok()) return failure_;
    if (closing_) return Status::Aborted("the engine is shutting down");
    if (have >= count) return have;
    if (!acks_cv_.WaitUntil(deadline) && Clock::now() >= deadline) {
      have = 0;
      for (const auto& [_, sb] : standbys_) have += !sb->resync && sb->flushed >= lsn ? 1 : 0;
      return have;
    }
  }
}

Status EngineImpl::WaitForApplied(uint64_t lsn, std::chrono::milliseconds timeout) {
  auto deadline = DeadlineAfter(timeout);
  MutexLock l(&mu_);
  while (applied_lsn_ < lsn && !closing_ && failure_.ok()) {
    if (!applied_cv_.WaitUntil(deadline) && Clock::now() >= deadline) break;
  }
  if (!failure_.ok()) return failure_;
  if (applied_lsn_ >= lsn) return Status::OK();
  if (closing_) return Status::Aborted("the engine is shutting down");
  return Status::TimedOut("LSN " + std::to_string(lsn) + " not applied within " + std::to_string(timeout.count()) +
                          " ms (applied " + std::to_string(applied_lsn_) + ")");
}

Status EngineImpl::ApplyRecords(const std::vector<std::pair<wal::Lsn, std::string>>& records, wal::Lsn last,
                                std::vector<std::pair<wal::Lsn, std::vector<bool>>>* deleted) {
  std::vector<WriteBatch> batches;
  batches.reserve(records.size());
  // Counting: each key this apply batch deletes, and whether it exists after
  // the ops so far (RocksDB does not see the batch until it is written);
  // unknown until an op touches it, when RocksDB says. Keys that are never
  // deleted are not tracked.
  std::unordered_map<std::string_view, std::optional<bool>> exists;
  for (const auto& [lsn, payload] : records) {
    auto batch = WriteBatch::Decode(payload);
    if (!batch.ok()) return batch.status().WithContext("record LSN " + std::to_string(lsn));
    batches.push_back(std::move(batch).value());
    if (deleted == nullptr) continue;
    for (const auto& op : batches.back().ops()) {
      if (op.is_delete) exists.emplace(op.key, std::nullopt);
    }
  }
  rocksdb::WriteBatch wb;
  for (size_t r = 0; r < records.size(); ++r) {
    std::vector<bool> found;  // per delete of this record, in order
    for (const auto& op : batches[r].ops()) {
      if (auto it = exists.find(op.key); it != exists.end()) {
        if (op.is_delete) {
          if (!it->second) {  // first touch: what RocksDB holds
            std::string ignored;
            const rocksdb::Status gs = db_->Get(rocksdb::ReadOptions(), handles_[0], op.key, &ignored);
            if (!gs.ok() && !gs.IsNotFound()) return FromRocks(gs, "look up a deleted key");
            it->second = gs.ok();
          }
          found.push_back(*it->second);  // a key deleted twice is found once
        }
        it->second = !op.is_delete;  // from here on the batch itself says
      }
      if (op.is_delete) {
        wb.Delete(handles_[0], op.key);
      } else {
        wb.Put(handles_[0], op.key, op.value);
      }
    }
    if (!found.empty()) deleted->emplace_back(records[r].first, std::move(found));
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
    Fail(reader_or.status().WithContext("the applier could not read the log"));
    return;
  }
  auto reader = std::move(reader_or).value();
  std::vector<std::pair<wal::Lsn, std::string>> records;
  std::vector<std::pair<wal::Lsn, std::vector<bool>>> deleted;
  bool have_pending = false;
  wal::RecordView rec;
  for (;;) {
    {
      MutexLock l(&mu_);
      if (closing_ || applier_stop_) return;
    }
    MaintainRetention(/*force=*/false);
    // Take what is readable (and, on the active, committed), up to a batch.
    records.clear();
    wal::Lsn last = 0;
    Status error;
    while (records.size() < kMaxApplyRecords) {
      if (!have_pending) {
        if (records.empty() && wal_->options().sync_policy != wal::SyncPolicy::kNone &&
            wal_->durable_lsn() < reader->next_lsn()) {
          // Nothing is applied before it is durable here: wait for that
          // (one wake-up per group) rather than for the record to be
          // written, which comes first and would wake this thread twice.
          wal_->WaitForDurable(reader->next_lsn(), Clock::now() + 100ms);
        }
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
              apply_cv_.WaitUntil(Clock::now() + 100ms);
            }
          }
          break;  // not committed yet: apply what we have, then wait
        }
      } else {
        {
          MutexLock l(&mu_);
          if (rec.lsn > apply_cap_) {
            if (records.empty()) apply_cv_.WaitUntil(Clock::now() + 100ms);
            break;  // a demoted active's tail: not until an active accepts the log
          }
        }
        if (LocalDurable() < rec.lsn) {
          // A standby applies only what its own WAL holds durably.
          if (records.empty()) wal_->WaitForDurable(rec.lsn, Clock::now() + 100ms);
          if (LocalDurable() < rec.lsn) break;
        }
      }
      if (rec.type == static_cast<uint8_t>(wal::RecordType::kData)) records.emplace_back(rec.lsn, rec.payload);
      last = rec.lsn;
      have_pending = false;
      if (pins_pending_.load() > 0 && PinWanted(last)) break;  // logdiff wants a snapshot exactly here
    }
    // On the active, once a caller asked for delete counts (role and flag
    // read after the records: a counted write sets the flag before it appends).
    const bool counting = role_.load() == Role::kActive && count_deletes_.load();
    deleted.clear();
    if (error.ok() && last > 0 && opts_.test_fault) error = opts_.test_fault("apply");
    if (error.ok() && last > 0) error = ApplyRecords(records, last, counting ? &deleted : nullptr);
    if (!error.ok()) {
      {
        MutexLock l(&mu_);
        if (closing_ || applier_stop_) return;
      }
      RLOG(kError, "engine.apply_failed") << "node=" << opts_.node_id << " error=\"" << error.ToString() << "\"";
      Fail(error.WithContext("apply"));
      return;
    }
    if (last == 0) continue;
    std::shared_ptr<transport::Session> upstream;
    {
      MutexLock l(&mu_);
      applied_lsn_ = last;
      for (auto& [lsn, found] : deleted) delete_counts_[lsn] = std::move(found);
      if (!delete_counts_.empty() && last > kKeepDeleteCounts) {
        // Unclaimed (a writer that failed after its record was applied).
        delete_counts_.erase(delete_counts_.begin(), delete_counts_.lower_bound(last - kKeepDeleteCounts));
      }
      for (auto* w : pin_waits_) {
        if (w->snapshot || w->passed) continue;
        if (w->lsn == last) {
          w->snapshot = db_->GetSnapshot();
        } else if (w->lsn < last) {
          w->passed = true;
        }
      }
      applied_cv_.SignalAll();
      WakeWriters(last);
      if (role_.load() == Role::kStandby && upstream_head_known_.load() && last >= upstream_last_.load()) {
        applied_caught_up_us_.store(NowMicros());
      }
      upstream = upstream_;
    }
    if (upstream && role_.load() == Role::kStandby) SendAck(upstream);
  }
}

void EngineImpl::SendAck(const std::shared_ptr<transport::Session>& s) {
  proto::Control msg;
  auto* ack = msg.mutable_ack();
  ack->set_flushed_lsn(LocalDurable());  // under --wal-sync none: what was written
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
                                     ", which this node no longer retains; it is resynced from a snapshot when it "
                                     "subscribes again")
                    : reader_or.status();
    RLOG(kWarn, "engine.ship_refused") << "standby=" << sb->id << " reason=\"" << st.ToString() << "\"";
    sb->session->Close(st);
    return;
  }
  {
    MutexLock l(&sb->ship_mu);
    sb->reader = std::move(reader_or).value();
  }
  {
    MutexLock l(&ship_list_mu_);
    ship_list_.push_back(sb);
  }
  struct Unlist {
    EngineImpl* e;
    Standby* sb;
    ~Unlist() {
      {
        MutexLock l(&e->ship_list_mu_);
        auto& v = e->ship_list_;
        v.erase(std::remove_if(v.begin(), v.end(), [&](const auto& x) { return x.get() == sb; }), v.end());
      }
      MutexLock l(&sb->ship_mu);
      sb->unsent.reset();
      sb->reader.reset();
    }
  } unlist{this, sb.get()};
  while (!sb->stop.load()) {
    const uint32_t seen = sb->kick.Load();  // read first: a kick from here on is not lost
    Status st;
    wal::Lsn damaged_at = 0;
    {
      MutexLock l(&sb->ship_mu);
      bool from_log = false;
      st = ShipSome(sb.get(), &sb->sent_by_shipper, &from_log);
      if (from_log && IsLogDamage(st)) damaged_at = sb->reader->next_lsn();
    }
    if (st.ok()) {
      // All sent. The writer of the next group usually sends it itself;
      // this thread wakes when it could not (or to look at `stop`).
      sb->kick.WaitOnceUntil(seen, Clock::now() + 100ms);
    } else if (st.code() == StatusCode::kBusy) {
      if (sb->stop.load()) return;
      sb->WaitWritable();  // the standby is slow: stop reading the log until the queue drains
    } else {
      // The standby subscribes again, and is then resynced.
      if (damaged_at != 0) NoteLogDamage(sb->id, damaged_at, st);
      sb->session->Close(st);
      return;
    }
  }
}

void EngineImpl::NoteLogDamage(const std::string& standby, wal::Lsn at, const Status& st) {
  ++wal_damage_found_;
  {
    MutexLock l(&mu_);
    damaged_.insert(at);
  }
  RLOG(kError, "engine.log_damaged") << "node=" << opts_.node_id << " standby=" << standby << " from_lsn=" << at
                                     << " error=\"" << st.ToString()
                                     << "\" (standbys that need it are resynced from a snapshot)";
}

std::optional<wal::Lsn> EngineImpl::DamageFrom(wal::Lsn from) {
  const wal::Lsn first = wal_->first_lsn();
  {
    MutexLock l(&mu_);
    damaged_.erase(damaged_.begin(), damaged_.lower_bound(first));  // purged since
  }
  for (;;) {
    wal::Lsn at;
    {
      MutexLock l(&mu_);
      auto it = damaged_.lower_bound(from);
      if (it == damaged_.end()) return std::nullopt;
      at = *it;
    }
    if (IsLogDamage(LogReadFault(at))) return at;
    auto reader = wal_->NewReader(at);
    if (reader.ok()) {
      auto span = (*reader)->NextRaw(1);
      if (IsLogDamage(span.status())) return at;
    }
    MutexLock l(&mu_);
    damaged_.erase(at);
  }
}

Status EngineImpl::LogReadFault(wal::Lsn lsn) const {
  if (!opts_.test_fault) return Status::OK();
  const std::string step = "log.read " + std::to_string(lsn);
  return opts_.test_fault(step.c_str());
}

Status EngineImpl::ShipSome(Standby* sb, std::atomic<uint64_t>* sent, bool* from_log) {
  for (;;) {
    if (!sb->unsent) {
      Status fault = LogReadFault(sb->reader->next_lsn());
      auto span = fault.ok() ? sb->reader->NextRaw(kMaxShipBytes) : Result<std::optional<wal::RawSpan>>(fault);
      if (!span.ok()) {
        sb->drained = false;
        if (from_log != nullptr) *from_log = true;
        return span.status();
      }
      sb->drained = !span->has_value();
      if (sb->drained) return Status::OK();
      sb->unsent = std::move(**span);
    }
    // Stopped (a demotion): nothing more goes out, not even a span read
    // before the stop, which may hold a record the demotion cuts.
    if (sb->stop.load()) return Status::Aborted("the standby's shipping stopped");
    const wal::RawSpan& s = *sb->unsent;
    std::shared_ptr<const void> keep = s.file;  // keeps the segment open until sent
    Status st = sb->session->SendFile(std::move(keep), s.file->NativeHandle(), s.offset, s.length);
    if (!st.ok()) {
      sb->drained = false;
      return st;  // Busy: the span stays for the next try
    }
    sb->shipped.store(s.last_lsn);
    sb->unsent.reset();
    sent->fetch_add(1, std::memory_order_relaxed);
  }
}

void EngineImpl::ShipWritten() {
  MutexLock l(&ship_list_mu_);
  for (const auto& sb : ship_list_) {
    if (sb->stop.load()) continue;
    if (!sb->ship_mu.TryLock()) {
      sb->kick.Bump();  // its shipper is sending: it looks again once done
      continue;
    }
    Status st = sb->drained ? ShipSome(sb.get(), &sb->sent_by_writer) : Status::Busy("catching up");
    sb->ship_mu.Unlock();
    if (!st.ok()) sb->kick.Bump();  // behind, a full queue, or an error: the shipper deals with it
  }
}

bool EngineImpl::SendFileRange(Standby* sb, const std::shared_ptr<const void>& keep, int fd, uint64_t offset,
                               uint64_t length) {
  while (length > 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(length, kMaxShipBytes));
    for (;;) {
      Status st = sb->session->SendFile(keep, fd, offset, n);
      if (st.ok()) break;
      if (st.code() != StatusCode::kBusy || sb->stop.load()) return false;
      sb->WaitWritable();
    }
    offset += n;
    length -= n;
  }
  return true;
}

void EngineImpl::SnapshotLoop(std::shared_ptr<Standby> sb, std::string reason) {
  struct Done {
    Standby* sb;
    ~Done() { sb->done.store(true); }
  } done{sb.get()};
  const auto started = Clock::now();
  auto fail = [&](const Status& st) {
    RLOG(kError, "engine.resync_failed") << "node=" << opts_.node_id << " standby=" << sb->id << " error=\""
                                         << st.ToString() << "\"";
    sb->session->Close(st);
  };
  const std::string cp_root = JoinPath(opts_.data_dir, "checkpoints");
  const std::string cp_dir = JoinPath(cp_root, sb->id + "-" + std::to_string(++snapshot_seq_));
  struct Cleanup {
    std::string dir;
    ~Cleanup() { (void)snapshot::RemoveTree(dir); }  // open descriptors keep queued files readable
  } cleanup{cp_dir};
  Status st = Env::Default()->CreateDirIfMissing(cp_root);
  if (st.ok()) st = snapshot::RemoveTree(cp_dir);
  if (!st.ok()) return fail(st);
  {
    // Held from the applied LSN on while the checkpoint is made (flushes and
    // hashes every file: it can take minutes), so that retention cannot
    // purge the seed meanwhile; narrowed to the seed below.
    MutexLock l(&mu_);
    slots_[sb->id] = std::max<wal::Lsn>(1, applied_lsn_);
  }
  auto cp = snapshot::MakeCheckpoint(db_.get(), cp_dir, kMetaColumnFamily, kAppliedKey, &checkpoint_hashes_);
  if (!cp.ok()) return fail(cp.status());

  // The seed: the stored frames holding the checkpoint's LSN, from which the
  // standby's new log starts, so that its next Subscribe can be checked.
  proto::Control offer_msg;
  auto* offer = offer_msg.mutable_snapshot_offer();
  std::optional<wal::RawSpan> seed;
  if (cp->lsn > 0) {
    auto reader = wal_->NewReader(cp->lsn);
    if (!reader.ok()) return fail(reader.status().WithContext("read the seed at LSN " + std::to_string(cp->lsn)));
    // The seed frame itself unreadable: no resync can start until a write
    // moves the checkpoint's LSN past it (operations.md).
    auto seed_failed = [&](const Status& st) {
      if (IsLogDamage(st)) NoteLogDamage(sb->id, cp->lsn, st);
      fail(st);
    };
    auto span = (*reader)->NextRaw(1);
    if (!span.ok()) return seed_failed(span.status());
    if (!span->has_value() || (*span)->first_lsn > cp->lsn || (*span)->last_lsn < cp->lsn) {
      return fail(Status::Corruption("no stored frame holds the checkpoint's LSN " + std::to_string(cp->lsn)));
    }
    seed = std::move(**span);
    std::string bytes;
    st = seed->ReadInto(&bytes);
    if (!st.ok()) return seed_failed(st);
    offer->set_seed_first_lsn(seed->first_lsn);
    offer->set_seed_size(bytes.size());
    offer->set_seed_xxh3(XXH3_64bits(bytes.data(), bytes.size()));
    MutexLock l(&mu_);
    slots_[sb->id] = seed->first_lsn;  // keep the seed and everything after it
  } else {
    offer->set_seed_first_lsn(1);
  }
  offer->set_lsn(cp->lsn);
  offer->set_epoch(epoch_.load());
  offer->set_epoch_history(wal_->epoch_history().Encode());
  offer->set_reason(reason);
  std::map<std::string, const snapshot::FileInfo*> by_name;
  for (const auto& f : cp->files) {
    auto* pf = offer->add_files();
    pf->set_name(f.name);
    pf->set_size(f.size);
    pf->set_xxh3(f.xxh3);
    by_name[f.name] = &f;
  }
  if (!sb->session->SendControl(offer_msg).ok()) return;

  // Wait for the standby to say which files it lacks.
  proto::SnapshotRequest request;
  {
    MutexLock l(&sb->writable_mu);
    uint64_t checkpoint_bytes = 0;
    for (const auto& f : cp->files) checkpoint_bytes += f.size;
    const auto deadline = Clock::now() + kSnapshotRequestTimeout +
                          std::chrono::seconds(2 * checkpoint_bytes / kSnapshotHashBytesPerSecond);
    while (!sb->snapshot_request && !sb->stop.load() && !sb->session->closed() && Clock::now() < deadline) {
      sb->writable_cv.WaitUntil(std::min(deadline, Clock::now() + 100ms));
    }
    if (!sb->snapshot_request) {
      if (!sb->stop.load() && !sb->session->closed()) {
        fail(Status::TimedOut("the standby did not answer the snapshot offer"));
      }
      return;
    }
    request = *sb->snapshot_request;
  }
  // The whole request first: each name once, and in the snapshot (a name
  // repeated would send a file again and again).
  std::set<std::string> asked;
  for (const auto& name : request.names()) {
    if (!asked.insert(name).second) return fail(Status::InvalidArgument("the standby asked for '" + name + "' twice"));
    if (!(name == snapshot::kSeedName && seed) && !by_name.count(name)) {
      return fail(Status::InvalidArgument("the standby asked for '" + name + "', which is not in the snapshot"));
    }
  }
  uint64_t files = 0, bytes = 0;
  for (const auto& name : request.names()) {
    proto::Control begin;
    begin.mutable_snapshot_file()->set_name(name);
    if (name == snapshot::kSeedName && seed) {
      begin.mutable_snapshot_file()->set_size(seed->length);
      if (!sb->session->SendControl(begin).ok()) return;
      if (!SendFileRange(sb.get(), seed->file, seed->file->NativeHandle(), seed->offset, seed->length)) return;
      bytes += seed->length;
      continue;
    }
    auto it = by_name.find(name);
    if (it == by_name.end()) return fail(Status::InvalidArgument("the standby asked for '" + name +
                                                                 "', which is not in the snapshot"));
    auto file = Env::Default()->NewRandomAccessFile(JoinPath(cp_dir, name));
    if (!file.ok()) return fail(file.status());
    std::shared_ptr<RandomAccessFile> keep = std::move(file).value();
    if (keep->NativeHandle() < 0) return fail(Status::NotSupported("checkpoint file without a descriptor"));
    begin.mutable_snapshot_file()->set_size(it->second->size);
    if (!sb->session->SendControl(begin).ok()) return;
    if (!SendFileRange(sb.get(), keep, keep->NativeHandle(), 0, it->second->size)) return;
    ++files;
    bytes += it->second->size;
  }
  proto::Control end;
  end.mutable_snapshot_done()->set_lsn(cp->lsn);
  if (!sb->session->SendControl(end).ok()) return;
  ++snapshots_sent_;
  snapshot_files_sent_ += files;
  snapshot_bytes_sent_ += bytes;
  RLOG(kInfo, "engine.resync_sent") << "node=" << opts_.node_id << " standby=" << sb->id << " lsn=" << cp->lsn
                                    << " files_sent=" << files << " files_in_snapshot=" << cp->files.size()
                                    << " bytes_sent=" << bytes << " bytes_hashed=" << cp->bytes_hashed << " ms="
                                    << std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started)
                                           .count();
}

bool EngineImpl::FromUpstream(const std::shared_ptr<transport::Session>& s, const std::string& what) {
  std::shared_ptr<transport::Session> upstream;
  {
    MutexLock l(&mu_);
    upstream = upstream_;
  }
  if (role_.load() != Role::kStandby) {
    s->Close(Status::InvalidArgument(what + " sent to the active"));
    return false;
  }
  if (s != upstream) {
    s->Close(Status::InvalidArgument(what + " from a node this standby does not follow"));
    return false;
  }
  return true;
}

Status EngineImpl::FinishFile(Receive& r) {
  Status st = r.file->Sync();
  if (st.ok()) st = r.file->Close();
  r.file.reset();
  r.received[r.name] = XXH3_64bits_digest(r.hash.get());
  return st;
}

void EngineImpl::OnSnapshotControl(const std::shared_ptr<transport::Session>& s, const proto::Control& msg) {
  if (!FromUpstream(s, "a snapshot")) return;
  {
    MutexLock l(&mu_);
    if (msg.has_snapshot_offer()) {
      pending_offer_ = msg.snapshot_offer();  // the follower thread answers it
      cv_.SignalAll();
      return;
    }
  }
  Status st;
  bool complete = false;
  {
    MutexLock l(&recv_mu_);
    if (!recv_ || recv_->done) {
      st = Status::InvalidArgument("snapshot data without an accepted offer");
    } else if (msg.has_snapshot_file()) {
      Receive& r = *recv_;
      const auto& f = msg.snapshot_file();
      if (r.file) {
        st = Status::InvalidArgument("snapshot file '" + f.name() + "' begins before '" + r.name + "' ended");
      } else if (!r.expected.count(f.name()) || r.received.count(f.name())) {
        st = Status::InvalidArgument("snapshot file '" + f.name() + "' was not requested, or came twice");
      } else if (const uint64_t offered = OfferedSize(r.offer, f.name()); f.size() != offered) {
        // Checked before a byte is written: a wrong size would otherwise be
        // found only at install, after filling the disk.
        st = Status::InvalidArgument("snapshot file '" + f.name() + "' announced as " + std::to_string(f.size()) +
                                     " bytes, but the offer said " + std::to_string(offered));
      } else {
        const std::string path = f.name() == snapshot::kSeedName
                                     ? JoinPath(snapshot::StagingDir(opts_.data_dir), snapshot::kSeedName)
                                     : JoinPath(snapshot::StagingDb(opts_.data_dir), f.name());
        auto file = Env::Default()->NewWritableFile(path);
        if (!file.ok()) {
          st = file.status();
        } else {
          r.file = std::move(file).value();
          r.name = f.name();
          r.remaining = f.size();
          XXH3_64bits_reset(r.hash.get());
          if (r.remaining == 0) st = FinishFile(r);
        }
      }
    } else if (msg.has_snapshot_done()) {
      Receive& r = *recv_;
      if (r.file || r.received.size() != r.expected.size()) {
        st = Status::InvalidArgument("snapshot ended with " + std::to_string(r.received.size()) + " of " +
                                     std::to_string(r.expected.size()) + " files received");
      } else {
        r.done = true;
        complete = true;
      }
    }
  }
  if (!st.ok()) {
    RLOG(kError, "engine.resync_receive_failed") << "node=" << opts_.node_id << " error=\"" << st.ToString() << "\"";
    s->Close(st);
    return;
  }
  if (complete) {
    MutexLock l(&mu_);
    snapshot_received_ = true;  // the follower thread installs it
    cv_.SignalAll();
  }
}

Status EngineImpl::PrepareResync(const std::shared_ptr<transport::Session>& s, const proto::SnapshotOffer& offer) {
  Env* env = Env::Default();
  std::set<std::string> names;
  for (const auto& f : offer.files()) {
    if (!snapshot::IsPlainFileName(f.name()) || f.name() == snapshot::kSeedName || !names.insert(f.name()).second) {
      return Status::InvalidArgument("snapshot offer with a bad or repeated file name '" + f.name() + "'");
    }
  }
  // The seed is one stored frame (NextRaw(1)); the standby reads it whole
  // into memory at install, so a larger announced size is refused up front.
  if (offer.seed_size() > wal::kFrameHeaderSize + wal::kMaxFramePayload) {
    return Status::InvalidArgument("snapshot offer with a seed of " + std::to_string(offer.seed_size()) +
                                   " bytes; a seed is one WAL frame, at most " +
                                   std::to_string(wal::kFrameHeaderSize + wal::kMaxFramePayload));
  }
  if (offer.seed_first_lsn() == 0 || (offer.lsn() > 0 && offer.seed_first_lsn() > offer.lsn())) {
    return Status::InvalidArgument("snapshot offer whose seed starts at LSN " + std::to_string(offer.seed_first_lsn()) +
                                   ", after its LSN " + std::to_string(offer.lsn()));
  }
  RLOG(kWarn, "engine.resync_offer") << "node=" << opts_.node_id << " lsn=" << offer.lsn()
                                     << " files=" << offer.files_size() << " reason=\"" << offer.reason() << "\"";
  const std::string staging = snapshot::StagingDir(opts_.data_dir);
  const std::string staged_db = snapshot::StagingDb(opts_.data_dir);
  REPLICA_RETURN_IF_ERROR(env->CreateDirIfMissing(staging));
  REPLICA_RETURN_IF_ERROR(env->CreateDirIfMissing(staged_db));
  REPLICA_RETURN_IF_ERROR(snapshot::RemoveTree(snapshot::StagingWal(opts_.data_dir)));
  REPLICA_RETURN_IF_ERROR(snapshot::RemoveTree(JoinPath(staging, snapshot::kSeedName)));
  // What a previous, interrupted resync left and the snapshot does not hold goes.
  REPLICA_ASSIGN_OR_RETURN(auto leftovers, env->GetChildren(staged_db));
  for (const auto& name : leftovers) {
    if (!names.count(name)) REPLICA_RETURN_IF_ERROR(snapshot::RemoveTree(JoinPath(staged_db, name)));
  }
  // Files held unchanged (same name, size and XXH3) are kept or linked, not sent.
  auto same = [&](const std::string& path, const proto::SnapshotFile& f) {
    if (!env->FileExists(path)) return false;
    auto size = env->GetFileSize(path);
    if (!size.ok() || *size != f.size()) return false;
    auto hash = snapshot::HashFile(path);
    return hash.ok() && *hash == f.xxh3();
  };
  auto recv = std::make_unique<Receive>();
  recv->offer = offer;
  proto::Control request;
  for (const auto& f : offer.files()) {
    const std::string staged = JoinPath(staged_db, f.name());
    if (same(staged, f)) {
      ++recv->reused;
      continue;
    }
    (void)snapshot::RemoveTree(staged);
    const std::string live = JoinPath(JoinPath(opts_.data_dir, "db"), f.name());
    if (same(live, f)) {
      if (snapshot::LinkFile(live, staged).ok()) {
        ++recv->reused;
        continue;
      }
    }
    request.mutable_snapshot_request()->add_names(f.name());
    recv->expected.insert(f.name());
    recv->total += f.size();
  }
  if (offer.seed_size() > 0) {
    request.mutable_snapshot_request()->add_names(snapshot::kSeedName);
    recv->expected.insert(snapshot::kSeedName);
    recv->total += offer.seed_size();
  }
  RLOG(kInfo, "engine.resync_request") << "node=" << opts_.node_id << " files_needed=" << recv->expected.size()
                                       << " files_reused=" << recv->reused;
  {
    MutexLock l(&recv_mu_);
    recv_ = std::move(recv);
    receiving_.store(true);
  }
  return s->SendControl(request);
}

void EngineImpl::DropStaleStaging() {
  // A resync being prepared or installed holds staging_mu_; one receiving
  // files has recv_ set. Either way resync/ is in use: leave it.
  if (!staging_mu_.TryLock()) return;
  DropStaleStagingLocked();
  staging_mu_.Unlock();
}

void EngineImpl::DropStaleStagingLocked() {
  {
    MutexLock l(&recv_mu_);
    if (recv_ || receiving_.load()) return;
  }
  const std::string staging = snapshot::StagingDir(opts_.data_dir);
  if (!Env::Default()->FileExists(staging)) return;
  Status st = snapshot::RemoveTree(staging);
  if (st.ok()) {
    RLOG(kInfo, "engine.staging_removed") << "node=" << opts_.node_id << " dir=" << staging
                                          << " (an interrupted resync's files, no longer needed)";
  } else {
    RLOG(kWarn, "engine.staging_removed") << "node=" << opts_.node_id << " dir=" << staging << " error=\""
                                          << st.ToString() << "\"";
  }
}

void EngineImpl::JoinStoppedShippers() {
  std::vector<std::shared_ptr<Standby>> stopped;
  {
    MutexLock l(&mu_);
    stopped.swap(finished_);  // every one was told to stop (Standby::Stop)
  }
  for (auto& sb : stopped) {
    if (sb->shipper.joinable()) sb->shipper.join();
  }
}

Status EngineImpl::InstallSnapshot() {
  const auto started = Clock::now();
  std::unique_ptr<Receive> r;
  {
    MutexLock l(&recv_mu_);
    r = std::move(recv_);
    receiving_.store(false);
  }
  if (!r || !r->done) return Status::Aborted("no complete snapshot to install");
  const proto::SnapshotOffer& offer = r->offer;
  // Every file is there, whole: received ones were hashed as they arrived,
  // kept ones were compared before the request.
  for (const auto& f : offer.files()) {
    const std::string path = JoinPath(snapshot::StagingDb(opts_.data_dir), f.name());
    auto size = Env::Default()->GetFileSize(path);
    if (!size.ok() || *size != f.size()) {
      return Status::Corruption("snapshot file " + f.name() + " is missing or has the wrong size");
    }
    auto got = r->received.find(f.name());
    if (got != r->received.end() && got->second != f.xxh3()) {
      return Status::Corruption("snapshot file " + f.name() + " arrived with a different checksum");
    }
  }
  auto history = wal::EpochHistory::Decode(offer.epoch_history());
  if (!history.ok()) return history.status().WithContext("snapshot offer's epoch history");
  // The new log: the active's history, then the seed frames as stored.
  {
    const std::string wal_dir = snapshot::StagingWal(opts_.data_dir);
    REPLICA_RETURN_IF_ERROR(snapshot::RemoveTree(wal_dir));
    wal::Options wo = wal_options_;
    wo.on_error = nullptr;  // a failed staging log fails this install only
    wo.on_written = nullptr;  // nothing is shipped from it
    wo.start_lsn = offer.seed_first_lsn();
    wo.initial_history = *history;
    REPLICA_ASSIGN_OR_RETURN(auto wal, wal::Wal::Open(wal_dir, wo));
    if (offer.seed_size() > 0) {
      if (r->received[snapshot::kSeedName] != offer.seed_xxh3()) {
        return Status::Corruption("the snapshot's WAL seed arrived with a different checksum");
      }
      REPLICA_ASSIGN_OR_RETURN(std::string seed,
                               ReadWholeFile(Env::Default(), JoinPath(snapshot::StagingDir(opts_.data_dir),
                                                                      snapshot::kSeedName),
                                             wal::kFrameHeaderSize + wal::kMaxFramePayload));
      auto last = wal->AppendRaw(seed);
      if (!last.ok()) return last.status().WithContext("the snapshot's WAL seed");
      if (*last < offer.lsn()) {
        return Status::Corruption("the snapshot's WAL seed ends at LSN " + std::to_string(*last) + ", before LSN " +
                                  std::to_string(offer.lsn()));
      }
    }
    REPLICA_RETURN_IF_ERROR(wal->Close());
  }
  // The switch: nothing may use the old log or database from here on. The
  // shippers and snapshot senders this node ran as an active (stopped at its
  // demotion, not joined) use them without store_mu_: they end first.
  JoinStoppedShippers();
  StopApplier();
  Status st;
  {
    WriterLock store(&store_mu_);
    diff_.ReleaseAll(db_.get());
    CloseStorage();
    st = snapshot::CommitInstall(opts_.data_dir);
    checkpoint_hashes_.Clear();  // another database: its file numbers start over
    if (st.ok() && opts_.test_fault) st = opts_.test_fault("install.reopen");
    if (st.ok()) st = OpenStorage();
    if (!st.ok()) {
      // Whatever happened, a restart finishes or discards the install
      // (RecoverInstall); until then the node has no storage.
      CloseStorage();  // whatever the failed open left open
      RLOG(kError, "engine.resync_install_failed") << "node=" << opts_.node_id << " error=\"" << st.ToString()
                                                   << "\" (the node has failed; restart it to finish the install)";
    }
  }
  if (!st.ok()) {
    st = st.WithContext("snapshot install: the new data could not be opened; restart the node to finish the install");
    Fail(st);
    return st;
  }
  StartApplier();
  ++snapshots_installed_;
  snapshot_files_reused_ += r->reused;
  {
    MutexLock l(&mu_);
    progress_.clear();
    want_snapshot_ = false;
    // The installed snapshot may already hold what WaitForApplied waits for
    // (counted above first, so that a woken caller sees the install).
    WakeAllWaiters();
  }
  RLOG(kWarn, "engine.resync_installed") << "node=" << opts_.node_id << " lsn=" << offer.lsn()
                                         << " files_received=" << r->received.size() << " files_reused=" << r->reused
                                         << " bytes_received=" << r->bytes << " ms="
                                         << std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() -
                                                                                                   started)
                                                .count();
  return Status::OK();
}

NodeInfo EngineImpl::MyInfo() {
  NodeInfo n;
  n.id = opts_.node_id;
  n.address = PublishedAddress();
  n.role = RoleName(role_.load());
  n.epoch = epoch_.load();
  ReaderLock store(&store_mu_);
  if (wal_) {
    n.last_lsn = wal_->last_lsn();
    n.durable_lsn = wal_->durable_lsn();
    n.wal_first_lsn = wal_->first_lsn();
    n.wal_bytes = wal_->size_bytes();
  }
  if (db_ && !db_closed_.load()) {
    uint64_t v = 0;
    if (db_->GetAggregatedIntProperty("rocksdb.total-sst-files-size", &v)) n.db_bytes = v;
  }
  n.resyncs = snapshots_installed_.load();
  n.incarnation = incarnation_;
  MutexLock l(&mu_);
  n.applied_lsn = applied_lsn_;
  n.commit = rule_.ToString();
  n.progress = progress_;
  if (!failure_.ok()) n.failure = failure_.ToString();
  n.final_epoch = final_epoch_.load();
  n.slots = slots_;  // a standby's too: repctl remove tells a mistyped id by them
  n.client_address = ClientAddress();
  if (role_.load() == Role::kActive) {
    const auto now = Clock::now();
    for (const auto& [id, sb] : standbys_) {
      n.standby_lag_bytes[id] = wal_->BytesAfter(sb->flushed);
      n.standby_lag_ms[id] = LagMs(*sb, n.last_lsn, now);
    }
  }
  return n;
}

void EngineImpl::RoleLoop() {
  auto last_publish = Clock::time_point();
  auto vacancy_seen = Clock::time_point();  // when this node first saw no active
  bool lease_held_logged = true;
  bool sync_unreadable_logged = false;
  bool not_eligible_said = false;  // this election
  constexpr auto kSettle = 50ms;
  for (;;) {
    const uint64_t seen = arbiter_->changes();
    {
      MutexLock l(&mu_);
      if (closing_) return;
    }
    if (const Status failed = FailedStatus(); !failed.ok()) {
      // A failed node never campaigns; an active hands the role on. Its
      // session says so, for repctl and for the others' elections (which
      // would otherwise wait for it): published until etcd takes it.
      if (role_.load() == Role::kActive) {
        Demote("the node failed: " + failed.ToString());
        (void)arbiter_->Resign(opts_.node_id);
      }
      while (!arbiter_->Publish(MyInfo()).ok()) {
        MutexLock l(&mu_);
        if (closing_) return;
        cv_.WaitUntil(Clock::now() + 200ms);
      }
      return;
    }
    const auto now = Clock::now();
    if (now - last_publish >= 500ms) {
      Status st = arbiter_->Publish(MyInfo());
      if (st.ok()) last_publish = now;
    }
    // Self-fencing needs no demotion: Write refuses while the lease is in
    // doubt. If etcd answers again and the lease still stands, writes resume
    // with no failover; if the lease ended, the key is gone and the node
    // steps down below.
    if (role_.load() == Role::kActive && !arbiter_->WonLeaseCurrent()) {
      // Certain without asking etcd: the active key ended with that lease.
      Demote("the etcd lease this node won the active role under ended (a new lease replaced it)");
      lease_held_logged = true;
      continue;
    }
    const bool held = ActiveLeaseHeld();
    if (role_.load() == Role::kActive && held != lease_held_logged) {
      RLOG(kWarn, held ? "engine.lease_regained" : "engine.self_fenced")
          << "node=" << opts_.node_id
          << (held ? " (writes accepted again)" : " (the etcd lease could not be renewed in time: writes refused)");
      lease_held_logged = held;
    }
    auto active = arbiter_->GetActive();
    std::map<std::string, std::string> ctl;
    if (auto c = arbiter_->GetControls(); c.ok()) ctl.insert(c->begin(), c->end());
    if (ctl.count("fence/" + opts_.node_id)) {
      if (role_.load() == Role::kActive) {
        Demote("fenced by an operator (repctl fence)");
        (void)arbiter_->Resign(opts_.node_id);
      }
      (void)arbiter_->ClearControl("fence/" + opts_.node_id);
      continue;
    }
    if (ctl.count("reseed/" + opts_.node_id)) {
      (void)arbiter_->ClearControl("reseed/" + opts_.node_id);
      if (role_.load() == Role::kStandby) {
        RequestReseed();
      } else {
        RLOG(kWarn, "engine.reseed_refused") << "node=" << opts_.node_id
                                             << " (the active is the source of snapshots; switch over first)";
      }
    }
    if (role_.load() == Role::kActive) {
      // A removal stands until the node comes back (a session under its
      // id): whichever node is the active drops the slot it keeps for it,
      // also one that held it in an earlier term (a demoted node keeps its
      // slots file, and a switchover back used to bring the slot back).
      std::optional<std::vector<NodeInfo>> live;
      for (const auto& [key, value] : ctl) {
        if (key.rfind("remove/", 0) != 0) continue;
        const std::string id = key.substr(7);
        bool has_slot, connected;
        {
          MutexLock l(&mu_);
          has_slot = slots_.count(id) > 0;
          connected = standbys_.count(id) > 0;
        }
        // A removal with nothing to do here (no slot, and the node not back
        // on this active) costs no etcd read: a node gone for good leaves
        // its key for good, and this runs on every pass.
        if (!has_slot && !connected && id != opts_.node_id) continue;
        if (!live) {
          auto nodes = arbiter_->GetNodes();
          if (!nodes.ok()) break;
          live = std::move(*nodes);
        }
        if (id == opts_.node_id ||
            std::any_of(live->begin(), live->end(), [&](const NodeInfo& n) { return n.id == id; })) {
          (void)arbiter_->ClearControl(key);  // back (or this node): the removal is over
          continue;
        }
        // Connected, its session not in etcd yet: it is back; the key goes
        // once its session shows (RemoveStandby would refuse it on every
        // pass).
        if (has_slot && !connected) RemoveStandby(id);
      }
    }
    {
      // Every node takes the cluster's rule: the active commits by it, and a
      // standby judges eligibility by it when the active is gone.
      if (auto it = ctl.find("commit"); it != ctl.end()) {
        auto rule = CommitRule::Parse(it->second);
        Status st = rule.ok() ? Status::OK() : rule.status();
        if (st.ok() && rule->ToString() != CurrentRule().ToString()) st = SetCommitRule(*rule);
        if (!st.ok() && refused_rule_ != it->second) {
          RLOG(kError, "engine.commit_rule_refused") << "node=" << opts_.node_id << " rule=\"" << it->second
                                                     << "\" error=\"" << st.ToString() << "\"";
        }
        refused_rule_ = st.ok() ? std::string() : it->second;
      }
    }
    // An operator's switchover or promotion names its node and the epoch it
    // was asked in (NODE@EPOCH): once an election moved the epoch on, a
    // request left behind (repctl killed while it waited) is void, so that
    // it cannot force a promotion at some later failover.
    std::string switch_to, forced;
    if (ctl.count("switchover") || ctl.count("promote")) {
      auto epoch = arbiter_->GetEpoch();
      auto current = [&](const char* name) -> std::string {
        auto it = ctl.find(name);
        if (it == ctl.end() || !epoch.ok()) return {};
        const auto [node, asked] = ParseOperatorRequest(it->second);
        if (!node.empty() && asked == *epoch) return node;
        if (stale_request_ != it->second) {
          stale_request_ = it->second;
          RLOG(kInfo, "engine.stale_request") << "node=" << opts_.node_id << " request=ctl/" << name << " value=\""
                                              << it->second << "\" epoch=" << *epoch
                                              << " (not NODE@EPOCH of the current epoch: ignored)";
        }
        return {};
      };
      switch_to = current("switchover");
      forced = current("promote");
    }
    if (role_.load() == Role::kActive && !switch_to.empty() && switch_to != opts_.node_id) {
      HandOver(switch_to);
      continue;
    }
    if (role_.load() == Role::kStandby && active.ok() && !*active &&
        (switch_to == opts_.node_id || forced == opts_.node_id) && now >= campaign_not_before_) {
      // Named by the operator: campaign now, without waiting for the others
      // (a forced promotion ignores eligibility: acknowledged writes may be lost).
      RLOG(kWarn, "engine.operator_promotion") << "node=" << opts_.node_id
                                               << (forced == opts_.node_id ? " (promote --force)" : " (switchover)");
      const NodeInfo me = MyInfo();
      const std::optional<wal::Epoch> from = CampaignEpoch(me);
      auto won = from ? arbiter_->Campaign(me, *from) : Result<std::optional<uint64_t>>(std::nullopt);
      NoteCampaign(won.status());
      if (won.ok() && *won) {
        PromoteOrStepAside(**won);
        (void)arbiter_->ClearControl(forced == opts_.node_id ? "promote" : "switchover");
      }
      continue;
    }
    if (!switch_to.empty() && switch_to != opts_.node_id && active.ok() && !*active) {
      // A switchover to another node is under way: stand aside (for at most
      // a lease TTL, in case the target died meanwhile).
      if (vacancy_seen == Clock::time_point()) vacancy_seen = now;
      if (now - vacancy_seen < opts_.lease_ttl + 1s) {
        arbiter_->WaitForChange(seen, Clock::now() + 100ms);
        continue;
      }
    }
    if (!active.ok() && active.status().IsCorruption()) {
      // etcd answers, with an active key no node wrote: no election runs
      // while it is there. Said once per distinct value, loudly.
      if (active_key_error_ != active.status().ToString()) {
        active_key_error_ = active.status().ToString();
        RLOG(kError, "engine.active_key_unreadable") << "node=" << opts_.node_id << " error=\"" << active_key_error_
                                                     << "\" (no election until an operator deletes or corrects it)";
      }
    } else if (!active.ok()) {
      RLOG(kDebug, "engine.arbiter_unreachable") << "node=" << opts_.node_id << " error=\""
                                                 << active.status().ToString() << "\"";
    } else if (role_.load() == Role::kActive) {
      if (!*active || (*active)->id != opts_.node_id) {
        Demote(*active ? "node " + (*active)->id + " holds the active key" : std::string("its active key is gone"));
      } else if (CurrentRule().mode != CommitRule::Mode::kAsync) {
        // The sync set: listed standbys stay while they can be judged (one
        // being resynced, or whose slot was dropped, cannot; one that lags
        // is dropped by a writer, see Write); joining ones, and connected
        // ones that hold everything committed, are listed. Written when it
        // changes. The first write of a term (or after a switch to this
        // rule) lists only standbys that hold everything committed.
        MutexLock sl(&sync_mu_);  // never overwrites a withdrawal made meanwhile by a degrading write
        std::set<std::string> next;
        bool publish;
        {
          MutexLock l(&mu_);
          if (!degraded_) {
            for (const auto& [id, sb] : standbys_) MaybeJoin(*sb);
            for (const auto& id : sync_listed_) {
              if (Judged(id) && (sync_confirmed_ || MemberLsn(id) >= commit_lsn_)) next.insert(id);
            }
            for (auto it = sync_joining_.begin(); it != sync_joining_.end();) {
              if (!Judged(*it)) {
                it = sync_joining_.erase(it);  // not listed: it can go at once
                continue;
              }
              if (sync_confirmed_ || MemberLsn(*it) >= commit_lsn_) next.insert(*it);
              ++it;
            }
          }
          publish = next != sync_listed_ || sync_dirty_ || !sync_confirmed_;
        }
        if (publish) (void)PublishSync(std::move(next));
      }
    } else if (*active && (*active)->id == opts_.node_id) {
      // The key names this node, which is not the active (it was demoted, or
      // restarted while its old lease lived on): free the role for an election.
      (void)arbiter_->Resign(opts_.node_id);
    } else if (*active) {
      bool need_client;
      {
        MutexLock l(&mu_);
        need_client = active_id_ != (*active)->id || active_client_.empty();
      }
      std::string client;
      if (need_client) {
        if (auto nodes = arbiter_->GetNodes(); nodes.ok()) {
          for (const auto& n : *nodes) {
            if (n.id == (*active)->id) client = n.client_address;
          }
        }
      }
      promote_backoff_ = std::chrono::milliseconds(0);  // another node holds the role
      MutexLock l(&mu_);
      if (need_client) active_client_ = client;
      active_id_ = (*active)->id;
      if ((*active)->id != opts_.node_id && follow_ != (*active)->address) {
        RLOG(kInfo, "engine.follow") << "node=" << opts_.node_id << " active=" << (*active)->id
                                     << " address=" << (*active)->address << " epoch=" << (*active)->epoch;
        follow_ = (*active)->address;
        cv_.SignalAll();
      }
    } else if (LeaseHeld()) {
      // Nobody is active. First every node publishes its final LSNs (what
      // it received from the dead active no longer changes) and waits a
      // moment for the others to do the same; then only an eligible node
      // campaigns, and only if no eligible live node holds more: such a node
      // is given a lease TTL to win before the others campaign anyway.
      if (vacancy_seen == Clock::time_point()) {
        vacancy_seen = now;
        // The LSNs published now are final for this election, which every
        // node names alike: by the epoch key (each win bumps it, so a mark
        // left from an earlier election never matches).
        auto e = arbiter_->GetEpoch();
        final_epoch_ = e.ok() ? *e : 0;
        RLOG(kInfo, "engine.no_active") << "node=" << opts_.node_id << " (the active key is gone: election)";
        if (arbiter_->Publish(MyInfo()).ok()) last_publish = now;
      } else {
        std::optional<std::vector<std::string>> sync;
        if (CurrentRule().mode != CommitRule::Mode::kAsync) {
          auto got = arbiter_->GetSyncSet();
          if (!got.ok()) {
            // Not knowing who is eligible is not "everyone is": wait.
            if (!got.status().IsCorruption()) {
              RLOG(kDebug, "engine.sync_set_unreadable")
                  << "node=" << opts_.node_id << " error=\"" << got.status().ToString() << "\" (not campaigning)";
            } else if (!sync_unreadable_logged) {
              RLOG(kError, "engine.sync_set_unreadable")
                  << "node=" << opts_.node_id << " error=\"" << got.status().ToString() << "\" (not campaigning)";
            }
            sync_unreadable_logged = got.status().IsCorruption();
            arbiter_->WaitForChange(seen, Clock::now() + 100ms);
            continue;
          }
          sync_unreadable_logged = false;
          sync = *got;
        }
        // Listed, and with the data directory it was listed with: a node
        // whose directory was emptied (or replaced) since holds none of the
        // acknowledged writes that listing stood for.
        auto eligible = [&](const NodeInfo& n) { return !sync || SyncListed(*sync, n.id, n.incarnation); };
        const NodeInfo me = MyInfo();
        auto nodes = arbiter_->GetNodes();
        // Settled once every eligible node has published its final LSNs
        // for this election, or after kSettle at the latest.
        bool settled = now - vacancy_seen >= kSettle;
        if (!settled && nodes.ok()) {
          settled = std::all_of(nodes->begin(), nodes->end(), [&](const NodeInfo& n) {
            return n.id == me.id || !eligible(n) || !n.failure.empty() ||
                   (me.final_epoch != 0 && n.final_epoch == me.final_epoch);
          });
        }
        if (!settled) {
          arbiter_->WaitForChange(seen, std::min(vacancy_seen + kSettle, Clock::now() + 5ms));
          continue;
        }
        int ahead = 0;
        if (nodes.ok()) {
          for (const auto& n : *nodes) {
            if (n.id == me.id || !eligible(n) || !n.failure.empty()) continue;  // a failed node never campaigns
            if (n.durable_lsn > me.durable_lsn || (n.durable_lsn == me.durable_lsn && n.id < me.id)) ++ahead;
          }
        }
        if (!eligible(me)) {
          if (!not_eligible_said) {
            // Once per election: why this node waits for another.
            not_eligible_said = true;
            const bool listed = std::any_of(sync->begin(), sync->end(),
                                            [&](const std::string& e) { return SyncEntry::Parse(e).id == me.id; });
            RLOG(kWarn, "engine.not_eligible")
                << "node=" << opts_.node_id
                << (listed ? " (the sync set lists this node id with another data directory: this one was emptied "
                             "or replaced since, and may lack writes that listing stood for)"
                           : " (not in the sync set: it may lack acknowledged writes)")
                << "; it waits for a listed node to win (or repctl promote --force " << opts_.node_id << ")";
          }
        } else if (const auto from = CampaignEpoch(me); !from) {
          // Failed meanwhile: the loop's next pass steps aside for good.
        } else if (now < campaign_not_before_) {
          // A promotion of this node failed a moment ago: not yet.
        } else if (ahead == 0 || now - vacancy_seen >= kSettle + opts_.lease_ttl + 1s) {
          auto won = arbiter_->Campaign(me, *from);
          NoteCampaign(won.status());
          if (won.ok() && *won) {
            vacancy_seen = Clock::time_point();
            not_eligible_said = false;
            final_epoch_ = 0;
            PromoteOrStepAside(**won);
            continue;
          }
        }
      }
    }
    if (active.ok()) active_key_error_.clear();  // readable again: a new damage is said again
    if (active.ok() && *active) {
      vacancy_seen = Clock::time_point();
      not_eligible_said = false;
      // The mark goes from the published session at once.
      if (final_epoch_.exchange(0) != 0 && arbiter_->Publish(MyInfo()).ok()) last_publish = Clock::now();
    }
    auto wake = Clock::now() + 200ms;
    if (vacancy_seen != Clock::time_point() && vacancy_seen + kSettle > Clock::now()) {
      wake = std::min(wake, Clock::now() + 5ms);  // look for the others' final LSNs soon
    }
    arbiter_->WaitForChange(seen, wake);
  }
}

void EngineImpl::HandOver(const std::string& target) {
  const auto started = Clock::now();
  handing_over_ = true;  // writes are refused from here on
  RLOG(kWarn, "engine.switchover_start") << "node=" << opts_.node_id << " to=" << target;
  bool ready = false;
  {
    MutexLock l(&mu_);
    const auto deadline = Clock::now() + 10s;
    for (;;) {
      const wal::Lsn last = wal_->last_lsn();
      auto it = standbys_.find(target);
      ready = it != standbys_.end() && !it->second->resync && it->second->flushed >= last && applied_lsn_ >= last;
      if (ready || closing_ || Clock::now() >= deadline) break;
      acks_cv_.WaitUntil(std::min(deadline, Clock::now() + 50ms));
    }
  }
  if (!ready) {
    handing_over_ = false;
    (void)arbiter_->ClearControl("switchover");
    RLOG(kError, "engine.switchover_failed") << "node=" << opts_.node_id << " to=" << target
                                             << " reason=\"the target did not catch up within 10 s (or is not connected)\"";
    return;
  }
  Demote("switchover to " + target);
  (void)arbiter_->Resign(opts_.node_id);
  RLOG(kWarn, "engine.switchover_handed") << "node=" << opts_.node_id << " to=" << target << " ms="
                                          << std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started)
                                                 .count();
}

void EngineImpl::PromoteOrStepAside(uint64_t epoch) {
  Status st = Promote(epoch);
  if (st.ok()) {
    promote_backoff_ = std::chrono::milliseconds(0);
    return;
  }
  RLOG(kError, "engine.promote_failed") << "node=" << opts_.node_id << " error=\"" << st.ToString() << "\"";
  (void)arbiter_->Resign(opts_.node_id);
  Demote("promotion failed");
  // Not straight into the next campaign: a cause that persists (a fence
  // etcd cannot disprove, a disk that refuses the epoch start) would bump
  // the epoch key tens of times a second. 100 ms, doubling up to 5 s, until
  // another node holds the role or this one is promoted.
  promote_backoff_ = std::clamp<std::chrono::milliseconds>(promote_backoff_ * 2, 100ms, 5s);
  campaign_not_before_ = Clock::now() + promote_backoff_;
}

Status EngineImpl::Promote(uint64_t epoch) {
  const auto started = Clock::now();
  {
    // Stop following, and wait until nothing more can arrive.
    MutexLock l(&mu_);
    if (!failure_.ok()) return failure_;
    follow_.clear();
    auto up = upstream_;
    cv_.SignalAll();
    if (up) {
      mu_.Unlock();
      up->Close(Status::Aborted("this node is being promoted"));
      mu_.Lock();
    }
    const auto deadline = Clock::now() + 5s;
    while (upstream_ && !closing_ && Clock::now() < deadline) cv_.WaitUntil(deadline);
    if (upstream_) return Status::TimedOut("the upstream session did not end");
    // A snapshot install may have failed meanwhile (and taken the storage).
    if (!failure_.ok()) return failure_;
  }
  DrainReceiver();
  DropStaleStaging();  // unless the follower is still installing a snapshot
  // Apply everything received (it is all in the new active's history now).
  REPLICA_RETURN_IF_ERROR(wal_->Sync());
  {
    MutexLock l(&mu_);
    apply_cap_ = UINT64_MAX;
    apply_cv_.SignalAll();
  }
  REPLICA_RETURN_IF_ERROR(WaitForApplied(wal_->last_lsn(), 60s));
  {
    // Nothing this epoch appends is applied before the role is taken (below):
    // a promotion that stops short leaves it as a tail the rejoin can cut.
    MutexLock l(&mu_);
    apply_cap_ = wal_->last_lsn();
  }
  epoch_ = epoch;
  // The other nodes' durable LSNs as they published them: they are the
  // standbys of this epoch (their slots keep the log they need, and those
  // that hold everything so far stay eligible until writes go past them).
  auto nodes = arbiter_->GetNodes();
  {
    MutexLock l(&mu_);
    // A slot past this log's end is from another term's history.
    for (auto& [id, lsn] : slots_) lsn = std::min(lsn, wal_->last_lsn());
    if (nodes.ok()) {
      for (const auto& n : *nodes) {
        if (n.id != opts_.node_id) slots_[n.id] = std::min(n.durable_lsn, wal_->last_lsn());
      }
    }
  }
  // The sync set of this term. Until this node has written it, nothing
  // commits (etcd may hold a set, or none, that this node does not bound).
  // It starts with the standbys the last active listed that are alive: they
  // hold every write it acknowledged. The others join once they hold
  // everything (MaybeJoin).
  // A listed one counts only with the data directory it was listed with.
  std::set<std::string> keep;
  std::map<std::string, std::string> keep_incarnation;
  if (auto listed = arbiter_->GetSyncSet(); listed.ok() && *listed && nodes.ok()) {
    for (const auto& entry : **listed) {
      const SyncEntry e = SyncEntry::Parse(entry);
      for (const auto& n : *nodes) {
        if (n.id != e.id || n.id == opts_.node_id || !SyncListed({entry}, n.id, n.incarnation)) continue;
        keep.insert(n.id);
        keep_incarnation[n.id] = e.incarnation.empty() ? n.incarnation : e.incarnation;
      }
    }
  }
  {
    MutexLock sl(&sync_mu_);
    {
      MutexLock l(&mu_);
      sync_listed_.clear();
      sync_joining_.clear();
      member_incarnation_ = keep_incarnation;
      if (rule_.mode != CommitRule::Mode::kAsync) sync_joining_ = keep;
      sync_backoff_.clear();
      sync_drop_retry_ = Clock::time_point();
      sync_confirmed_ = false;
      sync_dirty_ = false;
    }
    if (CurrentRule().mode != CommitRule::Mode::kAsync) (void)PublishSync(std::move(keep));
  }
  // A newer active fenced this node while it promoted (its key ended during
  // the slow steps above): stop here, before this epoch writes anything.
  auto fenced = [&]() REQUIRES(mu_) -> Status {
    if (fenced_epoch_ <= epoch) return Status::OK();
    return Status::Aborted("fenced at epoch " + std::to_string(fenced_epoch_) + " while promoting to epoch " +
                           std::to_string(epoch));
  };
  if (opts_.test_fault) REPLICA_RETURN_IF_ERROR(opts_.test_fault("promote.fence_check"));
  uint64_t claimed, fences;
  {
    MutexLock l(&mu_);
    claimed = fenced_epoch_;
    fences = fences_received_;
  }
  if (claimed > epoch) {
    // A genuine fence comes from a campaign that reached its epoch, and
    // every win bumps the epoch key. One past the key (a peer's bug, or a
    // forged message) would block every promotion of this node for good:
    // it is logged and forgotten. If etcd cannot tell, the fence stands.
    auto current = arbiter_->GetEpoch();
    if (current.ok() && *current <= epoch) {
      RLOG(kError, "engine.bogus_fence") << "node=" << opts_.node_id << " fence_epoch=" << claimed
                                         << " epoch_key=" << *current
                                         << " (a fence past every campaign: ignored)";
      MutexLock l(&mu_);
      if (fences_received_ == fences) fenced_epoch_ = epoch;  // not if a fence came meanwhile: it may be genuine
    }
  }
  {
    MutexLock l(&mu_);
    REPLICA_RETURN_IF_ERROR(fenced());
  }
  REPLICA_ASSIGN_OR_RETURN(wal::Lsn start, wal_->Append(epoch, wal::RecordType::kEpochStart, opts_.node_id));
  SendFences(epoch);
  handing_over_ = false;
  {
    MutexLock l(&mu_);
    REPLICA_RETURN_IF_ERROR(fenced());  // the epoch start stays unapplied (apply_cap_)
    // Everything received was applied above; nothing past it counts as
    // committed until the rule holds in this epoch (a commit point left
    // from an earlier term, past a rewound tail, must not).
    commit_lsn_ = applied_lsn_;
    degraded_ = false;
    active_id_ = opts_.node_id;
    role_ = Role::kActive;
    notifier_.RoleChanged(Role::kActive);
    WakeAllWaiters();
  }
  RLOG(kWarn, "engine.promoted") << "node=" << opts_.node_id << " epoch=" << epoch << " first_lsn=" << start
                                 << " ms="
                                 << std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started).count();
  (void)arbiter_->Publish(MyInfo());
  return Status::OK();
}

void EngineImpl::SendFences(uint64_t epoch) {
  auto nodes = arbiter_->GetNodes();
  if (!nodes.ok()) return;
  std::vector<std::shared_ptr<transport::Session>> sessions;
  for (const auto& n : *nodes) {
    if (n.id == opts_.node_id) continue;
    auto hp = ParseHostPort(n.address);
    if (!hp.ok()) continue;
    auto s = endpoint_->Connect(hp->host, hp->port);
    if (s.ok()) sessions.push_back(*s);
  }
  // Best effort within a short bound: an old active that cannot be reached
  // has fenced itself already (its lease ended before this node could win).
  // One that can is waited for until it has handled the fence (demoted,
  // its in-flight writes drained), which it tells by closing the session:
  // etcd can end a lease before the deadline its holder counts on (a
  // leader change), and the fence closes that window.
  const auto deadline = Clock::now() + 500ms;
  std::vector<bool> sent(sessions.size(), false);
  size_t done = 0;
  while (done < sessions.size() && Clock::now() < deadline) {
    for (size_t i = 0; i < sessions.size(); ++i) {
      if (!sessions[i]) continue;  // done
      if (sessions[i]->closed()) {
        sessions[i].reset();
        ++done;
      } else if (!sent[i] && sessions[i]->established()) {
        proto::Control msg;
        msg.mutable_fence()->set_epoch(epoch);
        msg.mutable_fence()->set_new_active(opts_.node_id);
        (void)sessions[i]->SendControl(msg);  // the peer closes the session once it has handled it
        sent[i] = true;
      }
    }
    if (done < sessions.size()) {
      MutexLock l(&mu_);
      cv_.WaitUntil(Clock::now() + 10ms);  // OnEstablished signals cv_
    }
  }
}

void EngineImpl::Demote(const std::string& reason) {
  std::vector<std::shared_ptr<Standby>> gone;
  wal::Lsn committed;
  {
    MutexLock l(&mu_);
    if (role_.load() != Role::kActive) {
      // Another caller is demoting: return once it has drained (below).
      while (demoting_) appends_cv_.Wait();
      return;
    }
    role_ = Role::kStandby;
    notifier_.RoleChanged(Role::kStandby);
    demoting_ = true;  // the follower waits for the drain below
    apply_cap_ = commit_lsn_;
    committed = commit_lsn_;
    for (auto& [_, sb] : standbys_) {
      sb->Stop();
      gone.push_back(sb);
      finished_.push_back(sb);
    }
    standbys_.clear();
    active_id_.clear();
    WakeAllWaiters();
    acks_cv_.SignalAll();
    WakeAllWriters();
  }
  // Stopped above and closed here, before the drain: neither the writers'
  // hook nor a shipper sends another span (a send already under way
  // finishes; a record written before the demotion began may be in it).
  for (auto& sb : gone) sb->session->Close(Status::Aborted("this node is no longer the active"));
  {
    // Appends that passed the role check end first (past the cap: never
    // acknowledged nor shipped, a tail the rejoin cuts), so that the
    // follower subscribes from a log end that no longer moves.
    MutexLock l(&mu_);
    while (appends_in_flight_ > 0) appends_cv_.Wait();
    demoting_ = false;
    appends_cv_.SignalAll();  // other Demote callers
    cv_.SignalAll();          // the follower
  }
  RLOG(kWarn, "engine.demoted") << "node=" << opts_.node_id << " epoch=" << epoch_.load()
                                << " commit_lsn=" << committed << " reason=\"" << reason << "\"";
  // A static-mode engine has no follower; with an arbiter it already runs.
}

void EngineImpl::Fail(const Status& why) {
  {
    MutexLock l(&mu_);
    if (!failure_.ok()) return;
    failure_ = why;
    failed_.store(true);
    // Not while the host is closing the engine: it is stopping it already.
    if (!closing_) notifier_.Failed(why);
    WakeAllWaiters();
    WakeAllWriters();
    acks_cv_.SignalAll();
    cv_.SignalAll();  // the follower stops
  }
  RLOG(kError, "engine.failed") << "node=" << opts_.node_id << " role=" << RoleName(role_.load()) << " error=\""
                                << why.ToString() << "\" (restart the node)";
  if (arbiter_) arbiter_->Kick();  // the role loop steps down
}

Status EngineImpl::RewindTo(wal::Lsn to) {
  StopApplier();  // its reader would fail once the log is cut
  Status st;
  {
    MutexLock l(&mu_);
    if (applied_lsn_ > to) {
      st = Status::InvalidArgument("RocksDB already holds LSN " + std::to_string(applied_lsn_) + ", past LSN " +
                                   std::to_string(to));
    }
  }
  const wal::Lsn last = wal_->last_lsn();
  if (st.ok() && to < last) st = wal_->Truncate(to);
  if (st.ok()) {
    MutexLock l(&mu_);
    commit_lsn_ = std::min(commit_lsn_, to);  // nothing past the cut was ever committed here
  }
  StartApplier();
  if (st.ok()) {
    ++rewinds_;
    RLOG(kWarn, "engine.rejoin_truncated") << "node=" << opts_.node_id << " kept_to=" << to
                                           << " dropped_records=" << (last > to ? last - to : 0)
                                           << " (a tail the active's history does not hold)";
  }
  return st;
}

void EngineImpl::FollowerLoop() {
  for (;;) {
    std::shared_ptr<transport::Session> session;
    std::string target;
    {
      MutexLock l(&mu_);
      if (closing_ || !failure_.ok()) return;  // a failed node follows nobody
      target = follow_;
      if (target.empty() || role_.load() != Role::kStandby || demoting_) {
        cv_.WaitUntil(Clock::now() + 200ms);  // nobody to follow yet (the arbiter tells)
        continue;
      }
    }
    auto hp = ParseHostPort(target);
    auto s = hp.ok() ? endpoint_->Connect(hp->host, hp->port) : Result<std::shared_ptr<transport::Session>>(hp.status());
    if (s.ok()) {
      session = *s;
      MutexLock l(&mu_);
      upstream_ = session;
      upstream_head_known_.store(false);  // this session's heartbeats will say
      pending_offer_.reset();
      pending_rewind_.reset();
      snapshot_received_ = false;
      // OnEstablished and OnClosed signal cv_; the timed wait covers races.
      bool subscribed = false;
      while (!closing_ && !session->closed()) {
        if (!failure_.ok()) {
          const Status why = failure_;
          mu_.Unlock();
          session->Close(why);
          mu_.Lock();
          continue;
        }
        if (!subscribed && session->established() && session->peer_id() == opts_.node_id) {
          // Its own port under another name (localhost for 127.0.0.1, say),
          // or another node with this id: following it can never work. With
          // etcd the address may be a dead active's, now this node's port:
          // the key will change, so the session just ends (said once).
          subscribed = true;
          const bool static_mode = !arbiter_;
          const bool say = unreachable_target_ != target + "#self";
          if (!static_mode) unreachable_target_ = target + "#self";
          mu_.Unlock();
          if (static_mode || say) {
            RLOG(kError, "engine.follows_itself") << "node=" << opts_.node_id << " active=" << target
                                                  << " (the node there has this node's id)";
          }
          if (static_mode) {
            Fail(Status::InvalidArgument("the node at " + target + " has this node's id " + opts_.node_id +
                                         ": a node cannot follow itself, and node ids must be unique"));
          } else {
            session->Close(Status::InvalidArgument("the node at " + target + " has this node's id"));
          }
          mu_.Lock();
          continue;
        }
        if (!subscribed && session->established()) {
          subscribed = true;
          if (!arbiter_) active_id_ = session->peer_id();  // static mode: the node it follows
          mu_.Unlock();
          SendSubscribe(session);
          mu_.Lock();
          continue;
        }
        if (drop_staging_) {
          drop_staging_ = false;
          mu_.Unlock();
          DropStaleStaging();
          mu_.Lock();
          continue;
        }
        if (pending_offer_) {
          // The active cannot ship the log this node needs: it offers a snapshot.
          proto::SnapshotOffer offer = std::move(*pending_offer_);
          pending_offer_.reset();
          mu_.Unlock();
          Status st;
          {
            MutexLock staging(&staging_mu_);  // resync/ is in use
            st = PrepareResync(session, offer);
          }
          if (!st.ok()) {
            RLOG(kError, "engine.resync_failed") << "node=" << opts_.node_id << " error=\"" << st.ToString() << "\"";
            session->Close(st);
          }
          mu_.Lock();
          continue;
        }
        if (pending_rewind_) {
          const wal::Lsn to = *pending_rewind_;
          pending_rewind_.reset();
          mu_.Unlock();
          session->Close(Status::Aborted("rewinding the log; subscribing again"));
          DrainReceiver();
          Status st = RewindTo(to);
          mu_.Lock();
          if (!st.ok()) {
            RLOG(kError, "engine.rewind_failed") << "node=" << opts_.node_id << " error=\"" << st.ToString()
                                                 << "\" (asking for a snapshot)";
            want_snapshot_ = true;
          }
          continue;
        }
        if (snapshot_received_) {
          snapshot_received_ = false;
          mu_.Unlock();
          Status st;
          {
            MutexLock staging(&staging_mu_);  // resync/ is in use
            st = InstallSnapshot();
          }
          if (!st.ok()) {
            RLOG(kError, "engine.resync_failed") << "node=" << opts_.node_id << " error=\"" << st.ToString() << "\"";
          }
          // Either way: subscribe again, now from the installed log's end.
          session->Close(st.ok() ? Status::Aborted("snapshot installed; subscribing again") : st);
          mu_.Lock();
          continue;
        }
        if (follow_ != target || role_.load() != Role::kStandby) {
          mu_.Unlock();
          session->Close(Status::Aborted("following another node now"));
          mu_.Lock();
          continue;
        }
        cv_.WaitUntil(Clock::now() + 200ms);
        mu_.Unlock();
        ReportCatchUp();
        mu_.Lock();
      }
      if (upstream_ == session) {
        upstream_.reset();
        upstream_head_known_.store(false);
      }
      cv_.SignalAll();  // Promote waits for the upstream session to end
      if (!session->established()) {
        if (unreachable_target_ != target) {
          unreachable_target_ = target;
          const Status why = session->close_status();
          RLOG(kWarn, "engine.upstream_unreachable") << "node=" << opts_.node_id << " active=" << target
                                                     << (why.ok() ? "" : " error=\"" + why.ToString() + "\"")
                                                     << " (retrying every 200 ms)";
        }
      } else if (unreachable_target_ == target) {
        unreachable_target_.clear();
      }
      mu_.Unlock();
      DrainReceiver();  // the next Subscribe must see the log as it will stay
      mu_.Lock();
      {
        MutexLock rl(&recv_mu_);
        recv_.reset();  // a transfer cut short; its files stay in resync/ for the next one
        receiving_.store(false);
      }
      if (closing_ || !failure_.ok()) return;
    } else {
      MutexLock l(&mu_);
      if (unreachable_target_ != target) {  // said once per target, not every 200 ms
        unreachable_target_ = target;
        RLOG(kWarn, "engine.follow_failed") << "node=" << opts_.node_id << " active=" << target << " error=\""
                                            << s.status().ToString() << "\" (retrying every 200 ms)";
      }
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
  // The active counts everything before from_lsn as held durably here (as
  // flushed): under an interval sync, make it so first.
  if (Status st = wal_->Sync(); !st.ok()) {
    s->Close(st.WithContext("sync the log before subscribing"));
    return;
  }
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
    sub->set_want_snapshot(want_snapshot_);
    sub->set_client_address(ClientAddress());
    sub->set_incarnation(incarnation_);
    // Kept until a snapshot is installed (a resync cut short asks again).
  }
  (void)s->SendControl(msg);
}

std::shared_ptr<Standby> EngineImpl::FindBySession(const transport::Session* s) {
  for (const auto& [_, sb] : standbys_) {
    if (sb->session.get() == s) return sb;
  }
  return nullptr;
}

void EngineImpl::ObserveLag(LagHistogram* h, wal::Lsn from, wal::Lsn to, Clock::time_point now) const {
  // At most one ring's worth: older records' times are gone.
  for (wal::Lsn l = std::max(from + 1, to > AppendTimes::kSize ? to - AppendTimes::kSize + 1 : 1); l <= to; ++l) {
    bool pending = false;
    if (auto t = append_times_.Get(l, &pending)) {
      h->Observe(std::max(0.0, std::chrono::duration<double>(now - *t).count()));
    } else if (pending) {
      h->Observe(0.0);  // held by the standby before it was durable here
    }
  }
}

void EngineImpl::Credit(const transport::Session* s, wal::Lsn flushed, wal::Lsn applied) {
  // When the acknowledgement arrived, not when mu_ became free: lag is the
  // standby's, not this node's lock contention under load.
  const auto arrived = Clock::now();
  MutexLock l(&mu_);
  auto sb = FindBySession(s);
  if (!sb || sb->resync) return;
  const wal::Lsn before = sb->flushed;
  const wal::Lsn applied_before = sb->applied;
  sb->flushed = std::max(sb->flushed, std::min(flushed, sb->shipped.load()));
  sb->applied = std::max(sb->applied, std::min(applied, sb->flushed));
  if (sb->flushed > before) {
    slots_[sb->id] = std::max(slots_[sb->id], sb->flushed);
    // Lag in time of each newly held record: its ack now minus when it was
    // durable here (as PostgreSQL's flush_lag).
    ObserveLag(&lag_[sb->id], before, sb->flushed, arrived);
  }
  // The same for records newly applied there (PostgreSQL's replay_lag).
  if (sb->applied > applied_before) ObserveLag(&apply_lag_[sb->id], applied_before, sb->applied, arrived);
  if (sb->flushed >= wal_->last_lsn()) sb->caught_up_at = Clock::now();
  MaybeJoin(*sb);
  AdvanceCommit();
  acks_cv_.SignalAll();  // WaitForReplicas counts acks, not the commit point
}

void EngineImpl::OnSubscribe(const std::shared_ptr<transport::Session>& s, const proto::Subscribe& msg) {
  if (role_.load() != Role::kActive) {
    s->Refuse(Status::NotActive("node " + opts_.node_id + " is not the active"));
    return;
  }
  if (msg.last_epoch() > epoch_.load()) {
    // The standby has seen a newer epoch: this node is a stale active.
    ++refused_;
    s->Refuse(Status::StaleEpoch("standby " + s->peer_id() + " is at epoch " + std::to_string(msg.last_epoch()) +
                                ", past this active's epoch " + std::to_string(epoch_.load())));
    return;
  }
  const wal::Lsn from = msg.from_lsn();
  if (from == 0) {
    ++refused_;
    s->Refuse(Status::InvalidArgument("standby " + s->peer_id() + " asks for LSN 0"));
    return;
  }
  // The log can be shipped only if the standby's last record is ours too;
  // otherwise (it is ahead of us, its last record differs, or we no longer
  // hold it) it is resynced from a snapshot.
  // A standby from an older epoch whose log went on past where that epoch
  // ended here (an old active's unreplicated tail) is told to cut its log
  // back to there, if it applied nothing beyond; otherwise, a snapshot.
  auto try_rewind = [&]() -> bool {
    if (msg.want_snapshot() || msg.last_epoch() == 0 || msg.last_epoch() >= epoch_.load()) return false;
    const wal::EpochEnd end = wal_->EndOfEpoch(msg.last_epoch());
    if (end.epoch != msg.last_epoch()) return false;
    const wal::Lsn to = std::min<wal::Lsn>(end.end_lsn, from - 1);
    if (to + 1 >= from || to < wal_->first_lsn() || msg.applied_lsn() > to) return false;
    proto::Control rw;
    rw.mutable_rewind()->set_to_lsn(to);
    rw.mutable_rewind()->set_epoch(epoch_.load());
    RLOG(kWarn, "engine.standby_rewind") << "node=" << opts_.node_id << " standby=" << s->peer_id()
                                         << " its_epoch=" << msg.last_epoch() << " from_lsn=" << from
                                         << " keep_to=" << to;
    (void)s->SendControl(rw);
    return true;
  };
  if (from > wal_->last_lsn() + 1) {
    if (try_rewind()) return;
    return StartResync(s, msg, "its log ends at LSN " + std::to_string(from - 1) + ", past this node's last LSN " +
                              std::to_string(wal_->last_lsn()) + " (diverged)");
  }
  if (msg.want_snapshot()) return StartResync(s, msg, "it asked for one (repctl reseed, or its log could not be rewound)");
  // (Its last record, from - 1, must still be here to be checked.)
  if (from > 1 ? from - 1 < wal_->first_lsn() : from < wal_->first_lsn()) {
    return StartResync(s, msg, "it needs LSN " + std::to_string(from) + " but this node's log now starts at LSN " +
                              std::to_string(wal_->first_lsn()) + " (purged)");
  }
  // Damage in this log where the standby needs it (found by an earlier
  // shipper, or now): the records are in RocksDB, not readable in the log.
  if (auto at = DamageFrom(from > 1 ? from - 1 : from)) {
    return StartResync(s, msg, "this node's log is damaged at LSN " + std::to_string(*at) + " (engine.log_damaged)");
  }
  if (from > 1) {
    auto reader = wal_->NewReader(from - 1);
    wal::RecordView rec;
    Result<bool> got = reader.ok() ? (*reader)->Next(&rec) : Result<bool>(reader.status());
    if (!got.ok() && got.status().IsCorruption()) {
      NoteLogDamage(s->peer_id(), from - 1, got.status());
      return StartResync(s, msg, "this node's log is damaged at LSN " + std::to_string(from - 1) +
                                     " (engine.log_damaged)");
    }
    if (!got.ok() && IsLogDamage(got.status())) {
      // A read error may pass: noted, and read again when the standby
      // subscribes again (DamageFrom), which resyncs it only if it stays.
      NoteLogDamage(s->peer_id(), from - 1, got.status());
      ++refused_;
      s->Refuse(got.status().WithContext("check standby " + s->peer_id() + "'s log (read again when it subscribes)"));
      return;
    }
    if (!got.ok() && !got.status().IsPurged()) {
      ++refused_;
      s->Refuse(got.status().WithContext("check standby " + s->peer_id() + "'s log"));
      return;
    }
    if (!got.ok() || !*got || wal::RecordDigest(rec) != msg.last_record_digest()) {
      RLOG(kWarn, "engine.standby_diverged") << "standby=" << s->peer_id() << " lsn=" << from - 1;
      if (try_rewind()) return;
      return StartResync(s, msg, "its record at LSN " + std::to_string(from - 1) + " differs from this node's (diverged)");
    }
  }
  auto sb = std::make_shared<Standby>();
  sb->session = s;
  sb->id = s->peer_id();
  sb->address = s->remote_address();
  sb->client_address = ClientAddressOf(msg.client_address());
  sb->incarnation = msg.incarnation();
  sb->flushed = from - 1;  // its log matches ours up to here
  sb->applied = std::min<wal::Lsn>(msg.applied_lsn(), from - 1);
  sb->shipped.store(from - 1);
  // Tells the standby its log is accepted (a prefix of this one), before any data.
  proto::Control ok;
  ok.mutable_ack()->set_flushed_lsn(from - 1);
  ok.mutable_ack()->set_epoch(epoch_.load());
  (void)s->SendControl(ok);
  AddStandby(s, sb, std::max<wal::Lsn>(1, from - 1), "from_lsn=" + std::to_string(from),
             [this, sb, from] { ShipperLoop(sb, from); });
}

void EngineImpl::StartResync(const std::shared_ptr<transport::Session>& s, const proto::Subscribe& msg,
                             const std::string& reason) {
  auto sb = std::make_shared<Standby>();
  sb->session = s;
  sb->id = s->peer_id();
  sb->address = s->remote_address();
  sb->client_address = ClientAddressOf(msg.client_address());
  sb->incarnation = msg.incarnation();
  sb->resync = true;
  RLOG(kWarn, "engine.resync_start") << "node=" << opts_.node_id << " standby=" << sb->id << " reason=\"" << reason
                                     << "\"";
  // The slot is set to the checkpoint's seed once it is known.
  AddStandby(s, sb, 0, "snapshot resync", [this, sb, reason] { SnapshotLoop(sb, reason); });
}

void EngineImpl::AddStandby(const std::shared_ptr<transport::Session>& s, std::shared_ptr<Standby> sb,
                            wal::Lsn slot, const std::string& what, std::function<void()> run) {
  std::shared_ptr<Standby> replaced;
  std::vector<std::shared_ptr<Standby>> reap;
  {
    MutexLock l(&mu_);
    if (closing_) return;
    if (role_.load() != Role::kActive) {
      // Demoted since OnSubscribe looked: nothing more is shipped from here
      // (Demote closed every standby it knew of; this one it did not).
      mu_.Unlock();
      s->Refuse(Status::NotActive("node " + opts_.node_id + " is no longer the active"));
      mu_.Lock();
      return;
    }
    if (FindBySession(s.get())) {
      mu_.Unlock();
      s->Refuse(Status::InvalidArgument("a second Subscribe on one session"));
      mu_.Lock();
      return;
    }
    auto it = standbys_.find(sb->id);
    if (it != standbys_.end()) {
      replaced = it->second;
      replaced->Stop();
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
    RLOG(kInfo, "engine.standby_subscribed") << "standby=" << sb->id << " " << what
                                             << (replaced ? " (replaces its previous session)" : "");
    if (!sb->incarnation.empty()) {
      IncarnationWatch& w = incarnation_watch_[sb->id];
      const auto now = Clock::now();
      if (now - w.since > 60s) {
        w.since = now;
        w.changes = 0;
        w.said = false;
      }
      if (!w.last.empty() && w.last != sb->incarnation && ++w.changes >= 2 && !w.said) {
        w.said = true;
        RLOG(kError, "engine.duplicate_id") << "node=" << opts_.node_id << " standby=" << sb->id << " incarnations="
                                            << w.last << "," << sb->incarnation
                                            << " (sessions of this id come from two data directories in turn: two "
                                               "nodes run with --id " << sb->id << "; give each its own)";
      }
      w.last = sb->incarnation;
    }
    standbys_[sb->id] = sb;
    if (slot > 0) slots_[sb->id] = slot;
    sb->shipper = NamedThread("ship:" + sb->id, std::move(run));
  }
  if (replaced) replaced->session->Close(Status::Aborted("replaced by a new session of the same standby"));
  for (auto& r : reap) {
    if (r->shipper.joinable()) r->shipper.join();  // already returned: joins at once
  }
}

void EngineImpl::OnControl(const std::shared_ptr<transport::Session>& s, const proto::Control& msg) {
  if (msg.has_subscribe()) return OnSubscribe(s, msg.subscribe());
  if (msg.has_diff_request()) return diff_.Submit(s, msg.diff_request());
  if (msg.has_snapshot_request()) {
    std::shared_ptr<Standby> sb;
    {
      MutexLock l(&mu_);
      sb = FindBySession(s.get());
    }
    if (!sb || !sb->resync) {
      s->Refuse(Status::InvalidArgument("a snapshot request without a snapshot offer"));
      return;
    }
    MutexLock l(&sb->writable_mu);
    sb->snapshot_request = msg.snapshot_request();
    sb->writable_cv.SignalAll();
    return;
  }
  if (msg.has_snapshot_offer() || msg.has_snapshot_file() || msg.has_snapshot_done()) {
    return OnSnapshotControl(s, msg);
  }
  if (msg.has_fence()) {
    const auto& f = msg.fence();
    if (Status named = CheckName("the fencing node's id", f.new_active()); !named.ok()) {
      ++refused_;
      s->Close(named);
      return;
    }
    {
      // Kept even while this node is no active yet: a promotion under way
      // must not complete past a newer active's fence.
      MutexLock l(&mu_);
      fenced_epoch_ = std::max(fenced_epoch_, f.epoch());
      ++fences_received_;
    }
    if (f.epoch() > epoch_.load()) {
      Demote("fenced by " + f.new_active() + " at epoch " + std::to_string(f.epoch()));
    } else if (f.epoch() == epoch_.load() && role_.load() == Role::kStandby) {
      // The active of this very epoch announcing itself: nothing to do.
    } else {
      RLOG(kWarn, "engine.stale_fence") << "node=" << opts_.node_id << " from=" << f.new_active()
                                        << " epoch=" << f.epoch() << " own_epoch=" << epoch_.load();
    }
    s->Close(Status::Aborted("fence handled"));
    return;
  }
  if (msg.has_ack() && role_.load() == Role::kStandby) {
    // The active accepted this node's log: all of it is in its history.
    bool accepted = false;
    {
      MutexLock l(&mu_);
      accepted = s == upstream_;
      if (accepted && apply_cap_ != UINT64_MAX) {
        apply_cap_ = UINT64_MAX;
        apply_cv_.SignalAll();
      }
    }
    if (accepted) {
      // No resync follows on this session: the follower removes what an
      // interrupted one left (not this I/O thread: it can take a while).
      MutexLock l(&mu_);
      drop_staging_ = true;
      cv_.SignalAll();
    }
    return;
  }
  if (msg.has_ack()) return Credit(s.get(), msg.ack().flushed_lsn(), msg.ack().applied_lsn());
  if (msg.has_rewind()) {
    if (!FromUpstream(s, "a rewind")) return;
    MutexLock l(&mu_);
    pending_rewind_ = msg.rewind().to_lsn();  // the follower thread does it
    cv_.SignalAll();
    return;
  }
  // A standby's heartbeats carry its flushed and applied LSNs too (its
  // interval sync advances them without any data arriving).
  if (msg.has_heartbeat() && role_.load() == Role::kActive) {
    if (const std::string& given = msg.heartbeat().client_address(); !given.empty()) {
      MutexLock l(&mu_);  // parsed only when it differs from what the standby said before
      if (auto sb = FindBySession(s.get()); sb && sb->client_address != given) sb->client_address = ClientAddressOf(given);
    }
    return Credit(s.get(), msg.heartbeat().flushed_lsn(), msg.heartbeat().applied_lsn());
  }
  if (msg.has_heartbeat()) {
    bool from_upstream;
    {
      MutexLock l(&mu_);
      from_upstream = s == upstream_;
      if (from_upstream) {
        upstream_last_.store(msg.heartbeat().last_lsn());
        upstream_head_known_.store(true);
        if (applied_lsn_ >= msg.heartbeat().last_lsn()) applied_caught_up_us_.store(NowMicros());
      }
    }
    if (from_upstream) {
      ReaderLock store(&store_mu_);
      if (wal_) NoteCaughtUp();
    }
  }
}

void EngineImpl::OnData(const std::shared_ptr<transport::Session>& s, std::string_view payload) {
  if (!FromUpstream(s, "WAL data")) return;
  if (receiving_.load()) {
    Status st;
    std::string progress;  // set under mu_ after recv_mu_ (a leaf) is released
    bool consumed = false;  // snapshot bytes, not WAL frames
    {
      MutexLock l(&recv_mu_);
      if (recv_) {
        consumed = true;
        Receive& r = *recv_;
        if (!r.file || payload.size() > r.remaining) {
          st = Status::InvalidArgument("snapshot data outside a file, or past its announced size");
        } else {
          st = r.file->Append(payload);
          XXH3_64bits_update(r.hash.get(), payload.data(), payload.size());
          r.remaining -= payload.size();
          r.bytes += payload.size();
          snapshot_bytes_received_ += payload.size();
          if (st.ok() && r.remaining == 0) st = FinishFile(r);
          if (const auto now = Clock::now(); now - r.reported >= kProgressEvery) {
            r.reported = now;
            const std::string text =
                ProgressText(r.bytes, r.total, std::chrono::duration<double>(now - r.started).count(), true);
            RLOG(kInfo, "engine.resync_progress") << "node=" << opts_.node_id << " lsn=" << r.offer.lsn()
                                                  << " received=\"" << text << "\"";
            progress = "receiving a snapshot: " + text;
          }
        }
      }
    }
    if (st.ok() && !progress.empty()) {
      MutexLock l(&mu_);
      progress_ = std::move(progress);
    }
    if (consumed && st.ok()) return;
    if (!st.ok()) {
      RLOG(kError, "engine.resync_receive_failed") << "node=" << opts_.node_id << " error=\"" << st.ToString() << "\"";
      s->Close(st);
      return;
    }
  }
  {
    // A write's worth queued: store it before taking more, so that no write
    // holds more than max_group_bytes unsynced (what recovery after a power
    // loss allows) unless a single frame does.
    bool store_first;
    {
      MutexLock rl(&rx_mu_);
      store_first = rx_session_ == s && !rx_buf_.empty() &&
                    rx_buf_.size() + payload.size() > wal_options_.max_group_bytes;
    }
    if (store_first) StoreReceived(s);
  }
  // Queued only while s is still the upstream session, checked under mu_, so
  // nothing from a session the follower has let go can reach the new log.
  MutexLock l(&mu_);
  if (s != upstream_) return;
  MutexLock rl(&rx_mu_);
  if (rx_session_ != s) {
    rx_buf_.clear();
    rx_session_ = s;
  }
  rx_buf_.append(payload);
}

void EngineImpl::OnReadIdle(const std::shared_ptr<transport::Session>& s) { StoreReceived(s); }

void EngineImpl::StoreReceived(const std::shared_ptr<transport::Session>& s) {
  std::string batch;
  {
    MutexLock l(&rx_mu_);
    while (rx_busy_) rx_cv_.Wait();  // another session's store: the follower lets that one go
    if (rx_session_ != s || rx_buf_.empty()) return;
    batch.swap(rx_buf_);
    rx_buf_.swap(rx_spare_);  // both keep their capacity
    rx_busy_ = true;
  }
  Status st;
  {
    ReaderLock store(&store_mu_);
    // Stored unchanged after every checksum and LSN is verified: the logs stay byte-identical.
    auto last = wal_ ? wal_->AppendRaw(batch) : Result<wal::Lsn>(Status::Aborted("the node has no storage"));
    if (last.ok()) {
      {
        MutexLock l(&mu_);
        if (apply_cap_ != UINT64_MAX) {
          apply_cap_ = UINT64_MAX;  // an active continued this log: all of it is in its history
          apply_cv_.SignalAll();
        }
      }
      const wal::Epoch seen = wal_->last_epoch();
      if (seen > epoch_.load()) epoch_ = seen;  // the epoch this standby now knows of
      NoteCaughtUp();
      SendAck(s);
    } else {
      st = last.status();
    }
  }
  if (!st.ok()) {
    RLOG(kError, "engine.receive_failed") << "node=" << opts_.node_id << " error=\"" << st.ToString() << "\"";
    s->Close(st);
  }
  batch.clear();
  MutexLock l(&rx_mu_);
  if (!st.ok() && rx_session_ == s) rx_buf_.clear();  // what followed the bad frames cannot be stored either
  rx_spare_.swap(batch);
  rx_busy_ = false;
  rx_cv_.SignalAll();
}

void EngineImpl::DrainReceiver() {
  MutexLock l(&rx_mu_);
  rx_buf_.clear();
  rx_session_.reset();
  while (rx_busy_) rx_cv_.Wait();
}

void EngineImpl::OnWritable(const std::shared_ptr<transport::Session>& s) {
  std::shared_ptr<Standby> sb;
  {
    MutexLock l(&mu_);
    sb = FindBySession(s.get());
    if (!sb) return;
  }
  MutexLock l(&sb->writable_mu);
  sb->writable_signaled = true;
  sb->writable_cv.SignalAll();
}

void EngineImpl::OnClosed(const std::shared_ptr<transport::Session>& s, const Status& why) {
  diff_.SessionClosed(s);
  MutexLock l(&mu_);
  for (auto it = standbys_.begin(); it != standbys_.end(); ++it) {
    if (it->second->session.get() != s.get()) continue;
    it->second->Stop();
    RLOG(kInfo, "engine.standby_gone") << "standby=" << it->second->id << " reason=\"" << why.ToString() << "\"";
    finished_.push_back(it->second);
    standbys_.erase(it);
    break;
  }
  cv_.SignalAll();
}

void EngineImpl::ReportCatchUp() {
  wal::Lsn applied;
  {
    MutexLock l(&mu_);
    applied = applied_lsn_;
  }
  const wal::Lsn head = upstream_last_.load();
  const uint64_t behind = head > applied ? head - applied : 0;
  const auto now = Clock::now();
  CatchUp& c = catch_up_;
  if (!c.on) {
    if (behind < kCatchUpReportRecords) return;
    c = CatchUp{true, now, now, applied};
    RLOG(kInfo, "engine.catchup_started") << "node=" << opts_.node_id << " applied_lsn=" << applied
                                          << " active_lsn=" << head << " behind=" << behind;
    return;
  }
  if (behind < kCatchUpReportRecords / 20) {  // within a moment of the active: steady state
    RLOG(kInfo, "engine.caught_up") << "node=" << opts_.node_id << " lsn=" << applied << " records=" << applied - c.from
                                    << " ms=" << std::chrono::duration_cast<std::chrono::milliseconds>(now - c.started).count();
    c.on = false;
    MutexLock l(&mu_);
    progress_.clear();
    return;
  }
  if (now - c.reported < kProgressEvery) return;
  c.reported = now;
  const std::string text = ProgressText(applied - c.from, head - c.from,
                                        std::chrono::duration<double>(now - c.started).count(), false);
  RLOG(kInfo, "engine.catchup_progress") << "node=" << opts_.node_id << " applied_lsn=" << applied
                                         << " active_lsn=" << head << " applied=\"" << text << "\"";
  MutexLock l(&mu_);
  progress_ = "catching up: " + text;
}

void EngineImpl::RequestReseed() {
  std::shared_ptr<transport::Session> up;
  {
    MutexLock l(&mu_);
    want_snapshot_ = true;
    up = upstream_;
  }
  RLOG(kWarn, "engine.reseed_requested") << "node=" << opts_.node_id
                                         << " (repctl reseed: the replica is replaced by a snapshot of the active)";
  if (up) up->Close(Status::Aborted("reseed requested: subscribing again for a snapshot"));
}

void EngineImpl::RemoveStandby(const std::string& id) {
  {
    MutexLock l(&mu_);
    if (standbys_.count(id)) {
      RLOG(kWarn, "engine.remove_refused") << "node=" << opts_.node_id << " standby=" << id
                                           << " (it is connected: stop it first)";
      return;
    }
    const bool had = slots_.erase(id) > 0;
    lag_.erase(id);
    apply_lag_.erase(id);
    RLOG(kWarn, "engine.standby_removed") << "node=" << opts_.node_id << " standby=" << id
                                          << (had ? " (its slot is dropped: the log it needed may be deleted)"
                                                  : " (it had no slot)");
  }
  MaintainRetention(/*force=*/true);  // persists the slots without it
}

Status EngineImpl::WithStore(const std::function<Status(const logdiff::Store&)>& fn) {
  ReaderLock store(&store_mu_);
  if (!db_ || !wal_ || db_closed_.load()) return StorageGone();
  return fn(logdiff::Store{wal_.get(), db_.get(), handles_, {rocksdb::kDefaultColumnFamilyName, kMetaColumnFamily}});
}

Result<const rocksdb::Snapshot*> EngineImpl::PinAt(uint64_t lsn, std::chrono::milliseconds timeout) {
  // Called within WithStore: db_ stays. Registered first, so that the
  // applier cannot pass lsn unseen between the check below and the wait.
  PinWait w;
  w.lsn = lsn;
  {
    MutexLock l(&mu_);
    pin_waits_.push_back(&w);
    pins_pending_.fetch_add(1);  // under mu_: the applier checks it, then the list under mu_
  }
  auto unregister = [&]() REQUIRES(mu_) {
    pin_waits_.erase(std::find(pin_waits_.begin(), pin_waits_.end(), &w));
    pins_pending_.fetch_sub(1);
  };
  // Already there? The applied LSN inside a snapshot matches its data exactly.
  const rocksdb::Snapshot* snap = db_->GetSnapshot();
  rocksdb::ReadOptions ro;
  ro.snapshot = snap;
  std::string v;
  wal::Lsn at = 0;
  if (db_->Get(ro, handles_[1], kAppliedKey, &v).ok() && v.size() == 8) at = DecodeFixed64(v.data());
  MutexLock l(&mu_);
  if (w.snapshot || at != lsn) {
    // The applier may have taken one at lsn meanwhile: that one is used.
    db_->ReleaseSnapshot(snap);
    snap = nullptr;
  }
  if (snap) {
    unregister();
    return snap;
  }
  const auto deadline = Clock::now() + timeout;
  while (at < lsn && !w.snapshot && !w.passed && !closing_ && !applier_stop_ && failure_.ok() &&
         Clock::now() < deadline) {
    applied_cv_.WaitUntil(deadline);
  }
  unregister();
  if (w.snapshot) return w.snapshot;
  if (at > lsn || w.passed) {
    return Status::Aborted("applied past LSN " + std::to_string(lsn) + " (at LSN " +
                           std::to_string(std::max(at, applied_lsn_)) + ")");
  }
  if (closing_) return Status::Aborted("the node is closing");
  if (applier_stop_) return Status::Aborted("the node is replacing or rewinding its replica; pin again");
  if (!failure_.ok()) return failure_;
  return Status::TimedOut("applied only up to LSN " + std::to_string(applied_lsn_) + ", not LSN " +
                          std::to_string(lsn) + ", within " + std::to_string(timeout.count()) + " ms");
}

void EngineImpl::FillHeartbeat(proto::Heartbeat* hb) {
  ReaderLock store(&store_mu_);
  hb->set_last_lsn(wal_ ? wal_->last_lsn() : 0);
  hb->set_flushed_lsn(LocalDurable());
  MutexLock l(&mu_);
  hb->set_applied_lsn(applied_lsn_);
  hb->set_epoch(epoch_);
  if (role_.load() == Role::kStandby) {
    hb->set_client_address(ClientAddress());
  }
}

std::string EngineImpl::PrometheusMetrics() const {
  ReaderLock store(&store_mu_);
  const EngineStatus st = StatusLocked();
  const wal::WalStats ws = wal_ ? wal_->stats() : wal::WalStats{};  // none once the storage was lost
  const transport::Stats& ts = endpoint_->stats();
  // Each family's lines (HELP, TYPE, samples) kept in one group, as the
  // text format asks, in the order the families first appear; samples of
  // one family may be added at several places (per standby, say).
  std::vector<std::string> families;
  std::map<std::string, size_t, std::less<>> family_index;
  auto family = [&](const char* name, const char* help, const char* type) -> std::string& {
    const auto [it, added] = family_index.emplace(name, families.size());
    if (added) families.push_back(std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n");
    return families[it->second];  // used before the next call adds a family
  };
  auto metric = [&](const char* name, const char* type, const char* help, const std::string& labels, double v) {
    std::string& out = family(name, help, type);
    char num[64];
    std::snprintf(num, sizeof num, "%.17g", v);
    out += std::string(name) + (labels.empty() ? "" : "{" + labels + "}") + " " + num + "\n";
  };
  // A Prometheus histogram: bounds[i] is bucket i's upper bound (the le
  // label), counts[i] its own (not cumulative) count, the extra last count
  // the +Inf bucket.
  auto histogram = [&](const char* name, const char* help, const std::string& labels, std::span<const double> bounds,
                       std::span<const uint64_t> counts, double sum, uint64_t count) {
    std::string& out = family(name, help, "histogram");
    uint64_t cum = 0;
    char num[64];
    for (size_t i = 0; i < counts.size(); ++i) {
      cum += counts[i];
      if (i < bounds.size()) {
        std::snprintf(num, sizeof num, "%g", bounds[i]);
      } else {
        std::snprintf(num, sizeof num, "+Inf");
      }
      out += std::string(name) + "_bucket{" + labels + ",le=\"" + num + "\"} " + std::to_string(cum) + "\n";
    }
    std::snprintf(num, sizeof num, "%.9g", sum);
    out += std::string(name) + "_sum{" + labels + "} " + num + "\n";
    out += std::string(name) + "_count{" + labels + "} " + std::to_string(count) + "\n";
  };
  const std::string node = "node=\"" + opts_.node_id + "\"";
  metric("replica_role_active", "gauge", "1 on the active, 0 on a standby", node, st.role == Role::kActive);
  metric("replica_failed", "gauge", "1 once the node has failed (see the engine.failed log line): restart it", node,
         !st.failure.empty());
  metric("replica_epoch", "gauge", "current epoch", node, static_cast<double>(st.epoch));
  metric("replica_last_lsn", "gauge", "last LSN in the local WAL", node, static_cast<double>(st.last_lsn));
  metric("replica_durable_lsn", "gauge", "local WAL durable up to this LSN", node, static_cast<double>(st.durable_lsn));
  metric("replica_applied_lsn", "gauge", "applied to the local RocksDB up to this LSN", node,
         static_cast<double>(st.applied_lsn));
  metric("replica_commit_lsn", "gauge", "the commit rule holds up to this LSN (active)", node,
         static_cast<double>(st.commit_lsn));
  if (st.role == Role::kStandby) {
    // The standby's own view of its lag, from the active's heartbeats: in
    // records, and in bytes at this log's average record size.
    const wal::Lsn head = upstream_last_.load();
    const uint64_t behind = head > st.durable_lsn ? head - st.durable_lsn : 0;
    const uint64_t records = st.last_lsn >= st.first_lsn ? st.last_lsn - st.first_lsn + 1 : 0;
    const double avg =
        records > 0 && wal_ ? static_cast<double>(wal_->BytesAfter(st.first_lsn - 1)) / static_cast<double>(records) : 0;
    metric("replica_upstream_connected", "gauge",
           "1 while the standby streams from its active (INFO's master_link_status:up), 0 otherwise", node,
           st.upstream_streaming() ? 1 : 0);
    metric("replica_upstream_last_lsn", "gauge", "the active's last LSN, as its heartbeats say (standby)", node,
           static_cast<double>(head));
    metric("replica_upstream_lag_records", "gauge", "records the active has that this standby does not hold durably",
           node, static_cast<double>(behind));
    metric("replica_upstream_lag_bytes", "gauge", "the same in bytes, at this log's average record size", node,
           static_cast<double>(behind) * avg);
    const int64_t now_us = NowMicros();
    const int64_t since = caught_up_us_.load();
    metric("replica_upstream_lag_ms", "gauge", "time since this standby last held all the active had (0 when it does)",
           node, behind == 0 || since == 0 ? 0.0 : static_cast<double>(now_us - since) / 1000.0);
  }
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
      metric("replica_standby_lag_bytes", "gauge", "bytes of this node's WAL after the standby's durable LSN", lab,
             static_cast<double>(wal_->BytesAfter(sb->flushed)));
      metric("replica_standby_lag_ms", "gauge", "time since the standby last held every record", lab,
             static_cast<double>(LagMs(*sb, st.last_lsn, Clock::now())));
      metric("replica_standby_resyncing", "gauge", "1 while the standby is being sent a snapshot", lab, sb->resync);
      metric("replica_standby_spans_sent_total", "counter",
             "WAL spans sent to the standby, by the thread that wrote them (by=\"writer\") or its shipper",
             lab + ",by=\"writer\"", static_cast<double>(sb->sent_by_writer.load()));
      metric("replica_standby_spans_sent_total", "counter",
             "WAL spans sent to the standby, by the thread that wrote them (by=\"writer\") or its shipper",
             lab + ",by=\"shipper\"", static_cast<double>(sb->sent_by_shipper.load()));
    }
    for (const auto& [id, lsn] : slots_) {
      metric("replica_slot_lsn", "gauge", "first LSN kept for this standby (its slot)", node + ",standby=\"" + id + "\"",
             static_cast<double>(lsn));
    }
    metric("replica_slots_dropped_total", "counter", "slots dropped for passing slot_max_bytes", node,
           static_cast<double>(slots_dropped_));
    for (const auto& [id, h] : lag_) {
      histogram("replica_standby_lag_seconds",
                "time from a record being durable here to the standby acknowledging it durable",
                node + ",standby=\"" + id + "\"", kLagBuckets, h.counts, h.sum, h.count);
    }
    for (const auto& [id, h] : apply_lag_) {
      histogram("replica_standby_apply_lag_seconds",
                "time from a record being durable here to the standby acknowledging it applied",
                node + ",standby=\"" + id + "\"", kLagBuckets, h.counts, h.sum, h.count);
    }
  }
  metric("replica_snapshots_sent_total", "counter", "snapshot resyncs served (active)", node,
         static_cast<double>(st.snapshots_sent));
  metric("replica_snapshot_bytes_sent_total", "counter", "snapshot bytes sent (active)", node,
         static_cast<double>(st.snapshot_bytes_sent));
  metric("replica_wal_damage_found_total", "counter",
         "times a damaged frame or a read error was found in this node's own log while shipping it, checking a standby's log or reading a snapshot's seed (active; engine.log_damaged)", node,
         static_cast<double>(st.wal_damage_found));
  metric("replica_snapshots_installed_total", "counter", "snapshots installed (standby)", node,
         static_cast<double>(st.snapshots_installed));
  metric("replica_snapshot_files_reused_total", "counter", "snapshot files already held, not sent again (standby)",
         node, static_cast<double>(st.snapshot_files_reused));
  metric("replica_wal_records_total", "counter", "records appended to the local WAL", node, static_cast<double>(ws.records));
  metric("replica_wal_bytes_total", "counter", "bytes written to the local WAL", node, static_cast<double>(ws.bytes));
  metric("replica_wal_group_commits_total", "counter", "group commits (writes)", node, static_cast<double>(ws.groups));
  metric("replica_wal_largest_group_bytes", "gauge",
         "the most bytes one group commit wrote since the node started (at most what a power loss can tear)", node,
         static_cast<double>(ws.largest_group_bytes));
  metric("replica_wal_fsyncs_total", "counter", "fdatasync calls of the WAL (group commits, interval syncs)", node,
         static_cast<double>(ws.syncs));
  metric("replica_wal_fsync_seconds_total", "counter", "time spent in those fdatasync calls", node,
         static_cast<double>(ws.sync_micros) / 1e6);
  {
    std::array<double, wal::kSyncBucketMicros.size()> bounds;
    for (size_t i = 0; i < bounds.size(); ++i) bounds[i] = static_cast<double>(wal::kSyncBucketMicros[i]) / 1e6;
    histogram("replica_wal_fsync_latency_seconds", "how long each fdatasync of the WAL took", node, bounds,
              ws.sync_buckets, static_cast<double>(ws.sync_micros) / 1e6, ws.syncs);
  }
  metric("replica_wal_gathers_total", "counter", "WAL group commits whose leader waited for the appenders it expected",
         node, static_cast<double>(ws.gathers));
  metric("replica_wal_gathers_patient_total", "counter",
         "WAL group-commit waits made with the long (patient) deadline", node, static_cast<double>(ws.gathers_patient));
  metric("replica_wal_gathers_timed_out_total", "counter",
         "WAL group-commit waits that ended at their deadline (the others filled their group or were cut short)", node,
         static_cast<double>(ws.gathers_timed_out));
  metric("replica_wal_size_bytes", "gauge", "bytes of retained WAL segments", node,
         static_cast<double>(wal_ ? wal_->size_bytes() : 0));
  metric("replica_wal_first_lsn", "gauge", "first retained LSN", node, static_cast<double>(st.first_lsn));
  metric("replica_transport_sessions_established_total", "counter", "authenticated sessions", node,
         static_cast<double>(ts.sessions_established.load()));
  metric("replica_transport_auth_failures_total", "counter", "peers refused for a wrong secret or cluster", node,
         static_cast<double>(ts.auth_failures.load()));
  metric("replica_transport_connections_refused_total", "counter",
         "replication connections closed at once: past the cap of established sessions", node,
         static_cast<double>(ts.connections_refused.load()));
  metric("replica_transport_handshakes_evicted_total", "counter",
         "connections still in their handshake closed to make room for a newer one", node,
         static_cast<double>(ts.handshakes_evicted.load()));
  metric("replica_transport_sessions_not_reading_total", "counter",
         "sessions closed because their peer did not read its control messages", node,
         static_cast<double>(ts.sessions_not_reading.load()));
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
  std::string out;
  for (const auto& f : families) out += f;
  return out;
}

EngineStatus EngineImpl::status() const {
  ReaderLock store(&store_mu_);
  return StatusLocked();
}

EngineStatus EngineImpl::StatusLocked() const {
  EngineStatus st;
  st.role = role_.load();
  st.epoch = epoch_;
  MutexLock l(&mu_);
  // Applied first: it never passes durable, and both only grow, so reading
  // it first keeps applied <= durable in the snapshot too.
  st.applied_lsn = applied_lsn_;
  if (wal_) {  // null only once the storage was lost
    st.first_lsn = wal_->first_lsn();
    st.last_lsn = wal_->last_lsn();
    st.durable_lsn = wal_->durable_lsn();
  }
  if (!failure_.ok()) st.failure = failure_.ToString();
  st.commit_lsn = commit_lsn_;
  st.commit = rule_;
  st.commit_degraded = degraded_;
  st.commit_fallbacks = fallbacks_;
  st.standbys_refused = refused_.load();
  const auto now = Clock::now();
  for (const auto& [_, sb] : standbys_) {
    st.standbys.push_back({sb->id, sb->address, sb->client_address, sb->flushed, sb->applied, sb->resync,
                           wal_->BytesAfter(sb->flushed), LagMs(*sb, st.last_lsn, now)});
  }
  for (const auto& [id, lsn] : slots_) st.slots.emplace_back(id, lsn);
  st.slots_dropped = slots_dropped_;
  st.snapshots_sent = snapshots_sent_.load();
  st.snapshot_files_sent = snapshot_files_sent_.load();
  st.snapshot_bytes_sent = snapshot_bytes_sent_.load();
  st.snapshots_installed = snapshots_installed_.load();
  st.rewinds = rewinds_.load();
  st.wal_damage_found = wal_damage_found_.load();
  st.snapshot_files_reused = snapshot_files_reused_.load();
  st.snapshot_bytes_received = snapshot_bytes_received_.load();
  if (st.role == Role::kStandby) {
    st.active_address = follow_;
    st.upstream_connected = upstream_ && upstream_->established() && !upstream_->closed();
    st.receiving_snapshot = st.upstream_connected && receiving_.load();
  }
  st.active_id = st.role == Role::kActive ? opts_.node_id : active_id_;
  if (st.role == Role::kStandby) st.active_client_address = active_client_;
  return st;
}

void EngineImpl::Interrupt() {
  MutexLock l(&mu_);
  closing_ = true;
  notifier_.DropFailures();
  WakeAllWaiters();
  acks_cv_.SignalAll();
  WakeAllWriters();
}

Status EngineImpl::Close() {
  {
    MutexLock l(&mu_);
    if (close_started_) {
      // Another thread is closing: return once it is done (from a callback,
      // at once: that Close waits for the callback to return).
      if (notifier_.OnThread()) return Status::OK();
      while (!close_done_) close_cv_.Wait();
      return close_status_;
    }
    if (!opened_.load() && !wal_) return Status::OK();
    close_started_ = true;
    closing_ = true;
    notifier_.Halt();  // no callback starts from here on
    for (auto& [_, sb] : standbys_) sb->Stop();
    WakeAllWaiters();
    acks_cv_.SignalAll();
    WakeAllWriters();
  }
  notifier_.Stop();  // no callback once Close has begun (one under way ends first)
  if (role_thread_.joinable()) role_thread_.join();
  if (arbiter_) arbiter_->Stop();  // revokes the lease: a successor is elected at once
  if (follower_.joinable()) follower_.join();
  if (endpoint_) endpoint_->Stop();  // OnClosed moves every standby to finished_
  diff_.Stop();  // releases logdiff's snapshots while the database is open
  if (applier_.joinable()) applier_.join();
  {
    MutexLock l(&mu_);
    for (auto& [_, sb] : standbys_) finished_.push_back(sb);  // each told to stop above
    standbys_.clear();
  }
  JoinStoppedShippers();
  MaintainRetention(/*force=*/true);  // saves the slots
  WriterLock store(&store_mu_);
  db_closed_.store(true);
  Status st = wal_ ? wal_->Close() : Status::OK();
  for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);  // none once the storage was lost
  handles_.clear();
  if (db_) {
    Status cs = FromRocks(db_->Close(), "close RocksDB");
    if (st.ok()) st = cs;
    db_.reset();
  }
  dir_lock_.reset();  // the directory may be opened again
  MutexLock l(&mu_);
  close_done_ = true;
  close_status_ = st;
  close_cv_.SignalAll();
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
