// logdiff against real replicas: an active and standbys made by the engine
// over real sockets, then copied and damaged on purpose (a flipped value, a
// missing key, an extra key, a truncated WAL, another epoch at the same LSN,
// a replica that is merely behind). The logdiff binary runs as a process.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <rocksdb/db.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <boost/json.hpp>
#include <thread>

#include "replica/engine.h"
#include "replication/logdiff.h"
#include "transport/transport.h"
#include "tests/tools/daemon.h"
#include "wal/wal.h"

namespace replica::test {
namespace {

const std::string kLogdiff = LOGDIFF_PATH;

std::string Logdiff(const std::string& args, int* code) { return Shell(kLogdiff + " --no-progress " + args, code); }

EngineOptions Node(const std::string& dir, const std::string& id, const std::string& follow) {
  EngineOptions o;
  o.node_id = id;
  o.data_dir = dir + "/" + id;
  o.follow = follow;
  o.secret = "test-secret";
  o.cluster = "t";
  o.wal_segment_size = 64 << 10;
  return o;
}

void Write(Engine* e, int from, int to) {
  for (int i = from; i < to; ++i) {
    WriteBatch b;
    b.Put("key" + std::to_string(i), Payload(static_cast<uint64_t>(i), 100));
    b.Put("counter", std::to_string(i));
    ASSERT_TRUE(e->Write(b).ok());
  }
}

// Opens a node's RocksDB directly, for damage and for flushes.
class RawDb {
 public:
  explicit RawDb(const std::string& data_dir) {
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{rocksdb::kDefaultColumnFamilyName, {}}, {"replica_meta", {}}};
    rocksdb::DB* db = nullptr;
    auto s = rocksdb::DB::Open(rocksdb::Options(), data_dir + "/db", cfs, &handles_, &db);
    EXPECT_TRUE(s.ok()) << s.ToString();
    db_.reset(db);
  }
  ~RawDb() {
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
  }
  rocksdb::DB* db() { return db_.get(); }
  rocksdb::ColumnFamilyHandle* handle(size_t i) { return handles_[i]; }

 private:
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::unique_ptr<rocksdb::DB> db_;
};

// Built once: a (active, 300 writes), b (standby, caught up), c (standby
// stopped after 200 writes).
class LogdiffTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    base_ = new TempDir();
    auto a = Engine::Open(Node(base_->path(), "a", ""));
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    const std::string follow = "127.0.0.1:" + std::to_string((*a)->listen_port());
    auto b = Engine::Open(Node(base_->path(), "b", follow));
    auto c = Engine::Open(Node(base_->path(), "c", follow));
    ASSERT_TRUE(b.ok() && c.ok());
    Write(a->get(), 0, 200);
    ASSERT_TRUE((*c)->WaitForApplied(200, 30s).ok());
    ASSERT_TRUE((*c)->Close().ok());
    Write(a->get(), 200, 300);
    ASSERT_TRUE((*b)->WaitForApplied(300, 30s).ok());
    ASSERT_TRUE((*b)->Close().ok());
    ASSERT_TRUE((*a)->Close().ok());
  }
  static void TearDownTestSuite() { delete base_; }

  // A copy of a base node, to damage.
  std::string Copy(const std::string& id, const std::string& as) {
    CopyDir(base_->Sub(id), dir_.Sub(as));
    return dir_.Sub(as);
  }
  static std::string Base(const std::string& id) { return base_->Sub(id); }

  static TempDir* base_;
  TempDir dir_;
};
TempDir* LogdiffTest::base_ = nullptr;

TEST_F(LogdiffTest, IdenticalReplicasExitZero) {
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + Base("b"), &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(out.rfind("logdiff: IDENTICAL: a, b; WAL LSN 1..300 (300 records agree); 301 keys", 0), 0u) << out;
  EXPECT_NE(out.find("MiB/s"), std::string::npos) << out;

  out = Logdiff("--json --bytes " + Base("a") + " " + Base("b"), &code);
  EXPECT_EQ(code, 0) << out;
  auto v = boost::json::parse(out).as_object();
  EXPECT_EQ(v["verdict"].as_string(), "identical");
  EXPECT_EQ(v["records_compared"].as_int64(), 300);
  EXPECT_EQ(v["keys_compared"].as_int64(), 301);
  EXPECT_EQ(v["nodes"].as_array()[1].as_object()["applied"].as_int64(), 300);
}

