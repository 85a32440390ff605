// Recovery on open: every kind of damage is either repaired (a torn tail) or
// refused with a message that names where it is (damage inside the log).
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <vector>

#include "base/coding.h"
#include "tests/support/test_util.h"
#include "wal/frame.h"
#include "wal/wal.h"

namespace replica::wal {
namespace {

using test::AppendN;
using test::OpenOrDie;
using test::Payload;
using test::ReadAll;
using test::SegmentPaths;
using test::TempDir;

Options Opts(bool compress = false) {
  Options o;
  o.segment_size = 8 << 10;
  o.compress = compress;
  return o;
}

// Builds a log of n records (100-byte payloads) and returns the sizes of the
// last segment before and after the last record.
std::pair<uint64_t, uint64_t> BuildLog(const std::string& dir, uint64_t n, bool compress = false) {
  auto wal = OpenOrDie(dir, Opts(compress));
  AppendN(wal.get(), n - 1, 100);
  uint64_t before = wal->segments().back().size;
  AppendN(wal.get(), 1, 100);
  uint64_t after = wal->segments().back().size;
  EXPECT_TRUE(wal->Close().ok());
  return {before, after};
}

TEST(RecoveryTest, TornTailAtEveryByteOfTheLastRecord) {
  for (bool compress : {false, true}) {
    TempDir base;
    const std::string golden = base.Sub("golden");
    auto [before, after] = BuildLog(golden, 30, compress);
    ASSERT_GT(after, before);
    for (uint64_t cut = before; cut < after; ++cut) {
      const std::string dir = base.Sub("cut" + std::to_string(cut));
      test::CopyDir(golden, dir);
      const std::string seg = SegmentPaths(dir).back();
      test::TruncateFileTo(seg, cut);
      auto wal = OpenOrDie(dir, Opts(compress));
      ASSERT_NE(wal, nullptr);
      EXPECT_EQ(wal->last_lsn(), 29u) << "cut at " << cut;
      EXPECT_EQ(wal->recovery().torn_tail, cut != before) << "cut at " << cut;
      EXPECT_EQ(wal->segments().back().size, before);
      auto recs = ReadAll(wal.get(), 1);
      ASSERT_EQ(recs.size(), 29u);
      EXPECT_EQ(recs.back().payload, Payload(29, 100));
      // The log goes on from where it was cut, and ends there once closed.
      AppendN(wal.get(), 1, 100);
      EXPECT_EQ(ReadAll(wal.get(), 30).size(), 1u);
      ASSERT_TRUE(wal->Close().ok());
      EXPECT_EQ(test::FileSize(seg), after) << "cut at " << cut;
    }
  }
}

TEST(RecoveryTest, ReservedZerosAfterTheLastRecordAreACleanEnd) {
  // What a crash leaves of a preallocated segment: the frames, then zeros.
  TempDir dir;
  BuildLog(dir.path(), 20);
  const std::string seg = SegmentPaths(dir.path()).back();
  const std::string data = test::ReadFileBytes(seg);
  test::WriteFileBytes(seg, data + std::string(3 << 20, '\0'));
  {
    Options ro = Opts();
    ro.read_only = true;
    auto wal = OpenOrDie(dir.path(), ro);
    EXPECT_FALSE(wal->recovery().torn_tail);
    EXPECT_EQ(wal->last_lsn(), 20u);
    EXPECT_EQ(wal->segments().back().size, data.size());
    EXPECT_EQ(ReadAll(wal.get(), 1).size(), 20u);
  }
  auto wal = OpenOrDie(dir.path(), Opts());
  EXPECT_FALSE(wal->recovery().torn_tail);
  EXPECT_EQ(wal->last_lsn(), 20u);
  AppendN(wal.get(), 1, 100);  // goes where the zeros began, not after them
  ASSERT_TRUE(wal->Close().ok());
  auto again = OpenOrDie(dir.path(), Opts());
  auto recs = ReadAll(again.get(), 1);
  ASSERT_EQ(recs.size(), 21u);
  EXPECT_EQ(recs.back().payload, Payload(21, 100));
}

TEST(RecoveryTest, GarbageInTheReservedSpaceIsATornTail) {
  TempDir dir;
  BuildLog(dir.path(), 20);
  const std::string seg = SegmentPaths(dir.path()).back();
  const std::string data = test::ReadFileBytes(seg);
  // Half a frame header, then the rest of the reserved space.
  test::WriteFileBytes(seg, data + std::string(17, '\x5a') + std::string(1 << 20, '\0'));
  auto wal = OpenOrDie(dir.path(), Opts());
  EXPECT_TRUE(wal->recovery().torn_tail);
  EXPECT_EQ(wal->recovery().torn_offset, data.size());
  EXPECT_EQ(wal->recovery().torn_bytes, 17u) << "the reserved zeros after it are not counted as lost";
  EXPECT_EQ(wal->last_lsn(), 20u);
}

TEST(RecoveryTest, ATornRecordFullOfHeaderImagesIsJudgedInBoundedTime) {
  // The torn record's payload is 2,000 images of frame headers (as a value
  // holding log bytes would be), each claiming a frame that runs into the
  // reserved zeros: checking each claim in full took 2,000 checksums of
  // 30 MiB. The search stops at its budget and says it cannot tell.
  TempDir dir;
  BuildLog(dir.path(), 20);
  const std::string seg = SegmentPaths(dir.path()).back();
  const std::string data = test::ReadFileBytes(seg);
  std::string images;
  for (int i = 0; i < 2000; ++i) {
    std::string frame;
    EncodeRecordFrame(1000, 1, RecordType::kData, "", &frame);
    EncodeFixed32(frame.data(), 30u << 20);  // claims 30 MiB of payload
    EncodeFixed32(frame.data() + 28, 30u << 20);
    images += frame;
  }
  std::string torn;
  EncodeRecordFrame(21, 1, RecordType::kData, images + std::string(1 << 20, 'x'), &torn);
  test::WriteFileBytes(seg, data + torn.substr(0, kFrameHeaderSize + images.size()));
  test::TruncateFileTo(seg, data.size() + (64u << 20) + (1u << 20));  // reserved zeros after it
  auto refused = Wal::Open(dir.path(), Opts());
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(refused.status().IsCorruption()) << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("cannot tell a torn tail from damage"), std::string::npos)
      << refused.status().ToString();
  EXPECT_EQ(refused.status().message().find("valid records follow it"), std::string::npos)
      << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("offset " + std::to_string(data.size())), std::string::npos)
      << refused.status().ToString();
}

