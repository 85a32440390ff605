// The embedding API: open a node on a data directory; write on the active,
// read anywhere; be told of role changes. No Boost or RocksDB types here.
//
// Static mode: a node without `follow` is the active; a node with
// `follow = "HOST:PORT"` is a standby of the active listening there. High
// availability: with `etcd` (or an `arbiter`), the nodes elect the active,
// promote a standby when it dies and fence the old one (docs/failover.md).
//
// Thread-safety: every method may be called from any thread, the callbacks'
// own included (see on_role_change).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "replica/status.h"

namespace replica {

class Arbiter;  // replication/arbiter.h

enum class Role { kActive, kStandby };
const char* RoleName(Role role);

// When the active acknowledges a write (see docs/replication.md).
struct CommitRule {
  enum class Mode {
    kAsync,        // the local WAL has it durably
    kRemoteWrite,  // and `count` standbys have it durably in their WAL
    kRemoteApply,  // and `count` standbys have applied it to their RocksDB
  };
  Mode mode = Mode::kAsync;
  int count = 0;
  // "async", "remote-write:N", "remote-apply:N"
  static Result<CommitRule> Parse(const std::string& text);
  std::string ToString() const;
};

struct EngineOptions {
  std::string node_id;
  std::string data_dir;  // holds wal/ and db/ (a plain RocksDB database)
  // Replication port to listen on (port 0: any free port; see listen_port()).
  std::string listen_host = "127.0.0.1";
  uint16_t listen_port = 0;
  // With an arbiter: the replication address published for the other nodes,
  // "HOST:PORT" (port 0: the port bound). Empty: listen_host and the port
  // bound, which cannot be a wildcard address (0.0.0.0, ::) then.
  std::string advertise;
  // Static mode (etcd empty): "" makes this node the active; "HOST:PORT"
  // makes it a standby of the active listening there.
  std::string follow;
  // High availability (docs/failover.md): etcd client URLs. Set, the node
  // starts as a standby, follows whichever node holds the active key, and
  // campaigns when there is none; `follow` is ignored.
  std::vector<std::string> etcd;
  // The etcd lease of the node's session (etcd's minimum is 2 s): an active
  // that dies is replaced about this long after.
  std::chrono::seconds lease_ttl{2};
  // An active stops accepting writes this long before its lease could
  // expire at etcd, counted from the send time of the last renewal.
  std::chrono::milliseconds fence_margin{500};
  // Tests: an arbiter to use instead of etcd (a fake that drives role
  // changes deterministically). Set, the node runs as with `etcd`.
  std::shared_ptr<Arbiter> arbiter;
  // Published for clients and tools (repctl): this node's RESP address.
  std::string client_address;
  std::string cluster = "default";
  std::string secret;  // the cluster's shared secret (required)
  // Mutual TLS on the replication port (docs/protocol.md, "TLS"): this
  // node's PEM certificate chain and key, and the CA that signs every node's
  // certificate. All three or none; every node of a cluster alike.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_ca_file;
  CommitRule commit;
  // When a write has waited this long for its standbys: keep waiting
  // (fallback "strict"), or fall back to async until enough standbys have
  // caught up again ("async"); both are logged, a fallback is counted.
  std::chrono::milliseconds commit_timeout{5000};
  std::string commit_fallback = "strict";
  // Under remote-write/remote-apply, a write is acknowledged only once every
  // standby listed as eligible for promotion (the sync set in etcd) holds it.
  // A listed standby that still lacks it after this long, while the rule
  // holds without it, is first removed from the set in etcd, then the write
  // is acknowledged. It rejoins once it holds everything committed again.
  std::chrono::milliseconds sync_grace{100};
  // A standby dropped from the sync set for lagging may join again after
  // this long, doubled with each further drop (at most 64 times it), and
  // back to this after a minute without a drop.
  std::chrono::milliseconds sync_rejoin_backoff{1000};
  // WAL: "every" | "interval" | "none" (see docs/wal-format.md)
  std::string wal_sync = "every";
  // Under "interval": how often the WAL is fdatasync'ed (1 ms to 60 s).
  std::chrono::milliseconds wal_sync_interval{10};
  uint64_t wal_segment_size = 64ull << 20;
  // Reserve each WAL segment's space when it starts (fallocate), under
  // "every" and "interval": fdatasync is then about a third shorter on ext4.
  // Turn off on filesystems where reserving gains nothing (copy-on-write).
  bool wal_preallocate = true;
  // WAL retention: segments are deleted while the log is larger than this,
  // but never records a known standby still needs (its slot, see below) or
  // that this node has not applied yet. 0 keeps every segment.
  uint64_t wal_keep_bytes = 1ull << 30;
  // The active keeps the log each known standby still needs (a slot, kept in
  // DATA_DIR/slots across restarts), until that standby is this many WAL
  // bytes behind: then the slot is dropped (logged), the log it needs may be
  // deleted, and the standby is resynced from a snapshot. 0: no cap.
  uint64_t slot_max_bytes = 4ull << 30;
  // Threads serving the node's replication connections (to its standbys or
  // its active: reads, acknowledgements, queued sends; 1..64). With one
  // standby, one thread measured faster than two (docs/performance.md,
  // ninth session); more may help an active with many standbys.
  int transport_io_threads = 1;
  // Called with the node's role once Open has succeeded (possibly before
  // Open has returned to its caller: a callback that needs the Engine
  // pointer must wait until the host has stored it), then at each change. Both callbacks run on one internal thread of their own, one
  // call at a time, in the order of the events (never on the thread that
  // calls Open or Write, never under an engine lock): a callback may call
  // any method, Close included, and may destroy the engine. A slow
  // callback delays the next one, nothing else. No callback starts once
  // Close has begun (Close waits for one under way, unless called from it).
  std::function<void(Role)> on_role_change;
  // Called once when the node fails: its WAL can no longer be written (a
  // full disk), its applier stopped on an error, or a snapshot install
  // replaced its data but could not open the new data. A failed node stops
  // following and never campaigns; with an arbiter, an active steps down
  // (in static mode it keeps the role, refusing writes). Reads and writes
  // return the error (EngineStatus::failure says it). Restarting the node
  // (Close, then Open on the same data_dir) retries, and finishes an
  // interrupted install. Not called once Interrupt or Close has begun.
  std::function<void(const Status&)> on_failure;
  // Tests: called at named steps: "install.reopen" (a snapshot install has
  // replaced the data; the new data is about to be opened), "apply" (the
  // applier is about to apply a run of records), "write.append" (an active's
  // write passed its role check; the status is ignored),
  // "promote.fence_check" (a promotion is about to check for fences) and
  // "log.read LSN" (an active is about to read its own log at LSN to ship
  // it, or to see whether damage noted there is still there). A status other
  // than OK is taken as that step's failure.
  std::function<Status(const char* step)> test_fault;
};

// A batch of puts and deletes, applied atomically.
class WriteBatch {
 public:
  void Put(std::string key, std::string value);
  void Delete(std::string key);
  bool empty() const { return ops_.empty(); }
  size_t size() const { return ops_.size(); }

