// The arbiter: who is the active, at which epoch, and who is alive
// (docs/failover.md). The engine talks to it through this interface; the
// real one is etcd (NewEtcdArbiter), tests may substitute a fake.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "replica/status.h"

namespace replica {

// What a node publishes about itself (its session key, under its lease).
struct NodeInfo {
  std::string id;
  std::string address;         // replication HOST:PORT
  std::string client_address;  // RESP HOST:PORT, if any
  std::string role;            // "active" | "standby"
  uint64_t epoch = 0;
  uint64_t last_lsn = 0;
  uint64_t durable_lsn = 0;
  uint64_t applied_lsn = 0;
  // Published by the active: how long each standby has not held every record.
  std::map<std::string, uint64_t> standby_lag_ms;
  // And the bytes of its WAL each standby does not hold durably yet.
  std::map<std::string, uint64_t> standby_lag_bytes;
  // The first LSN this node keeps for each standby (slots): on the active,
  // those it holds the log for; on a standby, those it kept as an earlier
  // active, which it would hold again if promoted (repctl remove checks an
  // id against them).
  std::map<std::string, uint64_t> slots;
  std::string commit;          // the commit rule in force on this node
  uint64_t wal_first_lsn = 0;  // retention: the oldest LSN still in the WAL
  uint64_t wal_bytes = 0;      // disk use of the WAL
  uint64_t db_bytes = 0;       // disk use of RocksDB (SST files)
  uint64_t resyncs = 0;        // snapshots installed since the node started
  std::string progress;        // long work under way (resync, catch-up), or empty
  // Set once the node has failed (EngineStatus::failure): it serves nothing
  // and never campaigns; elections pass it over.
  std::string failure;
  // Set while there is no active, to the cluster's epoch key as the node
  // read it then: its LSNs above are final for that election (nothing more
  // arrives from the active that is gone). 0 otherwise.
  uint64_t final_epoch = 0;
  // Its data directory's incarnation (DATA_DIR/node): new whenever the
  // directory is created empty. Empty from nodes older than incarnations.
  std::string incarnation;
  // Not published: what FromJson could not read, e.g. a number field that
  // is not a whole number 0..2^63-1 (it reads as 0, as before); empty when
  // the session read cleanly. For the operator (repctl status).
  std::string unreadable;
  std::string ToJson() const;
  static Result<NodeInfo> FromJson(const std::string& text);
};

// A sync set entry: "ID" (any incarnation: written before incarnations)
// or "ID#INCARNATION" (that data directory only; '#' is in no node id).
struct SyncEntry {
  std::string id;
  std::string incarnation;  // empty: any
  static SyncEntry Parse(const std::string& text);
  std::string ToString() const { return incarnation.empty() ? id : id + "#" + incarnation; }
};
// Whether `entries` list node `id` with data directory `incarnation`.
bool SyncListed(const std::vector<std::string>& entries, const std::string& id, const std::string& incarnation);

struct ActiveInfo {
  std::string id;
  std::string address;  // replication HOST:PORT
  uint64_t epoch = 0;
  std::string ToJson() const;
  static Result<ActiveInfo> FromJson(const std::string& text);
};

// An epoch as stored in etcd: decimal digits only, below 2^63 (so that
// adding one never wraps). nullopt for anything else ("-2", "1e3", "").
std::optional<uint64_t> ParseEpoch(std::string_view text);
inline constexpr uint64_t kMaxEpoch = (uint64_t{1} << 63) - 1;

// An operator's switchover or forced promotion (ctl/switchover,
// ctl/promote): the node named and the epoch the request was made in, as
// NODE@EPOCH. Parsing gives ("", 0) for any other form.
std::string OperatorRequest(const std::string& node, uint64_t epoch);
std::pair<std::string, uint64_t> ParseOperatorRequest(const std::string& value);

class Arbiter {
 public:
  using Clock = std::chrono::steady_clock;
  virtual ~Arbiter() = default;