TEST(RecoveryTest, ATornTailInAHugeReservedSegmentIsReadOnlyAsFarAsAFrameCanReach) {
  // Eight bytes of a torn write, then 1 GiB of reserved zeros (a sparse
  // file here): recovery read the whole rest of the segment into memory.
  TempDir dir;
  BuildLog(dir.path(), 20);
  const std::string seg = SegmentPaths(dir.path()).back();
  const std::string data = test::ReadFileBytes(seg);
  test::WriteFileBytes(seg, data + "GARBAGE!");
  test::TruncateFileTo(seg, 1ull << 30);
  auto wal = OpenOrDie(dir.path(), Opts());
  EXPECT_TRUE(wal->recovery().torn_tail);
  EXPECT_EQ(wal->last_lsn(), 20u);
  rusage ru{};
  ASSERT_EQ(::getrusage(RUSAGE_SELF, &ru), 0);
  EXPECT_LT(ru.ru_maxrss, 512L << 10) << "KiB at most resident; the segment is 1 GiB";
}

// Where the frame of `lsn` starts in the segment that holds it.
uint64_t OffsetOf(const std::string& dir, Lsn lsn, std::string* seg_path) {
  Options ro;
  ro.read_only = true;
  auto wal = OpenOrDie(dir, ro);
  auto reader = wal->NewReader(lsn);
  auto span = (*reader)->NextRaw(1);
  EXPECT_TRUE(span.ok() && span->has_value());
  *seg_path = (*span)->segment_path;
  return (*span)->offset;
}

TEST(RecoveryTest, FlippedBitInTheMiddleOfTheLastSegmentIsCorruption) {
  // Bits in the length, type, LSN and payload of record 40 (records 41.. follow it).
  for (uint64_t field : {0ull, 4ull, 9ull, 17ull, 45ull, 100ull}) {
    TempDir dir;
    BuildLog(dir.path(), 45);
    std::string seg;
    const uint64_t off = OffsetOf(dir.path(), 40, &seg);
    ASSERT_EQ(seg, SegmentPaths(dir.path()).back()) << "record 40 should be in the last segment";
    test::FlipBit(seg, off + field, 3);
    const uint64_t size_before = test::FileSize(seg);
    auto wal = Wal::Open(dir.path(), Opts());
    ASSERT_FALSE(wal.ok()) << "byte " << field;
    const std::string msg = wal.status().ToString();
    EXPECT_TRUE(wal.status().IsCorruption()) << msg;
    EXPECT_NE(msg.find(seg), std::string::npos) << msg;
    EXPECT_NE(msg.find("offset " + std::to_string(off)), std::string::npos) << msg;
    EXPECT_NE(msg.find("LSN 40"), std::string::npos) << msg;
    EXPECT_EQ(test::FileSize(seg), size_before) << "damage inside the log must not be cut away";
  }
}