TEST_F(LogdiffTest, FlippedValueIsNamedWithBothValues) {
  const std::string b = Copy("b", "b");
  {
    RawDb db(b);
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "key42", "flipped").ok());
  }
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + b, &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_EQ(out.rfind("logdiff: DIFFERENT: 1 difference among a, b", 0), 0u) << out;
  EXPECT_NE(out.find("value cf default key \"key42\": a: (applied 300) \""), std::string::npos) << out;
  EXPECT_NE(out.find("b: (applied 300) \"flipped\" (7 bytes)"), std::string::npos) << out;
}

TEST_F(LogdiffTest, MissingAndExtraKeysAreNamed) {
  const std::string b = Copy("b", "b");
  {
    RawDb db(b);
    ASSERT_TRUE(db.db()->Delete(rocksdb::WriteOptions(), "key7").ok());
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "zz-extra", "x").ok());
  }
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + b, &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("DIFFERENT: 2 differences"), std::string::npos) << out;
  EXPECT_NE(out.find("missing cf default key \"key7\": a: (applied 300) \""), std::string::npos) << out;
  EXPECT_NE(out.find("b: (applied 300) missing"), std::string::npos) << out;
  EXPECT_NE(out.find("missing cf default key \"zz-extra\": a: (applied 300) missing; b: (applied 300) \"x\""),
            std::string::npos)
      << out;
}

TEST_F(LogdiffTest, TruncatedWalIsADifferenceNotLag) {
  const std::string b = Copy("b", "b");
  auto segs = SegmentPaths(b + "/wal");
  ASSERT_FALSE(segs.empty());
  TruncateFileTo(segs.back(), FileSize(segs.back()) - 30);
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + b, &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("log-end WAL of b: b: WAL ends at LSN 299 but RocksDB applied up to LSN 300"), std::string::npos)
      << out;
  EXPECT_NE(out.find("note: b: torn tail in the WAL"), std::string::npos) << out;
}

TEST_F(LogdiffTest, OtherEpochAtTheSameLsnIsTheFirstDivergence) {
  const std::string b = Copy("b", "b");
  {
    auto w = wal::Wal::Open(b + "/wal", {});
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    ASSERT_TRUE((*w)->Truncate(297).ok());
    for (int i = 0; i < 3; ++i) {
      WriteBatch batch;
      batch.Put("counter", "other");
      ASSERT_TRUE((*w)->Append(2, wal::RecordType::kData, batch.Encode()).ok());
    }
  }
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + b, &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("(297 records agree)"), std::string::npos) << out;
  EXPECT_NE(out.find("wal LSN 298: a: epoch 1 data"), std::string::npos) << out;
  EXPECT_NE(out.find("b: epoch 2 data"), std::string::npos) << out;
  EXPECT_NE(out.find("epochs epoch history up to LSN 300: a: epoch 1 from LSN 1; b: epoch 1 from LSN 1, epoch 2 from LSN 298"),
            std::string::npos)
      << out;
}

TEST_F(LogdiffTest, ReplicaBehindIsLagUnlessStrict) {
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + Base("c"), &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("IDENTICAL"), std::string::npos) << out;
  EXPECT_NE(out.find("note: c is behind a by 100 records (its WAL ends at LSN 200, a's at 300)"), std::string::npos)
      << out;
  EXPECT_NE(out.find("note: c has applied up to LSN 200, 100 records behind a"), std::string::npos) << out;
  // 100 new keys and "counter" differ only by lag.
  EXPECT_NE(out.find("note: 101 keys differ only because"), std::string::npos) << out;

  out = Logdiff("--strict " + Base("a") + " " + Base("c"), &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("lag WAL end: c is behind a by 100 records"), std::string::npos) << out;
  EXPECT_NE(out.find("missing cf default key \"key205\""), std::string::npos) << out;

  // A key the lagging node lacks is lag only if the nodes that applied
  // everything agree on it: here b's copy of key250 differs from a's.
  const std::string b = Copy("b", "b");
  {
    RawDb db(b);
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "key250", "flipped").ok());
  }
  out = Logdiff(Base("a") + " " + b + " " + Base("c"), &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("DIFFERENT: 1 difference among a, b, c"), std::string::npos) << out;
  EXPECT_NE(out.find("cf default key \"key250\""), std::string::npos) << out;

  // A real difference on the node that is behind is still reported.
  const std::string c = Copy("c", "c");
  {
    RawDb db(c);
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "key10", "flipped").ok());
  }
  out = Logdiff(Base("a") + " " + c + " " + Base("b"), &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("DIFFERENT: 1 difference among a, c, b"), std::string::npos) << out;
  EXPECT_NE(out.find("value cf default key \"key10\""), std::string::npos) << out;
}

