// logdiff: prove that nodes' replicas are identical, or show where they differ.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <string>
#include <vector>

#include "base/host_port.h"
#include "base/log.h"
#include "base/names.h"
#include "replication/logdiff.h"
#include "tools/cli.h"

using namespace replica;

namespace {

constexpr const char* kHelp = R"(Usage: logdiff [OPTIONS] NODE NODE [NODE...]
       logdiff --live [OPTIONS] HOST:PORT HOST:PORT [...]

Compares the replicas of two or more nodes and proves them identical, or
shows exactly where they differ:
  - the WALs, record by record wherever two or more nodes hold an LSN (LSN,
    epoch, type and a digest of the payload; the payload bytes with --bytes);
  - the epoch histories;
  - the RocksDB contents, every column family, key by key.
Ranges are compared by hash first, in parallel, and read entry by entry only
where the hashes differ.

NODE is a node's data directory (the --data-dir of replicad, holding wal/ and
db/), optionally named: NAME=DIR. A running node is not disturbed: its WAL is
read without a lock or repair, its RocksDB opened as a secondary instance
(scratch files under $TMPDIR). On a running node the comparison sees the
state at the moment each directory is opened.

With --live, each NODE is a running node's replication address (its
--listen), optionally named NAME=HOST:PORT; no data directory needs to be
reachable; two addresses of one node (found by its id) are a usage error.
logdiff authenticates with the cluster's secret, picks one LSN
(--at, or the highest WAL end among the nodes, retried while writes move
the nodes past it), and has every node take a RocksDB snapshot exactly when
its applied LSN reaches it; each node then hashes its own ranges at that
LSN and sends only digests, and entries where digests differ.

A node behind another (a shorter WAL, a lower applied LSN) is reported as
"behind by N records", not as a difference: keys written by the records it has
not applied yet are set aside, provided some node still holds those records.

Options:
  --json           print one JSON object instead of text
  --strict         count a node behind another as a difference
  --bytes          compare WAL payloads byte for byte (reads every record)
  --max-diffs N    list at most N differences (default 20; all are counted)
  --threads N      hashing threads (default: one per core, at least 2)
  --live           NODEs are running nodes' replication addresses
  --at LSN         (--live) compare at this LSN (default: the highest WAL end)
  --pin-timeout S  (--live) how long a node may take to reach that LSN
                   (default 10, at most 60 seconds)
  --cluster NAME   (--live) the cluster name (default "default")
  --secret-file F  (--live) file whose first line is the cluster's secret
  --secret S       (--live) the secret itself (visible in ps; prefer a file)
  --tls-cert F --tls-key F --tls-ca F
                   (--live) for a cluster that runs TLS
                   (an option marked --live is a usage error without it)
  --progress       show progress on stderr (default: when stderr is a terminal)
  --no-progress    never show progress
  -h, --help       show this help

Output: a one-line verdict, then each difference (first diverging LSN and what
each node holds there; keys missing on a node or with different values, with
each node's applied LSN), then notes (lag, torn tails).

Exit status: 0 identical (lag allowed unless --strict), 1 different,
2 could not compare (the reason is printed) or bad usage.
)";

void ShowProgress(uint64_t done, uint64_t expected, bool tty) {
  static auto start = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%slogdiff: hashed %s%s", tty ? "\r" : "", ProgressText(done, expected, secs, true).c_str(),
               tty ? "   " : "\n");
}

}  // namespace

