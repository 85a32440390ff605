// Suffix truncation and prefix purge, including interruption at every step.
#include <gtest/gtest.h>

#include "base/fault_env.h"
#include "tests/support/test_util.h"
#include "wal/wal.h"

namespace replica::wal {
namespace {

using test::AppendN;
using test::OpenOrDie;
using test::Payload;
using test::ReadAll;
using test::TempDir;

Options Opts(Env* env = nullptr) {
  Options o;
  o.segment_size = 8 << 10;
  o.env = env;
  return o;
}

// Epoch 1 for LSN 1..100, epoch 2 for 101..200, epoch 3 for 201..300.
void BuildThreeEpochs(Wal* wal) {
  AppendN(wal, 100, 100, 1);
  AppendN(wal, 100, 100, 2);
  AppendN(wal, 100, 100, 3);
}

// Every record present is the one originally written at its LSN.
void ExpectCleanPrefix(Wal* wal, Lsn min_last, Lsn max_last) {
  EXPECT_GE(wal->last_lsn(), min_last);
  EXPECT_LE(wal->last_lsn(), max_last);
  auto recs = ReadAll(wal, wal->first_lsn());
  ASSERT_EQ(recs.size(), wal->last_lsn() - wal->first_lsn() + 1);
  for (const auto& r : recs) {
    ASSERT_EQ(r.payload, Payload(r.lsn, 100)) << "LSN " << r.lsn;
    ASSERT_EQ(r.epoch, (r.lsn - 1) / 100 + 1) << "LSN " << r.lsn;
  }
  const EpochHistory history = wal->epoch_history();
  for (const auto& e : history.entries()) EXPECT_LE(e.first_lsn, wal->last_lsn());
}

TEST(TruncateTest, CutsTheTailAndTheEpochHistory) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Opts());
  BuildThreeEpochs(wal.get());
  const size_t segs_before = wal->segments().size();
  ASSERT_TRUE(wal->Truncate(150).ok());
  EXPECT_EQ(wal->last_lsn(), 150u);
  EXPECT_EQ(wal->last_epoch(), 2u);
  EXPECT_LT(wal->segments().size(), segs_before);
  ExpectCleanPrefix(wal.get(), 150, 150);
  // Epoch 2 ended at 150 now; a new epoch continues at 151.
  EXPECT_EQ(wal->EndOfEpoch(2).end_lsn, 150u);
  AppendN(wal.get(), 5, 10, 5);
  EXPECT_EQ(wal->EndOfEpoch(3).epoch, 2u);
  EXPECT_EQ(wal->EndOfEpoch(3).end_lsn, 150u);
  ASSERT_TRUE(wal->Close().ok());
  auto again = OpenOrDie(dir.path(), Opts());
  EXPECT_EQ(again->last_lsn(), 155u);
  EXPECT_EQ(again->epoch_history().entries().back(), (EpochEntry{5, 151}));
}

TEST(TruncateTest, ToSegmentBoundariesAndToEmpty) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Opts());
  BuildThreeEpochs(wal.get());
  auto segs = wal->segments();
  ASSERT_GE(segs.size(), 3u);
  ASSERT_TRUE(wal->Truncate(segs[2].first_lsn - 1).ok());  // exactly at a boundary
  ExpectCleanPrefix(wal.get(), segs[2].first_lsn - 1, segs[2].first_lsn - 1);
  ASSERT_TRUE(wal->Truncate(0).ok());
  EXPECT_EQ(wal->last_lsn(), 0u);
  EXPECT_TRUE(wal->epoch_history().empty());
  EXPECT_EQ(wal->segments().size(), 1u);
  AppendN(wal.get(), 3, 100, 1);
  EXPECT_EQ(ReadAll(wal.get(), 1).size(), 3u);
}

TEST(TruncateTest, RefusesBadTargets) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Opts());
  AppendN(wal.get(), 10, 10);
  EXPECT_EQ(wal->Truncate(11).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(wal->Truncate(10).ok());  // nothing to do
  // Inside an LZ4 block.
  TempDir cdir;
  Options o = Opts();
  o.compress = true;
  auto cwal = OpenOrDie(cdir.path(), o);
  std::vector<std::string> ps(10, std::string(100, 'q'));
  std::vector<RecordIn> recs;
  for (auto& p : ps) recs.push_back({RecordType::kData, p});
  ASSERT_TRUE(cwal->AppendBatch(1, recs.data(), recs.size()).ok());
  ASSERT_TRUE(cwal->AppendBatch(1, recs.data(), recs.size()).ok());
  Status st = cwal->Truncate(15);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_TRUE(cwal->Truncate(10).ok());  // a block boundary
  EXPECT_EQ(cwal->last_lsn(), 10u);
}

TEST(TruncateTest, ReaderPastTheCutIsAborted) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Opts());
  AppendN(wal.get(), 50, 100);
  auto reader = wal->NewReader(40);
  ASSERT_TRUE(reader.ok());
  ASSERT_TRUE(wal->Truncate(30).ok());
  RecordView r;
  EXPECT_TRUE((*reader)->Next(&r).status().IsAborted());
}

