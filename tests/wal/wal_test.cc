// Appending, group commit, sync policies, segment rolls and reopening.
#include "wal/wal.h"

#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <set>
#include <thread>

#include "base/fault_env.h"
#include "tests/support/test_util.h"

namespace replica::wal {
namespace {

using test::AppendN;
using test::OpenOrDie;
using test::Payload;
using test::ReadAll;
using test::TempDir;

struct Variant {
  bool compress;
  SyncPolicy sync;
};

void PrintTo(const Variant& v, std::ostream* os) {
  *os << (v.compress ? "lz4" : "plain") << "/" << SyncPolicyName(v.sync);
}

class WalVariantTest : public ::testing::TestWithParam<Variant> {
 protected:
  Options Opts(Env* env = nullptr) const {
    Options o;
    o.env = env;
    o.compress = GetParam().compress;
    o.sync_policy = GetParam().sync;
    o.sync_interval = std::chrono::milliseconds(2);
    o.segment_size = 16 << 10;
    return o;
  }
  TempDir dir_;
};

TEST_P(WalVariantTest, AppendReadReopen) {
  // Power loss after a clean Close must lose nothing, whatever the policy.
  FaultInjectionEnv env(Env::Default());
  {
    auto wal = OpenOrDie(dir_.path(), Opts(&env));
    EXPECT_EQ(wal->first_lsn(), 1u);
    EXPECT_EQ(wal->last_lsn(), 0u);
    AppendN(wal.get(), 500, 100);
    EXPECT_EQ(wal->last_lsn(), 500u);
    if (GetParam().sync == SyncPolicy::kEveryCommit) {
      EXPECT_EQ(wal->durable_lsn(), 500u);
    }
    EXPECT_GT(wal->segments().size(), 2u) << "16 KiB segments must have rolled";
    auto recs = ReadAll(wal.get(), 1);
    ASSERT_EQ(recs.size(), 500u);
    for (size_t i = 0; i < recs.size(); ++i) {
      EXPECT_EQ(recs[i].lsn, i + 1);
      EXPECT_EQ(recs[i].epoch, 1u);
      EXPECT_EQ(recs[i].payload, Payload(i + 1, 100));
    }
    ASSERT_TRUE(wal->Close().ok());
    // Close syncs everything, under kNone too.
    EXPECT_EQ(wal->durable_lsn(), 500u);
  }
  ASSERT_TRUE(env.DropUnsyncedData().ok());
  auto wal = OpenOrDie(dir_.path(), Opts());
  EXPECT_FALSE(wal->recovery().torn_tail);
  EXPECT_EQ(wal->last_lsn(), 500u);
  EXPECT_EQ(ReadAll(wal.get(), 1).size(), 500u);
  AppendN(wal.get(), 10, 3000, 2);
  auto recs = ReadAll(wal.get(), 495);
  ASSERT_EQ(recs.size(), 16u);
  EXPECT_EQ(recs.back().lsn, 510u);
  EXPECT_EQ(recs.back().epoch, 2u);
  EXPECT_EQ(recs.back().payload, Payload(510, 3000));
  EXPECT_EQ(wal->EndOfEpoch(1).end_lsn, 500u);
}

TEST_P(WalVariantTest, ConcurrentAppendersShareGroups) {
  auto wal = OpenOrDie(dir_.path(), Opts());
  constexpr int kThreads = 8, kPerThread = 150;
  std::vector<std::vector<Lsn>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        std::string p = "t" + std::to_string(t) + "-" + std::to_string(i) + Payload(t * 1000 + i, 50);
        auto lsn = wal->Append(1, RecordType::kData, p);
        ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
        got[t].push_back(*lsn);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::set<Lsn> all;
  for (int t = 0; t < kThreads; ++t) {
    // A thread's appends keep their order.
    EXPECT_TRUE(std::is_sorted(got[t].begin(), got[t].end()));
    all.insert(got[t].begin(), got[t].end());
  }
  ASSERT_EQ(all.size(), size_t{kThreads * kPerThread});
  EXPECT_EQ(*all.begin(), 1u);
  EXPECT_EQ(*all.rbegin(), Lsn{kThreads * kPerThread});  // gap-free
  auto recs = ReadAll(wal.get(), 1);
  ASSERT_EQ(recs.size(), all.size());
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kPerThread; ++i) {
      std::string p = "t" + std::to_string(t) + "-" + std::to_string(i) + Payload(t * 1000 + i, 50);
      EXPECT_EQ(recs[got[t][i] - 1].payload, p);
    }
  }
  if (GetParam().sync == SyncPolicy::kEveryCommit) {
    WalStats s = wal->stats();
    EXPECT_EQ(s.records, all.size());
    // One fdatasync per group, and 8 appenders waiting on ~200 µs syncs do group.
    EXPECT_LT(s.groups, s.records);
    EXPECT_EQ(s.syncs, s.groups);
    // Each fdatasync is timed into exactly one latency bucket.
    uint64_t bucketed = 0;
    for (uint64_t n : s.sync_buckets) bucketed += n;
    EXPECT_EQ(bucketed, s.syncs);
    EXPECT_GT(s.sync_micros, 0u);
    // Every wait for a group ended one way (no maintenance op, no close yet).
    EXPECT_LE(s.gathers_patient, s.gathers);
    EXPECT_EQ(s.gathers_filled + s.gathers_timed_out, s.gathers);
    EXPECT_EQ(s.gathers_cut_short, 0u);
  }
}