int main(int argc, char** argv) {
  logdiff::Options opt;
  bool json = false;
  int progress = -1;  // -1: when stderr is a terminal
  std::vector<std::string> names, dirs;
  bool live = false;
  uint64_t at = 0;
  std::string live_only;  // the first option given that means something only with --live
  logdiff::LiveOptions lo;
  std::string secret_file;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&](uint64_t* out) {
      if (i + 1 >= argc) cli::UsageError("logdiff", "%.*s needs a value", a);
      if (!cli::ParseU64(argv[++i], out)) cli::UsageError("logdiff", "bad number '%.*s'", argv[i]);
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kHelp, stdout);
      return 0;
    } else if (a == "--json") {
      json = true;
    } else if (a == "--strict") {
      opt.strict = true;
    } else if (a == "--bytes") {
      opt.bytes = true;
    } else if (a == "--progress") {
      progress = 1;
    } else if (a == "--no-progress") {
      progress = 0;
    } else if (a == "--live") {
      live = true;
    } else if (a == "--pin-timeout") {
      uint64_t v;
      value(&v);
      if (v == 0 || v > 60) cli::UsageError("logdiff", "--pin-timeout must be 1..60 seconds, not '%.*s'", argv[i]);
      lo.pin_timeout = std::chrono::seconds(v);
      if (live_only.empty()) live_only = a;
    } else if (a == "--at") {
      value(&at);
      if (at == 0) cli::UsageError("logdiff", "--at needs an LSN above 0%.*s", "");
      if (live_only.empty()) live_only = a;
    } else if (a == "--cluster" || a == "--secret" || a == "--secret-file" || a == "--tls-cert" || a == "--tls-key" ||
               a == "--tls-ca") {
      if (i + 1 >= argc) cli::UsageError("logdiff", "%.*s needs a value", a);
      if (live_only.empty()) live_only = a;
      std::string v = argv[++i];
      if (a == "--cluster") lo.cluster = v;
      if (a == "--secret") lo.secret = v;
      if (a == "--secret-file") secret_file = v;
      if (a == "--tls-cert") lo.tls_cert = v;
      if (a == "--tls-key") lo.tls_key = v;
      if (a == "--tls-ca") lo.tls_ca = v;
    } else if (a == "--max-diffs") {
      uint64_t v;
      value(&v);
      opt.max_diffs = v;
    } else if (a == "--threads") {
      uint64_t v;
      value(&v);
      if (v == 0 || v > 256) cli::UsageError("logdiff", "--threads must be 1..256, not '%.*s'", argv[i]);
      opt.threads = static_cast<int>(v);
    } else if (!a.empty() && a[0] == '-') {
      cli::UsageError("logdiff", "unknown option '%.*s'", a);
    } else {
      // NAME=DIR only when NAME is a name: a path may hold '=' too.
      const auto eq = a.find('=');
      std::string name, dir;
      if (eq != std::string_view::npos && eq > 0 && a.substr(0, eq).find('/') == std::string_view::npos) {
        name = a.substr(0, eq);
        dir = a.substr(eq + 1);
      } else {
        dir = a;
        while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
        const auto slash = dir.rfind('/');
        name = slash == std::string::npos ? dir : dir.substr(slash + 1);
      }
      if (dir.empty()) cli::UsageError("logdiff", "empty directory in '%.*s'", a);
      names.push_back(name);
      dirs.push_back(dir);
    }
  }
  if (dirs.size() < 2) cli::UsageError("logdiff", "give at least two nodes%.*s", "");
  if (live) {
    if (!secret_file.empty() && !lo.secret.empty()) {
      cli::UsageError("logdiff", "--secret and --secret-file exclude each other%.*s", "");
    }
    if (!secret_file.empty()) {
      auto secret = cli::ReadSecretFile(secret_file);
      if (!secret.ok()) cli::UsageError("logdiff", "%.*s", secret.status().ToString());
      lo.secret = *secret;
      if (const std::string w = cli::SecretFileExposed(secret_file); !w.empty()) {
        std::fprintf(stderr, "logdiff: WARNING: %s\n", w.c_str());
      }
    }
    if (lo.secret.empty()) cli::UsageError("logdiff", "--live needs the cluster's secret (--secret-file)%.*s", "");
    if (Status st = CheckName("--cluster", lo.cluster); !st.ok()) cli::UsageError("logdiff", "%.*s", st.message());
    if (lo.tls_cert.empty() != lo.tls_key.empty() || lo.tls_cert.empty() != lo.tls_ca.empty()) {
      cli::UsageError("logdiff", "TLS needs all of --tls-cert, --tls-key and --tls-ca%.*s", "");
    }
    if (opt.bytes) cli::UsageError("logdiff", "--bytes needs data directories, not --live%.*s", "");
  } else if (!live_only.empty()) {
    cli::UsageError("logdiff", "%.*s only goes with --live", live_only);
  }
  // A node given twice would prove itself identical to itself.
  for (size_t i = 0; i < dirs.size(); ++i) {
    for (size_t j = i + 1; j < dirs.size(); ++j) {
      bool same = false;
      if (live) {
        auto x = ParseHostPort(dirs[i]), y = ParseHostPort(dirs[j]);
        same = x.ok() && y.ok() ? x->ToString() == y->ToString() : dirs[i] == dirs[j];
      } else {
        struct stat x {}, y {};
        same = ::stat(dirs[i].c_str(), &x) == 0 && ::stat(dirs[j].c_str(), &y) == 0 ? x.st_dev == y.st_dev && x.st_ino == y.st_ino
                                                                                  : dirs[i] == dirs[j];
      }
      if (same) {
        cli::UsageError("logdiff", "%.*s", "'" + dirs[i] + "' and '" + dirs[j] + "' are the same node: give each node once");
      }
    }
  }
  // Names must tell the nodes apart; fall back to the paths as given.
  for (size_t i = 0; i < names.size(); ++i) {
    for (size_t j = i + 1; j < names.size(); ++j) {
      if (names[i] == names[j]) names = dirs;
    }
  }

  SetLogLevel(LogLevel::kError);
  const auto started = std::chrono::steady_clock::now();
  // Opened in parallel: opening a RocksDB replays its own log, which takes a
  // while on a large node.
  std::vector<Result<std::unique_ptr<logdiff::Source>>> opened;
  opened.reserve(dirs.size());
  for (size_t i = 0; i < dirs.size(); ++i) opened.emplace_back(Status::Aborted("not opened"));
  {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < dirs.size(); ++i) {
      threads.emplace_back([&, i] { opened[i] = live ? logdiff::ConnectNode(dirs[i], lo) : logdiff::OpenDirectory(dirs[i]); });
    }
    for (auto& t : threads) t.join();
  }
  std::vector<std::unique_ptr<logdiff::Source>> sources;
  std::vector<logdiff::Source*> raw;
  for (size_t i = 0; i < dirs.size(); ++i) {
    if (!opened[i].ok()) {
      logdiff::Report r;
      r.names = names;
      r.error = names[i] + ": " + opened[i].status().ToString();
      std::fputs(json ? logdiff::FormatJson(r).c_str() : logdiff::FormatText(r).c_str(), stdout);
      return 2;
    }
    sources.push_back(std::move(opened[i]).value());
    raw.push_back(sources.back().get());
  }
  // Two addresses of one node (127.0.0.1:P and localhost:P, or a second
  // interface) are only found once connected: by the node's id.
  for (size_t i = 0; i < raw.size(); ++i) {
    for (size_t j = i + 1; j < raw.size(); ++j) {
      if (live && !raw[i]->node_id().empty() && raw[i]->node_id() == raw[j]->node_id()) {
        const std::string why = "'" + dirs[i] + "' and '" + dirs[j] + "' are the same node (id '" +
                                raw[i]->node_id() + "'): give each node once";
        raw.clear();
        sources.clear();  // the sessions close before the process exits
        cli::UsageError("logdiff", "%.*s", why);
      }
    }
  }
  uint64_t pinned_at = 0;
  if (live) {
    auto pinned = logdiff::PinCommonLsn(names, raw, at);
    if (!pinned.ok()) {
      logdiff::Report r;
      r.names = names;
      r.error = pinned.status().ToString();
      std::fputs(json ? logdiff::FormatJson(r).c_str() : logdiff::FormatText(r).c_str(), stdout);
      return 2;
    }
    pinned_at = *pinned;
  }
  const bool tty = ::isatty(STDERR_FILENO) == 1;
  if (progress == 1 || (progress == -1 && tty)) {
    opt.progress = [tty](uint64_t done, uint64_t expected) { ShowProgress(done, expected, tty); };
  }
  logdiff::Report report = logdiff::Compare(names, raw, opt);
  // The time reported covers opening the nodes too (and pinning them, live).
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (opt.progress && tty) std::fputs("\n", stderr);
  if (live) {
    report.notes.insert(report.notes.begin(), "live: every node hashed its replica as of LSN " +
                                                  std::to_string(pinned_at) + " (a RocksDB snapshot taken there)");
  }
  std::fputs(json ? logdiff::FormatJson(report).c_str() : logdiff::FormatText(report).c_str(), stdout);
  return report.exit_code();
}