TEST(RecoveryTest, ZeroedRecordsBeforeAValidOneAreCorruptionNotAnEnd) {
  TempDir dir;
  BuildLog(dir.path(), 45);
  std::string seg;
  const uint64_t from = OffsetOf(dir.path(), 40, &seg);
  const uint64_t to = OffsetOf(dir.path(), 45, &seg);
  ASSERT_EQ(seg, SegmentPaths(dir.path()).back());
  ASSERT_EQ(from / 4096, to / 4096) << "zeros up to a page's end would read as a write lost to power loss";
  std::string data = test::ReadFileBytes(seg);
  std::fill(data.begin() + static_cast<std::ptrdiff_t>(from), data.begin() + static_cast<std::ptrdiff_t>(to), '\0');
  test::WriteFileBytes(seg, data + std::string(4096, '\0'));
  auto wal = Wal::Open(dir.path(), Opts());
  ASSERT_FALSE(wal.ok());
  EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
  EXPECT_NE(wal.status().ToString().find("LSN 40"), std::string::npos) << wal.status().ToString();
  EXPECT_EQ(test::FileSize(seg), data.size() + 4096) << "damage inside the log must not be cut away";
}

// Power loss can write a later page of the last unsynced writes and lose an
// earlier one: the lost page reads as zeros (from where the synced part of
// the file ended, or whole) with valid frames after it. Nothing after a lost
// page was ever synced, so it is a torn write, not damage inside the log.
TEST(RecoveryTest, ALostPageWithValidRecordsAfterItIsATornWrite) {
  constexpr uint64_t kPage = 4096;
  Options o = Opts();
  o.segment_size = 64 << 10;
  TempDir base;
  const std::string golden = base.Sub("golden");
  {
    auto wal = OpenOrDie(golden, o);
    AppendN(wal.get(), 120, 100);
    ASSERT_TRUE(wal->Close().ok());
  }
  // The record whose frame runs over the first page boundary.
  Lsn cut_lsn = 0;
  uint64_t cut_at = 0;
  std::string seg;
  for (Lsn lsn = 1; lsn < 120 && cut_lsn == 0; ++lsn) {
    const uint64_t off = OffsetOf(golden, lsn, &seg);
    const uint64_t next = OffsetOf(golden, lsn + 1, &seg);
    if (off < kPage && next > kPage) cut_lsn = lsn, cut_at = off;
  }
  ASSERT_NE(cut_lsn, 0u);
  struct Case {
    const char* name;
    uint64_t from, to;  // the bytes that read as zeros
  };
  for (const Case& c : {Case{"the rest of the page the synced part ended in", cut_at, kPage},
                        Case{"the whole next page", kPage, 2 * kPage}}) {
    const std::string dir = base.Sub(std::to_string(c.from));
    test::CopyDir(golden, dir);
    const std::string path = SegmentPaths(dir).back();
    std::string data = test::ReadFileBytes(path);
    ASSERT_GT(data.size(), c.to + 500) << "valid frames should follow the lost page";
    std::fill(data.begin() + static_cast<std::ptrdiff_t>(c.from), data.begin() + static_cast<std::ptrdiff_t>(c.to),
              '\0');
    test::WriteFileBytes(path, data + std::string(kPage, '\0'));
    {
      Options ro = o;
      ro.read_only = true;
      auto wal = OpenOrDie(dir, ro);
      ASSERT_NE(wal, nullptr) << c.name;
      EXPECT_TRUE(wal->recovery().torn_lost_page) << c.name;
      EXPECT_EQ(ReadAll(wal.get(), 1).size(), cut_lsn - 1) << c.name;
      EXPECT_EQ(test::FileSize(path), data.size() + kPage) << "a read-only open changes nothing";
    }
    auto wal = OpenOrDie(dir, o);
    ASSERT_NE(wal, nullptr) << c.name;
    const RecoveryReport& r = wal->recovery();
    EXPECT_TRUE(r.torn_tail) << c.name;
    EXPECT_TRUE(r.torn_lost_page) << c.name;
    EXPECT_EQ(r.torn_offset, cut_at) << c.name;
    EXPECT_NE(r.torn_why.find("read as zeros"), std::string::npos) << r.torn_why;
    EXPECT_EQ(wal->last_lsn(), cut_lsn - 1) << c.name;
    auto recs = ReadAll(wal.get(), 1);
    ASSERT_EQ(recs.size(), cut_lsn - 1) << c.name;
    EXPECT_EQ(recs.back().payload, Payload(cut_lsn - 1, 100));
    // The log goes on from the cut.
    AppendN(wal.get(), 1, 100);
    EXPECT_EQ(ReadAll(wal.get(), cut_lsn).size(), 1u);
  }
}