// Records of several KiB (written with writev, uncopied, when plain) cross
// segment boundaries exactly like small ones and read back intact.
TEST_P(WalVariantTest, LargeRecordsRollSegmentsAndReadBack) {
  std::vector<std::string> payloads;
  {
    auto wal = OpenOrDie(dir_.path(), Opts());
    for (int b = 0; b < 6; ++b) {
      std::vector<std::string> chunk;
      for (int i = 0; i < 5; ++i) chunk.push_back(Payload(static_cast<Lsn>(b * 10 + i), 4000 + static_cast<size_t>(i) * 1500));
      std::vector<RecordIn> in;
      for (const auto& p : chunk) in.push_back(RecordIn{RecordType::kData, p});
      auto last = wal->AppendBatch(1, in.data(), in.size());
      ASSERT_TRUE(last.ok()) << last.status().ToString();
      EXPECT_EQ(*last, Lsn{static_cast<uint64_t>(b + 1) * 5});
      payloads.insert(payloads.end(), chunk.begin(), chunk.end());
    }
    EXPECT_GT(wal->segments().size(), 5u);
    ASSERT_TRUE(wal->Close().ok());
  }
  auto wal = OpenOrDie(dir_.path(), Opts());
  EXPECT_FALSE(wal->recovery().torn_tail);
  auto recs = ReadAll(wal.get(), 1);
  ASSERT_EQ(recs.size(), payloads.size());
  for (size_t i = 0; i < recs.size(); ++i) {
    EXPECT_EQ(recs[i].lsn, i + 1);
    EXPECT_TRUE(recs[i].payload == payloads[i]) << "LSN " << i + 1;
  }
}

