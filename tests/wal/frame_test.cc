// Frame encoding, decoding and raw-run verification (wal/frame.h).
#include "wal/frame.h"

#include <gtest/gtest.h>

#include "base/coding.h"
#include "tests/support/test_util.h"

namespace replica::wal {
namespace {

TEST(FrameTest, RecordFrameRoundTrip) {
  std::string out;
  EncodeRecordFrame(7, 3, RecordType::kEpochStart, "hello", &out);
  ASSERT_EQ(out.size(), kFrameHeaderSize + 5);
  FrameHeader h;
  ASSERT_TRUE(DecodeFrameHeader(out.data(), &h).ok());
  EXPECT_EQ(h.frame_type, FrameType::kRecord);
  EXPECT_EQ(h.record_type, static_cast<uint8_t>(RecordType::kEpochStart));
  EXPECT_EQ(h.lsn, 7u);
  EXPECT_EQ(h.epoch, 3u);
  EXPECT_EQ(h.count, 1u);
  EXPECT_EQ(h.payload_len, 5u);
  EXPECT_TRUE(FrameChecksumOk(out.data(), 5));
  // Any flipped bit, in header or payload, breaks the checksum or the header.
  for (size_t i = 0; i < out.size() * 8; ++i) {
    std::string bad = out;
    bad[i / 8] = static_cast<char>(bad[i / 8] ^ (1 << (i % 8)));
    FrameHeader bh;
    bool header_ok = DecodeFrameHeader(bad.data(), &bh).ok();
    bool whole_ok = header_ok && bh.payload_len == 5 && FrameChecksumOk(bad.data(), 5);
    EXPECT_FALSE(whole_ok) << "bit " << i;
  }
}

TEST(FrameTest, CompressibleRecordsBecomeOneBlock) {
  std::vector<std::string> payloads(50, std::string(200, 'x'));
  std::vector<RecordIn> recs;
  for (auto& p : payloads) recs.push_back({RecordType::kData, p});
  std::string out;
  ASSERT_TRUE(EncodeRecords(100, 2, recs.data(), recs.size(), true, &out));
  FrameHeader h;
  ASSERT_TRUE(DecodeFrameHeader(out.data(), &h).ok());
  EXPECT_EQ(h.frame_type, FrameType::kLz4Block);
  EXPECT_EQ(h.count, 50u);
  EXPECT_EQ(out.size(), h.frame_size());
  EXPECT_LT(out.size(), 50u * 200u / 4);
  std::string raw;
  std::vector<RecordView> views;
  ASSERT_TRUE(DecodeBlock(h, std::string_view(out).substr(kFrameHeaderSize), &raw, &views).ok());
  ASSERT_EQ(views.size(), 50u);
  for (size_t i = 0; i < views.size(); ++i) {
    EXPECT_EQ(views[i].lsn, 100 + i);
    EXPECT_EQ(views[i].epoch, 2u);
    EXPECT_EQ(views[i].payload, payloads[i]);
  }
}

TEST(FrameTest, IncompressibleRecordsStayPlain) {
  std::string p = test::Payload(1, 64);
  RecordIn r{RecordType::kData, p};
  std::string out;
  EXPECT_FALSE(EncodeRecords(1, 1, &r, 1, true, &out));
  FrameHeader h;
  ASSERT_TRUE(DecodeFrameHeader(out.data(), &h).ok());
  EXPECT_EQ(h.frame_type, FrameType::kRecord);
}

TEST(FrameTest, HeaderSanityChecks) {
  std::string good;
  EncodeRecordFrame(1, 1, RecordType::kData, "abc", &good);
  auto mutate = [&](size_t off, auto value) {
    std::string b = good;
    std::memcpy(b.data() + off, &value, sizeof value);
    FrameHeader h;
    return DecodeFrameHeader(b.data(), &h);
  };
  EXPECT_TRUE(mutate(4, uint8_t{9}).IsCorruption());              // unknown frame type
  EXPECT_TRUE(mutate(5, uint8_t{0}).IsCorruption());              // record type 0
  EXPECT_TRUE(mutate(6, uint16_t{1}).IsCorruption());             // flags
  EXPECT_TRUE(mutate(8, uint64_t{0}).IsCorruption());             // LSN 0
  EXPECT_TRUE(mutate(24, uint32_t{2}).IsCorruption());            // count != 1
  EXPECT_TRUE(mutate(0, uint32_t{kMaxRecordPayload + 1}).IsCorruption());  // huge length
}

TEST(FrameTest, VerifyFrameRun) {
  std::string run;
  EncodeRecordFrame(10, 1, RecordType::kData, "a", &run);
  EncodeRecordFrame(11, 1, RecordType::kData, "b", &run);
  EncodeRecordFrame(12, 2, RecordType::kEpochStart, "c", &run);
  auto ok = VerifyFrameRun(run, 10, 1);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->first_lsn, 10u);
  EXPECT_EQ(ok->last_lsn, 12u);
  EXPECT_EQ(ok->frames, 3u);
  ASSERT_EQ(ok->epoch_starts.size(), 2u);
  EXPECT_EQ(ok->epoch_starts[1], (std::pair<Epoch, Lsn>{2, 12}));

  EXPECT_TRUE(VerifyFrameRun(run, 11, 1).status().IsCorruption());                  // wrong start
  EXPECT_TRUE(VerifyFrameRun(run, 10, 3).status().IsStaleEpoch());                  // old epoch
  EXPECT_TRUE(VerifyFrameRun(run.substr(0, run.size() - 1), 10, 1).status().IsCorruption());  // torn
  std::string flipped = run;
  flipped[kFrameHeaderSize] ^= 1;
  EXPECT_TRUE(VerifyFrameRun(flipped, 10, 1).status().IsCorruption());
  std::string gap;
  EncodeRecordFrame(10, 1, RecordType::kData, "a", &gap);
  EncodeRecordFrame(12, 1, RecordType::kData, "b", &gap);
  EXPECT_TRUE(VerifyFrameRun(gap, 10, 1).status().IsCorruption());
  EXPECT_FALSE(VerifyFrameRun("", 10, 1).ok());
  EXPECT_TRUE(VerifyFrameRun(std::string(100, '\xff'), 10, 1).status().IsCorruption());
}

}  // namespace
}  // namespace replica::wal
