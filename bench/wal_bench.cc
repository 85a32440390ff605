// wal_bench: append throughput of the WAL against the raw write()/fdatasync
// baseline on the same filesystem, in the same run (docs/performance.md).
//
//   WAL/<sync>/<plain|lz4>/<size>B   Wal::Append of one record per iteration,
//                                    sync policy every|interval|none, 1 and 8
//                                    threads sharing one Wal.
//   WAL/every-unreserved/plain/<size>B  WAL/every with Options::preallocate
//                                    off: each sync also journals the file's
//                                    growth (what this WAL did before).
//   Raw/write+fdatasync/<size>B      write() of the record's bytes then
//                                    fdatasync(), per iteration; 8 threads
//                                    share one O_APPEND fd (no group commit).
//   Raw/reserved-write+fdatasync/<size>B  the same into a file whose space
//                                    was reserved first (fallocate of 64 MiB,
//                                    as the WAL does for each segment).
//   Raw/write/<size>B                write() only, same chunks.
//   Raw/write-framed/<size>B         write() only, chunks of the size the WAL
//                                    stores per plain record (payload + the
//                                    40-byte frame header): the same bytes.
//   Model/groupcommit/<size>B        the smallest group commit there is, as
//                                    a ceiling for WAL/every: appenders meet
//                                    under one std::mutex; the last of the
//                                    8 to arrive writes all their bytes with
//                                    one write() and one fdatasync(), then
//                                    wakes the others (std::condition_variable).
//   Model/reserved-groupcommit/<size>B  the same model writing what the WAL
//                                    stores (payload + frame header) into a
//                                    file with 64 MiB reserved first, as the
//                                    WAL does: the ceiling for WAL/every as
//                                    it is. Rates count the payload only.
//
// Every case gets a fresh directory under $TMPDIR (default /tmp), removed
// afterwards, and starts after a sync() so that no case pays for the
// writeback of another. bytes_per_second counts payload bytes (the caller's record
// bytes); disk_B/op says what the WAL actually stored per record (frame header
// included, after LZ4). After the runs, a summary prints the WAL / raw ratios
// and the goals of the issue (median of repetitions when there are several).
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench/bench_output.h"
#include "wal/format.h"
#include "wal/wal.h"