// A key the node behind has not written yet is lag only if every node that
// applied its write holds what that write left: a two-node comparison used
// to excuse any value there, and a node claiming to have applied nothing
// excused every key of the log on the other node too.
TEST_F(LogdiffTest, ANodeAheadMustHoldWhatTheRecordsTheOtherLacksWrote) {
  const std::string a = Copy("a", "a");
  {
    RawDb db(a);
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "key250", "flipped").ok());
    ASSERT_TRUE(db.db()->Delete(rocksdb::WriteOptions(), "key260").ok());
  }
  int code = -1;
  std::string out = Logdiff(a + " " + Base("c"), &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("DIFFERENT: 2 differences among a, c"), std::string::npos) << out;
  EXPECT_NE(out.find("missing cf default key \"key250\": a: (applied 300) \"flipped\" (7 bytes); c: (applied 200) "
                     "missing"),
            std::string::npos)
      << out;
  // Missing on both: c has not written it yet, a should hold it.
  EXPECT_NE(out.find("missing cf default key \"key260\": a: (applied 300) missing; c: (applied 200) missing"),
            std::string::npos)
      << out;
  // The other 99 keys (and "counter") are what the records c lacks wrote.
  EXPECT_NE(out.find("note: 99 keys differ only because"), std::string::npos) << out;

  // c with no applied LSN stored (as if it applied nothing) against a with
  // an early key changed: the change is still found.
  const std::string c = Copy("c", "c"), a2 = Copy("a", "a2");
  {
    RawDb db(c);
    auto* meta = db.handle(1);
    ASSERT_TRUE(db.db()->Delete(rocksdb::WriteOptions(), meta, "applied_lsn").ok());
  }
  {
    RawDb db(a2);
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "key9", "flipped").ok());
  }
  out = Logdiff(a2 + " " + c, &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("note: c has applied up to LSN 0, 300 records behind a2"), std::string::npos) << out;
  EXPECT_NE(out.find("DIFFERENT: 1 difference among a2, c"), std::string::npos) << out;
  EXPECT_NE(out.find("value cf default key \"key9\": a2: (applied 300) \"flipped\""), std::string::npos) << out;
}

// Two nodes behind by the same records hold the keys those records write as
// they were before them: they must agree, or it is a difference, not lag.
TEST_F(LogdiffTest, NodesBehindAlikeMustAgreeOnTheKeysTheyHaveNotWrittenYet) {
  const std::string c1 = Copy("c", "c1"), c2 = Copy("c", "c2");
  {
    RawDb db(c2);
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "key250", "stray").ok());  // written at LSN 251, not yet here
  }
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + c1 + " " + c2, &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("DIFFERENT: 1 difference among a, c1, c2"), std::string::npos) << out;
  EXPECT_NE(out.find("key \"key250\""), std::string::npos) << out;
  EXPECT_NE(out.find("c2: (applied 200) \"stray\""), std::string::npos) << out;
}

// A node whose log starts past what it applied cannot catch up from it:
// its data is not excused as lag.
TEST_F(LogdiffTest, ALogStartingPastTheAppliedLsnIsADifference) {
  const std::string c = Copy("c", "c");
  std::filesystem::remove_all(c + "/wal");
  {
    wal::Options o;
    o.start_lsn = 251;
    auto w = wal::Wal::Open(c + "/wal", o);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
  }
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + c, &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("log-start WAL of c: c: RocksDB applied up to LSN 200 but the WAL starts at LSN 251: LSN "
                     "201..250 can no longer be applied"),
            std::string::npos)
      << out;
}

