// The crash-safe install of a snapshot (replication/snapshot.h): a crash at
// any step before the commit point keeps the old data; at any step after it,
// the next open finishes the install.
#include "replication/snapshot.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <rocksdb/db.h>
#include <sys/stat.h>

#include <filesystem>
#include <memory>

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

// A table file is read once: again (or through a hard link, as a
// checkpoint's files are) it comes from the cache; changed in place (size
// or modification time), it is read again. Other files are always read.
TEST(SnapshotHashCacheTest, ATableFileIsReadOnceUntilItChanges) {
  TempDir dir;
  const std::string a = dir.Sub("000012.sst");
  test::WriteFileBytes(a, test::Payload(1, 1 << 20));
  HashCache cache;
  bool read = false;
  auto first = cache.Hash(a, &read);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ(*first, *HashFile(a));
  EXPECT_TRUE(read);
  EXPECT_EQ(*cache.Hash(a, &read), *first);
  EXPECT_FALSE(read);
  fs::create_directories(dir.Sub("cp"));
  fs::create_hard_link(a, dir.Sub("cp/000012.sst"));
  EXPECT_EQ(*cache.Hash(dir.Sub("cp/000012.sst"), &read), *first);
  EXPECT_FALSE(read) << "a hard link is the same file";
  fs::create_hard_link(a, dir.Sub("000013.sst"));
  EXPECT_EQ(*cache.Hash(dir.Sub("000013.sst"), &read), *first);
  EXPECT_TRUE(read) << "another name (a new file on a reused inode) is hashed again";

  // Changed in place, same size: told by its modification time.
  test::WriteFileBytes(a, test::Payload(2, 1 << 20));
  const timespec times[2] = {{0, UTIME_OMIT}, {1000, 1}};
  ASSERT_EQ(::utimensat(AT_FDCWD, a.c_str(), times, 0), 0);
  auto changed = cache.Hash(a, &read);
  ASSERT_TRUE(changed.ok());
  EXPECT_EQ(*changed, *HashFile(a));
  EXPECT_NE(*changed, *first);
  EXPECT_TRUE(read);

  const std::string manifest = dir.Sub("MANIFEST-000005");
  test::WriteFileBytes(manifest, "manifest");
  EXPECT_EQ(*cache.Hash(manifest, &read), *HashFile(manifest));
  EXPECT_TRUE(read);
  (void)cache.Hash(manifest, &read);
  EXPECT_TRUE(read) << "only table files are remembered";

  // Trim keeps what was used since the last trim, and forgets the rest.
  cache.Trim();
  (void)cache.Hash(a, &read);
  EXPECT_FALSE(read);
  cache.Trim();
  cache.Trim();
  (void)cache.Hash(a, &read);
  EXPECT_TRUE(read);
  cache.Clear();
  (void)cache.Hash(a, &read);
  EXPECT_TRUE(read) << "a cleared cache knows nothing";
  EXPECT_FALSE(cache.Hash(dir.Sub("missing.sst"), &read).ok());
}

// Two checkpoints of a database: the second reads only what is new (its
// table files are links to the same files), and lists the same hashes as a
// checkpoint made without the cache.
TEST(SnapshotHashCacheTest, ASecondCheckpointReadsOnlyNewFiles) {
  TempDir dir;
  rocksdb::Options o;
  o.create_if_missing = true;
  o.create_missing_column_families = true;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{rocksdb::kDefaultColumnFamilyName, {}},
                                                      {kMetaColumnFamily, {}}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(o, dir.Sub("db"), cfs, &handles, &raw).ok());
  std::unique_ptr<rocksdb::DB> db(raw);
  for (int i = 0; i < 2000; ++i) {
    ASSERT_TRUE(db->Put({}, "key" + std::to_string(i), test::Payload(static_cast<uint64_t>(i), 200)).ok());
  }
  ASSERT_TRUE(db->Flush({}).ok());
  HashCache cache;
  auto one = MakeCheckpoint(db.get(), dir.Sub("cp1"), kMetaColumnFamily, kAppliedKey, &cache);
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  uint64_t tables = 0;
  for (const auto& f : one->files) {
    if (f.name.size() > 4 && f.name.substr(f.name.size() - 4) == ".sst") tables += f.size;
  }
  ASSERT_GT(tables, 100000u);
  EXPECT_GE(one->bytes_hashed, tables);
  auto two = MakeCheckpoint(db.get(), dir.Sub("cp2"), kMetaColumnFamily, kAppliedKey, &cache);
  ASSERT_TRUE(two.ok()) << two.status().ToString();
  EXPECT_LE(two->bytes_hashed, one->bytes_hashed - tables) << "the table files were read again";
  auto plain = MakeCheckpoint(db.get(), dir.Sub("cp3"), kMetaColumnFamily, kAppliedKey);
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  ASSERT_EQ(plain->files.size(), two->files.size());
  for (size_t i = 0; i < plain->files.size(); ++i) {
    EXPECT_EQ(two->files[i].name, plain->files[i].name);
    if (two->files[i].name.find(".sst") != std::string::npos) {
      EXPECT_EQ(two->files[i].xxh3, plain->files[i].xxh3) << two->files[i].name;
    }
  }
  for (auto* h : handles) (void)db->DestroyColumnFamilyHandle(h);
}

}  // namespace
}  // namespace replica::snapshot
