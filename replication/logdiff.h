// logdiff: prove that nodes' replicas are identical, or show exactly where
// they differ (docs/operations.md, "Verifying replicas with logdiff").
//
// What is compared, for every node:
//   - the WAL, record by record over the LSN range all nodes hold (LSN,
//     epoch, type and the record digest, which covers the payload; with
//     `bytes`, the payloads themselves byte for byte);
//   - the epoch histories over that range;
//   - the RocksDB contents, every column family, key by key.
// Ranges are compared by hash first, in parallel over nodes and key ranges;
// only ranges whose hashes differ are read entry by entry. A node behind
// another (a shorter log, a lower applied LSN) is lag, not a difference,
// unless `strict`: keys written by the records it has not applied yet are
// set aside as explained by lag.
//
// A Source is one node's data. OpenDirectory reads a data directory without
// disturbing a node that runs on it (the WAL read-only, RocksDB as a
// secondary instance). The engine answers the same questions over the
// replication port (logdiff --live).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "replica/status.h"

namespace replica::logdiff {

struct Digest {
  uint64_t hash = 0;
  uint64_t count = 0;  // records or entries covered
  uint64_t bytes = 0;  // payload or key + value bytes covered
  bool operator==(const Digest& o) const { return hash == o.hash && count == o.count; }
};

struct NodeInfo {
  uint64_t wal_first = 0;  // first retained LSN
  uint64_t wal_last = 0;   // wal_first - 1 when the log is empty
  uint64_t wal_bytes = 0;
  std::vector<std::pair<uint64_t, uint64_t>> epochs;  // (epoch, first LSN)
  std::string torn_tail;  // non-empty: a torn last write was found (described)
  uint64_t applied = 0;   // applied LSN stored in RocksDB
  uint64_t db_bytes = 0;  // approximate size of the RocksDB files
  std::vector<std::string> column_families;
};

struct WalRecord {
  uint64_t lsn = 0;
  uint64_t epoch = 0;
  uint8_t type = 0;
  uint64_t digest = 0;  // wal::RecordDigest
  uint32_t size = 0;
  std::string payload;  // only when asked for
};

struct Entry {
  std::string key;
  uint64_t value_hash = 0;
  uint32_t value_size = 0;
  std::string preview;  // the value's first bytes
};

// One node's data. Methods may be called from several threads at once.
class Source {
 public:
  virtual ~Source() = default;
  virtual Result<NodeInfo> Info() = 0;
  // Digests of [from, to] in chunks of `chunk` records: element i covers
  // [from + i * chunk, min(to, from + (i + 1) * chunk - 1)].
  virtual Result<std::vector<Digest>> WalDigests(uint64_t from, uint64_t to, uint64_t chunk) = 0;
  virtual Result<std::vector<WalRecord>> WalRecords(uint64_t from, uint64_t to, bool payloads) = 0;
  // Sorted keys that cut the column family into about n ranges of similar size.
  virtual Result<std::vector<std::string>> SplitKeys(const std::string& cf, int n) = 0;
  // Keys in [begin, end); an empty end means no upper bound. The applied-LSN
  // key of the engine's meta column family is left out (NodeInfo has it).
  virtual Result<Digest> RangeDigest(const std::string& cf, const std::string& begin, const std::string& end) = 0;
  // At most limit entries of [begin, end), in key order.
  virtual Result<std::vector<Entry>> Entries(const std::string& cf, const std::string& begin,
                                             const std::string& end, size_t limit) = 0;
  // Live nodes only: answer from a snapshot taken exactly when the node's
  // applied LSN reached lsn, and read the WAL only up to lsn (the WAL is not
  // held: a purge meanwhile makes a later read fail, never match). Returns
  // the node's info at that point. Aborted if it had already applied past lsn.
  virtual Result<NodeInfo> Pin(uint64_t lsn) { return Status::NotSupported("only a live node can be pinned"); }
  // Live nodes only: the node's id, as its session authenticated it (two
  // addresses of one node give the same id); empty for a data directory.
  virtual std::string node_id() const { return ""; }
  // Bytes hashed so far (for the progress display and the throughput).
  std::atomic<uint64_t> bytes_read{0};
};

// DATA_DIR (holding wal/ and db/), opened without disturbing a live node:
// the WAL read-only (a torn tail is reported, not cut), RocksDB as a
// secondary instance whose scratch files go to a temporary directory.
Result<std::unique_ptr<Source>> OpenDirectory(const std::string& data_dir);

struct LiveOptions {
  std::string cluster = "default";
  std::string secret;  // the cluster's shared secret
  std::string tls_cert, tls_key, tls_ca;  // all three for a cluster that runs TLS
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds pin_timeout{10000};  // how long a node may take to reach the LSN
};

// A running node, over its replication port ("HOST:PORT"): the node hashes
// its own ranges and sends only digests and the entries asked for.
Result<std::unique_ptr<Source>> ConnectNode(const std::string& address, const LiveOptions& options);

// Pins every live node at one LSN: at_lsn, or (0) the highest WAL end among
// them, retried a few times with a lead while writes keep moving the nodes
// past it. Returns the LSN.
Result<uint64_t> PinCommonLsn(const std::vector<std::string>& names, const std::vector<Source*>& sources,
                              uint64_t at_lsn);

struct Options {
  bool bytes = false;   // compare WAL payloads byte for byte, not only digests
  bool strict = false;  // a node behind another is a difference
  size_t max_diffs = 20;  // differences listed (all are counted)
  int threads = 0;        // 0: one per core
  uint64_t wal_chunk = 16384;  // records per WAL hash range
  // Called about once a second while hashing: (bytes done, bytes expected).
  std::function<void(uint64_t, uint64_t)> progress;
};

struct Difference {
  std::string kind;   // "wal", "epochs", "log-end", "log-start", "column-family", "value", "missing", "lag"
  std::string where;  // "LSN 1234", "cf default key \"k\"", ...
  std::vector<std::string> sides;  // what each node holds there, in node order
};

struct Report {
  enum class Verdict { kIdentical, kDifferent, kError };
  Verdict verdict = Verdict::kError;
  std::string error;  // kError: why the comparison could not be made
  std::vector<std::string> names;
  std::vector<NodeInfo> nodes;
  std::vector<std::string> notes;  // lag and other facts that are not differences
  std::vector<Difference> diffs;   // the first max_diffs
  uint64_t diff_count = 0;
  uint64_t common_first = 0, common_last = 0;  // WAL range every node holds (first > last: none)
  // The lowest and highest LSN compared (first > last: none). Records
  // outside the common range are compared among the nodes that hold them.
  uint64_t compared_first = 1, compared_last = 0;
  uint64_t records_compared = 0;
  uint64_t keys_compared = 0;    // entries of the reference node, all column families
  uint64_t lag_keys = 0;         // key differences set aside as lag
  uint64_t bytes_hashed = 0;     // over all nodes
  double seconds = 0;
  int exit_code() const { return verdict == Verdict::kIdentical ? 0 : verdict == Verdict::kDifferent ? 1 : 2; }
};

Report Compare(const std::vector<std::string>& names, const std::vector<Source*>& sources, const Options& options);

// A one-line verdict, then one line per difference and note.
std::string FormatText(const Report& report);
// One JSON object.
std::string FormatJson(const Report& report);

}  // namespace replica::logdiff
