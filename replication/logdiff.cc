// logdiff: range hashes first, entries only where the hashes differ.
#include "replication/logdiff.h"

#include <rocksdb/db.h>
#include <rocksdb/metadata.h>
#include <sys/stat.h>
#include <xxhash.h>

#include <algorithm>
#include <boost/json.hpp>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <unistd.h>
#include <unordered_map>

#include "base/coding.h"
#include "base/env.h"
#include "base/host_port.h"
#include "base/mutex.h"
#include "replica/engine.h"
#include "replication/logdiff_server.h"
#include "replication/snapshot.h"
#include "transport/transport.h"
#include "wal/wal.h"

namespace replica::logdiff {
namespace {

using Clock = std::chrono::steady_clock;

class Hasher {
 public:
  Hasher() : state_(XXH3_createState()) { XXH3_64bits_reset(state_); }
  ~Hasher() { XXH3_freeState(state_); }
  Hasher(const Hasher&) = delete;
  Hasher& operator=(const Hasher&) = delete;
  void U64(uint64_t v) {
    char b[8];
    EncodeFixed64(b, v);
    XXH3_64bits_update(state_, b, sizeof b);
  }
  void Bytes(std::string_view s) {
    U64(s.size());
    XXH3_64bits_update(state_, s.data(), s.size());
  }
  uint64_t Final() const { return static_cast<uint64_t>(XXH3_64bits_digest(state_)); }

 private:
  XXH3_state_t* state_;
};

using snapshot::FromRocks;

// Sorts and dedups split keys, then keeps at most n - 1 of them, evenly
// spaced, so that they cut the key space into at most n ranges.
void ThinSplitKeys(std::vector<std::string>* keys, int n) {
  if (n <= 1) {  // one range: no split
    keys->clear();
    return;
  }
  std::sort(keys->begin(), keys->end());
  keys->erase(std::unique(keys->begin(), keys->end()), keys->end());
  if (keys->size() > static_cast<size_t>(n - 1)) {
    std::vector<std::string> picked;
    for (int i = 1; i < n; ++i) picked.push_back((*keys)[keys->size() * static_cast<size_t>(i) / static_cast<size_t>(n)]);
    picked.erase(std::unique(picked.begin(), picked.end()), picked.end());
    keys->swap(picked);
  }
}

bool IsDir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

// A node's open log and database; DB reads at `snapshot` (nullptr: latest),
// WAL reads stop at wal_cap.
class StoreSource : public Source {
 public:
  StoreSource() = default;
  StoreSource(const Store& store, const rocksdb::Snapshot* snapshot, uint64_t wal_cap)
      : store_(store), snapshot_(snapshot), wal_cap_(wal_cap) {}

  Result<NodeInfo> Info() override {
    NodeInfo info = extra_;
    info.wal_first = store_.wal->first_lsn();
    info.wal_last = std::min(store_.wal->last_lsn(), wal_cap_);
    info.wal_bytes = store_.wal->size_bytes();
    const wal::EpochHistory history = store_.wal->epoch_history();
    for (const auto& e : history.entries()) {
      if (e.first_lsn <= info.wal_last) info.epochs.emplace_back(e.epoch, e.first_lsn);
    }
    info.column_families = store_.names;
    if (auto* meta = Handle(snapshot::kMetaColumnFamily)) {
      std::string v;
      rocksdb::ReadOptions ro;
      ro.snapshot = snapshot_;
      auto s = store_.db->Get(ro, meta, snapshot::kAppliedKey, &v);
      if (s.ok() && v.size() == 8) {
        info.applied = DecodeFixed64(v.data());
      } else if (s.ok()) {
        return Status::Corruption("the applied LSN is " + std::to_string(v.size()) + " bytes, not 8");
      } else if (!s.IsNotFound()) {
        return FromRocks(s, "read the applied LSN");
      }
    }
    std::vector<rocksdb::LiveFileMetaData> files;
    store_.db->GetLiveFilesMetaData(&files);
    for (const auto& f : files) info.db_bytes += f.size;
    return info;
  }

  Result<std::vector<Digest>> WalDigests(uint64_t from, uint64_t to, uint64_t chunk) override {
    if (chunk == 0 || from == 0 || from > to || to > wal_cap_ || to > store_.wal->last_lsn() ||
        (to - from) / chunk >= (1u << 24)) {
      return Status::InvalidArgument("bad WAL range " + std::to_string(from) + ".." + std::to_string(to));
    }
    std::vector<Digest> out((to - from) / chunk + 1);
    REPLICA_ASSIGN_OR_RETURN(auto reader, store_.wal->NewReader(from));
    std::unique_ptr<Hasher> h;
    size_t idx = 0;
    for (uint64_t lsn = from; lsn <= to; ++lsn) {
      wal::RecordView r;
      REPLICA_ASSIGN_OR_RETURN(bool got, reader->Next(&r));
      if (!got) return Status::Aborted("the WAL ended at LSN " + std::to_string(lsn - 1) + " while being read");
      const size_t i = (lsn - from) / chunk;
      if (!h || i != idx) {
        if (h) out[idx].hash = h->Final();
        h = std::make_unique<Hasher>();
        idx = i;
      }
      h->U64(r.lsn);
      h->U64(wal::RecordDigest(r));
      out[i].count++;
      out[i].bytes += r.payload.size();
      bytes_read.fetch_add(r.payload.size() + 40, std::memory_order_relaxed);
    }
    if (h) out[idx].hash = h->Final();
    return out;
  }

  Result<std::vector<WalRecord>> WalRecords(uint64_t from, uint64_t to, bool payloads) override {
    return WalRecordsLimited(from, std::min(to, wal_cap_), payloads, SIZE_MAX);
  }

  // At most max_bytes of payload (but at least one record).
  Result<std::vector<WalRecord>> WalRecordsLimited(uint64_t from, uint64_t to, bool payloads, size_t max_bytes) {
    std::vector<WalRecord> out;
    REPLICA_ASSIGN_OR_RETURN(auto reader, store_.wal->NewReader(from));
    size_t bytes = 0;
    for (uint64_t lsn = from; lsn <= to && (out.empty() || bytes < max_bytes); ++lsn) {
      wal::RecordView r;
      REPLICA_ASSIGN_OR_RETURN(bool got, reader->Next(&r));
      if (!got) break;
      WalRecord w;
      w.lsn = r.lsn;
      w.epoch = r.epoch;
      w.type = r.type;
      w.digest = wal::RecordDigest(r);
      w.size = static_cast<uint32_t>(r.payload.size());
      if (payloads) w.payload.assign(r.payload);
      bytes += r.payload.size() + 40;
      bytes_read.fetch_add(r.payload.size() + 40, std::memory_order_relaxed);
      out.push_back(std::move(w));
    }
    return out;
  }

  Result<std::vector<std::string>> SplitKeys(const std::string& cf, int n) override {
    if (!Handle(cf)) return Status::NotFound("no column family " + cf);
    std::vector<rocksdb::LiveFileMetaData> files;
    store_.db->GetLiveFilesMetaData(&files);
    std::vector<std::string> keys;
    for (const auto& f : files) {
      if (f.column_family_name == cf && !f.smallestkey.empty()) keys.push_back(f.smallestkey);
    }
    ThinSplitKeys(&keys, n);
    return keys;
  }

  Result<Digest> RangeDigest(const std::string& cf, const std::string& begin, const std::string& end) override {
    Digest d;
    Hasher h;
    REPLICA_RETURN_IF_ERROR(Scan(cf, begin, end, SIZE_MAX, [&](std::string_view k, std::string_view v) {
      h.Bytes(k);
      h.Bytes(v);
      d.count++;
      d.bytes += k.size() + v.size();
    }));
    d.hash = h.Final();
    return d;
  }

  Result<std::vector<Entry>> Entries(const std::string& cf, const std::string& begin, const std::string& end,
                                     size_t limit) override {
    return EntriesLimited(cf, begin, end, limit, SIZE_MAX);
  }
  // At least one entry (if any is left), and no more once the keys read
  // reach max_key_bytes: a reply to a remote logdiff stays small.
  Result<std::vector<Entry>> EntriesLimited(const std::string& cf, const std::string& begin, const std::string& end,
                                            size_t limit, size_t max_key_bytes) {
    std::vector<Entry> out;
    REPLICA_RETURN_IF_ERROR(Scan(
        cf, begin, end, limit,
        [&](std::string_view k, std::string_view v) {
          Entry e;
          e.key.assign(k);
          e.value_hash = XXH3_64bits(v.data(), v.size());
          e.value_size = static_cast<uint32_t>(v.size());
          e.preview.assign(v.substr(0, 32));
          out.push_back(std::move(e));
        },
        max_key_bytes));
    return out;
  }

