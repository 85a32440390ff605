// Readers: any start LSN, tailing without polling, purged LSNs, and the raw
// path that lets a standby keep a byte-identical copy.
#include <gtest/gtest.h>

#include <thread>

#include "tests/support/test_util.h"
#include "wal/wal.h"

namespace replica::wal {
namespace {

using namespace std::chrono_literals;
using test::AppendN;
using test::OpenOrDie;
using test::Payload;
using test::ReadAll;
using test::TempDir;

Options Small(bool compress) {
  Options o;
  o.segment_size = 8 << 10;
  o.compress = compress;
  return o;
}

// Appends with batches so that compressed logs hold multi-record blocks.
void AppendBatches(Wal* wal, int batches, int per_batch, Epoch epoch = 1) {
  for (int b = 0; b < batches; ++b) {
    std::vector<std::string> payloads;
    std::vector<RecordIn> recs;
    Lsn first = wal->last_lsn() + 1;
    for (int i = 0; i < per_batch; ++i) payloads.push_back(std::string(60, 'a' + (first + i) % 26));
    for (auto& p : payloads) recs.push_back({RecordType::kData, p});
    ASSERT_TRUE(wal->AppendBatch(epoch, recs.data(), recs.size()).ok());
  }
}

TEST(ReaderTest, StartsAnywhereIncludingInsideBlocks) {
  for (bool compress : {false, true}) {
    TempDir dir;
    auto wal = OpenOrDie(dir.path(), Small(compress));
    AppendBatches(wal.get(), 40, 7);
    const Lsn last = wal->last_lsn();
    ASSERT_EQ(last, 280u);
    for (Lsn from = 1; from <= last + 1; from += 3) {
      auto recs = ReadAll(wal.get(), from);
      ASSERT_EQ(recs.size(), last - from + 1) << "from " << from << " compress " << compress;
      if (!recs.empty()) {
        EXPECT_EQ(recs.front().lsn, from);
      }
    }
    EXPECT_EQ(wal->NewReader(last + 2).status().code(), StatusCode::kInvalidArgument);
  }
}

TEST(ReaderTest, TailingReaderWakesOnAppend) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Small(false));
  AppendN(wal.get(), 3, 10);
  auto reader = wal->NewReader(1);
  ASSERT_TRUE(reader.ok());
  RecordView r;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(*(*reader)->Next(&r));
  // Caught up: a short wait times out with nothing.
  auto none = (*reader)->NextWait(&r, std::chrono::steady_clock::now() + 20ms);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(*none);
  std::thread writer([&] { AppendN(wal.get(), 200, 100); });
  Lsn seen = 3;
  while (seen < 203) {
    auto got = (*reader)->NextWait(&r, std::chrono::steady_clock::now() + 30s);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ASSERT_TRUE(*got) << "no record within 30 s after LSN " << seen;
    EXPECT_EQ(r.lsn, seen + 1);
    EXPECT_EQ(r.payload, Payload(r.lsn, 100));
    seen = r.lsn;
  }
  writer.join();
}

TEST(ReaderTest, CloseWakesWaitingReader) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Small(false));
  auto reader = wal->NewReader(1);
  ASSERT_TRUE(reader.ok());
  Status result;
  std::thread waiter([&] {
    RecordView r;
    auto got = (*reader)->NextWait(&r, std::chrono::steady_clock::now() + 60s);
    result = got.ok() ? Status::OK() : got.status();
  });
  ASSERT_TRUE(wal->Close().ok());
  waiter.join();
  EXPECT_TRUE(result.IsAborted()) << result.ToString();
}

TEST(ReaderTest, PurgedLsnIsADistinctError) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Small(false));
  AppendN(wal.get(), 300, 100);
  auto first = wal->Purge(150);
  ASSERT_TRUE(first.ok());
  EXPECT_GT(*first, 1u);
  EXPECT_LE(*first, 151u);
  auto r = wal->NewReader(1);
  EXPECT_TRUE(r.status().IsPurged()) << r.status().ToString();
  EXPECT_EQ(ReadAll(wal.get(), *first).size(), 300 - *first + 1);
}