// A lost page with more valid data after it than one write can hold
// (max_group_bytes) is damage: power loss takes only the last write.
TEST(RecoveryTest, ALostPageWithMoreThanOneWriteAfterItIsCorruption) {
  constexpr uint64_t kPage = 4096;
  Options o = Opts();
  o.segment_size = 64 << 10;
  o.max_group_bytes = 4096;
  TempDir dir;
  {
    auto wal = OpenOrDie(dir.path(), o);
    AppendN(wal.get(), 120, 100);
    ASSERT_TRUE(wal->Close().ok());
  }
  const std::string seg = SegmentPaths(dir.path()).back();
  std::string data = test::ReadFileBytes(seg);
  ASSERT_GT(data.size(), 3 * kPage);
  std::fill(data.begin() + kPage, data.begin() + 2 * kPage, '\0');
  test::WriteFileBytes(seg, data);
  auto wal = Wal::Open(dir.path(), o);
  ASSERT_FALSE(wal.ok());
  EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
  EXPECT_NE(wal.status().ToString().find("more than one write (4096) can hold"), std::string::npos)
      << wal.status().ToString();
  o.max_group_bytes = 64 << 10;  // the default is 4 MiB
  EXPECT_TRUE(Wal::Open(dir.path(), o).ok()) << "within one write's size, the same zeros are a lost page";
}

// A damaged length can make a frame reach past the valid frames into the
// reserved zeros after the data; those zeros are no lost page of it.
TEST(RecoveryTest, ALengthThatReachesIntoTheReservedZerosIsCorruption) {
  for (bool compress : {true, false}) {
    Options o = Opts(compress);
    o.segment_size = 256 << 10;
    TempDir dir;
    {
      // 30 writes of 10 records each: with compression, 30 LZ4 blocks.
      auto wal = OpenOrDie(dir.path(), o);
      for (Lsn first = 1; first <= 300; first += 10) {
        std::vector<std::string> payloads;
        std::vector<RecordIn> recs;
        for (Lsn k = 0; k < 10; ++k) payloads.push_back(Payload(first + k, 100));
        for (const auto& p : payloads) recs.push_back(RecordIn{RecordType::kData, p});
        ASSERT_TRUE(wal->AppendBatch(1, recs.data(), recs.size()).ok());
      }
      EXPECT_EQ(wal->segments().back().size < 300 * (100 + kFrameHeaderSize), compress) << "expected LZ4 blocks";
      ASSERT_TRUE(wal->Close().ok());
    }
    std::string seg;
    const uint64_t off = OffsetOf(dir.path(), 201, &seg);
    std::string data = test::ReadFileBytes(seg);
    // The length 64 KiB longer: a record frame's payload_len and raw_len
    // (offsets 0 and 28), a block frame's payload_len only.
    for (uint64_t field : compress ? std::vector<uint64_t>{0} : std::vector<uint64_t>{0, 28}) {
      data[off + field + 2] = static_cast<char>(data[off + field + 2] + 1);
    }
    test::WriteFileBytes(seg, data + std::string(128 << 10, '\0'));
    auto wal = Wal::Open(dir.path(), o);
    ASSERT_FALSE(wal.ok()) << (compress ? "lz4" : "plain") << ": " << (*wal)->recovery().torn_why;
    EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
    EXPECT_NE(wal.status().ToString().find("offset " + std::to_string(off) + " "), std::string::npos)
        << wal.status().ToString();
  }
}

// Builds a log whose record 2 starts at `at` with the payload `payload2`
// (record 1 fills the space before it; `following` records of 100 bytes
// follow), all synced, and returns the last segment's path.
std::string BuildAround(const std::string& dir, const Options& o, uint64_t at, const std::string& payload2,
                        Epoch epoch = 1, Lsn following = 20) {
  {
    auto wal = OpenOrDie(dir, o);
    EXPECT_TRUE(wal->Append(epoch, RecordType::kData, Payload(1, at - kSegmentHeaderSize - kFrameHeaderSize)).ok());
    EXPECT_TRUE(wal->Append(epoch, RecordType::kData, payload2).ok());
    for (Lsn lsn = 3; lsn < 3 + following; ++lsn) {
      EXPECT_TRUE(wal->Append(epoch, RecordType::kData, Payload(lsn, 100)).ok());
    }
    EXPECT_TRUE(wal->Close().ok());
  }
  std::string seg;
  EXPECT_EQ(OffsetOf(dir, 2, &seg), at);
  return seg;
}