// Three nodes, one behind: the two ahead are compared on the records the
// third lacks, not only on the range all three hold.
TEST_F(LogdiffTest, RecordsTheShortestLogLacksAreComparedAmongTheOthers) {
  const std::string b = Copy("b", "b");
  {
    auto w = wal::Wal::Open(b + "/wal", {});
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    const wal::Epoch epoch = (*w)->last_epoch();
    ASSERT_TRUE((*w)->Truncate(250).ok());
    for (int i = 250; i < 300; ++i) {
      WriteBatch batch;
      batch.Put("counter", "split-" + std::to_string(i));
      ASSERT_TRUE((*w)->Append(epoch, wal::RecordType::kData, batch.Encode()).ok());
    }
  }
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + b + " " + Base("c"), &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_EQ(out.rfind("logdiff: DIFFERENT: 1 difference among a, b, c; WAL LSN 1..250 (250 records agree)", 0), 0u)
      << out;
  EXPECT_NE(out.find("wal LSN 251: a: "), std::string::npos) << out;
  EXPECT_NE(out.find("note: the WALs diverge from LSN 251"), std::string::npos) << out;

  // Without the damage: the records 201..300 agree on a and b.
  out = Logdiff("--json " + Base("a") + " " + Base("b") + " " + Base("c"), &code);
  EXPECT_EQ(code, 0) << out;
  auto v = boost::json::parse(out).as_object();
  EXPECT_EQ(v["records_compared"].as_int64(), 300);
  EXPECT_EQ(v["compared_last"].as_int64(), 300);
  EXPECT_EQ(v["common_last"].as_int64(), 200);
}

// A node given twice would prove itself identical to itself.
TEST_F(LogdiffTest, TheSameNodeTwiceIsAUsageError) {
  int code = -1;
  std::string out = Logdiff(Base("a") + " " + Base("a") + "/", &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("are the same node: give each node once"), std::string::npos) << out;
  out = Logdiff("x=" + Base("a") + " y=" + Base("b") + " z=" + Base("a"), &code);
  EXPECT_EQ(code, 2) << out;
  // A path holding '=' is a path, not NAME=DIR.
  const std::string odd = Copy("b", "x=1");
  out = Logdiff(Base("a") + " " + odd, &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("IDENTICAL: a, x=1"), std::string::npos) << out;
}

// 3,000 extra keys (bulk-F-IIII) in six groups, flushed after each group
// (six SST files) or once at the end (one_file).
void FillBulk(const std::string& dir, bool one_file) {
  RawDb db(dir);
  for (int f = 0; f < 6; ++f) {
    for (int i = 0; i < 500; ++i) {
      char k[32];
      std::snprintf(k, sizeof k, "bulk-%d-%04d", f, i);
      ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), k, Payload(static_cast<uint64_t>(f * 1000 + i), 64)).ok());
    }
    if (!one_file || f == 5) {
      ASSERT_TRUE(db.db()->Flush(rocksdb::FlushOptions()).ok());
    }
  }
}

// x and y hold the same data; one key of y changes. logdiff must name that
// key alone, having re-read entry by entry only the range holding it (a
// sixth of the keys or so), not the whole key space again.
void ChangeOneKeyAndExpectOneRangeReread(const std::string& x, const std::string& y) {
  int code = -1;
  std::string out = Logdiff("--json --threads 3 " + x + " " + y, &code);
  EXPECT_EQ(code, 0) << out;
  auto same = boost::json::parse(out).as_object();
  EXPECT_EQ(same["keys_compared"].as_int64(), 301 + 3000);
  const int64_t hashed_when_identical = same["bytes_hashed"].as_int64();
  {
    RawDb db(y);
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "bulk-3-0123", "changed").ok());
  }
  out = Logdiff("--json --threads 3 " + x + " " + y, &code);
  EXPECT_EQ(code, 1) << out;
  auto v = boost::json::parse(out).as_object();
  EXPECT_EQ(v["difference_count"].as_int64(), 1);
  EXPECT_EQ(v["differences"].as_array()[0].as_object()["where"].as_string(), "cf default key \"bulk-3-0123\"");
  EXPECT_LT(v["bytes_hashed"].as_int64(), hashed_when_identical * 14 / 10) << out;
}