// Close while appenders are queued or writing: every append either returns
// an LSN, which is in the log after reopening, or is refused as closed; no
// appender is left waiting.
TEST_P(WalVariantTest, CloseWhileAppendersRunLosesNothingAcknowledged) {
  auto wal = OpenOrDie(dir_.path(), Opts());
  constexpr int kThreads = 6;
  std::vector<std::vector<Lsn>> acked(kThreads);
  std::vector<Status> ended(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0;; ++i) {
        auto lsn = wal->Append(1, RecordType::kData, "t" + std::to_string(t) + "-" + std::to_string(i));
        if (!lsn.ok()) {
          ended[t] = lsn.status();
          return;
        }
        acked[t].push_back(*lsn);
      }
    });
  }
  ASSERT_TRUE(test::Eventually([&] { return wal->last_lsn() >= 3000; }));
  ASSERT_TRUE(wal->Close().ok());
  for (auto& th : threads) th.join();
  std::set<Lsn> all;
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_TRUE(ended[t].IsAborted()) << ended[t].ToString();
    all.insert(acked[t].begin(), acked[t].end());
  }
  auto reopened = OpenOrDie(dir_.path(), Opts());
  EXPECT_FALSE(reopened->recovery().torn_tail);
  auto recs = ReadAll(reopened.get(), 1);
  ASSERT_EQ(recs.size(), reopened->last_lsn());
  // Acknowledged is written: the log holds exactly the acknowledged records.
  ASSERT_EQ(all.size(), recs.size());
  EXPECT_EQ(*all.rbegin(), reopened->last_lsn());
  for (int t = 0; t < kThreads; ++t) {
    for (size_t i = 0; i < acked[t].size(); ++i) {
      EXPECT_EQ(recs[acked[t][i] - 1].payload, "t" + std::to_string(t) + "-" + std::to_string(i));
    }
  }
}

// Without group commit appenders write their own records, or combine;
// Sync, Purge and Truncate still go through the queue. They must exclude
// one another: a Sync covers every append that returned before it, a Purge
// never cuts the segment being written, and the log stays gap-free.
TEST_P(WalVariantTest, AppendersInterleaveWithSyncPurgeAndTruncate) {
  auto wal = OpenOrDie(dir_.path(), Opts());
  constexpr int kThreads = 4, kPerThread = 400;
  std::atomic<int> running{kThreads};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        auto lsn = wal->Append(1, RecordType::kData, Payload(static_cast<Lsn>(t * 1000 + i), 200));
        ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
      }
      --running;
    });
  }
  int syncs = 0;
  while (running.load() > 0) {
    const Lsn before = wal->last_lsn();
    ASSERT_TRUE(wal->Sync().ok());
    EXPECT_GE(wal->durable_lsn(), before);
    ++syncs;
    // Keep the newest records; everything at or below half goes if whole segments allow.
    auto first = wal->Purge(before / 2);
    ASSERT_TRUE(first.ok()) << first.status().ToString();
    EXPECT_LE(*first, before / 2 + 1);
  }
  for (auto& th : threads) th.join();
  EXPECT_GT(syncs, 0);
  const Lsn last = wal->last_lsn();
  ASSERT_EQ(last, Lsn{kThreads * kPerThread});
  // A truncation after all that leaves a log that ends exactly where asked
  // (at a frame boundary: a lone append starts its own frame, while the
  // concurrent ones may share LZ4 blocks).
  auto solo = wal->Append(1, RecordType::kData, "alone");
  ASSERT_TRUE(solo.ok());
  ASSERT_EQ(*solo, last + 1);
  ASSERT_TRUE(wal->Truncate(last).ok());
  EXPECT_EQ(wal->last_lsn(), last);
  auto more = wal->Append(1, RecordType::kData, "after the cut");
  ASSERT_TRUE(more.ok());
  EXPECT_EQ(*more, last + 1);
  auto recs = ReadAll(wal.get(), wal->first_lsn());
  ASSERT_FALSE(recs.empty());
  EXPECT_EQ(recs.back().lsn, last + 1);
  EXPECT_EQ(recs.back().payload, "after the cut");
  for (size_t i = 1; i < recs.size(); ++i) ASSERT_EQ(recs[i].lsn, recs[i - 1].lsn + 1);
  ASSERT_TRUE(wal->Close().ok());
  auto reopened = OpenOrDie(dir_.path(), Opts());
  EXPECT_FALSE(reopened->recovery().torn_tail);
  EXPECT_EQ(reopened->last_lsn(), last + 1);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, WalVariantTest,
    ::testing::Values(Variant{false, SyncPolicy::kEveryCommit}, Variant{true, SyncPolicy::kEveryCommit},
                      Variant{false, SyncPolicy::kInterval}, Variant{true, SyncPolicy::kNone}),
    [](const auto& info) {
      return std::string(info.param.compress ? "Lz4" : "Plain") + "_" + SyncPolicyName(info.param.sync);
    });

