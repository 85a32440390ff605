// walgen: append records to a WAL directory (for the demo and manual tests).
// Opening the log runs recovery, so walgen also shows a torn tail being cut.
#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "base/log.h"
#include "tools/cli.h"
#include "wal/wal.h"

using namespace replica;
using namespace replica::wal;

namespace {
constexpr const char* kHelp = R"(Usage: walgen [OPTIONS] WAL_DIR

Open (and so recover) the write-ahead log in WAL_DIR, creating it if missing,
and append records to it.

Options:
  --records N        records to append in all (default 1000; 0 only recovers)
  --size BYTES       payload size of each record (default 100)
  --threads N        concurrent appenders sharing group commits (default 1)
  --sync POLICY      every | interval | none (default every)
  --compress         store commit groups as LZ4 blocks when smaller
  --epoch E          epoch of the records (default: the log's last epoch, or 1)
  --segment-size B   bytes per segment file, 4096 to 1 TiB (default 67108864)
  --print-acks       print "ack LSN" once each append returns
  --log-level L      debug | info | warn | error | off (default info)
  -h, --help         show this help

Payloads are deterministic: the n-th record this run appends holds the text
"record n;" repeated (n counts from 1 in each run, so it equals the LSN only
for a new log written by one thread; with --threads above 1 the order of n
and of LSNs may differ).

Exit status: 0 done, 1 the log could not be opened or an append or the
close failed, 2 bad usage.
)";
}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  uint64_t records = 1000, size = 100, threads = 1, epoch = 0, segment_size = 64ull << 20;
  bool print_acks = false;
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) cli::UsageError("walgen", "%.*s needs a value", a);
      return argv[++i];
    };
    auto number = [&](uint64_t* out) {
      std::string_view v = value();
      if (!cli::ParseU64(v, out)) cli::UsageError("walgen", "not a number: '%.*s'", v);
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kHelp, stdout);
      return 0;
    } else if (a == "--records") number(&records);
    else if (a == "--size") number(&size);
    else if (a == "--threads") number(&threads);
    else if (a == "--epoch") number(&epoch);
    else if (a == "--segment-size") number(&segment_size);
    else if (a == "--compress") options.compress = true;
    else if (a == "--print-acks") print_acks = true;
    else if (a == "--sync") {
      std::string_view v = value();
      if (!ParseSyncPolicy(v, &options.sync_policy)) cli::UsageError("walgen", "bad --sync '%.*s'", v);
    } else if (a == "--log-level") {
      std::string_view v = value();
      LogLevel level;
      if (!ParseLogLevel(v, &level)) cli::UsageError("walgen", "bad --log-level '%.*s'", v);
      SetLogLevel(level);
    } else if (!a.empty() && a[0] == '-') {
      cli::UsageError("walgen", "unknown option '%.*s'", a);
    } else if (dir.empty()) {
      dir = a;
    } else {
      cli::UsageError("walgen", "unexpected argument '%.*s'", a);
    }
  }
  if (dir.empty()) cli::UsageError("walgen", "missing WAL_DIR%.*s", "");
  if (threads == 0 || threads > 256) cli::UsageError("walgen", "--threads must be 1..256%.*s", "");
  if (size > kMaxRecordPayload) cli::UsageError("walgen", "--size is above the record limit%.*s", "");
  // replicad's bounds for --wal-segment-size.
  if (segment_size < 4096 || segment_size > (uint64_t{1} << 40)) {
    cli::UsageError("walgen", "--segment-size must be 4096 bytes to 1 TiB%.*s", "");
  }
  options.segment_size = segment_size;

  auto opened = Wal::Open(dir, options);
  if (!opened.ok()) {
    std::fprintf(stderr, "walgen: %s\n", opened.status().ToString().c_str());
    return 1;
  }
  auto wal = std::move(opened).value();
  if (epoch == 0) epoch = wal->last_epoch() ? wal->last_epoch() : 1;
  std::printf("opened %s: LSN %llu..%llu, epoch %llu%s\n", dir.c_str(),
              static_cast<unsigned long long>(wal->first_lsn()), static_cast<unsigned long long>(wal->last_lsn()),
              static_cast<unsigned long long>(wal->last_epoch()),
              wal->recovery().torn_tail ? " (a torn tail was cut)" : "");
  std::fflush(stdout);

  std::atomic<uint64_t> left{records};
  std::atomic<bool> failed{false};
  auto work = [&] {
    std::string payload;
    while (!failed.load()) {
      uint64_t prev = left.load();
      do {
        if (prev == 0) return;
      } while (!left.compare_exchange_weak(prev, prev - 1));
      // The payload names the LSN it expects; with several threads the LSN is
      // only known afterwards, so the text uses the running count instead.
      std::string unit = "record " + std::to_string(records - prev + 1) + ";";
      payload.clear();
      while (payload.size() < size) payload += unit;
      payload.resize(size);
      auto lsn = wal->Append(epoch, RecordType::kData, payload);
      if (!lsn.ok()) {
        std::fprintf(stderr, "walgen: append failed: %s\n", lsn.status().ToString().c_str());
        failed = true;
        return;
      }
      if (print_acks) {
        std::printf("ack %llu\n", static_cast<unsigned long long>(*lsn));
        std::fflush(stdout);
      }
    }
  };
  std::vector<std::thread> pool;
  for (uint64_t t = 0; t < threads; ++t) pool.emplace_back(work);
  for (auto& t : pool) t.join();
  auto stats = wal->stats();
  std::printf("appended %llu records in %llu group commits with %llu syncs; last LSN %llu\n",
              static_cast<unsigned long long>(stats.records), static_cast<unsigned long long>(stats.groups),
              static_cast<unsigned long long>(stats.syncs), static_cast<unsigned long long>(wal->last_lsn()));
  Status st = wal->Close();
  if (!st.ok() || failed) {
    if (!st.ok()) std::fprintf(stderr, "walgen: close: %s\n", st.ToString().c_str());
    return 1;
  }
  return 0;
}
