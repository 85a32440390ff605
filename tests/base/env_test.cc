// The POSIX Env and the fault-injecting Env that the WAL tests rely on.
#include "base/env.h"

#include <gtest/gtest.h>

#include <sys/stat.h>

#include <cerrno>
#include <string>
#include <string_view>
#include <vector>

#include "base/fault_env.h"
#include "tests/support/test_util.h"

namespace replica {
namespace {

using test::TempDir;

TEST(EnvTest, WriteReadRenameDelete) {
  TempDir dir;
  Env* env = Env::Default();
  const std::string a = dir.Sub("a");
  auto f = env->NewWritableFile(a);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  ASSERT_TRUE((*f)->Append("hello ").ok());
  ASSERT_TRUE((*f)->Append("world").ok());
  EXPECT_EQ((*f)->Size(), 11u);
  ASSERT_TRUE((*f)->Sync().ok());
  ASSERT_TRUE((*f)->Close().ok());

  auto reopened = env->ReopenWritableFile(a);
  ASSERT_TRUE(reopened.ok());
  EXPECT_EQ((*reopened)->Size(), 11u);
  ASSERT_TRUE((*reopened)->Append("!").ok());
  ASSERT_TRUE((*reopened)->Close().ok());

  auto data = ReadWholeFile(env, a);
  ASSERT_TRUE(data.ok());
  EXPECT_EQ(*data, "hello world!");

  auto r = env->NewRandomAccessFile(a);
  ASSERT_TRUE(r.ok());
  char buf[16];
  auto n = (*r)->Read(6, 16, buf);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(std::string(buf, *n), "world!");  // short read at end of file
  EXPECT_GE((*r)->NativeHandle(), 0);

  ASSERT_TRUE(env->RenameFile(a, dir.Sub("b")).ok());
  EXPECT_FALSE(env->FileExists(a));
  ASSERT_TRUE(env->TruncateFile(dir.Sub("b"), 5).ok());
  EXPECT_EQ(*env->GetFileSize(dir.Sub("b")), 5u);
  auto children = env->GetChildren(dir.path());
  ASSERT_TRUE(children.ok());
  EXPECT_EQ(*children, std::vector<std::string>{"b"});
  ASSERT_TRUE(env->DeleteFile(dir.Sub("b")).ok());
  EXPECT_TRUE(env->NewRandomAccessFile(dir.Sub("b")).status().IsNotFound());
  EXPECT_TRUE(env->GetChildren(dir.Sub("nope")).status().IsNotFound());
}

// AppendV writes the parts in order as one Append of their concatenation
// would: more parts than one writev takes (64), empty parts among them, and
// both the POSIX file and the fault-injecting wrapper (which falls back to
// one Append per part).
TEST(EnvTest, AppendVWritesThePartsInOrder) {
  TempDir dir;
  std::vector<std::string> chunks;
  std::string expected;
  for (int i = 0; i < 150; ++i) {
    chunks.push_back(i % 7 == 3 ? std::string() : std::string(static_cast<size_t>(1 + i * 37 % 5000), static_cast<char>('a' + i % 26)));
    expected += chunks.back();
  }
  std::vector<std::string_view> parts(chunks.begin(), chunks.end());
  FaultInjectionEnv fault(Env::Default());
  for (Env* env : {Env::Default(), static_cast<Env*>(&fault)}) {
    const std::string path = dir.Sub(env == Env::Default() ? "posix" : "fault");
    auto f = env->NewWritableFile(path);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    ASSERT_TRUE((*f)->Append("head:").ok());
    ASSERT_TRUE((*f)->AppendV(parts.data(), parts.size()).ok());
    ASSERT_TRUE((*f)->AppendV(parts.data(), 0).ok());
    EXPECT_EQ((*f)->Size(), 5 + expected.size());
    ASSERT_TRUE((*f)->Close().ok());
    auto data = ReadWholeFile(Env::Default(), path);
    ASSERT_TRUE(data.ok()) << data.status().ToString();
    EXPECT_TRUE(*data == "head:" + expected) << path;
  }
  // Views cut from one buffer are adjacent in memory (one iovec per 64
  // parts' worth would otherwise be needed): same bytes.
  std::vector<std::string_view> cuts;
  for (size_t pos = 0; pos < expected.size(); pos += 97) cuts.push_back(std::string_view(expected).substr(pos, 97));
  const std::string path = dir.Sub("adjacent");
  auto f = Env::Default()->NewWritableFile(path);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE((*f)->AppendV(cuts.data(), cuts.size()).ok());
  EXPECT_EQ((*f)->Size(), expected.size());
  ASSERT_TRUE((*f)->Close().ok());
  auto data = ReadWholeFile(Env::Default(), path);
  ASSERT_TRUE(data.ok());
  EXPECT_TRUE(*data == expected);
}

TEST(EnvTest, AtomicWriteReplaces) {
  TempDir dir;
  Env* env = Env::Default();
  ASSERT_TRUE(WriteFileAtomically(env, dir.Sub("f"), "one").ok());
  ASSERT_TRUE(WriteFileAtomically(env, dir.Sub("f"), "two").ok());
  EXPECT_EQ(*ReadWholeFile(env, dir.Sub("f")), "two");
  EXPECT_FALSE(env->FileExists(dir.Sub("f.tmp")));
}

// A whole-file read of a configuration or state file is bounded and only
// of a regular file: a huge file used to be allocated whole (bad_alloc ends
// the process), a FIFO blocked the open, and a pipe read as empty.
TEST(EnvTest, ReadWholeFileRefusesLargeFilesAndWhatIsNoRegularFile) {
  TempDir dir;
  test::WriteFileBytes(dir.Sub("small"), std::string(1000, 's'));
  EXPECT_EQ(ReadWholeFile(Env::Default(), dir.Sub("small"), 1000)->size(), 1000u);
  auto big = ReadWholeFile(Env::Default(), dir.Sub("small"), 999);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(big.status().message().find("is 1000 bytes, more than the 999"), std::string::npos)
      << big.status().ToString();
  ASSERT_EQ(::mkfifo(dir.Sub("fifo").c_str(), 0600), 0);
  auto fifo = ReadWholeFile(Env::Default(), dir.Sub("fifo"));  // no writer: an open would block
  ASSERT_FALSE(fifo.ok());
  EXPECT_NE(fifo.status().message().find("not a regular file"), std::string::npos) << fifo.status().ToString();
  EXPECT_FALSE(ReadWholeFile(Env::Default(), dir.path()).ok());
  EXPECT_TRUE(ReadWholeFile(Env::Default(), dir.Sub("missing")).status().IsNotFound());
}

// A directory it creates is synced through its parent, which is found for
// a trailing slash too; an existing one is left as it is, and a file of
// that name is an error.
TEST(EnvTest, CreateDirIfMissingCreatesOnceAndRefusesAFile) {
  TempDir dir;
  Env* env = Env::Default();
  ASSERT_TRUE(env->CreateDirIfMissing(dir.Sub("a")).ok());
  ASSERT_TRUE(env->CreateDirIfMissing(dir.Sub("a") + "/b/").ok());
  EXPECT_TRUE(env->CreateDirIfMissing(dir.Sub("a") + "/b").ok()) << "an existing directory";
  EXPECT_FALSE(*env->IsRegularFile(dir.Sub("a") + "/b"));
  EXPECT_FALSE(env->CreateDirIfMissing(dir.Sub("a") + "/missing/c").ok()) << "parents are not created";
  test::WriteFileBytes(dir.Sub("f"), "x");
  EXPECT_FALSE(env->CreateDirIfMissing(dir.Sub("f")).ok());
}

TEST(EnvTest, LockIsExclusive) {
  TempDir dir;
  Env* env = Env::Default();
  auto first = env->LockFile(dir.Sub("LOCK"));
  ASSERT_TRUE(first.ok());
  // flock locks belong to the open file description, so a second open in the
  // same process conflicts too, as a second process would.
  auto second = env->LockFile(dir.Sub("LOCK"));
  EXPECT_EQ(second.status().code(), StatusCode::kBusy);
  first.value().reset();
  EXPECT_TRUE(env->LockFile(dir.Sub("LOCK")).ok());
}

TEST(FaultEnvTest, CrashAfterMutations) {
  TempDir dir;
  FaultInjectionEnv env(Env::Default());
  env.CrashAfterMutations(2);  // create + one append succeed
  auto f = env.NewWritableFile(dir.Sub("f"));
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE((*f)->Append("a").ok());
  EXPECT_TRUE((*f)->Append("b").IsIOError());
  EXPECT_TRUE(env.crashed());
  EXPECT_TRUE((*f)->Sync().IsIOError());  // everything after the crash fails
  EXPECT_TRUE(env.DeleteFile(dir.Sub("f")).IsIOError());
  EXPECT_EQ(env.mutations(), 2);
}

TEST(FaultEnvTest, SpaceBudgetGivesShortWriteAndEnospc) {
  TempDir dir;
  FaultInjectionEnv env(Env::Default());
  env.SetSpaceBudget(5);
  auto f = env.NewWritableFile(dir.Sub("f"));
  ASSERT_TRUE(f.ok());
  Status st = (*f)->Append("0123456789");
  EXPECT_EQ(st.sys_errno(), ENOSPC) << st.ToString();
  EXPECT_EQ((*f)->Size(), 5u);
  EXPECT_EQ(*ReadWholeFile(Env::Default(), dir.Sub("f")), "01234");
}

TEST(FaultEnvTest, DropUnsyncedData) {
  TempDir dir;
  FaultInjectionEnv env(Env::Default());
  auto f = env.NewWritableFile(dir.Sub("f"));
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE((*f)->Append("synced").ok());
  ASSERT_TRUE((*f)->Sync().ok());
  ASSERT_TRUE((*f)->Append("-lost").ok());
  ASSERT_TRUE(env.DropUnsyncedData().ok());
  EXPECT_EQ(*ReadWholeFile(Env::Default(), dir.Sub("f")), "synced");
  env.SetSyncFails(true);
  EXPECT_EQ((*f)->Sync().sys_errno(), EIO);
}

// Power loss that keeps chosen pages of the unsynced bytes: the pages before
// the last one kept read as zeros, beyond the synced part of their page; the
// file ends with the last page kept.
TEST(FaultEnvTest, DropUnsyncedDataKeepsChosenPages) {
  constexpr size_t kPage = FaultInjectionEnv::kPowerLossPage;
  TempDir dir;
  FaultInjectionEnv env(Env::Default());
  const std::string path = dir.Sub("f");
  const std::string synced(100, 's');
  const std::string unsynced(3 * kPage - 100, 'u');  // to the end of page 2
  for (bool keep_any : {true, false}) {
    auto f = env.NewWritableFile(path);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Append(synced).ok());
    ASSERT_TRUE((*f)->Sync().ok());
    ASSERT_TRUE((*f)->Append(unsynced).ok());
    std::vector<uint64_t> asked;
    ASSERT_TRUE(env.DropUnsyncedData([&](const std::string& p, uint64_t page) {
                     EXPECT_EQ(p, path);
                     asked.push_back(page);
                     return keep_any && page == 1;
                   }).ok());
    EXPECT_EQ(asked, (std::vector<uint64_t>{0, 1, 2}));
    const std::string got = *ReadWholeFile(Env::Default(), path);
    if (!keep_any) {
      EXPECT_EQ(got, synced);
      continue;
    }
    ASSERT_EQ(got.size(), 2 * kPage) << "the file ends with the last page kept";
    EXPECT_EQ(got.substr(0, 100), synced);
    EXPECT_EQ(got.substr(100, kPage - 100), std::string(kPage - 100, '\0')) << "page 0's unsynced part is lost";
    EXPECT_EQ(got.substr(kPage), std::string(kPage, 'u')) << "page 1 is kept";
  }
}

}  // namespace
}  // namespace replica