TEST(ReaderTest, ReaderOpenedBeforePurgeKeepsItsSegmentOrSaysPurged) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Small(false));
  AppendN(wal.get(), 300, 100);
  auto reader = wal->NewReader(1);
  ASSERT_TRUE(reader.ok());
  RecordView r;
  ASSERT_TRUE(*(*reader)->Next(&r));
  ASSERT_TRUE(wal->Purge(250).ok());
  // The open segment stays readable; crossing into a purged one is Purged.
  Status st;
  for (;;) {
    auto got = (*reader)->Next(&r);
    if (!got.ok()) {
      st = got.status();
      break;
    }
    ASSERT_TRUE(*got) << "the reader cannot finish: records were purged";
  }
  EXPECT_TRUE(st.IsPurged()) << st.ToString();
}

// The standby's path: raw spans out of one log, AppendRaw into another, and
// the segment files come out byte for byte the same.
TEST(ReaderTest, RawCopyIsByteIdentical) {
  for (bool compress : {false, true}) {
    TempDir a, b;
    auto active = OpenOrDie(a.path(), Small(compress));
    auto standby = OpenOrDie(b.path(), Small(compress));
    AppendBatches(active.get(), 30, 5, 1);
    AppendN(active.get(), 40, 300, 2);
    AppendBatches(active.get(), 20, 9, 3);
    auto reader = active->NewReader(1);
    ASSERT_TRUE(reader.ok());
    size_t spans = 0;
    for (;;) {
      auto span = (*reader)->NextRaw(3000);
      ASSERT_TRUE(span.ok()) << span.status().ToString();
      if (!span->has_value()) break;
      const RawSpan& s = **span;
      EXPECT_GE(s.file->NativeHandle(), 0);  // sendfile-able
      std::string bytes;
      ASSERT_TRUE(s.ReadInto(&bytes).ok());
      auto last = standby->AppendRaw(bytes);
      ASSERT_TRUE(last.ok()) << last.status().ToString();
      EXPECT_EQ(*last, s.last_lsn);
      ++spans;
    }
    EXPECT_GT(spans, 5u);
    EXPECT_EQ(standby->last_lsn(), active->last_lsn());
    EXPECT_EQ(standby->epoch_history().entries(), active->epoch_history().entries());
    ASSERT_TRUE(active->Close().ok());
    ASSERT_TRUE(standby->Close().ok());
    auto sa = test::SegmentPaths(a.path()), sb = test::SegmentPaths(b.path());
    ASSERT_EQ(sa.size(), sb.size());
    ASSERT_GT(sa.size(), 2u);
    for (size_t i = 0; i < sa.size(); ++i) {
      EXPECT_EQ(test::ReadFileBytes(sa[i]), test::ReadFileBytes(sb[i])) << sa[i] << " vs " << sb[i];
    }
  }
}

TEST(ReaderTest, RawSpanFromInsideABlockStartsAtTheBlock) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Small(true));
  AppendBatches(wal.get(), 3, 10);  // blocks 1-10, 11-20, 21-30
  auto reader = wal->NewReader(15);
  ASSERT_TRUE(reader.ok());
  auto span = (*reader)->NextRaw(1 << 20);
  ASSERT_TRUE(span.ok() && span->has_value());
  EXPECT_EQ((*span)->first_lsn, 11u);
  EXPECT_EQ((*span)->last_lsn, 30u);
}

// The bytes of the reader's next raw span (the test fails if there is none).
std::string NextRawBytes(Reader* reader) {
  auto span = reader->NextRaw(1 << 20);
  EXPECT_TRUE(span.ok() && span->has_value());
  std::string bytes;
  if (span.ok() && span->has_value()) {
    EXPECT_TRUE((*span)->ReadInto(&bytes).ok());
  }
  return bytes;
}