// A header's first bytes can be zero by nature (a length's low bytes), and a
// frame can start just before a page's end: such zeros are no lost page, and
// a flipped bit in that frame is still damage.
TEST(RecoveryTest, AHeaderThatStartsWithZerosAtAPageEndIsNoLostPage) {
  struct Case {
    uint64_t before_page_end;  // where record 2 starts
    size_t len;                // its payload: low bytes of the length zero
    uint64_t flip;             // the byte flipped, from the frame's start
  };
  for (const Case c : {Case{1, 256, 50}, Case{1, 512, 33}, Case{1, 256, 9}, Case{2, 65536, 1040},
                       Case{4, 0, 33}}) {
    TempDir dir;
    Options o = Opts();
    o.segment_size = 1 << 20;
    const uint64_t at = 4096 - c.before_page_end;
    const std::string seg = BuildAround(dir.path(), o, at, Payload(2, c.len));
    std::string data = test::ReadFileBytes(seg);
    for (uint64_t i = at; i < 4096; ++i) ASSERT_EQ(data[i], '\0') << "the header should start with zeros";
    data[at + c.flip] = static_cast<char>(data[at + c.flip] ^ 0x08);
    test::WriteFileBytes(seg, data + std::string(8192, '\0'));
    auto wal = Wal::Open(dir.path(), o);
    ASSERT_FALSE(wal.ok()) << "at " << at << ", byte " << c.flip << ": " << (*wal)->recovery().torn_why;
    EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
    EXPECT_NE(wal.status().ToString().find("(LSN 2)"), std::string::npos) << wal.status().ToString();
  }
}

// A frame whose own payload holds a page of zeros, with damage in its header:
// a type that does not decode, an LSN or an epoch that does not continue the
// log. Its extent is not trusted, so the zeros are no lost page: neither in
// the middle of the payload, nor on a page that the header runs onto with
// only its checksum's last byte (zero here, as by chance one time in 256).
TEST(RecoveryTest, HeaderDamageBesideAZeroPageInThePayloadIsCorruption) {
  for (uint64_t at : {1000ull, 4096ull - 39}) {
    for (uint64_t byte : {4ull, 9ull, 16ull}) {
      TempDir dir;
      Options o = Opts();
      o.segment_size = 1 << 20;
      const std::string seg = BuildAround(dir.path(), o, at, std::string(12 << 10, '\0'), /*epoch=*/3);
      std::string data = test::ReadFileBytes(seg);
      if (at == 4096 - 39) data[4096] = '\0';  // the checksum's last byte
      if (byte == 4) data[at + 4] = 7;         // an unknown frame type
      if (byte == 9) data[at + 9] ^= 0x01;     // LSN 2 + 256
      if (byte == 16) data[at + 16] = 1;       // epoch 1 after epoch 3
      test::WriteFileBytes(seg, data);
      auto wal = Wal::Open(dir.path(), o);
      ASSERT_FALSE(wal.ok()) << "at " << at << ", byte " << byte << ": " << (*wal)->recovery().torn_why;
      EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
    }
  }
}

// A lost page that holds only the tail of a header, the rest of which is on
// the page before (which survived): a lost page.
TEST(RecoveryTest, ALostPageHoldingTheTailOfAHeaderIsATornWrite) {
  // The header's tail on the lost page: its LSN's last bytes and the rest,
  // or its epoch's high bytes and the rest (neither decodes: epoch 0, count
  // 0); its checksum only (it decodes and continues the log).
  for (uint64_t before_page_end : {10ull, 20ull, 36ull}) {
    TempDir dir;
    Options o = Opts();
    o.segment_size = 1 << 20;
    const std::string seg = BuildAround(dir.path(), o, 4096 - before_page_end, Payload(2, 300), 1, 60);
    std::string data = test::ReadFileBytes(seg);
    ASSERT_GT(data.size(), 8192u + 500) << "valid frames should follow the lost page";
    std::fill(data.begin() + 4096, data.begin() + 8192, '\0');
    test::WriteFileBytes(seg, data);
    auto wal = OpenOrDie(dir.path(), o);
    ASSERT_NE(wal, nullptr);
    EXPECT_TRUE(wal->recovery().torn_lost_page) << before_page_end;
    EXPECT_EQ(wal->last_lsn(), 1u);
  }
}

// Zeros from a damaged frame's start up to a valid frame that starts one byte
// before a page's end: they reach the page's end only through that frame's
// own first byte (zero by nature), and the page does not end before the
// valid frame, so it is no lost page.
TEST(RecoveryTest, ZerosUpToAValidFrameJustBeforeAPageEndAreCorruption) {
  TempDir dir;
  Options o = Opts();
  o.segment_size = 1 << 20;
  {
    auto wal = OpenOrDie(dir.path(), o);
    ASSERT_TRUE(wal->Append(1, RecordType::kData, Payload(1, 1000 - kSegmentHeaderSize - kFrameHeaderSize)).ok());
    ASSERT_TRUE(wal->Append(1, RecordType::kData, Payload(2, 4095 - 1000 - kFrameHeaderSize)).ok());
    ASSERT_TRUE(wal->Append(1, RecordType::kData, Payload(3, 256)).ok());
    for (Lsn lsn = 4; lsn < 24; ++lsn) ASSERT_TRUE(wal->Append(1, RecordType::kData, Payload(lsn, 100)).ok());
    ASSERT_TRUE(wal->Close().ok());
  }
  std::string seg;
  ASSERT_EQ(OffsetOf(dir.path(), 3, &seg), 4095u);
  std::string data = test::ReadFileBytes(seg);
  std::fill(data.begin() + 1000, data.begin() + 4095, '\0');
  test::WriteFileBytes(seg, data);
  auto wal = Wal::Open(dir.path(), o);
  ASSERT_FALSE(wal.ok()) << (*wal)->recovery().torn_why;
  EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
}

