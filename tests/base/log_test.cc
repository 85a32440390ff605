// ProgressText: the progress of long work as log lines and displays show it.
#include <gtest/gtest.h>

#include "base/log.h"

namespace replica {
namespace {

TEST(ProgressTextTest, BytesWithRateAndTimeLeft) {
  EXPECT_EQ(ProgressText(120ull << 20, 240ull << 20, 4.0, true), "120.0 of 240.0 MiB (50%), 30.0 MiB/s, about 4 s left");
}

TEST(ProgressTextTest, RecordsAndEdgeCases) {
  EXPECT_EQ(ProgressText(2000, 10000, 1.0, false), "2000 of 10000 records (20%), 2000 records/s, about 4 s left");
  // No time yet: no rate, no estimate.
  EXPECT_EQ(ProgressText(0, 10000, 0.0, false), "0 of 10000 records (0%), 0 records/s");
  // Past an estimated total: capped at 100%, nothing left to estimate.
  EXPECT_EQ(ProgressText(300ull << 20, 200ull << 20, 2.0, true), "300.0 of 200.0 MiB (100%), 150.0 MiB/s");
  // Unknown total.
  EXPECT_EQ(ProgressText(10, 0, 1.0, false), "10 of 0 records, 10 records/s");
}

}  // namespace
}  // namespace replica