// Damage in the log is found by the raw path too (it used to hand the
// damaged frame out unverified, for every standby to refuse): the frames
// before it go out, then Corruption names the segment, offset and LSN, and
// stays, so that the sender can resync its peers instead.
// A raw reader from `from` reads a span starting there, in `segment`.
void ExpectRawReadFrom(Wal* wal, Lsn from, const std::string& segment) {
  auto reader = wal->NewReader(from);
  ASSERT_TRUE(reader.ok());
  auto span = (*reader)->NextRaw(4096);
  ASSERT_TRUE(span.ok()) << span.status().ToString();
  ASSERT_TRUE(span->has_value());
  EXPECT_EQ((*span)->first_lsn, from);
  EXPECT_EQ((*span)->segment_path, segment);
}

TEST(ReaderTest, NextRawStopsAtADamagedFrameAndNamesIt) {
  for (bool compress : {false, true}) {
    TempDir dir;
    auto wal = OpenOrDie(dir.path(), Small(compress));
    AppendN(wal.get(), 200, 200);  // segments of 8 KiB: several
    // The frame that holds LSN 150, in an older segment.
    auto at = wal->NewReader(150);
    ASSERT_TRUE(at.ok());
    auto frame = (*at)->NextRaw(1);
    ASSERT_TRUE(frame.ok() && frame->has_value());
    const RawSpan damaged = **frame;
    ASSERT_NE(damaged.segment_path, test::SegmentPaths(dir.path()).back());
    test::FlipBit(damaged.segment_path, damaged.offset + kFrameHeaderSize + 5, 2);

    auto reader = wal->NewReader(1);
    ASSERT_TRUE(reader.ok());
    Lsn shipped = 0;
    Status error;
    for (int i = 0; i < 1000; ++i) {
      auto span = (*reader)->NextRaw(4096);
      if (!span.ok()) {
        error = span.status();
        break;
      }
      ASSERT_TRUE(span->has_value()) << "the reader reached the log's end past the damage";
      EXPECT_EQ((*span)->first_lsn, shipped + 1);
      EXPECT_LT((*span)->last_lsn, damaged.first_lsn) << "a span holds the damaged frame";
      shipped = (*span)->last_lsn;
    }
    EXPECT_EQ(shipped + 1, damaged.first_lsn) << "the frames before the damage did not all go out";
    ASSERT_TRUE(error.IsCorruption()) << error.ToString();
    const std::string msg = error.message();
    EXPECT_NE(msg.find(damaged.segment_path), std::string::npos) << msg;
    EXPECT_NE(msg.find("offset " + std::to_string(damaged.offset)), std::string::npos) << msg;
    EXPECT_NE(msg.find("LSN " + std::to_string(damaged.first_lsn)), std::string::npos) << msg;
    EXPECT_NE(msg.find("checksum"), std::string::npos) << msg;
    EXPECT_EQ((*reader)->next_lsn(), damaged.first_lsn);
    // Asked again, the same answer: the reader does not step over the damage.
    auto again = (*reader)->NextRaw(4096);
    EXPECT_TRUE(again.status().IsCorruption()) << again.status().ToString();
    // A reader that starts past the damage, in the same segment, is not
    // stopped by it (a snapshot's seed, a standby that holds the damaged
    // records already).
    ExpectRawReadFrom(wal.get(), damaged.last_lsn + 1, damaged.segment_path);
  }
}

