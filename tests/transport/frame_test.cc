#include "transport/frame.h"

#include <gtest/gtest.h>

#include <cstring>

#include "transport/auth.h"

namespace replica::transport {
namespace {

TEST(TransportFrameTest, HeaderRoundTripAndDamage) {
  char h[kFrameHeaderSize];
  EncodeFrameHeader(FrameType::kData, 12345, h);
  FrameHeader out;
  ASSERT_TRUE(DecodeFrameHeader(h, 1 << 20, &out).ok());
  EXPECT_EQ(out.type, FrameType::kData);
  EXPECT_EQ(out.payload_len, 12345u);
  for (size_t bit = 0; bit < kFrameHeaderSize * 8; ++bit) {
    char bad[kFrameHeaderSize];
    std::memcpy(bad, h, sizeof bad);
    bad[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    EXPECT_FALSE(DecodeFrameHeader(bad, 1 << 20, &out).ok()) << "bit " << bit;
  }
  EXPECT_EQ(DecodeFrameHeader(h, 1000, &out).code(), StatusCode::kInvalidArgument);  // over the limit
}

TEST(TransportFrameTest, DecoderTakesFramesFedInPieces) {
  std::string stream;
  for (int i = 0; i < 5; ++i) {
    char h[kFrameHeaderSize];
    std::string payload(static_cast<size_t>(i * 100), static_cast<char>('a' + i));
    EncodeFrameHeader(i % 2 ? FrameType::kData : FrameType::kControl, static_cast<uint32_t>(payload.size()), h);
    stream.append(h, sizeof h);
    stream += payload;
  }
  FrameDecoder dec(1 << 20);
  int got = 0;
  for (char c : stream) {
    ASSERT_TRUE(dec.Feed(std::string_view(&c, 1)).ok());
    FrameHeader fh;
    std::string payload;
    while (dec.Next(&fh, &payload)) {
      EXPECT_EQ(payload, std::string(static_cast<size_t>(got * 100), static_cast<char>('a' + got)));
      ++got;
    }
  }
  EXPECT_EQ(got, 5);
  FrameDecoder bad(1 << 20);
  EXPECT_FALSE(bad.Feed("GET / HTTP/1.1\r\n\r\n").ok());
  EXPECT_FALSE(bad.Feed("more").ok());  // dead once broken
}

TEST(AuthTest, ProofsBindEveryInput) {
  const std::string cn = RandomNonce(), sn = RandomNonce();
  EXPECT_EQ(cn.size(), kNonceSize);
  EXPECT_NE(cn, sn);
  const std::string p = AuthProof("secret", "replica/client", "c1", cn, sn);
  EXPECT_EQ(p.size(), 32u);
  EXPECT_TRUE(ProofEquals(p, AuthProof("secret", "replica/client", "c1", cn, sn)));
  EXPECT_FALSE(ProofEquals(p, AuthProof("secreT", "replica/client", "c1", cn, sn)));
  EXPECT_FALSE(ProofEquals(p, AuthProof("secret", "replica/server", "c1", cn, sn)));
  EXPECT_FALSE(ProofEquals(p, AuthProof("secret", "replica/client", "c2", cn, sn)));
  EXPECT_FALSE(ProofEquals(p, AuthProof("secret", "replica/client", "c1", sn, cn)));
  EXPECT_FALSE(ProofEquals(p, p.substr(1)));
}

}  // namespace
}  // namespace replica::transport