TEST(TruncateTest, InterruptedAtEveryStep) {
  TempDir base;
  const std::string golden = base.Sub("golden");
  {
    auto wal = OpenOrDie(golden, Opts());
    BuildThreeEpochs(wal.get());
  }
  bool completed = false;
  for (int64_t step = 0; !completed && step < 100; ++step) {
    const std::string dir = base.Sub("step" + std::to_string(step));
    test::CopyDir(golden, dir);
    FaultInjectionEnv env(Env::Default());
    {
      auto wal = OpenOrDie(dir, Opts(&env));
      env.CrashAfterMutations(step);
      Status st = wal->Truncate(120);
      completed = st.ok();
      if (!completed) {
        EXPECT_TRUE(env.crashed()) << st.ToString();
        EXPECT_FALSE(wal->Append(9, RecordType::kData, "x").ok()) << "a failed truncation must be sticky";
      }
    }
    // Reopen as after a restart: a clean prefix between the target and the old end.
    auto wal = OpenOrDie(dir, Opts());
    ASSERT_NE(wal, nullptr) << "step " << step;
    ExpectCleanPrefix(wal.get(), 120, 300);
    if (completed) {
      EXPECT_EQ(wal->last_lsn(), 120u);
    }
    // Running the truncation again finishes the job.
    ASSERT_TRUE(wal->Truncate(120).ok()) << "step " << step;
    ExpectCleanPrefix(wal.get(), 120, 120);
    EXPECT_EQ(wal->last_epoch(), 2u);
  }
  EXPECT_TRUE(completed) << "truncation never completed within 100 mutations";
}

TEST(PurgeTest, RemovesWholeSegmentsOnly) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Opts());
  BuildThreeEpochs(wal.get());
  auto segs = wal->segments();
  ASSERT_GE(segs.size(), 4u);
  // Up to just before the end of segment 2: only segments 0 and 1 go.
  auto first = wal->Purge(segs[2].last_lsn - 1);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, segs[2].first_lsn);
  EXPECT_EQ(wal->segments().size(), segs.size() - 2);
  ExpectCleanPrefix(wal.get(), 300, 300);
  // Never the segment being written.
  ASSERT_TRUE(wal->Purge(UINT64_MAX).ok());
  EXPECT_EQ(wal->segments().size(), 1u);
  AppendN(wal.get(), 3, 100, 3);
  ASSERT_TRUE(wal->Close().ok());
  auto again = OpenOrDie(dir.path(), Opts());
  EXPECT_EQ(again->first_lsn(), wal->segments().front().first_lsn);
  EXPECT_EQ(again->last_lsn(), 303u);
  // The epoch history outlives the purged segments.
  EXPECT_EQ(again->EndOfEpoch(1).end_lsn, 100u);
}

TEST(PurgeTest, RetentionOptionRespectsTheFloor) {
  TempDir dir;
  Options o = Opts();
  o.retention_bytes = 24 << 10;
  auto wal = OpenOrDie(dir.path(), o);
  wal->SetRetentionFloor(50);  // a standby still needs LSN 50
  AppendN(wal.get(), 400, 100);
  EXPECT_LE(wal->first_lsn(), 50u);
  wal->SetRetentionFloor(UINT64_MAX);
  AppendN(wal.get(), 200, 100);
  EXPECT_GT(wal->first_lsn(), 50u);
  EXPECT_LE(wal->size_bytes(), (24u << 10) + (8u << 10) + 200);
  EXPECT_GT(wal->stats().segments_purged, 0u);
}

TEST(PurgeTest, InterruptedAtEveryStep) {
  TempDir base;
  const std::string golden = base.Sub("golden");
  Lsn target_first = 0;
  {
    auto wal = OpenOrDie(golden, Opts());
    BuildThreeEpochs(wal.get());
    target_first = wal->segments()[4].first_lsn;
  }
  bool completed = false;
  for (int64_t step = 0; !completed && step < 50; ++step) {
    const std::string dir = base.Sub("step" + std::to_string(step));
    test::CopyDir(golden, dir);
    FaultInjectionEnv env(Env::Default());
    {
      auto wal = OpenOrDie(dir, Opts(&env));
      env.CrashAfterMutations(step);
      completed = wal->Purge(target_first - 1).ok();
    }
    auto wal = OpenOrDie(dir, Opts());
    ASSERT_NE(wal, nullptr);
    EXPECT_GE(wal->first_lsn(), 1u);
    EXPECT_LE(wal->first_lsn(), target_first);
    ExpectCleanPrefix(wal.get(), 300, 300);
    ASSERT_TRUE(wal->Purge(target_first - 1).ok());
    EXPECT_EQ(wal->first_lsn(), target_first);
  }
  EXPECT_TRUE(completed);
}

}  // namespace
}  // namespace replica::wal