// A damaged LZ4 block of several records: a reader that starts inside it
// (a standby whose position lies within the block) is stopped by it, raw or
// by record, and the error names the block's first LSN; a reader that
// starts after it, in the same segment, reads on, by record too (the check
// of a subscribing standby's last record), as the frames before the start
// LSN are skipped unchecked.
TEST(ReaderTest, ADamagedBlockStopsAReaderStartingInsideItButNotOneAfterIt) {
  TempDir dir;
  auto wal = OpenOrDie(dir.path(), Small(true));
  AppendBatches(wal.get(), 40, 7);
  auto at = wal->NewReader(150);
  ASSERT_TRUE(at.ok());
  auto frame = (*at)->NextRaw(1);
  ASSERT_TRUE(frame.ok() && frame->has_value());
  const RawSpan block = **frame;
  ASSERT_LT(block.first_lsn, 150u) << "LSN 150 is not inside a block of several records";
  ASSERT_GT(block.last_lsn, 150u);
  test::FlipBit(block.segment_path, block.offset + kFrameHeaderSize + 3, 1);

  auto raw = wal->NewReader(150);
  ASSERT_TRUE(raw.ok());
  auto span = (*raw)->NextRaw(4096);
  ASSERT_TRUE(span.status().IsCorruption()) << span.status().ToString();
  EXPECT_NE(span.status().message().find("(LSN " + std::to_string(block.first_lsn) + ")"), std::string::npos)
      << span.status().ToString();
  auto records = wal->NewReader(150);
  ASSERT_TRUE(records.ok());
  RecordView r;
  auto got = (*records)->Next(&r);
  EXPECT_TRUE(got.status().IsCorruption()) << got.status().ToString();

  ExpectRawReadFrom(wal.get(), block.last_lsn + 1, block.segment_path);  // the damage is earlier in its segment
  auto records_after = wal->NewReader(block.last_lsn + 1);
  ASSERT_TRUE(records_after.ok());
  auto next = (*records_after)->Next(&r);
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  ASSERT_TRUE(*next);
  EXPECT_EQ(r.lsn, block.last_lsn + 1);
}

TEST(ReaderTest, AppendRawRefusesWhatDoesNotFit) {
  TempDir a, b;
  auto active = OpenOrDie(a.path(), Small(false));
  auto standby = OpenOrDie(b.path(), Small(false));
  AppendN(active.get(), 10, 50, 2);
  auto reader = active->NewReader(1);
  ASSERT_TRUE(reader.ok());
  const std::string bytes = NextRawBytes(reader->get());

  // Damaged bytes: refused, nothing stored.
  std::string bad = bytes;
  bad[bad.size() / 2] ^= 0x04;
  EXPECT_TRUE(standby->AppendRaw(bad).status().IsCorruption());
  // A partial frame.
  EXPECT_TRUE(standby->AppendRaw(bytes.substr(0, bytes.size() - 3)).status().IsCorruption());
  // Garbage.
  EXPECT_FALSE(standby->AppendRaw(std::string(500, 'z')).ok());
  EXPECT_EQ(standby->last_lsn(), 0u);
  // Not continuing the log: the standby is at 0, these start at LSN 11.
  AppendN(active.get(), 5, 50, 2);
  const std::string later_bytes = NextRawBytes(reader->get());
  EXPECT_EQ(standby->AppendRaw(later_bytes).status().code(), StatusCode::kInvalidArgument);
  // In order they are accepted.
  ASSERT_TRUE(standby->AppendRaw(bytes).ok());
  ASSERT_TRUE(standby->AppendRaw(later_bytes).ok());
  EXPECT_EQ(standby->last_lsn(), 15u);
  // Frames of an older epoch than the standby already holds.
  ASSERT_TRUE(standby->Append(3, RecordType::kEpochStart, "").ok());
  TempDir c;
  auto old = OpenOrDie(c.path(), Small(false));
  AppendN(old.get(), 17, 10, 2);
  auto old_reader = old->NewReader(17);
  ASSERT_TRUE(old_reader.ok());
  const std::string old_bytes = NextRawBytes(old_reader->get());
  EXPECT_TRUE(standby->AppendRaw(old_bytes).status().IsStaleEpoch());
}

}  // namespace
}  // namespace replica::wal