// Under kNone and kInterval, appenders that find the writer lock taken
// queue, and one write() carries all their records (Wal::Combine). The
// first group's on_written hook, which runs under the writer lock, holds
// it until the seven other appenders are queued behind it.
TEST(WalTest, UnsyncedAppendersThatFindTheWriterBusyShareOneWrite) {
  for (SyncPolicy policy : {SyncPolicy::kNone, SyncPolicy::kInterval}) {
    SCOPED_TRACE(SyncPolicyName(policy));
    TempDir dir;
    constexpr int kThreads = 8;
    Wal* log = nullptr;
    std::atomic<bool> first{true};
    Options o;
    o.sync_policy = policy;
    o.on_written = [&] {
      if (!first.exchange(false)) return;
      EXPECT_TRUE(test::Eventually([&] { return log->stats().queued == kThreads - 1; }));
    };
    auto wal = OpenOrDie(dir.path(), o);
    log = wal.get();
    std::vector<Lsn> got(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        auto lsn = wal->Append(1, RecordType::kData, "record " + std::to_string(t));
        ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
        got[t] = *lsn;
      });
    }
    for (auto& th : threads) th.join();
    const WalStats st = wal->stats();
    EXPECT_EQ(st.records, uint64_t{kThreads});
    // The appender the hook held wrote alone; the seven queued behind it
    // shared one write.
    EXPECT_LT(st.groups, st.records);
    EXPECT_EQ(st.groups, 2u);
    EXPECT_EQ(st.queued, 0u);
    auto recs = ReadAll(wal.get(), 1);
    ASSERT_EQ(recs.size(), size_t{kThreads});
    for (int t = 0; t < kThreads; ++t) EXPECT_EQ(recs[got[t] - 1].payload, "record " + std::to_string(t));
  }
}

TEST(WalTest, TheSegmentBeingWrittenIsReservedAndEveryFinishedOneEndsAtItsLastFrame) {
  for (SyncPolicy sync : {SyncPolicy::kEveryCommit, SyncPolicy::kInterval, SyncPolicy::kNone}) {
    test::TempDir dir;
    Options o;
    o.segment_size = 64 << 10;
    o.sync_policy = sync;
    auto wal = test::OpenOrDie(dir.path(), o);
    test::AppendN(wal.get(), 1500, 100);  // about 3 segments
    ASSERT_TRUE(wal->Sync().ok());
    const auto segs = wal->segments();
    ASSERT_GE(segs.size(), 3u) << SyncPolicyName(sync);
    for (size_t i = 0; i + 1 < segs.size(); ++i) {
      EXPECT_EQ(test::FileSize(segs[i].path), segs[i].size) << SyncPolicyName(sync) << " segment " << i;
    }
    // No reservation without fsync: it only makes fdatasync cheaper.
    const uint64_t reserved = sync == SyncPolicy::kNone ? segs.back().size : o.segment_size;
    EXPECT_EQ(test::FileSize(segs.back().path), reserved) << SyncPolicyName(sync);
    ASSERT_TRUE(wal->Close().ok());
    EXPECT_EQ(test::FileSize(segs.back().path), segs.back().size) << SyncPolicyName(sync);
    // Reopened, the last segment is reserved again and the log goes on.
    auto again = test::OpenOrDie(dir.path(), o);
    EXPECT_EQ(test::FileSize(segs.back().path), reserved) << SyncPolicyName(sync);
    test::AppendN(again.get(), 1, 100);
    EXPECT_EQ(test::ReadAll(again.get(), 1).size(), 1501u);
  }
}