TEST_F(LogdiffTest, ManyRangesAreHashedAndOnlyTheDifferingOneIsRead) {
  // Identical extra data in several SST files, so the key space splits into
  // several ranges.
  const std::string x = Copy("a", "x"), y = Copy("a", "y");
  FillBulk(x, /*one_file=*/false);
  FillBulk(y, /*one_file=*/false);
  ChangeOneKeyAndExpectOneRangeReread(x, y);
}

// The same data in one SST file on the first replica and in six on the
// second: the split points come from both, so a change is still found by
// re-reading one small range rather than half the key space.
TEST_F(LogdiffTest, SplitPointsComeFromEveryReplica) {
  const std::string x = Copy("a", "x1"), y = Copy("a", "y1");
  FillBulk(x, /*one_file=*/true);
  FillBulk(y, /*one_file=*/false);
  ChangeOneKeyAndExpectOneRangeReread(x, y);
}

TEST_F(LogdiffTest, WalComparedInManyChunksFindsTheFirstDivergence) {
  // The library with small WAL chunks: the diverging chunk is not the first.
  const std::string b = Copy("b", "b");
  {
    auto w = wal::Wal::Open(b + "/wal", {});
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    ASSERT_TRUE((*w)->Truncate(200).ok());
    for (int i = 0; i < 100; ++i) {
      WriteBatch batch;
      batch.Put("counter", "other" + std::to_string(i));
      ASSERT_TRUE((*w)->Append(2, wal::RecordType::kData, batch.Encode()).ok());
    }
  }
  auto sa = logdiff::OpenDirectory(Base("a")), sb = logdiff::OpenDirectory(b);
  ASSERT_TRUE(sa.ok() && sb.ok());
  logdiff::Options o;
  o.wal_chunk = 7;
  const logdiff::Report r = logdiff::Compare({"a", "b"}, {sa->get(), sb->get()}, o);
  EXPECT_EQ(r.verdict, logdiff::Report::Verdict::kDifferent) << logdiff::FormatText(r);
  EXPECT_EQ(r.records_compared, 200u) << logdiff::FormatText(r);
  ASSERT_FALSE(r.diffs.empty());
  EXPECT_EQ(r.diffs[0].kind, "wal");
  EXPECT_EQ(r.diffs[0].where, "LSN 201");
}

TEST_F(LogdiffTest, DifferencesAreCappedButCounted) {
  const std::string b = Copy("b", "b");
  {
    RawDb db(b);
    for (int i = 0; i < 30; ++i) ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "key" + std::to_string(i), "v").ok());
  }
  int code = -1;
  std::string out = Logdiff("--max-diffs 5 " + Base("a") + " " + b, &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("DIFFERENT: 30 differences"), std::string::npos) << out;
  EXPECT_NE(out.find("... and 25 more differences not listed"), std::string::npos) << out;
}

TEST_F(LogdiffTest, LiveNodeIsReadWithoutDisturbingIt) {
  // A running active: logdiff reads its directory while it keeps writing.
  const std::string a = Copy("a", "a");
  auto e = Engine::Open(Node(dir_.path(), "a", ""));
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  int code = -1;
  std::string out = Logdiff(a + " " + Base("b"), &code);
  EXPECT_EQ(code, 0) << out;
  Write(e->get(), 300, 310);
  out = Logdiff(a + " " + Base("b"), &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("note: b is behind a by 10 records"), std::string::npos) << out;
  EXPECT_TRUE((*e)->Close().ok());
}

TEST_F(LogdiffTest, BadInputExitsTwoWithTheReason) {
  int code = -1;
  std::string out = Logdiff(Base("a"), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("give at least two nodes"), std::string::npos) << out;
  out = Logdiff(Base("a") + " " + dir_.Sub("nope"), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("logdiff: ERROR: could not compare: nope: "), std::string::npos) << out;
  out = Logdiff(Base("a") + " " + dir_.path(), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("is not a node's data directory"), std::string::npos) << out;
  test::WriteFileBytes(dir_.Sub("afile"), "x");
  out = Logdiff(Base("a") + " " + dir_.Sub("afile"), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("afile is not a directory"), std::string::npos) << out;
  out = Logdiff("--max-diffs x " + Base("a") + " " + Base("b"), &code);
  EXPECT_EQ(code, 2) << out;
  // Every live-only option is a usage error without --live (--cluster and
  // the --tls-* options were ignored).
  for (const char* opt : {"--pin-timeout 5", "--at 3", "--secret s", "--secret-file /dev/null", "--cluster foo",
                          "--tls-cert x", "--tls-key x", "--tls-ca x"}) {
    out = Logdiff(std::string(opt) + " " + Base("a") + " " + Base("b"), &code);
    EXPECT_EQ(code, 2) << opt << ": " << out;
    const std::string name(opt, std::string(opt).find(' '));
    EXPECT_NE(out.find(name + " only goes with --live"), std::string::npos) << opt << ": " << out;
  }
  out = Logdiff("--frobnicate " + Base("a") + " " + Base("b"), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("unknown option"), std::string::npos) << out;
  // Corrupt WAL in the middle of a log.
  const std::string b = Copy("b", "b");
  auto segs = SegmentPaths(b + "/wal");
  FlipBit(segs.front(), 200, 3);
  out = Logdiff(Base("a") + " " + b, &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("ERROR"), std::string::npos) << out;
}

