// A writer in a child process is SIGKILLed at random moments; after each kill
// the log must reopen as a clean prefix holding every append the child saw
// acknowledged under the sync-every-commit policy.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <random>
#include <thread>

#include "tests/support/test_util.h"
#include "wal/wal.h"

namespace replica::wal {
namespace {

using test::TempDir;

std::string PayloadFor(int thread, uint64_t seq) {
  std::string id = "t" + std::to_string(thread) + "s" + std::to_string(seq) + ";";
  std::string out;
  while (out.size() < 120) out += id;
  return out;
}

// Child: 4 appender threads; after each acknowledged append, one line
// "LSN THREAD SEQ\n" on fd (a single write(), below PIPE_BUF, so lines never mix).
[[noreturn]] void RunChild(const std::string& dir, int fd, bool compress) {
  Options o;
  o.segment_size = 32 << 10;
  o.compress = compress;
  auto wal = Wal::Open(dir, o);
  if (!wal.ok()) {
    std::fprintf(stderr, "child: %s\n", wal.status().ToString().c_str());
    _exit(3);
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t seq = 0;; ++seq) {
        auto lsn = (*wal)->Append(1, RecordType::kData, PayloadFor(t, seq));
        if (!lsn.ok()) _exit(4);
        char line[64];
        int n = std::snprintf(line, sizeof line, "%llu %d %llu\n", static_cast<unsigned long long>(*lsn), t,
                              static_cast<unsigned long long>(seq));
        if (::write(fd, line, static_cast<size_t>(n)) != n) _exit(5);
      }
    });
  }
  for (auto& th : threads) th.join();
  _exit(0);
}

struct Ack {
  int thread;
  uint64_t seq;
};

void CrashRounds(bool compress) {
  const int rounds = test::SoakMode() ? 400 : 20;
  const unsigned seed = std::random_device{}();
  std::mt19937 rng(seed);
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir base;
  std::string dir;
  std::map<Lsn, Ack> acked;  // over all rounds on this directory
  for (int round = 0; round < rounds; ++round) {
    if (round % 10 == 0) {  // a fresh log now and then keeps rounds short
      dir = base.Sub("log" + std::to_string(round));
      acked.clear();
    }
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(fds[0]);
      RunChild(dir, fds[1], compress);
    }
    ::close(fds[1]);
    // Kill after a random number of acknowledgements (0: during open/recovery).
    const size_t kill_after = std::uniform_int_distribution<size_t>(0, 1500)(rng);
    FILE* in = ::fdopen(fds[0], "r");
    size_t seen = 0;
    char line[64];
    bool killed = false;
    while (true) {
      if (!killed && seen >= kill_after) {
        ::kill(pid, SIGKILL);
        killed = true;
      }
      if (!std::fgets(line, sizeof line, in)) break;  // EOF once the child is dead
      unsigned long long lsn, seq;
      int thread;
      ASSERT_EQ(std::sscanf(line, "%llu %d %llu", &lsn, &thread, &seq), 3) << line;
      acked[lsn] = Ack{thread, seq};
      ++seen;
    }
    std::fclose(in);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "round " << round << ": the child ended by itself, status " << status;

    // Reopen: every acknowledged append is present, the log is gap-free.
    Options o;
    o.segment_size = 32 << 10;
    o.compress = compress;
    auto wal = test::OpenOrDie(dir, o);
    ASSERT_NE(wal, nullptr) << "round " << round;
    if (!acked.empty()) {
      ASSERT_GE(wal->last_lsn(), acked.rbegin()->first) << "round " << round;
    }
    auto recs = test::ReadAll(wal.get(), 1);
    ASSERT_EQ(recs.size(), wal->last_lsn()) << "round " << round;
    for (const auto& [lsn, ack] : acked) {
      ASSERT_EQ(recs[lsn - 1].payload, PayloadFor(ack.thread, ack.seq)) << "round " << round << " LSN " << lsn;
    }
  }
}

TEST(CrashTest, SigkillDuringAppendsLosesNothingAcknowledged) { CrashRounds(false); }
TEST(CrashTest, SigkillDuringCompressedAppendsLosesNothingAcknowledged) { CrashRounds(true); }

}  // namespace
}  // namespace replica::wal