TEST(WalTest, ReservingLeavesTheLastOfTheDiskToOthers) {
  test::TempDir dir;
  test::TinyDisk disk(dir.Sub("disk"), "4m");
  if (!disk.mounted()) GTEST_SKIP() << "needs root to mount a small tmpfs";
  Options o;
  o.segment_size = 1 << 20;
  auto small = test::OpenOrDie(dir.Sub("disk/a"), o);
  EXPECT_EQ(test::FileSize(small->segments().back().path), o.segment_size) << "4 MiB free: 1 MiB is reserved";
  // 3 MiB would leave less than that for everything else: not reserved, and
  // the log works as before.
  o.segment_size = 3 << 20;
  auto big = test::OpenOrDie(dir.Sub("disk/b"), o);
  test::AppendN(big.get(), 100, 100);
  EXPECT_EQ(test::FileSize(big->segments().back().path), big->segments().back().size);
  EXPECT_EQ(test::ReadAll(big.get(), 1).size(), 100u);
  big.reset();
  small.reset();
}

// on_written comes once per group written, from the writing thread, when a
// reader can already see the group and (under every-commit) before its
// fdatasync has made it durable.
TEST(WalTest, OnWrittenSeesEachGroupBeforeItIsDurable) {
  TempDir dir;
  wal::Wal* w = nullptr;
  std::unique_ptr<wal::Reader> reader;
  std::vector<std::pair<Lsn, Lsn>> seen;  // (last_lsn, durable_lsn) at each call
  std::vector<Lsn> read_up_to;
  std::thread::id caller;
  Options o;
  o.segment_size = 16 << 10;
  o.on_written = [&] {
    seen.emplace_back(w->last_lsn(), w->durable_lsn());
    caller = std::this_thread::get_id();
    Lsn last = read_up_to.empty() ? 0 : read_up_to.back();
    wal::RecordView rec;
    for (;;) {
      auto got = reader->Next(&rec);
      if (!got.ok() || !*got) break;
      last = rec.lsn;
    }
    read_up_to.push_back(last);
  };
  auto wal = OpenOrDie(dir.path(), o);
  w = wal.get();
  auto r = wal->NewReader(1);
  ASSERT_TRUE(r.ok());
  reader = std::move(r).value();
  AppendN(wal.get(), 300, 100);  // rolls segments too
  ASSERT_EQ(seen.size(), 300u);  // one appender: a group per record
  EXPECT_EQ(caller, std::this_thread::get_id());
  for (size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].first, i + 1);
    EXPECT_EQ(seen[i].second, i) << "record " << i + 1 << " was durable before on_written";
    EXPECT_EQ(read_up_to[i], i + 1) << "a reader could not see record " << i + 1;
  }
}

TEST(WalTest, BytesAfterCountsWhatAReplicaLacks) {
  TempDir dir;
  Options o;
  o.segment_size = 4096;  // about 28 records of 100 bytes per segment
  auto wal = OpenOrDie(dir.path(), o);
  AppendN(wal.get(), 200, 100);
  const uint64_t frame = 100 + kFrameHeaderSize;
  EXPECT_EQ(wal->BytesAfter(200), 0u);
  EXPECT_EQ(wal->BytesAfter(0), 200 * frame);
  EXPECT_EQ(wal->BytesAfter(199), frame);
  // Inside a segment the average record size is used: exact here, since
  // every record has the same size.
  EXPECT_EQ(wal->BytesAfter(123), 77 * frame);
  const auto segs = wal->segments();
  ASSERT_GT(segs.size(), 3u);
  EXPECT_EQ(wal->BytesAfter(segs[1].last_lsn), (200 - segs[1].last_lsn) * frame);
}

