#include "wal/epoch_history.h"

#include <gtest/gtest.h>

namespace replica::wal {
namespace {

EpochHistory Sample() {
  EpochHistory h;
  EXPECT_TRUE(h.Add(1, 1).ok());
  EXPECT_TRUE(h.Add(3, 101).ok());
  EXPECT_TRUE(h.Add(4, 251).ok());
  return h;
}

TEST(EpochHistoryTest, EndOfEpoch) {
  EpochHistory h = Sample();
  // Epoch 1 ran LSN 1..100, epoch 3 ran 101..250, epoch 4 from 251 to the end (300).
  EXPECT_EQ(h.EndOf(1, 300).end_lsn, 100u);
  EXPECT_EQ(h.EndOf(1, 300).epoch, 1u);
  EXPECT_EQ(h.EndOf(2, 300).epoch, 1u);  // never written here: ends where 1 ended
  EXPECT_EQ(h.EndOf(2, 300).end_lsn, 100u);
  EXPECT_EQ(h.EndOf(3, 300).end_lsn, 250u);
  EXPECT_EQ(h.EndOf(4, 300).end_lsn, 300u);
  EXPECT_EQ(h.EndOf(9, 300).end_lsn, 300u);
  EXPECT_EQ(h.EndOf(9, 300).epoch, 4u);
  EXPECT_EQ(h.EndOf(0, 300).epoch, 0u);
  EXPECT_EQ(h.EndOf(0, 300).end_lsn, 0u);
  EXPECT_EQ(h.EpochAt(100), 1u);
  EXPECT_EQ(h.EpochAt(101), 3u);
  EXPECT_EQ(h.EpochAt(1000), 4u);
}

TEST(EpochHistoryTest, AddRefusesDisorder) {
  EpochHistory h = Sample();
  EXPECT_FALSE(h.Add(4, 400).ok());
  EXPECT_FALSE(h.Add(5, 251).ok());
  EXPECT_TRUE(h.Add(5, 252).ok());
}

TEST(EpochHistoryTest, TruncateAfter) {
  EpochHistory h = Sample();
  EXPECT_FALSE(h.TruncateAfter(300));
  EXPECT_TRUE(h.TruncateAfter(150));
  EXPECT_EQ(h.last_epoch(), 3u);
  EXPECT_TRUE(h.TruncateAfter(0));
  EXPECT_TRUE(h.empty());
}

TEST(EpochHistoryTest, EncodeDecodeAndDamage) {
  EpochHistory h = Sample();
  std::string bytes = h.Encode();
  auto back = EpochHistory::Decode(bytes);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->entries(), h.entries());
  for (size_t i = 0; i < bytes.size(); ++i) {
    std::string bad = bytes;
    bad[i] ^= 0x10;
    EXPECT_FALSE(EpochHistory::Decode(bad).ok()) << "byte " << i;
  }
  EXPECT_FALSE(EpochHistory::Decode(bytes.substr(0, bytes.size() - 1)).ok());
  EXPECT_FALSE(EpochHistory::Decode("").ok());
}

}  // namespace
}  // namespace replica::wal
