// GatherPolicy: when the leader of a commit group may wait patiently for the
// appenders it expects (wal/gather_policy.h).

#include "wal/gather_policy.h"

#include <gtest/gtest.h>

namespace replica::wal {
namespace {

using std::chrono::microseconds;

TEST(GatherPolicyTest, StartsImpatientWithAQuarterOfTheLastSyncAtMost100us) {
  GatherPolicy p;
  EXPECT_FALSE(p.patient());
  EXPECT_EQ(p.Wait(microseconds(200)), microseconds(50));
  EXPECT_EQ(p.Wait(microseconds(1000)), microseconds(100));  // capped
}

TEST(GatherPolicyTest, GroupsThatKeepFillingMakeItPatient) {
  GatherPolicy p;
  int fills = 0;
  while (!p.patient() && fills < 1000) {
    p.Filled();
    ++fills;
  }
  ASSERT_TRUE(p.patient());
  // Not after a handful: the moving average needs a run of full groups.
  EXPECT_EQ(fills, 70);
  // Patient: four fdatasyncs, at most 2 ms, so that the leader outsleeps
  // the group it handed over.
  EXPECT_EQ(p.Wait(microseconds(200)), microseconds(800));
  EXPECT_EQ(p.Wait(microseconds(1000)), microseconds(2000));
}

TEST(GatherPolicyTest, OneTimeOutEndsPatienceUntilGroupsFillAgain) {
  GatherPolicy p;
  for (int i = 0; i < 200; ++i) p.Filled();
  ASSERT_TRUE(p.patient());
  p.TimedOut();
  EXPECT_FALSE(p.patient());
  EXPECT_EQ(p.Wait(microseconds(200)), microseconds(50));
  int fills = 0;
  while (!p.patient() && fills < 1000) {
    p.Filled();
    ++fills;
  }
  EXPECT_EQ(fills, 29);
}

TEST(GatherPolicyTest, RegularTimeOutsKeepItImpatient) {
  // One gather in ten timing out: a patient wait would cost its group up to
  // four fdatasyncs that often, so the policy never gets there.
  GatherPolicy p;
  for (int round = 0; round < 1000; ++round) {
    p.TimedOut();
    for (int i = 0; i < 9; ++i) {
      p.Filled();
      EXPECT_FALSE(p.patient()) << "round " << round << ", fill " << i;
    }
  }
}

}  // namespace
}  // namespace replica::wal