namespace {

using replica::wal::Options;
using replica::wal::RecordType;
using replica::wal::SyncPolicy;
using replica::wal::Wal;

constexpr size_t kSizes[] = {100, 1024, 16384};
constexpr double kMinTime = 0.5;  // seconds per case

// Deterministic, moderately compressible payload: words from a small
// vocabulary with random numbers between them (LZ4 gets roughly 2x on a
// group of such records, little on a single 100 B record).
std::string MakePayload(size_t n) {
  static const char* const kWords[] = {"account", "balance", "commit", "ledger", "replica",
                                       "segment", "epoch",   "update", "insert", "key"};
  std::mt19937_64 rng(n);
  std::string s;
  s.reserve(n + 32);
  while (s.size() < n) {
    s += kWords[rng() % 10];
    s += '=';
    s += std::to_string(rng() % 100000);
    s += ';';
  }
  s.resize(n);
  return s;
}

std::string TempRoot() {
  const char* t = getenv("TMPDIR");
  return (t != nullptr && *t != '\0') ? t : "/tmp";
}

// A fresh directory, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = TempRoot() + "/wal_bench.XXXXXX";
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    if (path_.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  bool ok() const { return !path_.empty(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Called by thread 0 before each case: writes back what earlier cases (and
// anything else on the machine) left dirty in the page cache, so that every
// case starts from the same state instead of paying for its predecessor's
// writeback (untimed).
void StartClean() { ::sync(); }

// State shared by the threads of the running case. Thread 0 sets it up before
// the measurement loop and tears it down after it; Google Benchmark starts no
// thread's loop until every thread has reached it, and lets no thread leave
// the loop until all have finished it, so the others see it ready and are
// done with it before it goes.
struct Shared {
  std::unique_ptr<TempDir> dir;
  std::unique_ptr<Wal> wal;
  int fd = -1;
  std::string error;

  // The log (or fd) first, then the directory holding it.
  void Reset() {
    wal.reset();
    if (fd >= 0) ::close(fd);
    fd = -1;
    dir.reset();
    error.clear();
  }
};
Shared g;

void SetRates(benchmark::State& state, size_t size) {
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * size));
}

void BM_WalAppend(benchmark::State& state, SyncPolicy policy, bool compress, size_t size, bool reserve) {
  const std::string payload = MakePayload(size);
  if (state.thread_index() == 0) {
    g.Reset();
    StartClean();
    g.dir = std::make_unique<TempDir>();
    if (!g.dir->ok()) {
      g.error = "mkdtemp under " + TempRoot() + ": " + std::strerror(errno);
    } else {
      Options opt;
      opt.sync_policy = policy;
      opt.compress = compress;
      opt.preallocate = reserve;
      auto wal = Wal::Open(g.dir->path() + "/wal", opt);
      if (wal.ok()) {
        g.wal = std::move(wal).value();
      } else {
        g.error = wal.status().ToString();
      }
    }
  }
  bool failed = false;
  for (auto _ : state) {
    if (!g.wal) {
      state.SkipWithError(g.error.c_str());
      failed = true;
      break;
    }
    auto lsn = g.wal->Append(1, RecordType::kData, payload);
    if (!lsn.ok()) {
      state.SkipWithError(lsn.status().ToString().c_str());
      failed = true;
      break;
    }
    benchmark::DoNotOptimize(lsn);
  }
  if (!failed) SetRates(state, size);
  if (state.thread_index() == 0) {
    if (g.wal) {
      const replica::wal::WalStats st = g.wal->stats();
      const double ops = static_cast<double>(st.records);
      if (ops > 0 && !failed) {
        state.counters["groups/op"] = static_cast<double>(st.groups) / ops;
        state.counters["syncs/op"] = static_cast<double>(st.syncs) / ops;
        state.counters["disk_B/op"] = static_cast<double>(st.bytes) / ops;
        if (st.syncs > 0) {
          // Mean fdatasync time of a group commit (the rest of a group's
          // cycle is waking and gathering appenders).
          state.counters["sync_us"] = static_cast<double>(st.sync_micros) / static_cast<double>(st.syncs);
        }
        if (st.gathers > 0) {
          // Share of the leaders' waits for their group that were patient
          // (wal/gather_policy.h).
          state.counters["patient"] = static_cast<double>(st.gathers_patient) / static_cast<double>(st.gathers);
        }
      }
      auto closed = g.wal->Close();
      if (!closed.ok() && !failed) state.SkipWithError(closed.ToString().c_str());
    }
    g.Reset();
  }
}

void WriteAll(benchmark::State& state, int fd, const std::string& buf) {
  const char* p = buf.data();
  size_t left = buf.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      state.SkipWithError((std::string("write: ") + std::strerror(errno)).c_str());
      return;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

// Thread 0, before a raw or model case: a fresh directory holding one new
// file, g.fd (or g.error), opened O_APPEND, or with 64 MiB reserved
// (fallocate) and written from offset 0 on through the shared file position.
void OpenCaseFile(const std::string& name, bool reserve = false) {
  g.Reset();
  StartClean();
  g.dir = std::make_unique<TempDir>();
  if (!g.dir->ok()) {
    g.error = "mkdtemp under " + TempRoot() + ": " + std::strerror(errno);
    return;
  }
  const std::string path = g.dir->path() + "/" + name;
  g.fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | (reserve ? 0 : O_APPEND) | O_CLOEXEC, 0644);
  if (g.fd < 0) {
    g.error = "open " + path + ": " + std::strerror(errno);
    return;
  }
  if (reserve && (::fallocate(g.fd, 0, 0, 64 << 20) != 0 || ::fsync(g.fd) != 0)) {
    g.error = "fallocate " + path + ": " + std::strerror(errno);
    ::close(g.fd);
    g.fd = -1;
  }
}

// Inside the measuring loop, where every thread sees thread 0's set-up:
// false, with the case skipped, if OpenCaseFile failed.
bool CaseFileOk(benchmark::State& state) {
  if (g.fd >= 0) return true;
  state.SkipWithError(g.error.c_str());
  return false;
}

// framed: each write() carries the record's payload plus a frame header's
// worth of bytes, i.e. exactly as many bytes as the WAL stores for a plain
// record. Rates still count the payload only, as for the WAL.
void BM_Raw(benchmark::State& state, bool sync, size_t size, bool framed, bool reserve) {
  const std::string payload = MakePayload(size) + (framed ? std::string(replica::wal::kFrameHeaderSize, 'h') : "");
  if (state.thread_index() == 0) OpenCaseFile("raw", reserve);
  for (auto _ : state) {
    if (!CaseFileOk(state)) break;
    WriteAll(state, g.fd, payload);
    if (sync && ::fdatasync(g.fd) != 0) {
      state.SkipWithError((std::string("fdatasync: ") + std::strerror(errno)).c_str());
    }
    if (state.error_occurred()) break;
  }
  if (!state.error_occurred()) SetRates(state, size);
  if (state.thread_index() == 0) {
    g.Reset();
  }
}

// The group-commit model: no LSNs, no encoding, no queue, no log format;
// only the waiting and waking any group commit needs. A group closes when
// every thread of the case has arrived, or when one has waited 2 ms (so that
// threads leaving the loop at different times never wait for each other).
struct GroupModel {
  std::mutex mu;
  std::condition_variable cv;
  int waiting = 0;       // appenders in the open group
  size_t bytes = 0;      // their bytes
  uint64_t open = 1;     // number of the group being gathered
  uint64_t done = 0;     // last group made durable
  bool busy = false;     // a group is being written
  // For the counters (reset by thread 0 before each case): records
  // written, fdatasyncs, and their total time.
  uint64_t records = 0;
  uint64_t syncs = 0;
  std::chrono::nanoseconds sync_time{0};
};
GroupModel model;

void BM_GroupModel(benchmark::State& state, size_t size, bool reserve) {
  // On a reserved file, the bytes the WAL stores: a group's fdatasync costs
  // more as its writes reach further into reserved blocks (each block first
  // written converts an "unwritten" extent, a metadata write at the next fdatasync).
  const size_t stored = reserve ? size + replica::wal::kFrameHeaderSize : size;
  const std::string payload = MakePayload(stored);
  if (state.thread_index() == 0) {
    OpenCaseFile("model", reserve);
    std::lock_guard<std::mutex> l(model.mu);
    model.records = model.syncs = 0;
    model.sync_time = {};
  }
  const int threads = state.threads();
  std::string buf;
  for (auto _ : state) {
    if (!CaseFileOk(state)) break;
    std::unique_lock<std::mutex> l(model.mu);
    const uint64_t mine = model.open;
    ++model.waiting;
    model.bytes += stored;
    bool waited = false;
    while (model.done < mine) {
      if (!model.busy && model.open == mine && (model.waiting == threads || waited)) {
        model.busy = true;
        const size_t n = model.bytes;
        model.waiting = 0;
        model.bytes = 0;
        ++model.open;
        l.unlock();
        buf.clear();
        while (buf.size() < n) buf += payload;
        WriteAll(state, g.fd, buf);
        const auto start = std::chrono::steady_clock::now();
        const bool synced = ::fdatasync(g.fd) == 0;
        const auto took = std::chrono::steady_clock::now() - start;
        l.lock();
        model.records += n / stored;
        ++model.syncs;
        model.sync_time += took;
        model.busy = false;
        model.done = mine;
        model.cv.notify_all();
        if (!synced) state.SkipWithError((std::string("fdatasync: ") + std::strerror(errno)).c_str());
        break;
      }
      waited = model.cv.wait_for(l, std::chrono::milliseconds(2)) == std::cv_status::timeout;
    }
    l.unlock();
    if (state.error_occurred()) break;
  }
  if (!state.error_occurred()) SetRates(state, size);
  if (state.thread_index() == 0) {
    std::lock_guard<std::mutex> l(model.mu);
    if (model.records > 0 && model.syncs > 0 && !state.error_occurred()) {
      // As for the WAL: records per fdatasync, and the mean fdatasync time.
      state.counters["syncs/op"] = static_cast<double>(model.syncs) / static_cast<double>(model.records);
      state.counters["sync_us"] =
          std::chrono::duration<double, std::micro>(model.sync_time).count() / static_cast<double>(model.syncs);
    }
    g.Reset();
  }
}

// ---------------------------------------------------------------------------
// Ratio summary: collects items/s and bytes/s per (case, threads) from the
// reports and prints WAL / raw after the run.

struct Rates {
  double items = 0;
  double bytes = 0;
};

class SummaryReporter : public benchmark::BenchmarkReporter {
 public:
  SummaryReporter(std::unique_ptr<benchmark::BenchmarkReporter> inner, bool text_output)
      : inner_(std::move(inner)), text_output_(text_output) {}

  bool ReportContext(const Context& context) override {
    inner_->SetOutputStream(&GetOutputStream());
    inner_->SetErrorStream(&GetErrorStream());
    return inner_->ReportContext(context);
  }

  void ReportRuns(const std::vector<Run>& runs) override {
    inner_->ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      const Key key{r.run_name.function_name, r.threads};
      Rates rates{CounterValue(r, "items_per_second"), CounterValue(r, "bytes_per_second")};
      if (r.run_type == Run::RT_Aggregate) {
        if (r.aggregate_name == "median") medians_[key] = rates;
      } else {
        samples_[key].push_back(rates);
      }
    }
  }

  void Finalize() override {
    inner_->Finalize();
    // Text after JSON would spoil it: the summary goes to stderr then.
    PrintSummary(text_output_ ? GetOutputStream() : GetErrorStream());
  }

 private:
  using Key = std::pair<std::string, int64_t>;

  static double CounterValue(const Run& r, const char* name) {
    auto it = r.counters.find(name);
    return it == r.counters.end() ? 0 : it->second.value;
  }

  // Median over repetitions (Google Benchmark's own median when it made one).
  bool Get(const std::string& name, int64_t threads, Rates* out) const {
    const Key key{name, threads};
    if (auto it = medians_.find(key); it != medians_.end()) {
      *out = it->second;
      return true;
    }
    auto it = samples_.find(key);
    if (it == samples_.end() || it->second.empty()) return false;
    auto median = [&](double Rates::*field) {
      std::vector<double> v;
      for (const Rates& r : it->second) v.push_back(r.*field);
      std::sort(v.begin(), v.end());
      const size_t n = v.size();
      return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    };
    *out = Rates{median(&Rates::items), median(&Rates::bytes)};
    return true;
  }

  // One line: a / b with an optional goal (ratio >= goal); empty if either
  // side did not run (filtered out or failed).
  std::string Line(const std::string& what, const std::string& a, int64_t ta, const std::string& b,
                   int64_t tb, bool bytes, double goal) const {
    Rates ra, rb;
    if (!Get(a, ta, &ra) || !Get(b, tb, &rb)) return "";
    const double va = bytes ? ra.bytes / 1048576.0 : ra.items;
    const double vb = bytes ? rb.bytes / 1048576.0 : rb.items;
    const char* unit = bytes ? "MiB/s" : "op/s";
    char buf[512];
    std::snprintf(buf, sizeof buf, "  %-68s %11.1f / %11.1f %-5s = %6.2fx", what.c_str(), va, vb,
                  unit, vb > 0 ? va / vb : 0.0);
    std::string line = buf;
    if (goal > 0) {
      std::snprintf(buf, sizeof buf, "  (goal >= %.2fx: %s)", goal,
                    vb > 0 && va / vb >= goal ? "MET" : "MISSED");
      line += buf;
    }
    return line + "\n";
  }

  void PrintSummary(std::ostream& os) const {
    std::string out;
    for (size_t size : kSizes) {
      const std::string s = std::to_string(size) + "B";
      const std::string every = "WAL/every/plain/" + s;
      const std::string sync_raw = "Raw/write+fdatasync/" + s;
      const std::string write_raw = "Raw/write/" + s;
      std::string lines;
      lines += Line("group commit: WAL every 8t / WAL every 1t", every, 8, every, 1, false,
                    size == 100 ? 5.0 : 0);
      lines += Line("           model group commit 8t / 1t", "Model/groupcommit/" + s, 8,
                    "Model/groupcommit/" + s, 1, false, 0);
      const std::string reserved_model = "Model/reserved-groupcommit/" + s;
      lines += Line("           model group commit, reserved file, 8t / 1t", reserved_model, 8, reserved_model, 1,
                    false, 0);
      lines += Line("           raw write+fdatasync 8t / 1t", sync_raw, 8, sync_raw, 1, false, 0);
      lines += Line("group commit: WAL every 8t / model group commit 8t", every, 8, "Model/groupcommit/" + s,
                    8, false, 0);
      lines += Line("              WAL every 8t / model group commit, reserved file, 8t", every, 8, reserved_model,
                    8, false, 0);
      lines += Line("              WAL every 1t / model group commit, reserved file, 1t", every, 1, reserved_model,
                    1, false, 0);
      const std::string unreserved = "WAL/every-unreserved/plain/" + s;
      const std::string reserved_raw = "Raw/reserved-write+fdatasync/" + s;
      lines += Line("           WAL every-unreserved 8t / 1t", unreserved, 8, unreserved, 1, false, 0);
      lines += Line("reserved space: WAL every 1t / WAL every-unreserved 1t", every, 1, unreserved, 1, false, 0);
      lines += Line("                WAL every 8t / WAL every-unreserved 8t", every, 8, unreserved, 8, false, 0);
      lines += Line("                raw reserved 1t / raw write+fdatasync 1t", reserved_raw, 1, sync_raw, 1,
                    false, 0);
      lines += Line("synced: WAL every 1t / raw write+fdatasync 1t", every, 1, sync_raw, 1, false, 0);
      lines += Line("synced: WAL every 1t / raw reserved write+fdatasync 1t", every, 1, reserved_raw, 1, false, 0);
      lines += Line("synced: WAL every 8t / raw write+fdatasync 8t", every, 8, sync_raw, 8, false, 0);
      lines += Line("synced: WAL every lz4 8t / raw write+fdatasync 8t", "WAL/every/lz4/" + s, 8,
                    sync_raw, 8, false, 0);
      // The goal compares with raw write() of the bytes the WAL stores (the
      // 40-byte frame header makes every write end off a page boundary,
      // which costs the kernel alone up to 45% at 16 KiB); the payload-only
      // baseline is shown beside it.
      const std::string framed_raw = "Raw/write-framed/" + s;
      for (int64_t t : {1, 8}) {
        const std::string ts = std::to_string(t) + "t";
        lines += Line("unsynced: WAL none plain " + ts + " / raw write framed " + ts, "WAL/none/plain/" + s, t,
                      framed_raw, t, true, 0.7);
        lines += Line("          raw write framed " + ts + " / raw write " + ts, framed_raw, t, write_raw, t,
                      true, 0);
      }
      for (const std::string policy : {"none", "interval"}) {
        for (const std::string codec : {"plain", "lz4"}) {
          for (int64_t t : {1, 8}) {
            const std::string ts = std::to_string(t) + "t";
            lines += Line("unsynced: WAL " + policy + " " + codec + " " + ts + " / raw write " + ts,
                          "WAL/" + policy + "/" + codec + "/" + s, t, write_raw, t, true, 0);
          }
        }
      }
      if (!lines.empty()) out += s + ":\n" + lines;
    }
    if (out.empty()) return;
    os << "\nWAL / raw summary (medians when repeated; '8t' = 8 threads)\n" << out;
  }

  std::unique_ptr<benchmark::BenchmarkReporter> inner_;
  const bool text_output_;
  std::map<Key, Rates> medians_;
  std::map<Key, std::vector<Rates>> samples_;
};

// Registration order is run order (without --benchmark_enable_random_interleaving):
// each raw baseline runs right before the WAL cases compared with it, and the
// 1- and 8-thread runs of a case run back to back, so that a ratio compares
// measurements taken close together (fdatasync latency on a shared VM disk
// drifts over tens of seconds).
void RegisterAll() {
  auto reg = [](const std::string& name, auto fn, auto... args) {
    benchmark::RegisterBenchmark(name.c_str(), fn, args...)
        ->MinTime(kMinTime)
        ->UseRealTime()
        ->Threads(1)
        ->Threads(8);
  };
  auto wal = [&](SyncPolicy policy, const char* pname, bool lz4, size_t size, bool reserve = true) {
    reg(std::string("WAL/") + pname + (lz4 ? "/lz4/" : "/plain/") + std::to_string(size) + "B",
        BM_WalAppend, policy, lz4, size, reserve);
  };
  for (size_t size : kSizes) {
    const std::string s = std::to_string(size) + "B";
    reg("Raw/write+fdatasync/" + s, BM_Raw, true, size, false, false);
    reg("Raw/reserved-write+fdatasync/" + s, BM_Raw, true, size, false, true);
    reg("Model/groupcommit/" + s, BM_GroupModel, size, false);
    reg("Model/reserved-groupcommit/" + s, BM_GroupModel, size, true);
    wal(SyncPolicy::kEveryCommit, "every", false, size);
    wal(SyncPolicy::kEveryCommit, "every-unreserved", false, size, false);
    wal(SyncPolicy::kEveryCommit, "every", true, size);
    reg("Raw/write/" + s, BM_Raw, false, size, false, false);
    reg("Raw/write-framed/" + s, BM_Raw, false, size, true, false);
    wal(SyncPolicy::kNone, "none", false, size);
    wal(SyncPolicy::kNone, "none", true, size);
    wal(SyncPolicy::kInterval, "interval", false, size);
    wal(SyncPolicy::kInterval, "interval", true, size);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // Before Initialize consumes the output flags; the summary reporter
  // wraps the reporter they ask for.
  replica::bench::Output output = replica::bench::OutputFromFlags(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  benchmark::AddCustomContext("tmpdir", TempRoot());
  RegisterAll();

  SummaryReporter reporter(std::move(output.reporter), output.console);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