  // Takes a lease, publishes the node's session under it and keeps both
  // alive from now on (a lost lease is replaced by a new one).
  virtual Status Start(const NodeInfo& me) = 0;
  // Refreshes the session's content.
  virtual Status Publish(const NodeInfo& me) = 0;
  virtual Result<std::optional<ActiveInfo>> GetActive() = 0;
  virtual Result<std::vector<NodeInfo>> GetNodes() = 0;
  // A node session GetNodes leaves out: its value is not a node session (not
  // a JSON object, no id). key: its name under nodes/.
  struct UnreadableSession {
    std::string key;
    std::string why;
  };
  // For the operator (repctl status): the sessions GetNodes leaves out.
  virtual Result<std::vector<UnreadableSession>> GetUnreadableNodes() { return std::vector<UnreadableSession>(); }
  // Becomes the active if nobody is, at epoch max(stored epoch, min_epoch) + 1,
  // in one transaction; the active key lives under this node's lease.
  // Returns the new epoch, or nullopt if another node is the active.
  virtual Result<std::optional<uint64_t>> Campaign(const NodeInfo& me, uint64_t min_epoch) = 0;
  // The cluster's epoch key: the last epoch won (0 before the first).
  virtual Result<uint64_t> GetEpoch() = 0;
  // Deletes the active key if it is this node's (planned hand-over).
  virtual Status Resign(const std::string& id) = 0;
  // The standbys that hold every write the active acknowledged (eligible
  // for promotion); absent until an active publishes one. Publishing fails
  // (kNotActive) unless the active key is the one this node won last.
  virtual Status PublishSyncSet(const std::vector<std::string>& ids) = 0;
  virtual Result<std::optional<std::vector<std::string>>> GetSyncSet() = 0;
  // Until when this node's lease is certainly still alive at the arbiter:
  // the send time of the last successful renewal + TTL - the safety margin,
  // on the monotonic clock. An active stops accepting writes past it.
  virtual Clock::time_point LeaseDeadline() const = 0;
  // Whether the lease that this node's last won Campaign put the active key
  // under is still its lease. False once that lease ended and a new one
  // replaced it: the key ended with it, whatever LeaseDeadline says of the
  // new lease. True before any win.
  virtual bool WonLeaseCurrent() const = 0;
  // A counter of changes seen to the active key. Read it, look at the
  // state, then WaitForChange(that count): no change can slip between.
  virtual uint64_t changes() const = 0;
  // Returns once changes() differs from `since`, or at the deadline.
  virtual void WaitForChange(uint64_t since, Clock::time_point deadline) = 0;
  // Counts as a change: wakes WaitForChange at once (the engine has work
  // for its role loop). Never blocks on etcd.
  virtual void Kick() = 0;
  // Operator requests (repctl), under CTL/: "fence/NODE", "switchover"
  // (value: the target node), "promote" (value: the node to force),
  // "reseed/NODE", "remove/NODE", and "commit" (value: the cluster's commit
  // rule; kept, so that every later active takes it). Keys are relative to CTL/.
  virtual Result<std::vector<std::pair<std::string, std::string>>> GetControls() = 0;
  virtual Status PutControl(const std::string& name, const std::string& value) = 0;
  virtual Status ClearControl(const std::string& name) = 0;
  // Stops keeping the lease alive and revokes it (the session and, if held,
  // the active key vanish at once).
  virtual void Stop() = 0;
};

struct EtcdArbiterOptions {
  std::vector<std::string> endpoints;  // etcd client URLs
  std::string cluster = "default";     // keys live under /replica/CLUSTER/
  std::chrono::seconds lease_ttl{2};
  // Subtracted from the lease's end when judging whether it still stands
  // (clock drift between this node and etcd, scheduling delays).
  std::chrono::milliseconds safety_margin{500};
  std::chrono::milliseconds request_timeout{1000};
};

Result<std::unique_ptr<Arbiter>> NewEtcdArbiter(const EtcdArbiterOptions& options);

// The key prefix of a cluster: "/replica/CLUSTER/".
std::string ClusterPrefix(const std::string& cluster);

}  // namespace replica