 protected:
  Store store_;
  const rocksdb::Snapshot* snapshot_ = nullptr;
  uint64_t wal_cap_ = UINT64_MAX;
  NodeInfo extra_;  // torn tail, found when the directory was opened

 private:
  rocksdb::ColumnFamilyHandle* Handle(const std::string& cf) const {
    for (size_t i = 0; i < store_.names.size() && i < store_.handles.size(); ++i) {
      if (store_.names[i] == cf) return store_.handles[i];
    }
    return nullptr;
  }

  template <typename Fn>
  // Calls fn for up to `limit` entries from begin (and, with max_key_bytes,
  // stops after the entry whose key takes the keys read to that many bytes).
  Status Scan(const std::string& cf, const std::string& begin, const std::string& end, size_t limit, Fn&& fn,
              size_t max_key_bytes = SIZE_MAX) {
    auto* handle = Handle(cf);
    if (!handle) return Status::NotFound("no column family " + cf);
    const bool meta = cf == snapshot::kMetaColumnFamily;
    rocksdb::ReadOptions ro;
    ro.fill_cache = false;
    ro.readahead_size = 2 << 20;
    ro.snapshot = snapshot_;
    rocksdb::Slice upper(end);
    if (!end.empty()) ro.iterate_upper_bound = &upper;
    std::unique_ptr<rocksdb::Iterator> it(store_.db->NewIterator(ro, handle));
    size_t n = 0, key_bytes = 0;
    for (it->Seek(begin); it->Valid() && n < limit && key_bytes < max_key_bytes; it->Next()) {
      std::string_view k(it->key().data(), it->key().size()), v(it->value().data(), it->value().size());
      bytes_read.fetch_add(k.size() + v.size(), std::memory_order_relaxed);
      if (meta && k == snapshot::kAppliedKey) continue;
      fn(k, v);
      ++n;
      key_bytes += k.size();
    }
    return FromRocks(it->status(), "read column family " + cf);
  }
};

namespace {

// A data directory read without disturbing a node that may be running on it.
class DirectorySource final : public StoreSource {
 public:
  ~DirectorySource() override {
    if (db_) {
      for (auto* h : store_.handles) db_->DestroyColumnFamilyHandle(h);
    }
    db_.reset();
    wal_.reset();
    if (!scratch_.empty()) (void)snapshot::RemoveTree(scratch_);
  }

  Status Open(const std::string& data_dir) {
    const std::string wal_dir = JoinPath(data_dir, "wal"), db_dir = JoinPath(data_dir, "db");
    if (!IsDir(data_dir)) {
      struct stat st;
      if (::stat(data_dir.c_str(), &st) != 0) return Status::FromErrno(data_dir, errno);
      return Status::InvalidArgument(data_dir + " is not a directory (give a node's data directory)");
    }
    if (!IsDir(wal_dir) || !IsDir(db_dir)) {
      return Status::InvalidArgument(data_dir + " is not a node's data directory (it needs wal/ and db/)");
    }
    std::vector<std::string> names;
    REPLICA_RETURN_IF_ERROR(FromRocks(rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), db_dir, &names),
                                      "list the column families of " + db_dir));
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/logdiff-XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) return Status::FromErrno("create a scratch directory in " + templ, errno);
    scratch_ = templ;
    rocksdb::Options ro;
    ro.max_open_files = -1;  // required of a secondary instance
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
    for (const auto& name : names) cfs.emplace_back(name, rocksdb::ColumnFamilyOptions());
    rocksdb::DB* raw = nullptr;
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    REPLICA_RETURN_IF_ERROR(
        FromRocks(rocksdb::DB::OpenAsSecondary(ro, db_dir, scratch_, cfs, &handles, &raw), "open " + db_dir));
    db_.reset(raw);
    store_ = Store{nullptr, db_.get(), handles, names};  // the handles are the destructor's to free
    // The WAL after RocksDB: on a running node, the log then reaches at
    // least as far as the applied LSN the database shows.
    wal::Options wo;
    wo.read_only = true;
    REPLICA_ASSIGN_OR_RETURN(wal_, wal::Wal::Open(wal_dir, wo));
    const auto& rec = wal_->recovery();
    if (rec.torn_tail) {
      extra_.torn_tail = std::to_string(rec.torn_bytes) + " bytes after the last whole record in " +
                         rec.torn_segment + " at offset " + std::to_string(rec.torn_offset) + " (" + rec.torn_why + ")";
    }
    store_.wal = wal_.get();
    return Info().status().WithContext(db_dir);
  }

 private:
  std::unique_ptr<wal::Wal> wal_;
  std::unique_ptr<rocksdb::DB> db_;
  std::string scratch_;
};

// Runs every task on up to `threads` threads (the caller's among them).
void RunAll(const std::vector<std::function<void()>>& tasks, int threads) {
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < tasks.size();) tasks[i]();
  };
  std::vector<std::thread> pool;
  const size_t extra = std::min<size_t>(static_cast<size_t>(std::max(threads, 1)), tasks.size());
  for (size_t t = 1; t < extra; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// Printable form of a key or value: ASCII as is, other bytes as \xNN, cut at max.
std::string Printable(std::string_view s, size_t max = 48) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < max; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    }
  }
  if (s.size() > max) out += "...";
  return out;
}

std::string Hex64(uint64_t v) {
  char b[20];
  std::snprintf(b, sizeof b, "%016" PRIx64, v);
  return b;
}

const char* TypeName(uint8_t type) {
  switch (static_cast<wal::RecordType>(type)) {
    case wal::RecordType::kData: return "data";
    case wal::RecordType::kEpochStart: return "epoch-start";
  }
  return "unknown";
}

std::string DescribeRecord(const WalRecord& r) {
  return "epoch " + std::to_string(r.epoch) + " " + TypeName(r.type) + " " + std::to_string(r.size) +
         " bytes digest " + Hex64(r.digest);
}

std::string DescribeHistory(const std::vector<std::pair<uint64_t, uint64_t>>& h) {
  std::string out;
  for (const auto& [epoch, first] : h) {
    if (!out.empty()) out += ", ";
    out += "epoch " + std::to_string(epoch) + " from LSN " + std::to_string(first);
  }
  return out.empty() ? "(none)" : out;
}

class Comparison {
 public:
  Comparison(const std::vector<std::string>& names, const std::vector<Source*>& sources, const Options& options)
      : names_(names), src_(sources), opt_(options) {
    threads_ = opt_.threads > 0 ? opt_.threads : static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
  }

  Report Run() {
    const auto start = Clock::now();
    rep_.names = names_;
    Status st = Steps();
    if (!st.ok()) {
      rep_.verdict = Report::Verdict::kError;
      rep_.error = st.ToString();
    } else {
      rep_.verdict = rep_.diff_count > 0 ? Report::Verdict::kDifferent : Report::Verdict::kIdentical;
    }
    for (auto* s : src_) rep_.bytes_hashed += s->bytes_read.load();
    rep_.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return std::move(rep_);
  }

 private:
  size_t n() const { return src_.size(); }

  void AddDiff(Difference d) {
    if (rep_.diffs.size() < opt_.max_diffs) rep_.diffs.push_back(std::move(d));
    rep_.diff_count++;
  }

  // Runs fn(i) for every node in parallel; the first error (by node order) wins.
  Status ForEachNode(const std::function<Status(size_t)>& fn) {
    std::vector<size_t> all(n());
    for (size_t i = 0; i < n(); ++i) all[i] = i;
    return ForEachOf(all, fn);
  }
  Status ForEachOf(const std::vector<size_t>& nodes, const std::function<Status(size_t)>& fn) {
    std::vector<Status> st(nodes.size());
    std::vector<std::function<void()>> tasks;
    for (size_t k = 0; k < nodes.size(); ++k) tasks.emplace_back([&, k] { st[k] = fn(nodes[k]); });
    RunAll(tasks, threads_);
    for (size_t k = 0; k < nodes.size(); ++k) {
      if (!st[k].ok()) return st[k].WithContext(names_[nodes[k]]);
    }
    return Status::OK();
  }