TEST(WalTest, IntervalPolicyBecomesDurableWithoutBeingAsked) {
  TempDir dir;
  Options o;
  o.sync_policy = SyncPolicy::kInterval;
  o.sync_interval = std::chrono::milliseconds(5);
  auto wal = OpenOrDie(dir.path(), o);
  AppendN(wal.get(), 20, 100);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (wal->durable_lsn() < 20 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_EQ(wal->durable_lsn(), 20u);
  const WalStats s = wal->stats();
  EXPECT_GE(s.syncs, 1u);
  uint64_t bucketed = 0;
  for (uint64_t n : s.sync_buckets) bucketed += n;
  EXPECT_EQ(bucketed, s.syncs);  // the interval thread's fdatasyncs are timed too
}

TEST(WalTest, ExplicitSyncUnderNoSyncPolicy) {
  TempDir dir;
  Options o;
  o.sync_policy = SyncPolicy::kNone;
  auto wal = OpenOrDie(dir.path(), o);
  AppendN(wal.get(), 5, 10);
  EXPECT_EQ(wal->durable_lsn(), 0u);
  ASSERT_TRUE(wal->Sync().ok());
  EXPECT_EQ(wal->durable_lsn(), 5u);
}

TEST(WalTest, RefusesBadInput) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path());
  EXPECT_EQ(wal->Append(0, RecordType::kData, "x").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(wal->AppendBatch(1, nullptr, 0).status().code(), StatusCode::kInvalidArgument);
  std::string huge(kMaxRecordPayload + 1, 'x');
  EXPECT_EQ(wal->Append(1, RecordType::kData, huge).status().code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(wal->Append(5, RecordType::kData, "x").ok());
  // Lower epochs are refused once a higher one is written.
  EXPECT_TRUE(wal->Append(4, RecordType::kData, "x").status().IsStaleEpoch());
  EXPECT_TRUE(wal->Append(5, RecordType::kData, "y").ok());
  EXPECT_EQ(wal->last_lsn(), 2u);  // the refused append took no LSN
  // Nor an fdatasync: it wrote nothing (the default policy syncs every commit).
  const uint64_t syncs = wal->stats().syncs;
  EXPECT_TRUE(wal->Append(4, RecordType::kData, "x").status().IsStaleEpoch());
  EXPECT_EQ(wal->stats().syncs, syncs);
  Options bad;
  bad.segment_size = 100;
  EXPECT_EQ(Wal::Open(dir.Sub("x"), bad).status().code(), StatusCode::kInvalidArgument);
}

// A leader waiting for its group's appenders stops waiting as soon as an op
// that cannot join the group (here a Purge) is queued behind it: the group
// runs as it stands, then the Purge. Appenders and a purger race until that
// has happened at least once; every wait is accounted for and the log stays
// whole.
TEST(WalTest, AGatherIsCutShortByAnOpThatCannotJoinIt) {
  TempDir dir;
  Options o;
  o.sync_policy = SyncPolicy::kEveryCommit;
  o.segment_size = 16 << 10;
  auto wal = OpenOrDie(dir.path(), o);
  constexpr int kThreads = 8;
  std::atomic<bool> stop{false};
  std::vector<std::vector<Lsn>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      while (!stop.load()) {
        auto lsn = wal->Append(1, RecordType::kData, Payload(t, 60));
        ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
        got[t].push_back(*lsn);
      }
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  uint64_t purges = 0;
  bool too_fast = false;  // fdatasync of a few µs (tmpfs): a gather waits for next to nothing
  for (;;) {
    const WalStats now = wal->stats();
    if (now.gathers_cut_short > 0 || std::chrono::steady_clock::now() >= deadline) break;
    if (now.syncs >= 200 && now.sync_micros < 20 * now.syncs) {
      too_fast = true;
      break;
    }
    const Lsn last = wal->last_lsn();
    auto purged = wal->Purge(last > 200 ? last - 200 : 0);
    if (!purged.ok()) {
      ADD_FAILURE() << purged.status().ToString();
      break;  // the appenders must still be stopped and joined
    }
    ++purges;
  }
  stop = true;
  for (auto& th : threads) th.join();
  const WalStats s = wal->stats();
  if (too_fast && s.gathers_cut_short == 0) {
    GTEST_SKIP() << "fdatasync takes " << s.sync_micros / s.syncs << " µs here: gathers end before a purge arrives";
  }
  EXPECT_GT(s.gathers_cut_short, 0u) << "no gather was cut short in " << purges << " purges and " << s.gathers
                                     << " gathers";
  EXPECT_EQ(s.gathers_filled + s.gathers_timed_out + s.gathers_cut_short, s.gathers);
  // Every append kept its order and the retained log is gap-free and whole.
  for (int t = 0; t < kThreads; ++t) EXPECT_TRUE(std::is_sorted(got[t].begin(), got[t].end()));
  const Lsn first = wal->first_lsn();
  auto recs = ReadAll(wal.get(), first);
  ASSERT_EQ(recs.size(), wal->last_lsn() - first + 1);
  for (size_t i = 0; i < recs.size(); ++i) EXPECT_EQ(recs[i].lsn, first + i);
}

TEST(WalTest, BatchGetsConsecutiveLsns) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path());
  std::vector<RecordIn> batch{{RecordType::kData, "a"}, {RecordType::kEpochStart, "b"}, {RecordType::kData, "c"}};
  auto last = wal->AppendBatch(1, batch.data(), batch.size());
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, 3u);
  auto recs = ReadAll(wal.get(), 1);
  ASSERT_EQ(recs.size(), 3u);
  EXPECT_EQ(recs[1].type, static_cast<uint8_t>(RecordType::kEpochStart));
  EXPECT_EQ(recs[2].payload, "c");
}

