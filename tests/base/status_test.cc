#include "replica/status.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace replica {
namespace {

Result<int> Half(int v) {
  if (v % 2 != 0) return Status::InvalidArgument(std::to_string(v) + " is odd");
  return v / 2;
}

Result<int> Quarter(int v) {
  REPLICA_ASSIGN_OR_RETURN(int h, Half(v));
  REPLICA_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

Status Chain(bool fail) {
  REPLICA_RETURN_IF_ERROR_CTX(fail ? Status::NotFound("x") : Status::OK(), "loading x");
  return Status::OK();
}

TEST(StatusTest, OkIsCheapAndEmpty) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_TRUE(s.WithContext("ctx").ok());
}

TEST(StatusTest, CodesMessagesAndContext) {
  Status s = Status::Corruption("bad checksum").WithContext("segment 3").WithContext("open wal");
  EXPECT_TRUE(s.IsCorruption());
  EXPECT_EQ(s.message(), "open wal: segment 3: bad checksum");
  EXPECT_EQ(s.ToString(), "Corruption: open wal: segment 3: bad checksum");
  Status copy = s;
  EXPECT_EQ(copy.ToString(), s.ToString());
}

TEST(StatusTest, ErrnoIsKept) {
  Status s = Status::FromErrno("write /x", ENOSPC);
  EXPECT_TRUE(s.IsIOError());
  EXPECT_EQ(s.sys_errno(), ENOSPC);
  EXPECT_NE(s.message().find("No space left"), std::string::npos) << s.message();
  EXPECT_EQ(s.WithContext("append").sys_errno(), ENOSPC);
}

TEST(StatusTest, ResultPropagates) {
  EXPECT_EQ(*Quarter(8), 2);
  auto r = Quarter(6);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "3 is odd");
  EXPECT_TRUE(Chain(false).ok());
  EXPECT_EQ(Chain(true).ToString(), "NotFound: loading x: x");
}

TEST(StatusTest, ResultFromOkStatusIsAnError) {
  Result<int> r{Status::OK()};
  EXPECT_FALSE(r.ok());
}

}  // namespace
}  // namespace replica