  Status Steps() {
    if (n() < 2) return Status::InvalidArgument("logdiff needs at least two nodes");
    rep_.nodes.resize(n());
    REPLICA_RETURN_IF_ERROR(ForEachNode([&](size_t i) -> Status {
      REPLICA_ASSIGN_OR_RETURN(rep_.nodes[i], src_[i]->Info());
      return Status::OK();
    }));
    uint64_t expected = 0;
    for (const auto& ni : rep_.nodes) expected += ni.wal_bytes + ni.db_bytes;
    ProgressThread progress(this, expected);
    REPLICA_RETURN_IF_ERROR(CompareWal());
    CompareEpochs();
    REPLICA_RETURN_IF_ERROR(FindLagKeys());
    REPLICA_RETURN_IF_ERROR(CompareDb());
    return Status::OK();
  }

  // Reports progress about once a second while the comparison runs.
  class ProgressThread {
   public:
    ProgressThread(Comparison* c, uint64_t expected) : c_(c) {
      if (!c_->opt_.progress) return;
      thread_ = std::thread([this, expected] {
        MutexLock l(&mu_);
        while (!done_) {
          cv_.WaitUntil(Clock::now() + std::chrono::seconds(1));
          if (done_) break;
          uint64_t bytes = 0;
          for (auto* s : c_->src_) bytes += s->bytes_read.load();
          c_->opt_.progress(bytes, expected);
        }
      });
    }
    ~ProgressThread() {
      if (!thread_.joinable()) return;
      {
        MutexLock l(&mu_);
        done_ = true;
      }
      cv_.SignalAll();
      thread_.join();
    }

   private:
    Comparison* c_;
    Mutex mu_;
    CondVar cv_{&mu_};
    bool done_ GUARDED_BY(mu_) = false;
    std::thread thread_;
  };