TEST(WalTest, SecondWriterIsRefusedReadOnlyIsNot) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path());
  AppendN(wal.get(), 3, 10);
  auto second = Wal::Open(dir.path(), Options{});
  EXPECT_EQ(second.status().code(), StatusCode::kBusy) << second.status().ToString();
  Options ro;
  ro.read_only = true;
  auto inspector = OpenOrDie(dir.path(), ro);
  EXPECT_EQ(inspector->last_lsn(), 3u);
  EXPECT_EQ(inspector->Append(1, RecordType::kData, "x").status().code(), StatusCode::kNotSupported);
  EXPECT_EQ(ReadAll(inspector.get(), 1).size(), 3u);
}

TEST(WalTest, ReadOnlyOnMissingDirIsNotFound) {
  TempDir dir;
  Options ro;
  ro.read_only = true;
  EXPECT_TRUE(Wal::Open(dir.Sub("absent"), ro).status().IsNotFound());
}

TEST(WalTest, EntriesThatAreNotRegularFiles) {
  TempDir dir;
  OpenOrDie(dir.path()).reset();
  // A directory whose name ends in .tmp is not a leftover of ours: left alone.
  std::filesystem::create_directory(dir.Sub("junk.tmp"));
  {
    auto wal = Wal::Open(dir.path(), Options{});
    ASSERT_TRUE(wal.ok()) << wal.status().ToString();
  }
  EXPECT_TRUE(std::filesystem::is_directory(dir.Sub("junk.tmp")));
  // So is a dangling symlink (Open failed with a bare NotFound).
  std::filesystem::create_symlink("/nonexistent/target", dir.Sub("dangling.tmp"));
  {
    auto wal = Wal::Open(dir.path(), Options{});
    ASSERT_TRUE(wal.ok()) << wal.status().ToString();
  }
  EXPECT_TRUE(std::filesystem::is_symlink(dir.Sub("dangling.tmp")));
  // A directory named like a segment is refused by name, read-only too.
  const std::string odd = dir.Sub(SegmentFileName(9999));
  std::filesystem::create_directory(odd);
  Options ro;
  ro.read_only = true;
  for (const Options& o : {Options{}, ro}) {
    auto st = Wal::Open(dir.path(), o).status();
    EXPECT_TRUE(st.IsCorruption()) << st.ToString();
    EXPECT_NE(st.message().find(odd + " is named like a segment but is not a regular file"), std::string::npos)
        << st.ToString();
  }
  // A lone segment without a header: read-only says which file it found.
  TempDir empty;
  const std::string seg = empty.Sub(SegmentFileName(1));
  test::WriteFileBytes(seg, "");
  auto st = Wal::Open(empty.path(), ro).status();
  EXPECT_TRUE(st.IsNotFound()) << st.ToString();
  EXPECT_NE(st.message().find(seg + " holds no segment header"), std::string::npos) << st.ToString();
  auto wal = OpenOrDie(empty.path());
  EXPECT_EQ(wal->first_lsn(), 1u);
}