// logdiff --live: running nodes hash their own replicas at one LSN.
class LiveLogdiffTest : public ::testing::Test {
 protected:
  std::unique_ptr<Engine> Open(const std::string& id, const std::string& follow) {
    auto e = Engine::Open(Node(dir_.path(), id, follow));
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    return e.ok() ? std::move(e).value() : nullptr;
  }
  static std::string Addr(const Engine& e) { return "127.0.0.1:" + std::to_string(e.listen_port()); }
  std::string Live(const std::string& args, int* code) {
    WriteFileBytes(dir_.Sub("secret"), "test-secret\n");
    ::chmod(dir_.Sub("secret").c_str(), 0600);  // else logdiff warns of it
    return Logdiff("--live --cluster t --secret-file " + dir_.Sub("secret") + " " + args, code);
  }
  TempDir dir_;
};

TEST_F(LiveLogdiffTest, NodesUnderWriteLoadAreComparedAtOneLsn) {
  auto a = Open("a", "");
  auto b = Open("b", Addr(*a));
  auto c = Open("c", Addr(*a));
  ASSERT_TRUE(a && b && c);
  Write(a.get(), 0, 200);
  std::atomic<bool> stop{false};
  std::atomic<int> written{0};
  std::thread writer([&] {
    for (int i = 200; !stop.load(); ++i) {
      WriteBatch batch;
      batch.Put("key" + std::to_string(i % 500), Payload(static_cast<uint64_t>(i), 100));
      if (!a->Write(batch).ok()) break;
      written++;
      std::this_thread::sleep_for(200us);  // a steady load, not a flood the standbys trail far behind
    }
  });
  int code = -1;
  std::string out = Live("a=" + Addr(*a) + " b=" + Addr(*b) + " c=" + Addr(*c), &code);
  const int during = written.load();
  stop = true;
  writer.join();
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(out.rfind("logdiff: IDENTICAL: a, b, c; WAL LSN 1..", 0), 0u) << out;
  EXPECT_NE(out.find("note: live: every node hashed its replica as of LSN "), std::string::npos) << out;
  EXPECT_GT(during, 0) << "the load never ran while logdiff did";
  // The nodes keep working: the standbys follow the writes made meanwhile.
  const uint64_t last = a->status().last_lsn;
  EXPECT_TRUE(b->WaitForApplied(last, 30s).ok());
  EXPECT_TRUE(c->WaitForApplied(last, 30s).ok());
}

TEST_F(LiveLogdiffTest, APlainConnectionToATlsNodeSuggestsTheTlsOptions) {
  // The node closes a connection that does not speak TLS at once; logdiff
  // saw only "the peer closed the connection".
  ASSERT_TRUE(test::MakeCertificateAuthority(dir_.path(), "ca"));
  ASSERT_TRUE(test::MakeNodeCertificate(dir_.path(), "a"));
  std::vector<std::unique_ptr<Engine>> nodes;
  for (const char* id : {"a", "b"}) {
    EngineOptions o = Node(dir_.path(), id, "");
    o.tls_cert_file = dir_.Sub("a.crt");
    o.tls_key_file = dir_.Sub("a.key");
    o.tls_ca_file = dir_.Sub("ca.crt");
    auto e = Engine::Open(o);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    nodes.push_back(std::move(e).value());
  }
  int code = 0;
  const std::string out = Live("a=" + Addr(*nodes[0]) + " b=" + Addr(*nodes[1]), &code);
  EXPECT_EQ(code, 2) << out;  // could not compare
  EXPECT_NE(out.find("if the node uses TLS, give --tls-cert, --tls-key and --tls-ca"), std::string::npos) << out;
}