// Zeros from a frame's start to one byte short of the page's end are no lost
// page: a write is lost a page at a time, so this is damage, and the log is
// refused.
TEST(RecoveryTest, ZerosThatStopShortOfAPageEndAreCorruption) {
  constexpr uint64_t kPage = 4096;
  Options o = Opts();
  o.segment_size = 64 << 10;
  TempDir dir;
  {
    auto wal = OpenOrDie(dir.path(), o);
    AppendN(wal.get(), 60, 100);
    ASSERT_TRUE(wal->Close().ok());
  }
  std::string seg;
  Lsn lsn = 1;
  while (OffsetOf(dir.path(), lsn + 1, &seg) < kPage) ++lsn;
  const uint64_t off = OffsetOf(dir.path(), lsn, &seg);
  std::string data = test::ReadFileBytes(seg);
  std::fill(data.begin() + static_cast<std::ptrdiff_t>(off), data.begin() + static_cast<std::ptrdiff_t>(kPage - 1),
            '\0');
  test::WriteFileBytes(seg, data);
  auto wal = Wal::Open(dir.path(), o);
  ASSERT_FALSE(wal.ok());
  EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
  EXPECT_NE(wal.status().ToString().find("(LSN " + std::to_string(lsn) + ")"), std::string::npos)
      << wal.status().ToString();
  EXPECT_EQ(test::FileSize(seg), data.size()) << "damage inside the log must not be cut away";
}

TEST(RecoveryTest, FlippedBitInAnOlderSegmentIsCorruptionWhenRead) {
  TempDir dir;
  BuildLog(dir.path(), 300);
  std::string seg;
  const uint64_t off = OffsetOf(dir.path(), 10, &seg);
  ASSERT_EQ(seg, SegmentPaths(dir.path()).front());
  test::FlipBit(seg, off + kFrameHeaderSize + 20, 0);
  auto wal = OpenOrDie(dir.path(), Opts());  // only the last segment is scanned on open
  std::vector<test::ReadRecord> out;
  Status st = test::TryReadAll(wal.get(), 1, &out);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find(seg), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find("LSN 10"), std::string::npos) << st.ToString();
  EXPECT_EQ(out.size(), 9u);  // everything before the damage, nothing after
}

TEST(RecoveryTest, MissingSegmentInTheMiddle) {
  TempDir dir;
  BuildLog(dir.path(), 300);
  auto segs = SegmentPaths(dir.path());
  ASSERT_GE(segs.size(), 4u);
  std::remove(segs[1].c_str());
  auto wal = Wal::Open(dir.path(), Opts());
  ASSERT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
  EXPECT_NE(wal.status().message().find("missing"), std::string::npos) << wal.status().ToString();
}

TEST(RecoveryTest, ZeroLengthLastSegmentIsRemoved) {
  TempDir dir;
  BuildLog(dir.path(), 50);
  // A crash right after creating the next segment.
  const std::string extra = dir.Sub(SegmentFileName(51));
  test::WriteFileBytes(extra, "");
  auto wal = OpenOrDie(dir.path(), Opts());
  EXPECT_EQ(wal->recovery().removed_segments, std::vector<std::string>{extra});
  EXPECT_EQ(wal->last_lsn(), 50u);
  AppendN(wal.get(), 5, 100);
  EXPECT_EQ(ReadAll(wal.get(), 1).size(), 55u);
}

TEST(RecoveryTest, ZeroLengthMiddleSegmentIsCorruption) {
  TempDir dir;
  BuildLog(dir.path(), 300);
  auto segs = SegmentPaths(dir.path());
  test::TruncateFileTo(segs[1], 0);
  auto wal = Wal::Open(dir.path(), Opts());
  EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
  EXPECT_NE(wal.status().message().find(segs[1]), std::string::npos);
}

