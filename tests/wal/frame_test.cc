// Frame encoding, decoding and raw-run verification (wal/frame.h).
#include "wal/frame.h"

#include <gtest/gtest.h>

#include <lz4.h>

#include <vector>

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

TEST(FrameTest, VerifyFrameRunDecodesBlocks) {
  // A block whose checksum is good but whose contents do not decode into
  // its records is refused: stored, it would stop every reader at its LSN.
  const std::string value(200, 'v');
  std::vector<RecordIn> recs(4, RecordIn{RecordType::kData, value});
  std::string good;
  ASSERT_TRUE(EncodeRecords(20, 1, recs.data(), recs.size(), /*try_compress=*/true, &good));
  ASSERT_TRUE(VerifyFrameRun(good, 20, 1).ok());
  FrameHeader h;
  ASSERT_TRUE(DecodeFrameHeader(good.data(), &h).ok());
  ASSERT_EQ(h.frame_type, FrameType::kLz4Block);
  // Same header, new payload, checksum made good again.
  auto with_payload = [&](const std::string& payload, uint32_t count, uint32_t raw_len) {
    std::string f = good.substr(0, kFrameHeaderSize) + payload;
    EncodeFixed32(f.data() + 0, static_cast<uint32_t>(payload.size()));
    EncodeFixed32(f.data() + 24, count);
    EncodeFixed32(f.data() + 28, raw_len);
    EncodeFixed64(f.data() + kFrameChecksumOffset, FrameChecksum(f.data(), payload));
    return f;
  };
  const std::string packed = good.substr(kFrameHeaderSize);
  // Not LZ4 at all.
  auto bad = VerifyFrameRun(with_payload(std::string(packed.size(), '\x7f'), h.count, h.raw_len), 20, 1);
  EXPECT_TRUE(bad.status().IsCorruption()) << bad.status().ToString();
  EXPECT_NE(bad.status().message().find("does not decompress"), std::string::npos) << bad.status().ToString();
  // Decodes, but to fewer records than the header counts.
  bad = VerifyFrameRun(with_payload(packed, h.count - 1, h.raw_len), 20, 1);
  EXPECT_TRUE(bad.status().IsCorruption()) << bad.status().ToString();
  // A record of type 0 inside the block.
  std::string raw(8, '\0');
  EncodeFixed32(raw.data() + 4, 0);
  std::string zero_type(static_cast<size_t>(LZ4_compressBound(8)), '\0');
  zero_type.resize(static_cast<size_t>(LZ4_compress_default(raw.data(), zero_type.data(), 8, static_cast<int>(zero_type.size()))));
  bad = VerifyFrameRun(with_payload(zero_type, 1, 8), 20, 1);
  EXPECT_TRUE(bad.status().IsCorruption()) << bad.status().ToString();
  EXPECT_NE(bad.status().message().find("bad record 0"), std::string::npos) << bad.status().ToString();
}

}  // namespace
}  // namespace replica::wal