TEST_F(LiveLogdiffTest, DamagedStandbyIsFoundWithoutItsDirectory) {
  auto a = Open("a", "");
  ASSERT_TRUE(a);
  Write(a.get(), 0, 100);
  {
    auto b = Open("b", Addr(*a));
    ASSERT_TRUE(b->WaitForApplied(100, 30s).ok());
    ASSERT_TRUE(b->Close().ok());
  }
  {
    RawDb db(dir_.Sub("b"));
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), "key42", "flipped").ok());
  }
  auto b = Open("b", Addr(*a));
  Write(a.get(), 100, 120);
  ASSERT_TRUE(b->WaitForApplied(120, 30s).ok());
  int code = -1;
  std::string out = Live("--json --at 120 a=" + Addr(*a) + " b=" + Addr(*b), &code);
  EXPECT_EQ(code, 1) << out;
  auto v = boost::json::parse(out).as_object();
  EXPECT_EQ(v["difference_count"].as_int64(), 1) << out;
  EXPECT_EQ(v["differences"].as_array()[0].as_object()["where"].as_string(), "cf default key \"key42\"");
  EXPECT_EQ(v["common_last"].as_int64(), 120);

  // An LSN a node has passed cannot be pinned: a clear error, exit 2.
  out = Live("--at 50 a=" + Addr(*a) + " b=" + Addr(*b), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("applied past LSN 50"), std::string::npos) << out;
}

// Large keys: a node answers a page of entries within a byte budget, with
// fewer entries than asked, and the tool asks again from the last key. A
// short page read as "the range ends here" would leave the damaged key,
// the last, unread (and the replicas "identical").
TEST_F(LiveLogdiffTest, LargeKeysAreReadPageByPageToTheEnd) {
  auto a = Open("a", "");
  ASSERT_TRUE(a);
  auto big = [](int i) { return "big" + std::to_string(i) + "-" + std::string(1 << 20, 'k'); };
  for (int i = 0; i < 6; ++i) {
    WriteBatch batch;
    batch.Put(big(i), "value" + std::to_string(i));
    ASSERT_TRUE(a->Write(batch).ok());
  }
  {
    auto b = Open("b", Addr(*a));
    ASSERT_TRUE(b->WaitForApplied(a->status().last_lsn, 30s).ok());
    ASSERT_TRUE(b->Close().ok());
  }
  {
    RawDb db(dir_.Sub("b"));
    ASSERT_TRUE(db.db()->Put(rocksdb::WriteOptions(), big(5), "flipped").ok());
  }
  auto b = Open("b", Addr(*a));
  ASSERT_TRUE(b->WaitForApplied(a->status().last_lsn, 30s).ok());
  int code = -1;
  std::string out = Live("--json a=" + Addr(*a) + " b=" + Addr(*b), &code);
  EXPECT_EQ(code, 1) << out.substr(0, 2000);
  auto v = boost::json::parse(out).as_object();
  EXPECT_EQ(v["difference_count"].as_int64(), 1) << out.substr(0, 2000);
}

TEST_F(LiveLogdiffTest, WrongSecretOrNoNodeExitsTwo) {
  auto a = Open("a", "");
  auto b = Open("b", Addr(*a));
  ASSERT_TRUE(a && b);
  WriteFileBytes(dir_.Sub("wrong"), "not-the-secret\n");
  ::chmod(dir_.Sub("wrong").c_str(), 0600);
  int code = -1;
  std::string out = Logdiff("--live --cluster t --secret-file " + dir_.Sub("wrong") + " " + Addr(*a) + " " + Addr(*b),
                            &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("logdiff: ERROR: could not compare"), std::string::npos) << out;
  out = Live(Addr(*a) + " 127.0.0.1:1", &code);
  EXPECT_EQ(code, 2) << out;
  out = Live(Addr(*a) + " nonsense", &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("bad node address"), std::string::npos) << out;
  out = Logdiff("--live " + Addr(*a) + " " + Addr(*b), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("needs the cluster's secret"), std::string::npos) << out;
  out = Logdiff("--live --secret s --cluster x/nodes " + Addr(*a) + " " + Addr(*b), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("--cluster 'x/nodes': use 1 to 64 letters"), std::string::npos) << out;
  out = Live(Addr(*a) + " " + Addr(*a), &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("are the same node"), std::string::npos) << out;
  // The same node under two addresses: told apart by its id once connected
  // (it was compared with itself and found IDENTICAL).
  const std::string port = std::to_string(a->listen_port());
  out = Live("x=127.0.0.1:" + port + " " + Addr(*b) + " y=localhost:" + port, &code);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("'127.0.0.1:" + port + "' and 'localhost:" + port + "' are the same node (id 'a')"),
            std::string::npos)
      << out;
}