TEST(RecoveryTest, TruncatedOlderSegmentIsCorruptionWhenRead) {
  TempDir dir;
  BuildLog(dir.path(), 300);
  auto segs = SegmentPaths(dir.path());
  test::TruncateFileTo(segs[0], test::FileSize(segs[0]) - 140);  // drop its last record
  auto wal = OpenOrDie(dir.path(), Opts());
  std::vector<test::ReadRecord> out;
  Status st = test::TryReadAll(wal.get(), 1, &out);
  EXPECT_TRUE(st.IsCorruption()) << st.ToString();
  EXPECT_NE(st.message().find("next segment starts"), std::string::npos) << st.ToString();
}

TEST(RecoveryTest, DamagedSegmentHeaderAndUnknownFeatures) {
  TempDir dir;
  BuildLog(dir.path(), 20);
  const std::string seg = SegmentPaths(dir.path()).back();
  std::string good = test::ReadFileBytes(seg);
  test::FlipBit(seg, 2, 1);  // magic
  EXPECT_TRUE(Wal::Open(dir.path(), Opts()).status().IsCorruption());
  test::WriteFileBytes(seg, good);
  test::FlipBit(seg, 20, 1);  // first_lsn: header checksum catches it
  EXPECT_TRUE(Wal::Open(dir.path(), Opts()).status().IsCorruption());
  // A future writer's incompatible feature bit, with a valid checksum.
  SegmentHeader h;
  h.first_lsn = 1;
  h.incompat_flags = 1u << 7;
  std::string future = EncodeSegmentHeader(h) + good.substr(kSegmentHeaderSize);
  test::WriteFileBytes(seg, future);
  auto st = Wal::Open(dir.path(), Opts()).status();
  EXPECT_EQ(st.code(), StatusCode::kNotSupported) << st.ToString();
}

TEST(RecoveryTest, EpochHistoryDamageAndRepair) {
  TempDir dir;
  {
    auto wal = OpenOrDie(dir.path(), Opts());
    AppendN(wal.get(), 10, 10, 1);
    AppendN(wal.get(), 10, 10, 4);
  }
  const std::string epochs = dir.Sub(kEpochFileName);
  std::string good = test::ReadFileBytes(epochs);
  test::FlipBit(epochs, 20, 0);
  EXPECT_TRUE(Wal::Open(dir.path(), Opts()).status().IsCorruption());
  // Lost entirely: the epochs seen in the last segment are put back.
  std::remove(epochs.c_str());
  {
    auto wal = OpenOrDie(dir.path(), Opts());
    EXPECT_TRUE(wal->recovery().history_repaired);
    EXPECT_EQ(wal->EndOfEpoch(1).end_lsn, 10u);
    EXPECT_EQ(wal->last_epoch(), 4u);
  }
  // An entry past the end of the log (a crash between the epochs file and the
  // first record of the new epoch) is dropped.
  {
    auto wal = OpenOrDie(dir.path(), Opts());
    EpochHistory h = wal->epoch_history();
    ASSERT_TRUE(h.Add(9, 21).ok());
    ASSERT_TRUE(wal->Close().ok());
    test::WriteFileBytes(epochs, h.Encode());
  }
  auto wal = OpenOrDie(dir.path(), Opts());
  EXPECT_EQ(wal->last_epoch(), 4u);
  EXPECT_TRUE(wal->recovery().history_repaired);
}

// A log of epochs 1, 2 and 3 over LSNs 1..200 in 4 KiB segments (50, 50 and
// 100 records, appended in batches of 10: LZ4 blocks when compressing).
void BuildEpochLog(const std::string& dir, bool compress) {
  Options o = Opts(compress);
  o.segment_size = 4096;
  auto wal = OpenOrDie(dir, o);
  // Half incompressible, so that blocks still fill several segments.
  std::vector<std::string> payloads;
  for (uint64_t i = 0; i < 10; ++i) payloads.push_back(Payload(i, 50) + std::string(50, 'a'));
  std::vector<RecordIn> batch;
  for (const auto& p : payloads) batch.push_back(RecordIn{RecordType::kData, p});
  for (Epoch epoch : {1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3}) {
    ASSERT_TRUE(wal->AppendBatch(epoch, batch.data(), batch.size()).ok());
  }
  // Every epoch starts before the last segment.
  ASSERT_GT(wal->segments().back().first_lsn, 101u);
  ASSERT_TRUE(wal->Close().ok());
}

