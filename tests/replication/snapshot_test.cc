// The crash-safe install of a snapshot (replication/snapshot.h): a crash at
// any step before the commit point keeps the old data; at any step after it,
// the next open finishes the install.
#include "replication/snapshot.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "tests/support/test_util.h"

namespace replica::snapshot {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

// DATA_DIR with old db/ and wal/, and a complete staging area holding new ones.
void Prepare(const std::string& d) {
  fs::create_directories(d + "/db");
  fs::create_directories(d + "/wal");
  test::WriteFileBytes(d + "/db/CURRENT", "old-db");
  test::WriteFileBytes(d + "/wal/seg", "old-wal");
  fs::create_directories(StagingDb(d));
  fs::create_directories(StagingWal(d));
  test::WriteFileBytes(StagingDb(d) + "/CURRENT", "new-db");
  test::WriteFileBytes(StagingWal(d) + "/seg", "new-wal");
}

void ExpectInstalled(const std::string& d) {
  EXPECT_EQ(test::ReadFileBytes(d + "/db/CURRENT"), "new-db");
  EXPECT_EQ(test::ReadFileBytes(d + "/wal/seg"), "new-wal");
  EXPECT_FALSE(fs::exists(StagingDir(d)));
  EXPECT_FALSE(fs::exists(d + "/INSTALL"));
  EXPECT_FALSE(fs::exists(d + "/old-db"));
  EXPECT_FALSE(fs::exists(d + "/old-wal"));
}

TEST(SnapshotInstallTest, CommitReplacesDbAndWal) {
  TempDir dir;
  const std::string d = dir.Sub("n");
  Prepare(d);
  ASSERT_TRUE(CommitInstall(d).ok());
  ExpectInstalled(d);
}

TEST(SnapshotInstallTest, WithoutTheMarkerNothingChangesAndStagingIsKept) {
  TempDir dir;
  const std::string d = dir.Sub("n");
  Prepare(d);  // a crash before the commit point
  ASSERT_TRUE(RecoverInstall(d).ok());
  EXPECT_EQ(test::ReadFileBytes(d + "/db/CURRENT"), "old-db");
  EXPECT_EQ(test::ReadFileBytes(d + "/wal/seg"), "old-wal");
  EXPECT_TRUE(fs::exists(StagingDb(d) + "/CURRENT")) << "received files should be kept for reuse";
}

TEST(SnapshotInstallTest, ACrashAtEveryStepAfterTheMarkerIsFinishedOnOpen) {
  // The steps after the marker: db -> old-db, resync/db -> db, wal -> old-wal,
  // resync/wal -> wal, marker removed, old-* removed.
  for (int step = 0; step <= 4; ++step) {
    SCOPED_TRACE("crash after step " + std::to_string(step));
    TempDir dir;
    const std::string d = dir.Sub("n");
    Prepare(d);
    test::WriteFileBytes(d + "/INSTALL", "snapshot install\n");
    if (step >= 1) fs::rename(d + "/db", d + "/old-db");
    if (step >= 2) fs::rename(StagingDb(d), d + "/db");
    if (step >= 3) fs::rename(d + "/wal", d + "/old-wal");
    if (step >= 4) fs::rename(StagingWal(d), d + "/wal");
    ASSERT_TRUE(RecoverInstall(d).ok());
    ExpectInstalled(d);
    ASSERT_TRUE(RecoverInstall(d).ok()) << "running it again must be harmless";
    ExpectInstalled(d);
  }
}

TEST(SnapshotInstallTest, FileNamesFromThePeerArePlain) {
  EXPECT_TRUE(IsPlainFileName("000012.sst"));
  EXPECT_TRUE(IsPlainFileName("MANIFEST-000005"));
  for (const char* bad : {"", ".", "..", "../x", "a/b", "/etc/passwd"}) EXPECT_FALSE(IsPlainFileName(bad)) << bad;
}

TEST(SnapshotInstallTest, HashFileMatchesContentAndReportsMissingFiles) {
  TempDir dir;
  test::WriteFileBytes(dir.Sub("a"), std::string(3 << 20, 'x'));
  test::WriteFileBytes(dir.Sub("b"), std::string(3 << 20, 'x'));
  test::WriteFileBytes(dir.Sub("c"), std::string(3 << 20, 'y'));
  EXPECT_EQ(*HashFile(dir.Sub("a")), *HashFile(dir.Sub("b")));
  EXPECT_NE(*HashFile(dir.Sub("a")), *HashFile(dir.Sub("c")));
  EXPECT_FALSE(HashFile(dir.Sub("missing")).ok());
}

}  // namespace
}  // namespace replica::snapshot
