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
#include <unordered_set>

#include "base/coding.h"
#include "base/env.h"
#include "base/mutex.h"
#include "replica/engine.h"
#include "replication/snapshot.h"
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

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::OK();
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  return Status::IOError(what + ": " + s.ToString());
}

bool IsDir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// A data directory read without disturbing a node that may be running on it.
class DirectorySource final : public Source {
 public:
  ~DirectorySource() override {
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
    db_.reset();
    wal_.reset();
    if (!scratch_.empty()) (void)snapshot::RemoveTree(scratch_);
  }

  Status Open(const std::string& data_dir) {
    const std::string wal_dir = JoinPath(data_dir, "wal"), db_dir = JoinPath(data_dir, "db");
    if (!IsDir(data_dir)) return Status::NotFound(data_dir + ": no such directory");
    if (!IsDir(wal_dir) || !IsDir(db_dir)) {
      return Status::InvalidArgument(data_dir + " is not a node's data directory (it needs wal/ and db/)");
    }
    wal::Options wo;
    wo.read_only = true;
    REPLICA_ASSIGN_OR_RETURN(wal_, wal::Wal::Open(wal_dir, wo));
    const auto& rec = wal_->recovery();
    if (rec.torn_tail) {
      info_.torn_tail = std::to_string(rec.torn_bytes) + " bytes after the last whole record in " + rec.torn_segment +
                        " at offset " + std::to_string(rec.torn_offset) + " (" + rec.torn_why + ")";
    }
    info_.wal_first = wal_->first_lsn();
    info_.wal_last = wal_->last_lsn();
    info_.wal_bytes = wal_->size_bytes();
    const wal::EpochHistory history = wal_->epoch_history();
    for (const auto& e : history.entries()) info_.epochs.emplace_back(e.epoch, e.first_lsn);

    REPLICA_RETURN_IF_ERROR(FromRocks(rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), db_dir, &cf_names_),
                                      "list the column families of " + db_dir));
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/logdiff-XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) return Status::FromErrno("create a scratch directory in " + templ, errno);
    scratch_ = templ;
    rocksdb::Options ro;
    ro.max_open_files = -1;  // required of a secondary instance
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
    for (const auto& name : cf_names_) cfs.emplace_back(name, rocksdb::ColumnFamilyOptions());
    rocksdb::DB* raw = nullptr;
    REPLICA_RETURN_IF_ERROR(
        FromRocks(rocksdb::DB::OpenAsSecondary(ro, db_dir, scratch_, cfs, &handles_, &raw), "open " + db_dir));
    db_.reset(raw);
    info_.column_families = cf_names_;

    if (auto* meta = Handle(snapshot::kMetaColumnFamily)) {
      std::string v;
      auto s = db_->Get(rocksdb::ReadOptions(), meta, snapshot::kAppliedKey, &v);
      if (s.ok() && v.size() == 8) {
        info_.applied = DecodeFixed64(v.data());
      } else if (s.ok()) {
        return Status::Corruption(db_dir + ": the applied LSN is " + std::to_string(v.size()) + " bytes, not 8");
      } else if (!s.IsNotFound()) {
        return FromRocks(s, "read the applied LSN of " + db_dir);
      }
    }
    std::vector<rocksdb::LiveFileMetaData> files;
    db_->GetLiveFilesMetaData(&files);
    for (const auto& f : files) info_.db_bytes += f.size;
    return Status::OK();
  }

  Result<NodeInfo> Info() override { return info_; }

  Result<std::vector<Digest>> WalDigests(uint64_t from, uint64_t to, uint64_t chunk) override {
    if (chunk == 0 || from > to) return Status::InvalidArgument("bad WAL range");
    std::vector<Digest> out((to - from) / chunk + 1);
    REPLICA_ASSIGN_OR_RETURN(auto reader, wal_->NewReader(from));
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
    std::vector<WalRecord> out;
    REPLICA_ASSIGN_OR_RETURN(auto reader, wal_->NewReader(from));
    for (uint64_t lsn = from; lsn <= to; ++lsn) {
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
      bytes_read.fetch_add(r.payload.size() + 40, std::memory_order_relaxed);
      out.push_back(std::move(w));
    }
    return out;
  }

  Result<std::vector<std::string>> SplitKeys(const std::string& cf, int n) override {
    if (!Handle(cf)) return Status::NotFound("no column family " + cf);
    std::vector<rocksdb::LiveFileMetaData> files;
    db_->GetLiveFilesMetaData(&files);
    std::vector<std::string> keys;
    for (const auto& f : files) {
      if (f.column_family_name == cf && !f.smallestkey.empty()) keys.push_back(f.smallestkey);
    }
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    if (n > 1 && keys.size() > static_cast<size_t>(n - 1)) {
      std::vector<std::string> picked;
      for (int i = 1; i < n; ++i) picked.push_back(keys[keys.size() * static_cast<size_t>(i) / static_cast<size_t>(n)]);
      picked.erase(std::unique(picked.begin(), picked.end()), picked.end());
      keys.swap(picked);
    }
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
    std::vector<Entry> out;
    REPLICA_RETURN_IF_ERROR(Scan(cf, begin, end, limit, [&](std::string_view k, std::string_view v) {
      Entry e;
      e.key.assign(k);
      e.value_hash = XXH3_64bits(v.data(), v.size());
      e.value_size = static_cast<uint32_t>(v.size());
      e.preview.assign(v.substr(0, 32));
      out.push_back(std::move(e));
    }));
    return out;
  }

 private:
  rocksdb::ColumnFamilyHandle* Handle(const std::string& cf) const {
    for (size_t i = 0; i < cf_names_.size(); ++i) {
      if (cf_names_[i] == cf) return handles_[i];
    }
    return nullptr;
  }

  template <typename Fn>
  Status Scan(const std::string& cf, const std::string& begin, const std::string& end, size_t limit, Fn&& fn) {
    auto* handle = Handle(cf);
    if (!handle) return Status::NotFound("no column family " + cf);
    const bool meta = cf == snapshot::kMetaColumnFamily;
    rocksdb::ReadOptions ro;
    ro.fill_cache = false;
    ro.readahead_size = 2 << 20;
    rocksdb::Slice upper(end);
    if (!end.empty()) ro.iterate_upper_bound = &upper;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro, handle));
    size_t n = 0;
    for (it->Seek(begin); it->Valid() && n < limit; it->Next()) {
      std::string_view k(it->key().data(), it->key().size()), v(it->value().data(), it->value().size());
      bytes_read.fetch_add(k.size() + v.size(), std::memory_order_relaxed);
      if (meta && k == snapshot::kAppliedKey) continue;
      fn(k, v);
      ++n;
    }
    return FromRocks(it->status(), "read column family " + cf);
  }

  std::unique_ptr<wal::Wal> wal_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<std::string> cf_names_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::string scratch_;
  NodeInfo info_;
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
    std::vector<Status> st(n());
    std::vector<std::function<void()>> tasks;
    for (size_t i = 0; i < n(); ++i) tasks.emplace_back([&, i] { st[i] = fn(i); });
    RunAll(tasks, threads_);
    for (size_t i = 0; i < n(); ++i) {
      if (!st[i].ok()) return st[i].WithContext(names_[i]);
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
    }
    bool diverged = false;
    if (first > last) {
      std::string ranges;
      for (size_t i = 0; i < n(); ++i) {
        ranges += (i ? ", " : "") + names_[i] + " " + std::to_string(rep_.nodes[i].wal_first) + ".." +
                  std::to_string(rep_.nodes[i].wal_last);
      }
      rep_.notes.push_back("the WALs hold no LSN in common (" + ranges + "): records not compared");
    } else {
      REPLICA_ASSIGN_OR_RETURN(diverged, WalRange(first, last));
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

  // Compares [first, last] chunk by chunk; returns whether the logs diverge.
  Result<bool> WalRange(uint64_t first, uint64_t last) {
    const uint64_t chunk = std::max<uint64_t>(1, opt_.wal_chunk);
    std::vector<std::vector<Digest>> dig(n());
    if (!opt_.bytes) {
      REPLICA_RETURN_IF_ERROR(ForEachNode([&](size_t i) -> Status {
        REPLICA_ASSIGN_OR_RETURN(dig[i], src_[i]->WalDigests(first, last, chunk));
        return Status::OK();
      }));
    }
    const size_t chunks = static_cast<size_t>((last - first) / chunk + 1);
    for (size_t c = 0; c < chunks; ++c) {
      if (!opt_.bytes) {
        bool same = true;
        for (size_t i = 1; i < n(); ++i) same = same && dig[i][c] == dig[0][c];
        if (same) {
          rep_.records_compared += dig[0][c].count;
          continue;
        }
      }
      const uint64_t lo = first + c * chunk, hi = std::min(last, lo + chunk - 1);
      std::vector<std::vector<WalRecord>> recs(n());
      REPLICA_RETURN_IF_ERROR(ForEachNode([&](size_t i) -> Status {
        REPLICA_ASSIGN_OR_RETURN(recs[i], src_[i]->WalRecords(lo, hi, opt_.bytes));
        if (recs[i].size() != hi - lo + 1) {
          return Status::Aborted("LSN " + std::to_string(lo) + ".." + std::to_string(hi) + " no longer readable");
        }
        return Status::OK();
      }));
      for (size_t k = 0; k < recs[0].size(); ++k) {
        bool same = true;
        for (size_t i = 1; i < n(); ++i) {
          const auto &a = recs[0][k], &b = recs[i][k];
          same = same && a.epoch == b.epoch && a.type == b.type && a.digest == b.digest && a.size == b.size &&
                 a.payload == b.payload;
        }
        if (same) {
          rep_.records_compared++;
          continue;
        }
        Difference d{"wal", "LSN " + std::to_string(recs[0][k].lsn), {}};
        for (size_t i = 0; i < n(); ++i) {
          std::string side = DescribeRecord(recs[i][k]);
          if (opt_.bytes && i > 0 && recs[i][k].digest == recs[0][k].digest && recs[i][k].payload != recs[0][k].payload) {
            side += " (same digest, different bytes)";
          }
          d.sides.push_back(side);
        }
        AddDiff(std::move(d));
        rep_.notes.push_back("the WALs diverge from LSN " + std::to_string(recs[0][k].lsn) +
                             " (records after the first divergence are not compared)");
        return true;
      }
    }
    return false;
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
        for (const auto& op : batch->ops()) lag_keys_.insert(op.key);
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
    REPLICA_ASSIGN_OR_RETURN(auto splits, src_[0]->SplitKeys(cf, threads_ * 8));
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
      if (lag_cf && lag_keys_.count(key)) {
        rep_.lag_keys++;
        continue;
      }
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
  }

  const std::vector<std::string>& names_;
  const std::vector<Source*>& src_;
  const Options& opt_;
  int threads_ = 2;
  Report rep_;
  std::unordered_set<std::string> lag_keys_;
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
  if (r.common_first <= r.common_last) {
    std::snprintf(buf, sizeof buf, "; WAL LSN %" PRIu64 "..%" PRIu64 " (%" PRIu64 " records agree)", r.common_first,
                  r.common_last, r.records_compared);
    out += buf;
  }
  std::snprintf(buf, sizeof buf, "; %" PRIu64 " keys in %zu column families; %.1f MiB hashed in %.3f s (%.0f MiB/s)\n",
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

}  // namespace replica::logdiff
