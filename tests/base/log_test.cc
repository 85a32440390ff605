// Log lines (one event, one line, whatever it holds) and ProgressText: the
// progress of long work as log lines and displays show it.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>

#include "base/log.h"
#include "tests/support/test_util.h"

namespace replica {
namespace {

using test::CapturedStderr;

// A peer's text that holds a newline and a well-formed line after it (as an
// unauthenticated peer's Error message did) stays on its own event's line.
TEST(LogTest, ControlCharactersAreEscapedSoAnEventIsOneLine) {
  const std::string forged =
      "x\"\n2026-12-02T00:00:00.000Z WARN engine.promoted node=evil\r\x01\x1b[2J\x7f\tend";
  const std::string out = CapturedStderr([&] { RLOG(kWarn, "test.event") << "reason=\"" << forged << "\""; });
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.find('\n'), out.size() - 1) << out;
  EXPECT_EQ(out.find('\r'), std::string::npos) << out;
  EXPECT_NE(out.find(" WARN test.event reason=\"x\"\\n2026-12-02T00:00:00.000Z WARN engine.promoted node=evil"
                     "\\r\\x01\\x1b[2J\\x7f\\x09end\"\n"),
            std::string::npos)
      << out;
}

TEST(LogTest, EscapeControlLeavesOtherBytesAlone) {
  EXPECT_EQ(EscapeControl("plain text, \"quoted\" \\ and UTF-8 \xc3\xa9"), "plain text, \"quoted\" \\ and UTF-8 \xc3\xa9");
  EXPECT_EQ(EscapeControl(std::string("a\0b\n", 4)), "a\\x00b\\n");
  EXPECT_EQ(EscapeControl(""), "");
}

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
