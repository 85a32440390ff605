// waldump and walgen as a user runs them: real processes, exit codes, output.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>

#include "tests/support/test_util.h"

namespace replica {
namespace {

using test::TempDir;

struct ExecResult {
  int exit_code;
  std::string out;  // stdout and stderr together
};

ExecResult Exec(const std::string& cmd) {
  ExecResult r{-1, ""};
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

const std::string kDump = WALDUMP_PATH;
const std::string kGen = WALGEN_PATH;

TEST(WaldumpTest, PrintsRecordsAndSummary) {
  TempDir dir;
  const std::string wal = dir.Sub("wal");
  ASSERT_EQ(Exec(kGen + " " + wal + " --records 50 --size 33 --epoch 2 --log-level warn").exit_code, 0);
  ExecResult r = Exec(kDump + " " + wal);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("lsn=1 epoch=2 type=data size=33 checksum=ok"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("lsn=50 "), std::string::npos);
  EXPECT_NE(r.out.find("summary: 50 records, LSN 1..50"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("epoch 2 starts at LSN 1"), std::string::npos) << r.out;

  ExecResult from = Exec(kDump + " --from 48 --json " + wal);
  ASSERT_EQ(from.exit_code, 0) << from.out;
  EXPECT_EQ(from.out.find("\"lsn\":47,"), std::string::npos);
  EXPECT_NE(from.out.find("{\"lsn\":48,\"epoch\":2,\"type\":\"data\""), std::string::npos) << from.out;
  EXPECT_NE(from.out.find("\"summary\":{"), std::string::npos);
  EXPECT_NE(from.out.find("\"records\":3,"), std::string::npos) << from.out;
}

TEST(WaldumpTest, CorruptLogExitsOneAndSaysWhere) {
  TempDir dir;
  const std::string wal = dir.Sub("wal");
  ASSERT_EQ(Exec(kGen + " " + wal + " --records 20 --log-level warn").exit_code, 0);
  const std::string seg = test::SegmentPaths(wal).back();
  test::FlipBit(seg, 40 + 40 * 3 + 100 * 2 + 50, 2);  // inside record 3's payload
  ExecResult r = Exec(kDump + " " + wal);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("Corruption"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(seg), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("LSN 3"), std::string::npos) << r.out;
  // What is left before the damage is shown, with a summary that says it
  // stopped there (the damage is in the last segment, which Open scans).
  EXPECT_NE(r.out.find("lsn=2 epoch=1 type=data"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("lsn=3 "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("summary: 2 records, LSN 1..2"), std::string::npos) << r.out;
  ExecResult json = Exec(kDump + " --json " + wal);
  EXPECT_EQ(json.exit_code, 1) << json.out;
  EXPECT_NE(json.out.find("{\"lsn\":2,"), std::string::npos) << json.out;
  EXPECT_NE(json.out.find("\"records\":2,"), std::string::npos) << json.out;
  EXPECT_NE(json.out.find("\"ok\":false,\"error\":\"Corruption: segment "), std::string::npos) << json.out;
  // The log's bytes end at record 2; the file holds all 20 records.
  EXPECT_NE(json.out.find("\"log_bytes\":" + std::to_string(40 + 140 * 2) + ",\"file_bytes\":" +
                          std::to_string(test::FileSize(seg)) + ","),
            std::string::npos)
      << json.out;
}

TEST(WaldumpTest, LogBytesEndWhereReadingStopsInAnOlderSegment) {
  TempDir dir;
  const std::string wal = dir.Sub("wal");
  ASSERT_EQ(Exec(kGen + " " + wal + " --records 100 --segment-size 4096 --log-level warn").exit_code, 0);
  const auto segs = test::SegmentPaths(wal);
  ASSERT_GT(segs.size(), 2u);
  test::FlipBit(segs.front(), 40 + 140 * 2 + 40 + 50, 2);  // inside record 3's payload
  uint64_t file_bytes = 0;
  for (const auto& seg : segs) file_bytes += test::FileSize(seg);
  ExecResult json = Exec(kDump + " --json " + wal);
  EXPECT_EQ(json.exit_code, 1) << json.out;
  EXPECT_NE(json.out.find("\"records\":2,"), std::string::npos) << json.out;
  // Up to the end of record 2, not every segment's bytes.
  EXPECT_NE(json.out.find("\"log_bytes\":" + std::to_string(40 + 140 * 2) + ",\"file_bytes\":" +
                          std::to_string(file_bytes) + ","),
            std::string::npos)
      << json.out;
  ExecResult text = Exec(kDump + " --summary " + wal);
  EXPECT_EQ(text.exit_code, 1) << text.out;
  EXPECT_NE(text.out.find(std::to_string(40 + 140 * 2) + " log bytes"), std::string::npos) << text.out;
}

TEST(WaldumpTest, ADamagedEpochsFileHidesNoRecord) {
  TempDir dir;
  const std::string wal = dir.Sub("wal");
  ASSERT_EQ(Exec(kGen + " " + wal + " --records 60 --segment-size 4096 --epoch 3 --log-level warn").exit_code, 0);
  ASSERT_GT(test::SegmentPaths(wal).size(), 1u);
  test::FlipBit(wal + "/epochs", 20, 0);
  ExecResult r = Exec(kDump + " " + wal);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("lsn=1 epoch=3 type=data"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("lsn=60 epoch=3 type=data"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("summary: 60 records, LSN 1..60"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("epoch 3 starts at LSN 1"), std::string::npos) << "rebuilt from the segments: " << r.out;
  EXPECT_NE(r.out.find("epoch history: checksum mismatch"), std::string::npos) << r.out;
  ExecResult json = Exec(kDump + " --summary --json " + wal);
  EXPECT_EQ(json.exit_code, 1) << json.out;
  EXPECT_NE(json.out.find("\"records\":60,"), std::string::npos) << json.out;
  EXPECT_NE(json.out.find("\"history_damage\":\"" + wal + "/epochs: epoch history: checksum mismatch\""),
            std::string::npos)
      << json.out;
  EXPECT_NE(json.out.find("\"ok\":false,\"error\":\"Corruption: "), std::string::npos) << json.out;
}

TEST(WaldumpTest, JsonSaysWhyALogCannotBeOpened) {
  TempDir dir;
  ExecResult missing = Exec(kDump + " --json " + dir.Sub("absent"));
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.out.find("{\"summary\":{\"dir\":\"" + dir.Sub("absent") + "\",\"ok\":false,\"error\":\"NotFound: "),
            std::string::npos)
      << missing.out;
  const std::string wal = dir.Sub("wal");
  ASSERT_EQ(Exec(kGen + " " + wal + " --records 3 --log-level warn").exit_code, 0);
  test::FlipBit(test::SegmentPaths(wal).front(), 2, 1);  // the segment header's magic
  ExecResult bad = Exec(kDump + " --json " + wal);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.out.find("\"ok\":false,\"error\":\"Corruption: "), std::string::npos) << bad.out;
}

TEST(WaldumpTest, TornTailIsReportedNotRepaired) {
  TempDir dir;
  const std::string wal = dir.Sub("wal");
  ASSERT_EQ(Exec(kGen + " " + wal + " --records 10 --log-level warn").exit_code, 0);
  const std::string seg = test::SegmentPaths(wal).back();
  const uint64_t size = test::FileSize(seg);
  test::TruncateFileTo(seg, size - 7);
  ExecResult r = Exec(kDump + " --summary " + wal);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("torn tail"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("summary: 9 records"), std::string::npos) << r.out;
  EXPECT_EQ(test::FileSize(seg), size - 7) << "waldump must not change the log";
  ExecResult json = Exec(kDump + " --summary --json " + wal);
  EXPECT_EQ(json.exit_code, 0) << json.out;
  EXPECT_NE(json.out.find("\"torn_tail\":true,\"torn\":{\"segment\":\"" + seg + "\",\"offset\":"), std::string::npos)
      << json.out;
  EXPECT_NE(json.out.find("\"lost_page\":false,\"why\":\"frame of "), std::string::npos) << json.out;
}

TEST(WaldumpTest, JsonEscapesTheDirectory) {
  TempDir dir;
  const std::string wal = dir.Sub("a\"b\\c");
  ASSERT_EQ(Exec(kGen + " '" + wal + "' --records 3 --log-level warn").exit_code, 0);
  ExecResult r = Exec(kDump + " --summary --json '" + wal + "'");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("\"dir\":\"" + dir.path() + "/a\\\"b\\\\c\","), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"torn_tail\":false,\"epochs\":["), std::string::npos) << r.out;
  // A path is bytes, JSON is UTF-8: a byte that is no valid UTF-8 is written
  // as \u00XX (it was written raw); valid UTF-8 is kept as it is.
  const std::string odd = dir.Sub("w\xff\"q\\\xc3\xa9\xed\xa0\x80");
  ASSERT_EQ(Exec(kGen + " '" + odd + "' --records 1 --log-level warn").exit_code, 0);
  r = Exec(kDump + " --summary --json '" + odd + "'");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("\"dir\":\"" + dir.path() + "/w\\u00ff\\\"q\\\\\xc3\xa9\\u00ed\\u00a0\\u0080\","),
            std::string::npos)
      << r.out;
}

TEST(WaldumpTest, UsageErrorsExitTwo) {
  TempDir dir;
  EXPECT_EQ(Exec(kDump).exit_code, 2);
  EXPECT_EQ(Exec(kDump + " --bogus " + dir.path()).exit_code, 2);
  EXPECT_EQ(Exec(kDump + " --from abc " + dir.path()).exit_code, 2);
  ExecResult missing = Exec(kDump + " " + dir.Sub("absent"));
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.out.find("NotFound"), std::string::npos) << missing.out;
  ExecResult help = Exec(kDump + " --help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("--from LSN"), std::string::npos);
  EXPECT_EQ(Exec(kGen + " --records x " + dir.path()).exit_code, 2);
  // walgen's segment size has replicad's bounds, and is a usage error outside them.
  for (const char* bad : {"0", "4095", "1099511627777"}) {
    ExecResult r = Exec(kGen + " --segment-size " + bad + " " + dir.Sub("g"));
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.out;
    EXPECT_NE(r.out.find("--segment-size must be 4096 bytes to 1 TiB"), std::string::npos) << bad << ": " << r.out;
  }
  ExecResult gen_help = Exec(kGen + " --help");
  EXPECT_EQ(gen_help.exit_code, 0);
  EXPECT_NE(gen_help.out.find("Exit status: 0"), std::string::npos) << gen_help.out;
  EXPECT_EQ(Exec(kDump + " " + dir.path() + " extra").exit_code, 2);
  EXPECT_EQ(Exec(kGen + " " + dir.Sub("g") + " extra").exit_code, 2);
}

}  // namespace
}  // namespace replica