  struct Op {
    bool is_delete = false;
    std::string key;
    std::string value;
  };
  const std::vector<Op>& ops() const { return ops_; }
  // The record payload stored in the WAL (docs/replication.md).
  std::string Encode() const;
  static Result<WriteBatch> Decode(std::string_view payload);

 private:
  std::vector<Op> ops_;
};

struct EngineStatus {
  Role role = Role::kStandby;
  uint64_t epoch = 0;
  uint64_t first_lsn = 0;    // first LSN the local WAL still holds (retention)
  uint64_t last_lsn = 0;     // last LSN in the local WAL
  uint64_t durable_lsn = 0;  // local WAL durable up to
  uint64_t applied_lsn = 0;  // applied to the local RocksDB up to
  uint64_t commit_lsn = 0;   // active: the commit rule holds up to here
  CommitRule commit;         // the rule in force
  bool commit_degraded = false;   // running as async after a commit timeout
  uint64_t commit_fallbacks = 0;  // how often that happened
  uint64_t standbys_refused = 0;  // subscriptions refused (diverged, purged, bad LSN)
  struct Standby {
    std::string id;
    std::string address;         // its replication connection's remote end (HOST:PORT)
    std::string client_address;  // where its clients go, as it said (empty if it has no client port)
    uint64_t flushed_lsn = 0;
    uint64_t applied_lsn = 0;
    bool resyncing = false;  // being sent a snapshot; not counted by the commit rule
    // Bytes of the active's WAL after flushed_lsn (the partial segment
    // estimated by its average record size).
    uint64_t lag_bytes = 0;
    // Time since it last held every record durably (0 while it does).
    uint64_t lag_ms = 0;
  };
  std::vector<Standby> standbys;  // active only: connected standbys
  // Active: the log kept for each known standby (slot: the first LSN kept).
  std::vector<std::pair<std::string, uint64_t>> slots;
  uint64_t slots_dropped = 0;        // slots dropped for passing slot_max_bytes
  // Snapshot resync.
  uint64_t snapshots_sent = 0;       // active: snapshots served
  uint64_t snapshot_files_sent = 0;
  uint64_t snapshot_bytes_sent = 0;
  uint64_t snapshots_installed = 0;  // standby: snapshots installed
  uint64_t snapshot_files_reused = 0;  // standby: files it already held, not sent again
  uint64_t snapshot_bytes_received = 0;
  uint64_t rewinds = 0;  // standby: times a diverged tail was cut back on rejoin
  // Active: times a damaged frame (or a read error) was found in this
  // node's own log while shipping it, checking a standby's log, or reading a
  // snapshot's seed (engine.log_damaged); standbys that need those records
  // are resynced from a snapshot instead.
  uint64_t wal_damage_found = 0;
  std::string active_address;     // standby only: whom it follows
  // Standby only: its session to the active is up (authenticated), and
  // whether a snapshot is being received on it (a resync).
  bool upstream_connected = false;
  bool receiving_snapshot = false;
  // Streaming from its active: connected and not being resynced (Redis's
  // master_link_status:up).
  bool upstream_streaming() const { return upstream_connected && !receiving_snapshot; }
  std::string active_id;          // the active's node id, if known (a static standby: the node it follows)
  std::string active_client_address;  // high availability: the active's client (RESP) address, if published
  // Empty while the node works; once it has failed (see
  // EngineOptions::on_failure), why. A failed node serves nothing until restarted.
  std::string failure;
};

// A read that says how stale it may be (Engine::ReadWithStaleness).
struct StatedRead {
  std::optional<std::string> value;  // nullopt: the key is absent
  uint64_t applied_lsn = 0;          // the data read is at least as recent as this LSN
  // How far behind the active this node's data may be: 0 on an active that
  // holds its lease. On an active that cannot renew it (self-fenced, see
  // docs/failover.md), the time since its lease's deadline, when another
  // node may have been elected. On a standby, the time since it last had
  // applied every record its active had reported as of the active's last
  // heartbeat (every 0.5 s), and how many records it lacked then; only a
  // heartbeat of the active it is connected to counts (a switch to another
  // active keeps counting from the last catch-up, an upper bound, until it
  // catches up with the new one). Unknown (nullopt) on a standby that has
  // not caught up with a live active since it was opened, and on an active
  // whose lease ended.
  std::optional<std::chrono::milliseconds> staleness;
  uint64_t behind_records = 0;
};

class Engine {
 public:
  static Result<std::unique_ptr<Engine>> Open(const EngineOptions& options);
  virtual ~Engine() = default;