// Hostile or careless DiffRequests get errors; the node serves on.
class DiffPeer : public transport::Handler {
 public:
  void OnEstablished(const std::shared_ptr<transport::Session>&) override {
    std::lock_guard<std::mutex> l(mu_);
    established_ = true;
    cv_.notify_all();
  }
  void OnControl(const std::shared_ptr<transport::Session>&, const proto::Control& msg) override {
    if (!msg.has_diff_reply()) return;
    std::lock_guard<std::mutex> l(mu_);
    replies_.push_back(msg.diff_reply());
    cv_.notify_all();
  }
  bool WaitEstablished() {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, 10s, [&] { return established_; });
  }
  std::optional<proto::DiffReply> Ask(transport::Session* s, proto::DiffRequest req) {
    static uint64_t id = 0;
    req.set_id(++id);
    proto::Control msg;
    *msg.mutable_diff_request() = req;
    if (!s->SendControl(msg).ok()) return std::nullopt;
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, 20s, [&] { return !replies_.empty(); })) return std::nullopt;
    auto r = replies_.front();
    replies_.clear();
    return r;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool established_ = false;
  std::vector<proto::DiffReply> replies_;
};

TEST_F(LiveLogdiffTest, BadRequestsGetErrorsAndTheNodeServesOn) {
  auto a = Open("a", "");
  ASSERT_TRUE(a);
  Write(a.get(), 0, 50);
  DiffPeer peer;
  transport::Options to;
  to.node_id = "tool";
  to.cluster = "t";
  to.secret = "test-secret";
  auto ep = transport::Endpoint::Create(to, &peer);
  ASSERT_TRUE(ep.ok());
  auto s = (*ep)->Connect("127.0.0.1", a->listen_port());
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(peer.WaitEstablished());
  proto::DiffRequest huge;
  huge.set_op(proto::DiffRequest::WAL_DIGESTS);
  huge.set_from(1);
  huge.set_to(1ull << 40);
  huge.set_chunk(1);
  auto r = peer.Ask(s->get(), huge);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->code(), static_cast<uint32_t>(StatusCode::kInvalidArgument));
  EXPECT_NE(r->message().find("pin an LSN first"), std::string::npos) << r->message();
  proto::DiffRequest pin;
  pin.set_op(proto::DiffRequest::PIN);
  pin.set_at_lsn(50);
  pin.set_limit(5000);
  r = peer.Ask(s->get(), pin);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->code(), 0u) << r->message();
  EXPECT_EQ(r->info().applied(), 50u);
  r = peer.Ask(s->get(), huge);  // pinned, but far past the pinned LSN
  ASSERT_TRUE(r);
  EXPECT_EQ(r->code(), static_cast<uint32_t>(StatusCode::kInvalidArgument));
  huge.set_to(50);
  huge.set_chunk(0);
  r = peer.Ask(s->get(), huge);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->code(), static_cast<uint32_t>(StatusCode::kInvalidArgument));
  huge.set_chunk(10);
  r = peer.Ask(s->get(), huge);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->code(), 0u) << r->message();
  EXPECT_EQ(r->digests_size(), 5);
  proto::DiffRequest unknown;
  unknown.set_op(static_cast<proto::DiffRequest::Op>(99));
  r = peer.Ask(s->get(), unknown);
  ASSERT_TRUE(r);
  EXPECT_NE(r->code(), 0u);
  // The node still writes and answers.
  (*ep)->Stop();
  Write(a.get(), 50, 60);
  EXPECT_EQ(a->status().applied_lsn, 60u);
}

}  // namespace
}  // namespace replica::test