TEST(WalTest, StartLsnForSeededLog) {
  TempDir dir;
  Options o;
  o.start_lsn = 1001;
  auto wal = OpenOrDie(dir.path(), o);
  EXPECT_EQ(wal->first_lsn(), 1001u);
  EXPECT_EQ(wal->last_lsn(), 1000u);
  auto lsn = wal->Append(1, RecordType::kData, "x");
  ASSERT_TRUE(lsn.ok());
  EXPECT_EQ(*lsn, 1001u);
  EXPECT_TRUE(wal->NewReader(1000).status().IsPurged());
}

// A record's LSN is at most kMaxLsn (lsn + count must not overflow, or
// readers refuse the frame): the writer stops there instead of wrapping.
TEST(WalTest, LsnsStopAtTheLargestTheFormatHolds) {
  EXPECT_EQ(kMaxLsn, UINT64_MAX - 1);
  for (SyncPolicy policy : {SyncPolicy::kEveryCommit, SyncPolicy::kNone}) {
    SCOPED_TRACE(SyncPolicyName(policy));
    TempDir dir;
    Options o;
    o.sync_policy = policy;
    o.start_lsn = kMaxLsn + 1;
    EXPECT_EQ(Wal::Open(dir.path(), o).status().code(), StatusCode::kInvalidArgument);
    o.start_lsn = kMaxLsn - 2;
    {
      auto wal = OpenOrDie(dir.path(), o);
      std::vector<RecordIn> four(4, RecordIn{RecordType::kData, "b"});
      EXPECT_EQ(wal->AppendBatch(1, four.data(), four.size()).status().code(), StatusCode::kInvalidArgument);
      auto first = wal->Append(1, RecordType::kData, "a");
      ASSERT_TRUE(first.ok()) << first.status().ToString();
      EXPECT_EQ(*first, kMaxLsn - 2);
      auto last = wal->AppendBatch(1, four.data(), 2);
      ASSERT_TRUE(last.ok()) << last.status().ToString();
      EXPECT_EQ(*last, kMaxLsn);
      auto past = wal->Append(1, RecordType::kData, "c");
      EXPECT_EQ(past.status().code(), StatusCode::kInvalidArgument) << (past.ok() ? std::to_string(*past) : "");
      std::string raw;
      EncodeRecordFrame(UINT64_MAX, 1, RecordType::kData, "d", &raw);
      EXPECT_FALSE(wal->AppendRaw(raw).ok());
      // Refusals of one request: the log is not failed.
      EXPECT_TRUE(wal->Sync().ok());
      EXPECT_EQ(wal->last_lsn(), kMaxLsn);
      ASSERT_TRUE(wal->Close().ok());
    }
    auto wal = OpenOrDie(dir.path(), o);
    EXPECT_EQ(wal->last_lsn(), kMaxLsn);
    auto recs = ReadAll(wal.get(), kMaxLsn - 2);
    ASSERT_EQ(recs.size(), 3u);
    EXPECT_EQ(recs.back().lsn, kMaxLsn);
  }
}

TEST(WalTest, AppendAfterCloseIsAborted) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path());
  ASSERT_TRUE(wal->Close().ok());
  EXPECT_TRUE(wal->Append(1, RecordType::kData, "x").status().IsAborted());
  EXPECT_TRUE(wal->Close().ok());  // idempotent
}

}  // namespace
}  // namespace replica::wal