  Status CompareWal() {
    uint64_t first = 0, last = UINT64_MAX, max_last = 0;
    for (const auto& ni : rep_.nodes) {
      first = std::max(first, ni.wal_first);
      last = std::min(last, ni.wal_last);
      max_last = std::max(max_last, ni.wal_last);
    }
    rep_.common_first = first;
    rep_.common_last = last;
    for (size_t i = 0; i < n(); ++i) {
      const auto& ni = rep_.nodes[i];
      if (!ni.torn_tail.empty()) rep_.notes.push_back(names_[i] + ": torn tail in the WAL: " + ni.torn_tail);
      if (ni.applied > ni.wal_last) {
        Difference d{"log-end", "WAL of " + names_[i], {}};
        for (size_t j = 0; j < n(); ++j) {
          d.sides.push_back(j == i ? "WAL ends at LSN " + std::to_string(ni.wal_last) + " but RocksDB applied up to LSN " +
                                         std::to_string(ni.applied) + ": the log lost its tail"
                                   : "");
        }
        AddDiff(std::move(d));
      }
      if (ni.applied + 1 < ni.wal_first) {
        // It cannot replay what it has not applied: a replica whose data
        // this comparison could not excuse as lag.
        Difference d{"log-start", "WAL of " + names_[i], {}};
        for (size_t j = 0; j < n(); ++j) {
          d.sides.push_back(j == i ? "RocksDB applied up to LSN " + std::to_string(ni.applied) +
                                         " but the WAL starts at LSN " + std::to_string(ni.wal_first) + ": LSN " +
                                         std::to_string(ni.applied + 1) + ".." + std::to_string(ni.wal_first - 1) +
                                         " can no longer be applied"
                                   : "");
        }
        AddDiff(std::move(d));
      }
    }
    if (first > last) {
      std::string ranges;
      for (size_t i = 0; i < n(); ++i) {
        ranges += (i ? ", " : "") + names_[i] + " " + std::to_string(rep_.nodes[i].wal_first) + ".." +
                  std::to_string(rep_.nodes[i].wal_last);
      }
      rep_.notes.push_back("the WALs hold no LSN that every node holds (" + ranges + ")");
    }
    // Every LSN held by two or more nodes is compared among them, not only
    // the range every node holds: with three nodes, one behind, the other
    // two must agree on the records it lacks. The LSN line is cut where a
    // node's log starts or ends; each piece is compared among its holders.
    std::vector<uint64_t> cuts;
    for (const auto& ni : rep_.nodes) {
      if (ni.wal_first > ni.wal_last) continue;  // an empty log
      cuts.push_back(ni.wal_first);
      cuts.push_back(ni.wal_last + 1);
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    bool diverged = false;
    for (size_t k = 0; k + 1 < cuts.size() && !diverged; ++k) {
      const uint64_t lo = cuts[k], hi = cuts[k + 1] - 1;
      std::vector<size_t> holders;
      for (size_t i = 0; i < n(); ++i) {
        if (rep_.nodes[i].wal_first <= lo && rep_.nodes[i].wal_last >= hi) holders.push_back(i);
      }
      if (holders.size() < 2) continue;
      REPLICA_ASSIGN_OR_RETURN(const uint64_t at, WalRange(holders, lo, hi));
      diverged = at != 0;
      if (diverged && at == lo) break;  // nothing in this piece agreed
      if (rep_.compared_first > rep_.compared_last) rep_.compared_first = lo;
      rep_.compared_last = diverged ? at - 1 : hi;
    }
    for (size_t i = 0; i < n() && !diverged; ++i) {
      const auto& ni = rep_.nodes[i];
      if (ni.wal_last >= max_last) continue;
      size_t ahead = 0;
      while (rep_.nodes[ahead].wal_last != max_last) ++ahead;
      const std::string text = names_[i] + " is behind " + names_[ahead] + " by " +
                               std::to_string(max_last - ni.wal_last) + " records (its WAL ends at LSN " +
                               std::to_string(ni.wal_last) + ", " + names_[ahead] + "'s at " +
                               std::to_string(max_last) + ")";
      if (opt_.strict) {
        AddDiff({"lag", "WAL end", {text}});
      } else {
        rep_.notes.push_back(text);
      }
    }
    return Status::OK();
  }

  // Compares [first, last] among the given nodes (all hold it), chunk by
  // chunk; returns the LSN where their logs diverge, or 0.
  Result<uint64_t> WalRange(const std::vector<size_t>& nodes, uint64_t first, uint64_t last) {
    // With --bytes every record is read with its payload, a chunk at a time
    // on every node: at most 256 records, so that large records cannot take
    // gigabytes of memory per node.
    const uint64_t chunk = std::max<uint64_t>(1, opt_.bytes ? std::min<uint64_t>(opt_.wal_chunk, 256) : opt_.wal_chunk);
    const size_t chunks = static_cast<size_t>((last - first) / chunk + 1);
    std::vector<std::vector<Digest>> dig(n());
    if (!opt_.bytes) {
      REPLICA_RETURN_IF_ERROR(ForEachOf(nodes, [&](size_t i) -> Status {
        REPLICA_ASSIGN_OR_RETURN(dig[i], src_[i]->WalDigests(first, last, chunk));
        if (dig[i].size() != chunks) {
          return Status::Corruption("asked for the digests of " + std::to_string(chunks) + " WAL chunks, got " +
                                    std::to_string(dig[i].size()));
        }
        return Status::OK();
      }));
    }
    const size_t r = nodes[0];  // the reference
    for (size_t c = 0; c < chunks; ++c) {
      if (!opt_.bytes) {
        bool same = true;
        for (const size_t i : nodes) same = same && dig[i][c] == dig[r][c];
        if (same) {
          rep_.records_compared += dig[r][c].count;
          continue;
        }
      }
      const uint64_t lo = first + c * chunk, hi = std::min(last, lo + chunk - 1);
      std::vector<std::vector<WalRecord>> recs(n());
      REPLICA_RETURN_IF_ERROR(ForEachOf(nodes, [&](size_t i) -> Status {
        REPLICA_ASSIGN_OR_RETURN(recs[i], src_[i]->WalRecords(lo, hi, opt_.bytes));
        if (recs[i].size() != hi - lo + 1) {
          return Status::Aborted("LSN " + std::to_string(lo) + ".." + std::to_string(hi) + " no longer readable");
        }
        return Status::OK();
      }));
      for (size_t k = 0; k < recs[r].size(); ++k) {
        bool same = true;
        for (const size_t i : nodes) {
          const auto &a = recs[r][k], &b = recs[i][k];
          same = same && a.lsn == b.lsn && a.epoch == b.epoch && a.type == b.type && a.digest == b.digest &&
                 a.size == b.size && a.payload == b.payload;
        }
        if (same) {
          rep_.records_compared++;
          continue;
        }
        Difference d{"wal", "LSN " + std::to_string(recs[r][k].lsn), {}};
        for (size_t i = 0; i < n(); ++i) {
          if (recs[i].empty()) {
            d.sides.push_back("");  // does not hold this LSN
            continue;
          }
          std::string side = DescribeRecord(recs[i][k]);
          if (opt_.bytes && i != r && recs[i][k].digest == recs[r][k].digest && recs[i][k].payload != recs[r][k].payload) {
            side += " (same digest, different bytes)";
          }
          d.sides.push_back(side);
        }
        AddDiff(std::move(d));
        rep_.notes.push_back("the WALs diverge from LSN " + std::to_string(recs[r][k].lsn) +
                             " (records after the first divergence are not compared)");
        return recs[r][k].lsn;
      }
    }
    return uint64_t{0};
  }

  void CompareEpochs() {
    // Entries that start within the range every log reaches.
    uint64_t upto = UINT64_MAX;
    for (const auto& ni : rep_.nodes) upto = std::min(upto, ni.wal_last);
    auto cut = [&](const NodeInfo& ni) {
      std::vector<std::pair<uint64_t, uint64_t>> h;
      for (const auto& e : ni.epochs) {
        if (e.second <= upto) h.push_back(e);
      }
      return h;
    };
    const auto ref = cut(rep_.nodes[0]);
    bool same = true;
    for (size_t i = 1; i < n(); ++i) same = same && cut(rep_.nodes[i]) == ref;
    if (same) return;
    Difference d{"epochs", "epoch history up to LSN " + std::to_string(upto), {}};
    for (const auto& ni : rep_.nodes) d.sides.push_back(DescribeHistory(cut(ni)));
    AddDiff(std::move(d));
  }

  // Nodes that applied different amounts: the keys the missing records write
  // are set aside (lag, not a difference), unless strict.
  Status FindLagKeys() {
    uint64_t lo = UINT64_MAX, hi = 0;
    size_t hi_node = 0;
    for (size_t i = 0; i < n(); ++i) {
      lo = std::min(lo, rep_.nodes[i].applied);
      if (rep_.nodes[i].applied > hi) hi = rep_.nodes[i].applied, hi_node = i;
    }
    if (lo == hi) return Status::OK();
    for (size_t i = 0; i < n(); ++i) {
      if (rep_.nodes[i].applied == hi) continue;
      const std::string text = names_[i] + " has applied up to LSN " + std::to_string(rep_.nodes[i].applied) + ", " +
                               std::to_string(hi - rep_.nodes[i].applied) + " records behind " + names_[hi_node];
      if (opt_.strict) {
        AddDiff({"lag", "applied LSN", {text}});
      } else {
        rep_.notes.push_back(text);
      }
    }
    if (opt_.strict) return Status::OK();
    for (size_t i = 0; i < n(); ++i) {
      const auto& ni = rep_.nodes[i];
      if (ni.applied != hi || ni.wal_first > lo + 1 || ni.wal_last < hi) continue;
      REPLICA_ASSIGN_OR_RETURN(auto recs, src_[i]->WalRecords(lo + 1, hi, /*payloads=*/true));
      for (const auto& r : recs) {
        if (static_cast<wal::RecordType>(r.type) != wal::RecordType::kData) continue;
        auto batch = WriteBatch::Decode(r.payload);
        if (!batch.ok()) return batch.status().WithContext(names_[i] + ": decode LSN " + std::to_string(r.lsn));
        for (const auto& op : batch->ops()) {
          auto& writes = lag_keys_[op.key].writes;
          if (!writes.empty() && writes.back().lsn == r.lsn) writes.pop_back();  // a later op of the same record wins
          writes.push_back(LagWrite{r.lsn, op.is_delete, op.is_delete ? 0 : XXH3_64bits(op.value.data(), op.value.size()),
                                    static_cast<uint32_t>(op.value.size())});
        }
      }
      lag_known_ = true;
      return Status::OK();
    }
    rep_.notes.push_back("no node still holds the records LSN " + std::to_string(lo + 1) + ".." + std::to_string(hi) +
                         ": key differences cannot be told apart from lag and are all reported");
    return Status::OK();
  }

  Status CompareDb() {
    std::vector<std::string> cfs;
    for (const auto& ni : rep_.nodes) {
      for (const auto& cf : ni.column_families) {
        if (std::find(cfs.begin(), cfs.end(), cf) == cfs.end()) cfs.push_back(cf);
      }
    }
    for (const auto& cf : cfs) {
      bool everywhere = true;
      Difference d{"column-family", "cf " + cf, {}};
      for (const auto& ni : rep_.nodes) {
        const bool has = std::find(ni.column_families.begin(), ni.column_families.end(), cf) != ni.column_families.end();
        everywhere = everywhere && has;
        d.sides.push_back(has ? "present" : "missing");
      }
      if (!everywhere) {
        AddDiff(std::move(d));
        continue;
      }
      REPLICA_RETURN_IF_ERROR(CompareCf(cf));
    }
    return Status::OK();
  }

  Status CompareCf(const std::string& cf) {
    // Split points from every replica, not just the first: one whose data
    // still sits in few SST files (or in its memtable) would otherwise make
    // a few huge ranges, and a difference in one of them is read whole.
    std::vector<std::string> splits;
    for (size_t i = 0; i < n(); ++i) {
      auto keys = src_[i]->SplitKeys(cf, threads_ * 8);
      if (!keys.ok()) return keys.status().WithContext(names_[i]);
      splits.insert(splits.end(), keys->begin(), keys->end());
    }
    ThinSplitKeys(&splits, threads_ * 8);
    std::vector<std::pair<std::string, std::string>> ranges;
    std::string begin;
    for (const auto& s : splits) {
      if (s.empty()) continue;
      ranges.emplace_back(begin, s);
      begin = s;
    }
    ranges.emplace_back(begin, "");
    std::vector<std::vector<Digest>> dig(ranges.size(), std::vector<Digest>(n()));
    std::vector<Status> st(ranges.size() * n());
    std::vector<std::function<void()>> tasks;
    for (size_t r = 0; r < ranges.size(); ++r) {
      for (size_t i = 0; i < n(); ++i) {
        tasks.emplace_back([&, r, i] {
          auto d = src_[i]->RangeDigest(cf, ranges[r].first, ranges[r].second);
          if (d.ok()) {
            dig[r][i] = *d;
          } else {
            st[r * n() + i] = d.status().WithContext(names_[i]);
          }
        });
      }
    }
    RunAll(tasks, threads_);
    for (const auto& s : st) REPLICA_RETURN_IF_ERROR(s);
    for (size_t r = 0; r < ranges.size(); ++r) {
      rep_.keys_compared += dig[r][0].count;
      bool same = true;
      for (size_t i = 1; i < n(); ++i) same = same && dig[r][i] == dig[r][0];
      if (!same) REPLICA_RETURN_IF_ERROR(MergeRange(cf, ranges[r].first, ranges[r].second));
    }
    if (lag_known_ && cf == rocksdb::kDefaultColumnFamilyName) REPLICA_RETURN_IF_ERROR(CheckUnseenLagKeys(cf));
    return Status::OK();
  }

  // Reads [begin, end) entry by entry on every node and reports each key
  // whose presence or value differs.
  Status MergeRange(const std::string& cf, const std::string& begin, const std::string& end) {
    constexpr size_t kPage = 4096;
    struct Cursor {
      std::vector<Entry> page;
      size_t pos = 0;
      std::string next;
      bool exhausted = false;
    };
    std::vector<Cursor> cur(n());
    for (auto& c : cur) c.next = begin;
    auto fill = [&](size_t i) -> Status {
      Cursor& c = cur[i];
      if (c.pos < c.page.size() || c.exhausted) return Status::OK();
      REPLICA_ASSIGN_OR_RETURN(c.page, src_[i]->Entries(cf, c.next, end, kPage));
      c.pos = 0;
      if (c.page.size() < kPage) c.exhausted = true;
      if (!c.page.empty()) c.next = c.page.back().key + std::string(1, '\0');
      return Status::OK();
    };
    const bool lag_cf = lag_known_ && cf == rocksdb::kDefaultColumnFamilyName;
    for (;;) {
      const std::string* min = nullptr;
      for (size_t i = 0; i < n(); ++i) {
        REPLICA_RETURN_IF_ERROR(fill(i).WithContext(names_[i]));
        if (cur[i].pos < cur[i].page.size() && (!min || cur[i].page[cur[i].pos].key < *min)) {
          min = &cur[i].page[cur[i].pos].key;
        }
      }
      if (!min) return Status::OK();
      const std::string key = *min;
      std::vector<const Entry*> at(n(), nullptr);
      for (size_t i = 0; i < n(); ++i) {
        if (cur[i].pos < cur[i].page.size() && cur[i].page[cur[i].pos].key == key) at[i] = &cur[i].page[cur[i].pos++];
      }
      bool same = true, all_present = true;
      for (size_t i = 0; i < n(); ++i) {
        all_present = all_present && at[i];
        same = same && at[i] && at[0] && at[i]->value_hash == at[0]->value_hash && at[i]->value_size == at[0]->value_size;
      }
      if (same) continue;
      if (lag_cf) {
        auto it = lag_keys_.find(key);
        if (it != lag_keys_.end()) {
          it->second.checked = true;
          if (IsLag(it->second, at)) {
            rep_.lag_keys++;
            continue;
          }
        }
      }
      AddKeyDiff(cf, key, at);
    }
  }

  void AddKeyDiff(const std::string& cf, const std::string& key, const std::vector<const Entry*>& at) {
    bool all_present = true;
    for (const Entry* e : at) all_present = all_present && e;
    Difference d{all_present ? "value" : "missing", "cf " + cf + " key \"" + Printable(key) + "\"", {}};
    for (size_t i = 0; i < n(); ++i) {
      std::string side = "(applied " + std::to_string(rep_.nodes[i].applied) + ") ";
      side += at[i] ? "\"" + Printable(at[i]->preview, 32) + (at[i]->value_size > at[i]->preview.size() ? "..." : "") +
                          "\" (" + std::to_string(at[i]->value_size) + " bytes)"
                    : "missing";
      d.sides.push_back(side);
    }
    AddDiff(std::move(d));
  }

  // The keys written by records some node has not applied that the merge did
  // not look at (the same on every node, or on none): each node that applied
  // a write of the key must still hold what it left, which a key deleted or
  // changed alike everywhere would not.
  Status CheckUnseenLagKeys(const std::string& cf) {
    // In key order, so that the differences listed are the same run to run;
    // one point read per node and key (directory mode only: live nodes are
    // pinned at one LSN and have no lag).
    std::vector<const std::pair<const std::string, LagWrites>*> unseen;
    for (const auto& entry : lag_keys_) {
      if (!entry.second.checked) unseen.push_back(&entry);
    }
    std::sort(unseen.begin(), unseen.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
    std::vector<Entry> found(n());
    std::vector<const Entry*> at(n());
    for (const auto* entry : unseen) {
      const std::string& key = entry->first;
      for (size_t i = 0; i < n(); ++i) {
        auto one = src_[i]->Entries(cf, key, key + std::string(1, '\0'), 1);
        if (!one.ok()) return one.status().WithContext(names_[i]);
        at[i] = nullptr;
        if (!one->empty() && (*one)[0].key == key) found[i] = std::move((*one)[0]), at[i] = &found[i];
      }
      if (!IsLag(entry->second, at)) AddKeyDiff(cf, key, at);
    }
    return Status::OK();
  }

  // Whether a key that differs among the nodes differs only by lag: it is
  // written by records some node has not applied, and every node holds what
  // the records it applied left there. A node that applied the key's last
  // write in those records must hold that write's value (or not hold the
  // key, if it was a delete); a node that applied an earlier one, that one's;
  // nodes that applied none of them must agree among themselves, and are
  // otherwise excused (they replay them from their logs, which were compared
  // above, and end with the same value).
  struct LagWrites;
  bool IsLag(const LagWrites& lag, const std::vector<const Entry*>& at) const {
    const auto& writes = lag.writes;
    // The nodes that applied none of them all hold the key as it was before
    // them: they must agree among themselves.
    bool seen_none = false;
    const Entry* none = nullptr;
    for (size_t i = 0; i < n(); ++i) {
      const uint64_t applied = rep_.nodes[i].applied;
      auto last = std::upper_bound(writes.begin(), writes.end(), applied,
                                   [](uint64_t lsn, const LagWrite& w) { return lsn < w.lsn; });
      if (last == writes.begin()) {  // applied none of them
        if (!seen_none) {
          seen_none = true;
          none = at[i];
        } else if ((none == nullptr) != (at[i] == nullptr) ||
                   (none && (none->value_hash != at[i]->value_hash || none->value_size != at[i]->value_size))) {
          return false;
        }
        continue;
      }
      const LagWrite& w = *std::prev(last);
      const Entry* e = at[i];
      if (w.deleted ? e != nullptr : (e == nullptr || e->value_hash != w.value_hash || e->value_size != w.value_size)) {
        return false;
      }
    }
    return true;
  }
  const std::vector<std::string>& names_;
  const std::vector<Source*>& src_;
  const Options& opt_;
  int threads_ = 2;
  Report rep_;
  // Per key written by the records some node has not applied: its writes
  // there, in LSN order (one per record: the record's last op on the key).
  struct LagWrite {
    uint64_t lsn;
    bool deleted;
    uint64_t value_hash;
    uint32_t value_size;
  };
  struct LagWrites {
    std::vector<LagWrite> writes;
    bool checked = false;  // looked at by the merge
  };
  std::unordered_map<std::string, LagWrites> lag_keys_;
  bool lag_known_ = false;
};

double MiB(uint64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

const char* VerdictName(Report::Verdict v) {
  switch (v) {
    case Report::Verdict::kIdentical: return "identical";
    case Report::Verdict::kDifferent: return "different";
    case Report::Verdict::kError: return "error";
  }
  return "error";
}

}  // namespace

Result<std::unique_ptr<Source>> OpenDirectory(const std::string& data_dir) {
  auto src = std::make_unique<DirectorySource>();
  REPLICA_RETURN_IF_ERROR(src->Open(data_dir));
  return std::unique_ptr<Source>(std::move(src));
}

Report Compare(const std::vector<std::string>& names, const std::vector<Source*>& sources, const Options& options) {
  return Comparison(names, sources, options).Run();
}

std::string FormatText(const Report& r) {
  std::string out = "logdiff: ";
  char buf[256];
  if (r.verdict == Report::Verdict::kError) {
    return out + "ERROR: could not compare: " + r.error + "\n";
  }
  std::string nodes;
  for (size_t i = 0; i < r.names.size(); ++i) nodes += (i ? ", " : "") + r.names[i];
  if (r.verdict == Report::Verdict::kIdentical) {
    out += "IDENTICAL: " + nodes;
  } else {
    out += "DIFFERENT: " + std::to_string(r.diff_count) + (r.diff_count == 1 ? " difference" : " differences") +
           " among " + nodes;
  }
  size_t cfs = r.nodes.empty() ? 0 : r.nodes[0].column_families.size();
  if (r.compared_first <= r.compared_last) {
    std::snprintf(buf, sizeof buf, "; WAL LSN %" PRIu64 "..%" PRIu64 " (%" PRIu64 " records agree)", r.compared_first,
                  r.compared_last, r.records_compared);
    out += buf;
  } else {
    out += "; no WAL record compared";
  }
  std::snprintf(buf, sizeof buf, "; %" PRIu64 " keys in %zu column families; %.1f MiB of records and entries hashed in %.3f s (%.0f MiB/s)\n",
                r.keys_compared, cfs, MiB(r.bytes_hashed), r.seconds,
                r.seconds > 0 ? MiB(r.bytes_hashed) / r.seconds : 0.0);
  out += buf;
  for (const auto& d : r.diffs) {
    out += "  " + d.kind + " " + d.where + ":";
    bool first = true;
    for (size_t i = 0; i < d.sides.size(); ++i) {
      if (d.sides[i].empty()) continue;
      out += (first ? " " : "; ") + (d.sides.size() == r.names.size() ? r.names[i] + ": " : std::string()) + d.sides[i];
      first = false;
    }
    out += "\n";
  }
  if (r.diff_count > r.diffs.size()) {
    out += "  ... and " + std::to_string(r.diff_count - r.diffs.size()) + " more differences not listed (--max-diffs)\n";
  }
  if (r.lag_keys > 0) {
    out += "  note: " + std::to_string(r.lag_keys) +
           " keys differ only because a node has not applied the latest records yet (--strict counts them)\n";
  }
  for (const auto& n : r.notes) out += "  note: " + n + "\n";
  return out;
}

std::string FormatJson(const Report& r) {
  namespace json = boost::json;
  json::object o;
  o["verdict"] = VerdictName(r.verdict);
  o["exit"] = r.exit_code();
  if (r.verdict == Report::Verdict::kError) o["error"] = r.error;
  json::array nodes;
  for (size_t i = 0; i < r.nodes.size() && i < r.names.size(); ++i) {
    const auto& ni = r.nodes[i];
    json::array epochs;
    for (const auto& [e, l] : ni.epochs) epochs.push_back(json::object{{"epoch", e}, {"first_lsn", l}});
    nodes.push_back(json::object{{"name", r.names[i]},
                                 {"wal_first", ni.wal_first},
                                 {"wal_last", ni.wal_last},
                                 {"applied", ni.applied},
                                 {"torn_tail", ni.torn_tail},
                                 {"epochs", std::move(epochs)},
                                 {"column_families", json::value_from(ni.column_families)}});
  }
  o["nodes"] = std::move(nodes);
  o["common_first"] = r.common_first;
  o["common_last"] = r.common_last;
  o["compared_first"] = r.compared_first;
  o["compared_last"] = r.compared_last;
  o["records_compared"] = r.records_compared;
  o["keys_compared"] = r.keys_compared;
  o["lag_keys"] = r.lag_keys;
  o["bytes_hashed"] = r.bytes_hashed;
  o["seconds"] = r.seconds;
  o["mib_per_second"] = r.seconds > 0 ? MiB(r.bytes_hashed) / r.seconds : 0.0;
  o["difference_count"] = r.diff_count;
  json::array diffs;
  for (const auto& d : r.diffs) {
    diffs.push_back(json::object{{"kind", d.kind}, {"where", d.where}, {"sides", json::value_from(d.sides)}});
  }
  o["differences"] = std::move(diffs);
  o["notes"] = json::value_from(r.notes);
  return json::serialize(o) + "\n";
}


// ---------------------------------------------------------------------------
// logdiff --live: the node's side.

namespace {

void ToProto(const NodeInfo& ni, proto::DiffInfo* p) {
  p->set_wal_first(ni.wal_first);
  p->set_wal_last(ni.wal_last);
  p->set_wal_bytes(ni.wal_bytes);
  for (const auto& [e, l] : ni.epochs) {
    p->add_epochs(e);
    p->add_epochs(l);
  }
  p->set_applied(ni.applied);
  p->set_db_bytes(ni.db_bytes);
  for (const auto& cf : ni.column_families) p->add_column_families(cf);
  p->set_torn_tail(ni.torn_tail);
}

void ToProto(const Digest& d, proto::DiffDigest* p) {
  p->set_hash(d.hash);
  p->set_count(d.count);
  p->set_bytes(d.bytes);
}

NodeInfo FromProto(const proto::DiffInfo& p) {
  NodeInfo ni;
  ni.wal_first = p.wal_first();
  ni.wal_last = p.wal_last();
  ni.wal_bytes = p.wal_bytes();
  for (int i = 0; i + 1 < p.epochs_size(); i += 2) ni.epochs.emplace_back(p.epochs(i), p.epochs(i + 1));
  ni.applied = p.applied();
  ni.db_bytes = p.db_bytes();
  for (const auto& cf : p.column_families()) ni.column_families.push_back(cf);
  ni.torn_tail = p.torn_tail();
  return ni;
}

constexpr size_t kMaxReplyBytes = 4u << 20;
constexpr uint64_t kMaxChunks = 1u << 20;     // WAL digests in one reply
constexpr uint32_t kMaxPinMillis = 60000;     // how long a PIN may wait

}  // namespace

void Server::Submit(const std::shared_ptr<transport::Session>& session, const proto::DiffRequest& request) {
  MutexLock l(&mu_);
  if (stop_ || queue_.size() >= kMaxQueued) {
    proto::Control msg;
    auto* r = msg.mutable_diff_reply();
    r->set_id(request.id());
    r->set_code(static_cast<uint32_t>(stop_ ? StatusCode::kAborted : StatusCode::kBusy));
    r->set_message(stop_ ? "the node is closing" : "too many logdiff requests queued");
    (void)session->SendControl(msg);
    return;
  }
  queue_.push_back(Item{session, request, false});
  if (!started_) {
    started_ = true;
    worker_ = std::thread([this] { Run(); });
  }
  cv_.Signal();
}

void Server::SessionClosed(const std::shared_ptr<transport::Session>& session) {
  // The worker owns the snapshots: it releases this session's after every
  // request the session queued (the queue is in order).
  MutexLock l(&mu_);
  if (stop_ || !started_) return;  // Stop releases everything; no worker, no pins
  queue_.push_back(Item{session, proto::DiffRequest(), true});
  cv_.Signal();
}

void Server::ReleaseAll(rocksdb::DB* db) {
  MutexLock l(&mu_);
  for (auto& [_, pin] : pins_) {
    if (pin.snapshot && pin.db == db) db->ReleaseSnapshot(pin.snapshot);
    pin.snapshot = nullptr;
    pin.db = nullptr;
  }
}

void Server::Stop() {
  {
    MutexLock l(&mu_);
    if (stopped_) return;
    stopped_ = true;
    stop_ = true;
    cv_.SignalAll();
  }
  if (worker_.joinable()) worker_.join();
  std::map<const transport::Session*, Pin> pins;
  {
    MutexLock l(&mu_);
    pins.swap(pins_);
    queue_.clear();
  }
  bool any = false;
  for (const auto& [_, pin] : pins) any = any || pin.snapshot;
  if (!any) return;
  (void)hooks_->WithStore([&](const Store& st) {
    for (auto& [_, pin] : pins) {
      if (pin.snapshot && pin.db == st.db) st.db->ReleaseSnapshot(pin.snapshot);
    }
    return Status::OK();
  });
}

void Server::Release(const transport::Session* session) {
  // Looked up with the store held, as ReleaseAll runs: an install cannot
  // slip in between and close the database under a pin taken out of pins_.
  Status st = hooks_->WithStore([&](const Store& store) {
    Pin pin;
    {
      MutexLock l(&mu_);
      auto it = pins_.find(session);
      if (it == pins_.end()) return Status::OK();
      pin = it->second;
      pins_.erase(it);
    }
    if (pin.snapshot && pin.db == store.db) store.db->ReleaseSnapshot(pin.snapshot);
    return Status::OK();
  });
  if (!st.ok()) {
    MutexLock l(&mu_);
    pins_.erase(session);  // the storage is closed: ReleaseAll already let go of its snapshots
  }
}

void Server::Run() {
  for (;;) {
    Item item;
    {
      MutexLock l(&mu_);
      while (queue_.empty() && !stop_) cv_.Wait();
      if (stop_) return;
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    if (item.release) {
      Release(item.session.get());
      continue;
    }
    if (item.session->closed()) continue;
    proto::Control msg;
    *msg.mutable_diff_reply() = Answer(item.session.get(), item.request);
    if (Status sent = item.session->SendControl(msg); sent.code() == StatusCode::kInvalidArgument) {
      // Past the frame limit (a value or key too large for one reply): the
      // tool is told so, instead of waiting for a reply that never comes.
      proto::Control err;
      err.mutable_diff_reply()->set_id(item.request.id());
      err.mutable_diff_reply()->set_code(static_cast<uint32_t>(StatusCode::kNotSupported));
      err.mutable_diff_reply()->set_message("the reply does not fit in one frame: " + sent.message());
      (void)item.session->SendControl(err);
    }
  }
}

proto::DiffReply Server::Answer(const transport::Session* session, const proto::DiffRequest& req) {
  proto::DiffReply reply;
  reply.set_id(req.id());
  Status st = hooks_->WithStore([&](const Store& store) -> Status {
    Pin pin;
    bool pinned = false;
    {
      MutexLock l(&mu_);
      auto it = pins_.find(session);
      if (it != pins_.end()) pin = it->second, pinned = true;
    }
    if (req.op() == proto::DiffRequest::PIN) {
      if (pinned && pin.snapshot && pin.db == store.db) store.db->ReleaseSnapshot(pin.snapshot);
      {
        MutexLock l(&mu_);
        pins_.erase(session);
      }
      if (req.at_lsn() == 0) return Status::InvalidArgument("PIN needs an LSN above 0");
      const auto timeout = std::chrono::milliseconds(std::clamp<uint32_t>(req.limit(), 1, kMaxPinMillis));
      REPLICA_ASSIGN_OR_RETURN(const rocksdb::Snapshot* snap, hooks_->PinAt(req.at_lsn(), timeout));
      {
        MutexLock l(&mu_);
        pins_[session] = Pin{req.at_lsn(), store.db, snap};
      }
      StoreSource src(store, snap, req.at_lsn());
      REPLICA_ASSIGN_OR_RETURN(auto info, src.Info());
      ToProto(info, reply.mutable_info());
      return Status::OK();
    }
    if (req.op() != proto::DiffRequest::INFO) {
      if (!pinned) return Status::InvalidArgument("pin an LSN first (PIN)");
      if (pin.db != store.db) {
        return Status::Aborted("the node's database was replaced (snapshot resync) since it was pinned; pin again");
      }
    }
    if (req.op() == proto::DiffRequest::WAL_DIGESTS || req.op() == proto::DiffRequest::WAL_RECORDS) {
      if (req.from() == 0 || req.from() > req.to() || req.to() > pin.lsn) {
        return Status::InvalidArgument("bad WAL range " + std::to_string(req.from()) + ".." + std::to_string(req.to()) +
                                       " (pinned at LSN " + std::to_string(pin.lsn) + ")");
      }
      if (req.op() == proto::DiffRequest::WAL_DIGESTS &&
          (req.chunk() == 0 || (req.to() - req.from()) / req.chunk() >= kMaxChunks)) {
        return Status::InvalidArgument("WAL digests: chunk " + std::to_string(req.chunk()) + " is too small for " +
                                       std::to_string(req.to() - req.from() + 1) + " records");
      }
    }
    StoreSource src(store, pinned ? pin.snapshot : nullptr, pinned ? pin.lsn : UINT64_MAX);
    switch (req.op()) {
      case proto::DiffRequest::INFO: {
        REPLICA_ASSIGN_OR_RETURN(auto info, src.Info());
        ToProto(info, reply.mutable_info());
        break;
      }
      case proto::DiffRequest::WAL_DIGESTS: {
        REPLICA_ASSIGN_OR_RETURN(auto d, src.WalDigests(req.from(), req.to(), req.chunk()));
        for (const auto& x : d) ToProto(x, reply.add_digests());
        break;
      }
      case proto::DiffRequest::WAL_RECORDS: {
        REPLICA_ASSIGN_OR_RETURN(auto recs, src.WalRecordsLimited(req.from(), std::min(req.to(), pinned ? pin.lsn : UINT64_MAX),
                                                                  req.payloads(), kMaxReplyBytes));
        for (const auto& r : recs) {
          auto* p = reply.add_records();
          p->set_lsn(r.lsn);
          p->set_epoch(r.epoch);
          p->set_type(r.type);
          p->set_digest(r.digest);
          p->set_size(r.size);
          if (req.payloads()) p->set_payload(r.payload);
        }
        break;
      }
      case proto::DiffRequest::SPLIT_KEYS: {
        REPLICA_ASSIGN_OR_RETURN(auto keys, src.SplitKeys(req.cf(), static_cast<int>(std::min<uint32_t>(req.limit(), 4096))));
        // Split keys are hints (any subset still splits the key space):
        // those past the reply's budget are left out.
        size_t bytes = 0;
        for (auto& k : keys) {
          bytes += k.size();
          if (bytes > kMaxReplyBytes) break;
          reply.add_keys(std::move(k));
        }
        break;
      }
      case proto::DiffRequest::RANGE_DIGEST: {
        REPLICA_ASSIGN_OR_RETURN(auto d, src.RangeDigest(req.cf(), req.begin(), req.end()));
        ToProto(d, reply.add_digests());
        break;
      }
      case proto::DiffRequest::ENTRIES: {
        // Fewer than asked when the keys are large: the tool asks again
        // from the last key until a reply is empty.
        REPLICA_ASSIGN_OR_RETURN(auto entries, src.EntriesLimited(req.cf(), req.begin(), req.end(),
                                                                  std::clamp<size_t>(req.limit(), 1, 16384),
                                                                  req.pages() ? kMaxReplyBytes : SIZE_MAX));
        for (const auto& e : entries) {
          auto* p = reply.add_entries();
          p->set_key(e.key);
          p->set_value_hash(e.value_hash);
          p->set_value_size(e.value_size);
          p->set_preview(e.preview);
        }
        break;
      }
      default:
        return Status::InvalidArgument("unknown logdiff request " + std::to_string(static_cast<int>(req.op())));
    }
    reply.set_bytes_read(src.bytes_read.load());
    return Status::OK();
  });
  if (!st.ok()) {
    reply.set_code(static_cast<uint32_t>(st.code()));
    reply.set_message(st.message());
  }
  return reply;
}

// ---------------------------------------------------------------------------
// logdiff --live: the tool's side.

namespace {

class RemoteSource final : public Source, public transport::Handler {
 public:
  ~RemoteSource() override {
    if (endpoint_) endpoint_->Stop();
  }

  Status Open(const std::string& address, const LiveOptions& o) {
    auto hp = ParseHostPort(address);
    if (!hp.ok() || hp->port == 0) {
      return Status::InvalidArgument("bad node address '" + address + "' (want HOST:PORT, port 1..65535)");
    }
    address_ = address;
    transport::Options to;
    to.node_id = "logdiff-" + std::to_string(::getpid());
    to.cluster = o.cluster;
    to.secret = o.secret;
    to.io_threads = 1;
    to.tls.enabled = !o.tls_cert.empty();
    to.tls.cert_file = o.tls_cert;
    to.tls.key_file = o.tls_key;
    to.tls.ca_file = o.tls_ca;
    REPLICA_ASSIGN_OR_RETURN(endpoint_, transport::Endpoint::Create(to, this));
    REPLICA_ASSIGN_OR_RETURN(session_, endpoint_->Connect(hp->host, hp->port));
    pin_timeout_ = o.pin_timeout;
    MutexLock l(&mu_);
    const auto deadline = Clock::now() + o.connect_timeout;
    while (!established_ && closed_.ok() && Clock::now() < deadline) cv_.WaitUntil(deadline);
    if (!closed_.ok()) {
      // A node with TLS closes a plain connection at its first bytes, and
      // all this side sees is the connection's end.
      const Status st = closed_.WithContext("connect to " + address);
      if (!o.tls_cert.empty() || st.message().find("the peer closed the connection") == std::string::npos) return st;
      return Status::FromCode(st.code(),
                              st.message() + " (if the node uses TLS, give --tls-cert, --tls-key and --tls-ca)");
    }
    if (!established_) return Status::TimedOut("connect to " + address + ": no session within the timeout");
    return Status::OK();
  }

  std::string node_id() const override { return session_ ? session_->peer_id() : std::string(); }

  Result<NodeInfo> Info() override {
    proto::DiffRequest req;
    req.set_op(proto::DiffRequest::INFO);
    REPLICA_ASSIGN_OR_RETURN(auto reply, Call(req));
    return FromProto(reply.info());
  }

  Result<NodeInfo> Pin(uint64_t lsn) override {
    proto::DiffRequest req;
    req.set_op(proto::DiffRequest::PIN);
    req.set_at_lsn(lsn);
    req.set_limit(static_cast<uint32_t>(pin_timeout_.count()));
    REPLICA_ASSIGN_OR_RETURN(auto reply, Call(req));
    return FromProto(reply.info());
  }

  Result<std::vector<Digest>> WalDigests(uint64_t from, uint64_t to, uint64_t chunk) override {
    proto::DiffRequest req;
    req.set_op(proto::DiffRequest::WAL_DIGESTS);
    req.set_from(from);
    req.set_to(to);
    req.set_chunk(chunk);
    REPLICA_ASSIGN_OR_RETURN(auto reply, Call(req));
    std::vector<Digest> out;
    for (const auto& d : reply.digests()) out.push_back(Digest{d.hash(), d.count(), d.bytes()});
    return out;
  }

  Result<std::vector<WalRecord>> WalRecords(uint64_t from, uint64_t to, bool payloads) override {
    std::vector<WalRecord> out;
    while (from <= to) {
      proto::DiffRequest req;
      req.set_op(proto::DiffRequest::WAL_RECORDS);
      req.set_from(from);
      req.set_to(to);
      req.set_payloads(payloads);
      REPLICA_ASSIGN_OR_RETURN(auto reply, Call(req));
      if (reply.records().empty()) break;
      for (const auto& r : reply.records()) {
        out.push_back(WalRecord{r.lsn(), r.epoch(), static_cast<uint8_t>(r.type()), r.digest(), r.size(), r.payload()});
      }
      from = out.back().lsn + 1;
    }
    return out;
  }

  Result<std::vector<std::string>> SplitKeys(const std::string& cf, int n) override {
    proto::DiffRequest req;
    req.set_op(proto::DiffRequest::SPLIT_KEYS);
    req.set_cf(cf);
    req.set_limit(static_cast<uint32_t>(std::max(n, 1)));
    REPLICA_ASSIGN_OR_RETURN(auto reply, Call(req));
    return std::vector<std::string>(reply.keys().begin(), reply.keys().end());
  }

  Result<Digest> RangeDigest(const std::string& cf, const std::string& begin, const std::string& end) override {
    proto::DiffRequest req;
    req.set_op(proto::DiffRequest::RANGE_DIGEST);
    req.set_cf(cf);
    req.set_begin(begin);
    req.set_end(end);
    REPLICA_ASSIGN_OR_RETURN(auto reply, Call(req));
    if (reply.digests_size() != 1) return Status::Corruption(address_ + ": a range digest reply without one digest");
    return Digest{reply.digests(0).hash(), reply.digests(0).count(), reply.digests(0).bytes()};
  }

  Result<std::vector<Entry>> Entries(const std::string& cf, const std::string& begin, const std::string& end,
                                     size_t limit) override {
    proto::DiffRequest req;
    req.set_op(proto::DiffRequest::ENTRIES);
    req.set_cf(cf);
    req.set_begin(begin);
    req.set_end(end);
    // A node answers fewer entries than asked when their keys are large
    // (a reply's byte budget), and none once the range is done: ask again
    // from past the last key until `limit` are in or a reply is empty.
    req.set_pages(true);
    std::vector<Entry> out;
    std::string from = begin;
    while (out.size() < limit) {
      req.set_begin(from);
      req.set_limit(static_cast<uint32_t>(std::min<size_t>(limit - out.size(), 16384)));
      REPLICA_ASSIGN_OR_RETURN(auto reply, Call(req));
      if (reply.entries().empty()) break;
      for (const auto& e : reply.entries()) out.push_back(Entry{e.key(), e.value_hash(), e.value_size(), e.preview()});
      from = out.back().key + std::string(1, '\0');
    }
    return out;
  }

  void OnEstablished(const std::shared_ptr<transport::Session>&) override {
    MutexLock l(&mu_);
    established_ = true;
    cv_.SignalAll();
  }
  void OnControl(const std::shared_ptr<transport::Session>& s, const proto::Control& msg) override {
    if (!msg.has_diff_reply()) return;  // heartbeats, and nothing else is expected
    MutexLock l(&mu_);
    replies_[msg.diff_reply().id()] = msg.diff_reply();
    cv_.SignalAll();
  }
  void OnClosed(const std::shared_ptr<transport::Session>&, const Status& why) override {
    MutexLock l(&mu_);
    closed_ = why.ok() ? Status::Aborted("the connection closed") : why;
    cv_.SignalAll();
  }

 private:

  // Sends a request and waits for its reply (the transport's heartbeats
  // close a session whose node stops answering).
  Result<proto::DiffReply> Call(proto::DiffRequest req) {
    uint64_t id;
    {
      MutexLock l(&mu_);
      id = ++next_id_;
    }
    req.set_id(id);
    proto::Control msg;
    *msg.mutable_diff_request() = req;
    REPLICA_RETURN_IF_ERROR(session_->SendControl(msg).WithContext(address_));
    MutexLock l(&mu_);
    while (!replies_.count(id) && closed_.ok()) cv_.Wait();
    auto it = replies_.find(id);
    if (it == replies_.end()) return closed_.WithContext(address_);
    proto::DiffReply reply = std::move(it->second);
    replies_.erase(it);
    // The node's code kept (PinCommonLsn tells "passed" apart).
    if (reply.code() != 0) {
      return Status::FromCode(static_cast<StatusCode>(std::min<uint32_t>(reply.code(), 255)),
                              address_ + ": " + reply.message());
    }
    bytes_read.fetch_add(reply.bytes_read(), std::memory_order_relaxed);
    return reply;
  }

  std::string address_;
  std::unique_ptr<transport::Endpoint> endpoint_;
  std::shared_ptr<transport::Session> session_;
  std::chrono::milliseconds pin_timeout_{10000};
  Mutex mu_;
  CondVar cv_{&mu_};
  bool established_ GUARDED_BY(mu_) = false;
  Status closed_ GUARDED_BY(mu_);
  uint64_t next_id_ GUARDED_BY(mu_) = 0;
  std::map<uint64_t, proto::DiffReply> replies_ GUARDED_BY(mu_);
};

}  // namespace

Result<std::unique_ptr<Source>> ConnectNode(const std::string& address, const LiveOptions& options) {
  auto src = std::make_unique<RemoteSource>();
  REPLICA_RETURN_IF_ERROR(src->Open(address, options));
  return std::unique_ptr<Source>(std::move(src));
}

Result<uint64_t> PinCommonLsn(const std::vector<std::string>& names, const std::vector<Source*>& sources,
                              uint64_t at_lsn) {
  constexpr int kAttempts = 6;
  uint64_t lead = 0;
  std::string why;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    uint64_t target = at_lsn;
    if (target == 0) {
      for (size_t i = 0; i < sources.size(); ++i) {
        auto info = sources[i]->Info();
        if (!info.ok()) return info.status().WithContext(names[i]);
        target = std::max(target, info->wal_last);
      }
      target += lead;
    }
    std::vector<Result<NodeInfo>> got(sources.size(), Status::Aborted("not pinned"));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < sources.size(); ++i) {
      threads.emplace_back([&, i] { got[i] = sources[i]->Pin(target); });
    }
    for (auto& t : threads) t.join();
    bool passed = false;
    uint64_t furthest = target;
    for (size_t i = 0; i < sources.size(); ++i) {
      if (got[i].ok()) continue;
      const Status& st = got[i].status();
      if (st.code() == StatusCode::kAborted && st.message().find("applied past") != std::string::npos && at_lsn == 0) {
        passed = true;
        why = names[i] + ": " + st.message();
        // "... applied past LSN T (at LSN A)": aim beyond A next time.
        const auto at = st.message().rfind("at LSN ");
        if (at != std::string::npos) furthest = std::max<uint64_t>(furthest, std::strtoull(st.message().c_str() + at + 7, nullptr, 10));
        continue;
      }
      if (st.code() == StatusCode::kTimedOut && lead > 0) {
        passed = true;  // writes stopped before the lead was used up: try at the log's end
        why = names[i] + ": " + st.message();
        continue;
      }
      return st.WithContext(names[i] + ": pin at LSN " + std::to_string(target));
    }
    if (!passed) {
      // Each node must be where it was pinned, or the comparison would be of
      // different moments (a node that answers for another LSN).
      for (size_t i = 0; i < sources.size(); ++i) {
        if (got[i]->applied != target || got[i]->wal_last != target) {
          return Status::Corruption(names[i] + ": pinned at LSN " + std::to_string(target) + " but reports applied LSN " +
                                    std::to_string(got[i]->applied) + " and WAL end " + std::to_string(got[i]->wal_last));
        }
      }
      return target;
    }
    lead = furthest > target ? 2 * (furthest - target) + 1 : 0;
  }
  return Status::Busy("the nodes kept applying past every LSN chosen (" + why +
                      "); try again under less load, or give one with --at");
}

}  // namespace replica::logdiff