  // Active only: logs, waits for the commit rule, applies, returns the LSN.
  // NotActive (naming the active, if known) on a standby.
  virtual Result<uint64_t> Write(const WriteBatch& batch) = 0;
  // Like Write, and sets *existed to how many of the batch's deletes found
  // their key, each as of its place in the log (after the ops before it, in
  // this batch and in earlier ones): Redis DEL's reply. A key deleted twice
  // in a row is found once; of two concurrent deletes of one key, one finds
  // it. The first call makes this node's applier look up every key it
  // deletes from then on (a point read per deleted key). *existed is nullopt
  // when the count was not kept (the call returned long after its batch was
  // applied, past 65,536 newer records).
  virtual Result<uint64_t> WriteCountingDeletes(const WriteBatch& batch, std::optional<uint64_t>* existed) = 0;
  // The same, delete by delete: (*existed)[i] says whether the batch's i-th
  // Delete found its key. For a batch that joins several callers' commands
  // (the client port writes many connections' SETs and DELs as one), so that
  // each DEL gets its own count. Empty for a batch without deletes;
  // nullopt as above, and when the write fails.
  virtual Result<uint64_t> WriteReportingDeletes(const WriteBatch& batch,
                                                 std::optional<std::vector<bool>>* existed) = 0;
  // Reads the local RocksDB; nullopt if the key is absent.
  virtual Result<std::optional<std::string>> Get(const std::string& key) = 0;
  // Like Get, and states how stale the answer may be (see StatedRead). With
  // max_staleness, a node further behind than that (or that cannot tell)
  // answers TooStale instead, naming its staleness: read the active, or
  // wait for this node with WaitForApplied. A failed node answers its failure.
  virtual Result<StatedRead> ReadWithStaleness(const std::string& key,
                                               std::optional<std::chrono::milliseconds> max_staleness) = 0;
  // Up to `limit` keys in order, starting at `start` (inclusive).
  virtual Result<std::vector<std::pair<std::string, std::string>>> Scan(const std::string& start, size_t limit) = 0;
  // The same keys without their values (no value is copied).
  virtual Result<std::vector<std::string>> ScanKeys(const std::string& start, size_t limit) = 0;
  // Waits until this node has applied `lsn` (read-your-writes across nodes).
  virtual Status WaitForApplied(uint64_t lsn, std::chrono::milliseconds timeout) = 0;
  // Active: waits until `count` standbys hold `lsn` durably in their WAL or
  // the timeout passes; returns how many do (Redis WAIT).
  virtual Result<int> WaitForReplicas(uint64_t lsn, int count, std::chrono::milliseconds timeout) = 0;
  virtual EngineStatus status() const = 0;
  // Changes the commit rule at run time (waiting writes are re-judged). With
  // etcd, a rule set there (`repctl set-commit`, the ctl/commit key) wins:
  // the active goes back to it within moments.
  virtual Status SetCommitRule(const CommitRule& rule) = 0;
  // Every metric in the Prometheus text exposition format (docs/operations.md).
  virtual std::string PrometheusMetrics() const = 0;
  virtual uint16_t listen_port() const = 0;
  // The address clients reach this node at (e.g. its RESP port once bound);
  // published to the arbiter, so that standbys can send clients to the active.
  virtual void SetClientAddress(const std::string& address) = 0;
  // Wakes every waiting call (Write, WaitForApplied, WaitForReplicas) with
  // Aborted and refuses new writes: the first step of a shutdown, so that
  // threads blocked in the engine can be joined before Close. Close should
  // follow soon: an interrupted active keeps its lease and role (refusing
  // writes) until Close resigns them.
  virtual void Interrupt() = 0;
  // Stops the node and closes its storage. Idempotent: a call while another
  // thread closes returns once that one is done, with its status (a call
  // from a callback returns at once).
  virtual Status Close() = 0;
};

}  // namespace replica