TEST(RecoveryTest, MissingEpochsFileIsRebuiltFromEverySegment) {
  for (bool compress : {false, true}) {
    SCOPED_TRACE(compress ? "lz4" : "plain");
    TempDir dir;
    BuildEpochLog(dir.path(), compress);
    Options o = Opts(compress);
    o.segment_size = 4096;
    const EpochHistory before = OpenOrDie(dir.path(), o)->epoch_history();
    ASSERT_EQ(before.entries(), (std::vector<EpochEntry>{{1, 1}, {2, 51}, {3, 101}}));
    std::remove(dir.Sub(kEpochFileName).c_str());
    {
      auto wal = OpenOrDie(dir.path(), o);
      EXPECT_TRUE(wal->recovery().history_repaired);
      EXPECT_EQ(wal->epoch_history().entries(), before.entries());
      EXPECT_EQ(wal->EndOfEpoch(1).epoch, 1u);
      EXPECT_EQ(wal->EndOfEpoch(1).end_lsn, 50u);
      EXPECT_EQ(wal->EndOfEpoch(2).epoch, 2u);
      EXPECT_EQ(wal->EndOfEpoch(2).end_lsn, 100u);
      EXPECT_TRUE(wal->Append(2, RecordType::kData, "stale").status().IsStaleEpoch());
    }
    // The rebuilt history was saved.
    auto decoded = EpochHistory::Decode(test::ReadFileBytes(dir.Sub(kEpochFileName)));
    ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
    EXPECT_EQ(decoded->entries(), before.entries());
  }
}

TEST(RecoveryTest, MissingEpochsFileWithAnEmptyLastSegment) {
  TempDir dir;
  BuildEpochLog(dir.path(), false);
  Options o = Opts();
  o.segment_size = 4096;
  {
    auto wal = OpenOrDie(dir.path(), o);
    // The last segment keeps only its header; the records before it are of epoch 3.
    ASSERT_TRUE(wal->Truncate(wal->segments().back().first_lsn - 1).ok());
    ASSERT_GT(wal->last_lsn(), 100u);
  }
  std::remove(dir.Sub(kEpochFileName).c_str());
  {
    auto wal = OpenOrDie(dir.path(), o);
    EXPECT_EQ(wal->last_epoch(), 3u);
    EXPECT_EQ(wal->epoch_history().entries(), (std::vector<EpochEntry>{{1, 1}, {2, 51}, {3, 101}}));
    auto stale = wal->Append(1, RecordType::kData, "stale");
    EXPECT_TRUE(stale.status().IsStaleEpoch()) << (stale.ok() ? "accepted" : stale.status().ToString());
  }
  // With the file there but lacking epoch 3 (a stale copy), the epoch of the
  // last record, in the segment before the empty one, still counts.
  EpochHistory old;
  ASSERT_TRUE(old.Add(1, 1).ok());
  ASSERT_TRUE(old.Add(2, 51).ok());
  test::WriteFileBytes(dir.Sub(kEpochFileName), old.Encode());
  auto wal = OpenOrDie(dir.path(), o);
  EXPECT_EQ(wal->last_epoch(), 3u);
  EXPECT_TRUE(wal->Append(2, RecordType::kData, "stale").status().IsStaleEpoch());
}

TEST(RecoveryTest, MissingEpochsFileOfAPurgedLogIsRefused) {
  TempDir dir;
  BuildEpochLog(dir.path(), false);
  Options o = Opts();
  o.segment_size = 4096;
  {
    auto wal = OpenOrDie(dir.path(), o);
    auto first = wal->Purge(60);
    ASSERT_TRUE(first.ok());
    ASSERT_GT(*first, 1u);
  }
  const std::string epochs = test::ReadFileBytes(dir.Sub(kEpochFileName));
  std::remove(dir.Sub(kEpochFileName).c_str());
  // Where epoch 1 ended is no longer in the segments: refused, not guessed.
  auto wal = Wal::Open(dir.path(), o);
  ASSERT_FALSE(wal.ok()) << "history: " << (*wal)->epoch_history().entries().size() << " entries";
  EXPECT_TRUE(wal.status().IsCorruption()) << wal.status().ToString();
  EXPECT_NE(wal.status().message().find("re-seed"), std::string::npos) << wal.status().ToString();
  EXPECT_FALSE(Env::Default()->FileExists(dir.Sub(kEpochFileName))) << "nothing may be written";
  // A read-only salvage open shows the log all the same, and says why the history is partial.
  Options ro = o;
  ro.read_only = true;
  ro.salvage = true;
  auto dump = Wal::Open(dir.path(), ro);
  ASSERT_TRUE(dump.ok()) << dump.status().ToString();
  EXPECT_NE((*dump)->recovery().history_damage.find("cannot be rebuilt"), std::string::npos);
  dump->reset();
  test::WriteFileBytes(dir.Sub(kEpochFileName), epochs);
  EXPECT_TRUE(Wal::Open(dir.path(), o).ok());
}

TEST(RecoveryTest, LeftoverTempFileIsRemoved) {
  TempDir dir;
  BuildLog(dir.path(), 5);
  test::WriteFileBytes(dir.Sub("epochs.tmp"), "half-written");
  auto wal = OpenOrDie(dir.path(), Opts());
  EXPECT_FALSE(Env::Default()->FileExists(dir.Sub("epochs.tmp")));
}

}  // namespace
}  // namespace replica::wal
