// The engine in static mode: an active and standbys over real sockets, each
// with its own WAL and RocksDB, checked by reading the databases back with
// RocksDB and comparing the WAL files byte for byte.
#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>
#include <map>
#include <set>
#include <sstream>

#include "replica/engine.h"
#include "replication/resp_server.h"
#include "tests/replication/fake_arbiter.h"
#include "tests/support/resp_client.h"
#include "tests/support/etcd_server.h"
#include "tests/support/test_util.h"
#include "transport/transport.h"
#include "wal/wal.h"

namespace replica {
namespace {

using namespace std::chrono_literals;
using test::TempDir;

EngineOptions Node(const TempDir& dir, const std::string& id, const std::string& follow = "",
                   const std::string& commit = "async") {
  EngineOptions o;
  o.node_id = id;
  o.data_dir = dir.Sub(id);
  o.follow = follow;
  o.secret = "test-secret";
  o.cluster = "t";
  o.commit = *CommitRule::Parse(commit);
  o.wal_segment_size = 64 << 10;
  return o;
}

std::unique_ptr<Engine> OpenOrDie(const EngineOptions& o) {
  auto e = Engine::Open(o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(e).value() : nullptr;
}

std::string Follow(const Engine& active) { return "127.0.0.1:" + std::to_string(active.listen_port()); }

// Every key and value of a node's RocksDB (default column family), read with
// stock RocksDB after the node closed.
std::map<std::string, std::string> DumpDb(const std::string& data_dir) {
  rocksdb::Options o;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {{rocksdb::kDefaultColumnFamilyName, {}},
                                                      {"replica_meta", {}}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  auto s = rocksdb::DB::OpenForReadOnly(o, data_dir + "/db", cfs, &handles, &db);
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::map<std::string, std::string> out;
  if (!s.ok()) return out;
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), handles[0]));
  for (it->SeekToFirst(); it->Valid(); it->Next()) out[it->key().ToString()] = it->value().ToString();
  it.reset();
  for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
  delete db;
  return out;
}

void ExpectSameWal(const std::string& a, const std::string& b) {
  auto sa = test::SegmentPaths(a + "/wal"), sb = test::SegmentPaths(b + "/wal");
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_EQ(test::ReadFileBytes(sa[i]), test::ReadFileBytes(sb[i])) << sa[i] << " differs from " << sb[i];
  }
}

// Over the LSNs both logs hold, every record is the same (a standby seeded
// from a snapshot starts its log later, so its segment files differ).
void ExpectSameRecords(const std::string& a, const std::string& b) {
  wal::Options ro;
  ro.read_only = true;
  auto wa = wal::Wal::Open(a + "/wal", ro), wb = wal::Wal::Open(b + "/wal", ro);
  ASSERT_TRUE(wa.ok() && wb.ok());
  const wal::Lsn from = std::max((*wa)->first_lsn(), (*wb)->first_lsn());
  const wal::Lsn to = std::min((*wa)->last_lsn(), (*wb)->last_lsn());
  ASSERT_LE(from, to) << "no common records";
  auto ra = (*wa)->NewReader(from), rb = (*wb)->NewReader(from);
  ASSERT_TRUE(ra.ok() && rb.ok());
  for (wal::Lsn l = from; l <= to; ++l) {
    wal::RecordView x, y;
    ASSERT_TRUE(*(*ra)->Next(&x) && *(*rb)->Next(&y));
    ASSERT_EQ(x.lsn, l);
    ASSERT_EQ(wal::RecordDigest(x), wal::RecordDigest(y)) << "records differ at LSN " << l;
  }
}

using test::Eventually;

uint64_t WriteMany(Engine* e, int batches, int start = 0) {
  uint64_t last = 0;
  for (int i = start; i < start + batches; ++i) {
    WriteBatch b;
    b.Put("key" + std::to_string(i), test::Payload(static_cast<uint64_t>(i), 100));
    b.Put("counter", std::to_string(i));
    if (i % 7 == 0 && i > 0) b.Delete("key" + std::to_string(i - 1));
    auto lsn = e->Write(b);
    EXPECT_TRUE(lsn.ok()) << lsn.status().ToString();
    if (lsn.ok()) last = *lsn;
  }
  return last;
}

// The Prometheus text format wants each family's samples in one group,
// under its one HELP and TYPE: no sample may follow another family's TYPE.
void ExpectFamiliesGrouped(const std::string& text) {
  std::set<std::string> seen;
  std::string current;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("# TYPE ", 0) == 0) {
      current = line.substr(7, line.find(' ', 7) - 7);
      EXPECT_TRUE(seen.insert(current).second) << "a second TYPE line for " << current;
      continue;
    }
    if (line.empty() || line[0] == '#') continue;
    const std::string name = line.substr(0, line.find_first_of("{ "));
    const bool ok = name == current || name == current + "_bucket" || name == current + "_sum" ||
                    name == current + "_count";
    EXPECT_TRUE(ok) << name << " appears within the family " << current;
  }
}

void ActiveAndTwoStandbysConverge(int transport_io_threads) {
  TempDir dir;
  auto node = [&](const std::string& id, const std::string& follow) {
    EngineOptions o = Node(dir, id, follow);
    o.transport_io_threads = transport_io_threads;
    return o;
  };
  auto active = OpenOrDie(node("a", ""));
  auto s1 = OpenOrDie(node("b", Follow(*active)));
  auto s2 = OpenOrDie(node("c", Follow(*active)));
  const uint64_t last = WriteMany(active.get(), 600);
  ASSERT_EQ(last, 600u);
  ASSERT_TRUE(s1->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(s2->WaitForApplied(last, 30s).ok());
  EXPECT_EQ(*s1->Get("counter"), std::optional<std::string>("599"));
  EXPECT_EQ(active->status().standbys.size(), 2u);
  ASSERT_TRUE(Eventually([&] {
    auto st = active->status();
    return st.standbys.size() == 2 && st.standbys[0].lag_bytes == 0 && st.standbys[1].lag_bytes == 0;
  })) << "a caught-up standby lacks no bytes";
  ExpectFamiliesGrouped(active->PrometheusMetrics());  // per-standby families, two standbys
  ASSERT_TRUE(s1->Close().ok());
  ASSERT_TRUE(s2->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  auto want = DumpDb(dir.Sub("a"));
  EXPECT_EQ(want.size(), 600u - 85u + 1u);  // 600 keys, 85 deleted, plus "counter"
  EXPECT_EQ(DumpDb(dir.Sub("b")), want);
  EXPECT_EQ(DumpDb(dir.Sub("c")), want);
  ExpectSameWal(dir.Sub("a"), dir.Sub("b"));
  ExpectSameWal(dir.Sub("a"), dir.Sub("c"));
}

TEST(EngineTest, ActiveAndTwoStandbysConverge) { ActiveAndTwoStandbysConverge(1); }

// One transport I/O thread is the default; several (two were, before) still
// serve every session.
TEST(EngineTest, ActiveAndTwoStandbysConvergeWithSeveralTransportThreads) { ActiveAndTwoStandbysConverge(3); }

TEST(EngineTest, StandbyRefusesWritesNamingTheActive) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a"));
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  WriteBatch b;
  b.Put("k", "v");
  auto r = standby->Write(b);
  ASSERT_EQ(r.status().code(), StatusCode::kNotActive);
  EXPECT_NE(r.status().message().find(Follow(*active)), std::string::npos) << r.status().ToString();
  EXPECT_EQ(standby->status().role, Role::kStandby);
  EXPECT_EQ(active->Write(WriteBatch()).status().code(), StatusCode::kInvalidArgument);
}

TEST(EngineTest, RemoteApplyMeansTheStandbyAlreadySeesIt) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a", "", "remote-apply:1"));
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  for (int i = 0; i < 50; ++i) {
    WriteBatch b;
    b.Put("k" + std::to_string(i), "v" + std::to_string(i));
    ASSERT_TRUE(active->Write(b).ok());
    // No waiting: remote-apply acknowledged only after the standby applied it.
    EXPECT_EQ(*standby->Get("k" + std::to_string(i)), std::optional<std::string>("v" + std::to_string(i)));
  }
}

TEST(EngineTest, RemoteWriteWaitsForAStandby) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a", "", "remote-write:1"));
  auto pending = std::async(std::launch::async, [&] {
    WriteBatch b;
    b.Put("k", "v");
    return active->Write(b);
  });
  EXPECT_EQ(pending.wait_for(300ms), std::future_status::timeout) << "acknowledged without any standby";
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  ASSERT_EQ(pending.wait_for(30s), std::future_status::ready);
  auto lsn = pending.get();
  ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
  EXPECT_GE(standby->status().durable_lsn, *lsn);
}

TEST(EngineTest, CommitTimeoutFallsBackToAsyncAndRestores) {
  TempDir dir;
  EngineOptions o = Node(dir, "a", "", "remote-write:1");
  o.commit_timeout = 200ms;
  o.commit_fallback = "async";
  auto active = OpenOrDie(o);
  WriteBatch b;
  b.Put("k", "v");
  auto lsn = active->Write(b);  // no standby: acknowledged as async after the timeout
  ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
  EXPECT_TRUE(active->status().commit_degraded);
  EXPECT_EQ(active->status().commit_fallbacks, 1u);
  ASSERT_TRUE(active->Write(b).ok());
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (active->status().commit_degraded && std::chrono::steady_clock::now() < deadline) {
    ASSERT_TRUE(active->Write(b).ok());  // acks from the standby re-judge the rule
  }
  EXPECT_FALSE(active->status().commit_degraded) << "never restored after the standby caught up";
  EXPECT_EQ(active->status().commit.ToString(), "remote-write:1");
}

TEST(EngineTest, StrictCommitKeepsWaitingUntilTheRuleChanges) {
  TempDir dir;
  EngineOptions o = Node(dir, "a", "", "remote-apply:1");
  o.commit_timeout = 100ms;
  auto active = OpenOrDie(o);
  auto pending = std::async(std::launch::async, [&] {
    WriteBatch b;
    b.Put("k", "v");
    return active->Write(b);
  });
  EXPECT_EQ(pending.wait_for(400ms), std::future_status::timeout) << "strict must not give up";
  EXPECT_FALSE(active->status().commit_degraded);
  ASSERT_TRUE(active->SetCommitRule(*CommitRule::Parse("async")).ok());
  ASSERT_EQ(pending.wait_for(30s), std::future_status::ready);
  EXPECT_TRUE(pending.get().ok());
  EXPECT_EQ(*active->Get("k"), std::optional<std::string>("v"));
}

// Review regressions: a standby whose log diverged must be refused, not
// credited; a standby that syncs on an interval must still count.
TEST(EngineTest, DivergedStandbyIsResyncedFromASnapshot) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a"));
  const uint16_t port = active->listen_port();
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  const uint64_t last = WriteMany(active.get(), 50);
  ASSERT_TRUE(standby->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(active->Close().ok());
  active.reset();
  std::filesystem::remove_all(dir.Sub("a"));  // the active loses its data and starts over
  EngineOptions again = Node(dir, "a");
  again.listen_port = port;
  active = OpenOrDie(again);
  WriteBatch b;
  uint64_t lsn = 0;
  for (int i = 0; i < 60; ++i) {
    b = WriteBatch();
    b.Put("new" + std::to_string(i), "x");
    auto w = active->Write(b);
    ASSERT_TRUE(w.ok());
    lsn = *w;
  }
  // Its record at LSN 50 differs from the active's: resynced, not merged.
  ASSERT_TRUE(Eventually([&] { return standby->status().snapshots_installed >= 1; }));
  ASSERT_TRUE(standby->WaitForApplied(lsn, 30s).ok());
  EXPECT_EQ(*standby->Get("new59"), std::optional<std::string>("x"));
  EXPECT_EQ(*standby->Get("key10"), std::nullopt) << "the diverged data survived the resync";
  EXPECT_EQ(active->status().snapshots_sent, 1u);
  b = WriteBatch();
  b.Put("after", "resync");
  lsn = *active->Write(b);
  ASSERT_TRUE(standby->WaitForApplied(lsn, 30s).ok()) << "it did not follow the log after the snapshot";
  ASSERT_TRUE(standby->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  EXPECT_EQ(DumpDb(dir.Sub("b")), DumpDb(dir.Sub("a")));
  ExpectSameRecords(dir.Sub("a"), dir.Sub("b"));
}

// A damaged frame in the active's own log (a stored byte the disk changed)
// is found when the active reads it to ship: the active says so and resyncs
// the standby from a snapshot, whose data comes from RocksDB. It used to
// ship the frame, which the standby refused, and the standby asked for the
// same records again every 200 ms, for good.
TEST(EngineTest, AStandbyThatNeedsADamagedPartOfTheActivesLogIsResynced) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a"));
  const uint64_t written = WriteMany(active.get(), 1500);  // segments of 64 KiB: several
  // Flip a bit in the payload of the frame holding LSN 300 (an older
  // segment; the page cache makes the change visible to the running active).
  wal::RawSpan frame;
  {
    wal::Options ro;
    ro.read_only = true;
    auto log = wal::Wal::Open(dir.Sub("a") + "/wal", ro);
    ASSERT_TRUE(log.ok()) << log.status().ToString();
    auto reader = (*log)->NewReader(300);
    ASSERT_TRUE(reader.ok());
    auto span = (*reader)->NextRaw(1);
    ASSERT_TRUE(span.ok() && span->has_value());
    frame = **span;
  }
  ASSERT_NE(frame.segment_path, test::SegmentPaths(dir.Sub("a") + "/wal").back());
  test::FlipBit(frame.segment_path, frame.offset + wal::kFrameHeaderSize + 7, 3);

  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  const uint64_t last = WriteMany(active.get(), 20, 5000);
  ASSERT_GT(last, written);
  ASSERT_TRUE(standby->WaitForApplied(last, 60s).ok()) << "the standby did not get past the damage";
  EXPECT_EQ(standby->status().snapshots_installed, 1u);
  EXPECT_EQ(active->status().snapshots_sent, 1u);
  EXPECT_GE(active->status().wal_damage_found, 1u);
  EXPECT_NE(active->PrometheusMetrics().find("replica_wal_damage_found_total{node=\"a\"} "), std::string::npos);
  ASSERT_TRUE(standby->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  EXPECT_EQ(DumpDb(dir.Sub("b")), DumpDb(dir.Sub("a")));
}

// A read error in the active's own log (EIO from a failing disk) while it
// ships is handled as damage, not as a failed connection (other IOErrors,
// such as EMFILE, are retried). A read that fails
// once and then reads well costs no resync: the active reads there again
// when the standby subscribes, and forgets the entry. Reads that keep
// failing where a standby needs records (a bad region of an older segment)
// resync it from a snapshot. Before, only a checksum failure was handled:
// a read error closed the session, and the standby asked for the same
// records every 200 ms, for good. The read errors come from the engine's
// test_fault hook (step "log.read LSN"), which fails a reading of the log
// at that LSN as the disk would.
TEST(EngineTest, AReadErrorInTheActivesLogIsHandledAsDamage) {
  TempDir dir;
  std::atomic<int> fail_once_at_1{0};  // an errno: the next read at LSN 1 fails with it
  std::atomic<uint64_t> bad_upto{0};   // reads at LSNs up to this fail with EIO, for good
  EngineOptions ao = Node(dir, "a");
  ao.test_fault = [&](const char* step) {
    std::string_view s(step);
    if (s.substr(0, 9) != "log.read ") return Status::OK();
    const uint64_t lsn = std::stoull(std::string(s.substr(9)));
    const int once = lsn == 1 ? fail_once_at_1.exchange(0) : 0;
    const int err = once != 0 ? once : lsn <= bad_upto.load() ? EIO : 0;
    if (err != 0) return Status::FromErrno("read of the log at LSN " + std::to_string(lsn) + " (the test)", err);
    return Status::OK();
  };
  auto active = OpenOrDie(ao);
  WriteMany(active.get(), 300);
  std::vector<std::unique_ptr<Engine>> standbys;
  auto follower = [&](const char* id, int start) {
    standbys.push_back(OpenOrDie(Node(dir, id, Follow(*active))));
    const uint64_t last = WriteMany(active.get(), 20, start);
    return standbys.back()->WaitForApplied(last, 60s);
  };

  fail_once_at_1 = EMFILE;  // not the device: retried, not noted
  ASSERT_TRUE(follower("b", 1000).ok());
  EXPECT_EQ(fail_once_at_1.load(), 0) << "the shipper never read at LSN 1";
  EXPECT_EQ(active->status().wal_damage_found, 0u);

  fail_once_at_1 = EIO;  // noted, read again at the next subscribe, forgotten
  ASSERT_TRUE(follower("c", 2000).ok());
  EXPECT_EQ(fail_once_at_1.load(), 0);
  EXPECT_EQ(active->status().wal_damage_found, 1u);
  EXPECT_EQ(active->status().snapshots_sent, 0u) << "a read error that passed cost a resync";

  bad_upto = 150;  // for good: resynced
  ASSERT_TRUE(follower("d", 3000).ok()) << "the standby did not get past the read error";
  EXPECT_EQ(standbys.back()->status().snapshots_installed, 1u);
  EXPECT_EQ(active->status().snapshots_sent, 1u);
  EXPECT_GE(active->status().wal_damage_found, 2u);
  for (auto& e : standbys) ASSERT_TRUE(e->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  for (const char* id : {"b", "c", "d"}) EXPECT_EQ(DumpDb(dir.Sub(id)), DumpDb(dir.Sub("a"))) << id;
}

void StandbyAddedAfterThePurgeIsSeeded(int transport_io_threads) {
  TempDir dir;
  EngineOptions ao = Node(dir, "a");
  ao.wal_keep_bytes = 64 << 10;  // one segment: older ones go once applied
  ao.transport_io_threads = transport_io_threads;
  auto active = OpenOrDie(ao);
  uint64_t last = WriteMany(active.get(), 2500);
  ASSERT_TRUE(Eventually([&] {
    WriteMany(active.get(), 10, 5000);  // retention runs when a segment rolls
    return active->status().first_lsn > 1;
  })) << "nothing was purged";
  EngineOptions bo = Node(dir, "b", Follow(*active));
  bo.transport_io_threads = transport_io_threads;
  auto standby = OpenOrDie(bo);
  last = WriteMany(active.get(), 300, 10000);  // under load while it joins
  ASSERT_TRUE(standby->WaitForApplied(last, 60s).ok());
  const EngineStatus st = standby->status();
  EXPECT_EQ(st.snapshots_installed, 1u);
  EXPECT_GT(st.first_lsn, 1u) << "the standby's log should start at the snapshot's seed";
  EXPECT_EQ(*standby->Get("key2499"), *active->Get("key2499"));
  ASSERT_TRUE(standby->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  EXPECT_EQ(DumpDb(dir.Sub("b")), DumpDb(dir.Sub("a")));
  ExpectSameRecords(dir.Sub("a"), dir.Sub("b"));
}

TEST(EngineTest, StandbyAddedAfterThePurgeIsSeededFromASnapshot) { StandbyAddedAfterThePurgeIsSeeded(1); }

// The snapshot's files stream while the log does (sendfile beside the
// shipper), on several I/O threads per node too.
TEST(EngineTest, StandbyAddedAfterThePurgeIsSeededWithSeveralTransportThreads) {
  StandbyAddedAfterThePurgeIsSeeded(3);
}

// A snapshot install that cannot open the new data fails the node: the
// host is told, every call answers with the reason, and the process goes on
// (the library used to end it with _Exit). A restart finishes the install.
TEST(EngineTest, AFailedSnapshotInstallFailsTheNodeAndARestartFinishesIt) {
  TempDir dir;
  EngineOptions ao = Node(dir, "a");
  ao.wal_keep_bytes = 64 << 10;  // one segment: older ones go once applied
  auto active = OpenOrDie(ao);
  WriteMany(active.get(), 2500);
  ASSERT_TRUE(Eventually([&] {
    WriteMany(active.get(), 10, 5000);  // retention runs when a segment rolls
    return active->status().first_lsn > 1;
  })) << "nothing was purged";
  EngineOptions bo = Node(dir, "b", Follow(*active));
  std::promise<Status> failed;
  std::atomic<int> failures{0};
  bo.on_failure = [&](const Status& why) {
    if (failures.fetch_add(1) == 0) failed.set_value(why);
  };
  bo.test_fault = [](const char* step) {
    return std::string_view(step) == "install.reopen" ? Status::IOError("injected: the new data cannot be opened")
                                                       : Status::OK();
  };
  auto standby = OpenOrDie(bo);
  auto reported = failed.get_future();
  ASSERT_EQ(reported.wait_for(60s), std::future_status::ready) << "the install never failed";
  EXPECT_NE(reported.get().ToString().find("injected"), std::string::npos);

  const EngineStatus st = standby->status();
  EXPECT_NE(st.failure.find("injected"), std::string::npos) << st.failure;
  EXPECT_NE(st.failure.find("restart the node"), std::string::npos) << st.failure;
  auto got = standby->Get("key1");
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().ToString().find("injected"), std::string::npos) << got.status().ToString();
  const uint64_t last = WriteMany(active.get(), 20, 20000);  // the active goes on without it
  const auto asked = std::chrono::steady_clock::now();
  Status wait = standby->WaitForApplied(last, 30s);
  EXPECT_FALSE(wait.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - asked, 10s) << "a wait on a failed node should end at once";
  EXPECT_NE(standby->PrometheusMetrics().find("replica_failed{node=\"b\"} 1"), std::string::npos);
  ASSERT_TRUE(Eventually([&] { return active->status().standbys.empty(); })) << "the failed node still follows";
  EXPECT_EQ(failures.load(), 1);
  EXPECT_TRUE(standby->Close().ok());
  standby.reset();

  bo.on_failure = nullptr;
  bo.test_fault = nullptr;
  standby = OpenOrDie(bo);
  ASSERT_TRUE(standby->WaitForApplied(last, 60s).ok());
  EXPECT_TRUE(standby->status().failure.empty());
  EXPECT_EQ(standby->status().snapshots_installed, 0u) << "the restart should have kept the installed data";
  ASSERT_TRUE(standby->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  EXPECT_EQ(DumpDb(dir.Sub("b")), DumpDb(dir.Sub("a")));
  ExpectSameRecords(dir.Sub("a"), dir.Sub("b"));
}

TEST(EngineTest, SlotsKeepTheLogAKnownStandbyNeedsAcrossRestarts) {
  TempDir dir;
  EngineOptions ao = Node(dir, "a");
  ao.wal_keep_bytes = 64 << 10;
  auto active = OpenOrDie(ao);
  const uint16_t port = active->listen_port();
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  uint64_t last = WriteMany(active.get(), 100);
  ASSERT_TRUE(standby->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(standby->Close().ok());
  standby.reset();
  // The active restarts (its slots come back from DATA_DIR/slots) and writes
  // many segments' worth while the standby is away.
  ASSERT_TRUE(active->Close().ok());
  active.reset();
  ao.listen_port = port;
  active = OpenOrDie(ao);
  ASSERT_EQ(active->status().slots.size(), 1u);
  EXPECT_EQ(active->status().slots[0].first, "b");
  last = WriteMany(active.get(), 3000, 100);
  EXPECT_LE(active->status().first_lsn, 100u) << "the log the standby needs was purged";
  standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  ASSERT_TRUE(standby->WaitForApplied(last, 60s).ok());
  EXPECT_EQ(standby->status().snapshots_installed, 0u) << "it should have caught up from the log";
  // Once it has caught up, the log it no longer needs goes.
  ASSERT_TRUE(Eventually([&] {
    WriteMany(active.get(), 10, 9000);
    return active->status().first_lsn > 100;
  }));
}

TEST(EngineTest, StandbyPastTheSlotCapIsResyncedReusingTheFilesItHolds) {
  TempDir dir;
  EngineOptions ao = Node(dir, "a");
  ao.wal_keep_bytes = 64 << 10;
  ao.slot_max_bytes = 256 << 10;
  auto active = OpenOrDie(ao);
  uint64_t last = WriteMany(active.get(), 3000);
  ASSERT_TRUE(Eventually([&] {
    WriteMany(active.get(), 10, 5000);
    return active->status().first_lsn > 1;
  }));
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  last = WriteMany(active.get(), 10, 6000);
  ASSERT_TRUE(standby->WaitForApplied(last, 60s).ok());
  ASSERT_EQ(standby->status().snapshots_installed, 1u);
  const uint64_t first_bytes = active->status().snapshot_bytes_sent;
  ASSERT_TRUE(standby->Close().ok());
  standby.reset();
  // Away for more than its cap: its slot is dropped and its log purged.
  ASSERT_TRUE(Eventually([&] {
    WriteMany(active.get(), 50, 7000);
    return active->status().slots_dropped >= 1 && active->status().slots.empty();
  }));
  ASSERT_TRUE(Eventually([&] {
    WriteMany(active.get(), 10, 8000);
    return active->status().first_lsn > last;
  }));
  last = WriteMany(active.get(), 10, 9000);
  standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  ASSERT_TRUE(standby->WaitForApplied(last, 60s).ok());
  const EngineStatus st = standby->status();
  EXPECT_EQ(st.snapshots_installed, 1u);  // counted since this open
  EXPECT_GE(st.snapshot_files_reused, 1u);
  // The first snapshot's SST files are still the active's: not sent again.
  EXPECT_LT(active->status().snapshot_bytes_sent - first_bytes, first_bytes / 2)
      << "files the standby already held were sent again";
  ASSERT_TRUE(standby->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  EXPECT_EQ(DumpDb(dir.Sub("b")), DumpDb(dir.Sub("a")));
  ExpectSameRecords(dir.Sub("a"), dir.Sub("b"));
}

// A node whose role the fake cluster decides.
EngineOptions ArbitratedNode(const TempDir& dir, test::FakeCluster* cluster, const std::string& id) {
  EngineOptions o = Node(dir, id);
  o.arbiter = std::make_shared<test::FakeArbiter>(cluster, id);
  return o;
}

// *a, the active of a fake cluster, and *b, its standby, which has applied
// the 10 batches written on *a. Returns their last LSN (0 if something failed).
uint64_t ActiveAndStandby(const TempDir& dir, test::FakeCluster* cluster, std::unique_ptr<Engine>* a,
                          std::unique_ptr<Engine>* b) {
  *a = OpenOrDie(ArbitratedNode(dir, cluster, "a"));
  if (!*a || !Eventually([&] { return (*a)->status().role == Role::kActive; })) return 0;
  *b = OpenOrDie(ArbitratedNode(dir, cluster, "b"));
  if (!*b || !Eventually([&] { return (*a)->status().standbys.size() == 1; })) return 0;
  const uint64_t last = WriteMany(a->get(), 10);
  return (*b)->WaitForApplied(last, 30s).ok() ? last : 0;
}

// Role changes driven by a fake arbiter, at the moments the test chooses: a
// promotion, the old active stepping down when its lease ends, the new
// active's epoch in the log, and the old active following it.
TEST(EngineTest, FakeArbiterDrivesPromotionAndDemotion) {
  TempDir dir;
  test::FakeCluster cluster;
  auto node = [&](const std::string& id) { return ArbitratedNode(dir, &cluster, id); };
  std::vector<Role> a_roles;
  Mutex roles_mu;
  EngineOptions ao = node("a");
  ao.on_role_change = [&](Role r) {
    MutexLock l(&roles_mu);
    a_roles.push_back(r);
  };
  auto a = OpenOrDie(ao);
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  auto b = OpenOrDie(node("b"));
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 1; }));
  uint64_t last = WriteMany(a.get(), 30);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  EXPECT_EQ(b->status().role, Role::kStandby);
  WriteBatch w;
  w.Put("x", "y");
  EXPECT_EQ(b->Write(w).status().code(), StatusCode::kNotActive);
  // a's lease ends: a refuses writes at once, b is promoted at epoch 2, a follows b.
  cluster.ExpireLease("a");
  EXPECT_EQ(a->Write(w).status().code(), StatusCode::kNotActive);
  ASSERT_TRUE(Eventually([&] { return b->status().role == Role::kActive; }));
  EXPECT_EQ(b->status().epoch, 2u);
  EXPECT_EQ(cluster.active()->id, "b");
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kStandby; }));
  last = WriteMany(b.get(), 10, 100);
  EXPECT_EQ(last, 30u + 1u + 1u + 10u);  // a's epoch start, 30 writes, b's epoch start, 10 writes
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
  MutexLock l(&roles_mu);
  EXPECT_EQ(a_roles, (std::vector<Role>{Role::kStandby, Role::kActive, Role::kStandby}));
}

// The slots file is checked line by line: a negative LSN used to be read as
// 2^64 - 1, and an id with a blank in it was written but not read back.
TEST(EngineTest, ADamagedSlotsFileIsAClearError) {
  TempDir dir;
  int round = 0;
  for (const char* bad : {"b -1\n", "b 12x\n", "b\n", "../x 5\n", "b 5 6\n"}) {
    const std::string data_dir = dir.Sub("n" + std::to_string(++round));
    std::filesystem::create_directories(data_dir);
    test::WriteFileBytes(data_dir + "/slots", bad);
    EngineOptions o = Node(dir, "a");
    o.data_dir = data_dir;
    auto e = Engine::Open(o);
    ASSERT_FALSE(e.ok()) << bad;
    EXPECT_EQ(e.status().code(), StatusCode::kCorruption) << e.status().ToString();
    EXPECT_NE(e.status().message().find("line 1: expected \"STANDBY_ID FIRST_LSN\""), std::string::npos)
        << e.status().ToString();
  }
}

// The files of a resync that was interrupted (resync/, kept so that the next
// resync can reuse them) go once the node no longer needs them: its log was
// accepted by the active, or it is an active itself. They used to stay for
// good, up to a whole database's size.
TEST(EngineTest, AnInterruptedResyncsFilesGoOnceNoLongerNeeded) {
  TempDir dir;
  auto make_debris = [&](const std::string& id) {
    const std::string staging = dir.Sub(id) + "/resync/db";
    std::filesystem::create_directories(staging);
    test::WriteFileBytes(staging + "/000042.sst", std::string(1 << 20, 'x'));
    return dir.Sub(id) + "/resync";
  };
  const std::string a_staging = make_debris("a"), b_staging = make_debris("b");
  auto a = OpenOrDie(Node(dir, "a"));
  EXPECT_FALSE(std::filesystem::exists(a_staging)) << "a static active kept resync/";
  auto b = OpenOrDie(Node(dir, "b", "127.0.0.1:" + std::to_string(a->listen_port())));
  const uint64_t last = WriteMany(a.get(), 10);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  EXPECT_TRUE(Eventually([&] { return !std::filesystem::exists(b_staging); }, 10s))
      << "a standby whose log was accepted kept resync/";
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// A node demoted to standby keeps the slots it had as the active, but they
// no longer hold its log: its WAL is purged as a standby's is (it used to
// keep every segment since the demotion, up to slot_max_bytes, 4 GiB).
TEST(EngineTest, ADemotedNodesOldSlotsDoNotHoldItsLog) {
  TempDir dir;
  test::FakeCluster cluster;
  auto node = [&](const std::string& id) {
    EngineOptions o = ArbitratedNode(dir, &cluster, id);
    o.wal_segment_size = 8 << 10;
    o.wal_keep_bytes = 32 << 10;
    return o;
  };
  auto a = OpenOrDie(node("a"));
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  auto b = OpenOrDie(node("b"));
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 1; }));
  uint64_t last = WriteMany(a.get(), 20);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  cluster.ExpireLease("a");  // b takes over; a keeps its slot for b
  ASSERT_TRUE(Eventually([&] { return b->status().role == Role::kActive; }));
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kStandby; }));
  // Retention runs when a segment fills: keep writing until a's log is
  // purged past where its old slot for b stood.
  int next = 1000;
  EXPECT_TRUE(Eventually(
      [&] {
        last = WriteMany(b.get(), 10, next);
        next += 10;
        return a->status().first_lsn > 100;
      },
      20s, 20ms))
      << "the standby's WAL still starts at LSN " << a->status().first_lsn << " of " << last;
  ASSERT_TRUE(a->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(a->Close().ok());
  ASSERT_TRUE(b->Close().ok());
}

// A forced promotion left in etcd from an earlier epoch (repctl killed
// while it waited) is void: at the next vacancy the election runs as usual
// (b and c equal, b wins by its name) instead of promoting c at once,
// ignoring eligibility.
TEST(EngineTest, AnOperatorRequestFromAnEarlierEpochIsIgnored) {
  TempDir dir;
  test::FakeCluster cluster;
  auto a = OpenOrDie(ArbitratedNode(dir, &cluster, "a"));
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  auto b = OpenOrDie(ArbitratedNode(dir, &cluster, "b"));
  auto c = OpenOrDie(ArbitratedNode(dir, &cluster, "c"));
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 2; }));
  const uint64_t last = WriteMany(a.get(), 10);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(c->WaitForApplied(last, 30s).ok());
  // Without an epoch (as repctl wrote it before): void too.
  test::FakeArbiter op(&cluster, "operator");
  ASSERT_TRUE(op.PutControl("promote", "c").ok());
  ASSERT_TRUE(a->Close().ok());
  a.reset();
  ASSERT_TRUE(Eventually([&] {
    auto active = cluster.active();
    return active && active->id != "a";
  }));
  EXPECT_EQ(cluster.active()->id, "b") << "the request left behind promoted c";
  EXPECT_EQ(cluster.active()->epoch, 2u);
  // Asked in epoch 1, now 2: a (back, as caught up as c) wins by its name.
  a = OpenOrDie(ArbitratedNode(dir, &cluster, "a"));
  const uint64_t more = WriteMany(b.get(), 5, 100);
  ASSERT_TRUE(a->WaitForApplied(more, 30s).ok());
  ASSERT_TRUE(c->WaitForApplied(more, 30s).ok());
  ASSERT_TRUE(op.PutControl("promote", OperatorRequest("c", 1)).ok());
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(Eventually([&] {
    auto active = cluster.active();
    return active && active->id != "b";
  }));
  EXPECT_EQ(cluster.active()->id, "a") << "the stale request promoted c";
  EXPECT_EQ(cluster.active()->epoch, 3u);
  ASSERT_TRUE(c->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// An active cut off from etcd whose lease etcd expired, while another node
// won the active role, must not take writes on the new lease it gets once
// its keepalive gets through: the active key went with the old lease. Here
// it cannot reach etcd for anything else yet, so it cannot learn of the new
// active, and only the lease tells it.
TEST(EngineTest, AnActiveWhoseLeaseWasReplacedTakesNoWritesOnTheNewLease) {
  TempDir dir;
  test::FakeCluster cluster;
  std::unique_ptr<Engine> a, b;
  const uint64_t last = ActiveAndStandby(dir, &cluster, &a, &b);
  ASSERT_GT(last, 0u);
  cluster.SetReachable("a", false);
  cluster.ExpireLease("a");
  WriteBatch w;
  w.Put("split", "brain");
  EXPECT_EQ(a->Write(w).status().code(), StatusCode::kNotActive) << "self-fenced: the lease is in doubt";
  // Its reads say so too: its data is as old as its lease's deadline (the
  // fake's lease ended a second ago), not "0 ms".
  auto stated = a->ReadWithStaleness("key1", std::nullopt);
  ASSERT_TRUE(stated.ok()) << stated.status().ToString();
  EXPECT_TRUE(stated->staleness && *stated->staleness >= 900ms) << "a self-fenced active claimed fresh data";
  EXPECT_EQ(a->ReadWithStaleness("key1", 100ms).status().code(), StatusCode::kTooStale);
  ASSERT_TRUE(Eventually([&] { return b->status().role == Role::kActive; }));
  cluster.RegrantLease("a");  // a's keepalive got through: a fresh lease, no active key under it
  EXPECT_EQ(a->Write(w).status().code(), StatusCode::kNotActive) << "two nodes would take writes at once";
  EXPECT_TRUE(b->Write(w).ok());
  // a steps down without etcd's word, and follows b once it can reach etcd.
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kStandby; }));
  cluster.SetReachable("a", true);
  const uint64_t b_last = WriteMany(b.get(), 5, 100);
  ASSERT_TRUE(a->WaitForApplied(b_last, 30s).ok());
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// A node whose key ends while it is still promoting (slow steps: draining,
// applying), and that a newer active fences meanwhile, must not complete
// the promotion: it never takes the role.
TEST(EngineTest, APromotionFencedByANewerActiveMidwayNeverTakesTheRole) {
  TempDir dir;
  test::FakeCluster cluster;
  auto a = OpenOrDie(ArbitratedNode(dir, &cluster, "a"));
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  Mutex hook_mu;
  CondVar hook_cv(&hook_mu);
  bool in_promote = false, release = false;
  std::vector<Role> b_roles;
  EngineOptions bo = ArbitratedNode(dir, &cluster, "b");
  bo.test_fault = [&](const char* step) {
    if (std::string_view(step) != "promote.fence_check") return Status::OK();
    MutexLock l(&hook_mu);
    in_promote = true;
    hook_cv.SignalAll();
    while (!release) hook_cv.Wait();
    return Status::OK();
  };
  bo.on_role_change = [&](Role r) {
    MutexLock l(&hook_mu);
    b_roles.push_back(r);
  };
  auto b = OpenOrDie(bo);
  auto c = OpenOrDie(ArbitratedNode(dir, &cluster, "c"));
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 2; }));
  const uint64_t last = WriteMany(a.get(), 10);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(c->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(a->Close().ok());  // a resigns: b and c hold the same, and b's id goes first
  {
    MutexLock l(&hook_mu);
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!in_promote && std::chrono::steady_clock::now() < deadline) hook_cv.WaitUntil(deadline);
    ASSERT_TRUE(in_promote) << "b did not win the election";
  }
  // b's lease ends mid-promotion and b gets a new one; c wins epoch 3 and
  // fences every node with a session, b included.
  cluster.ExpireLease("b");
  cluster.RegrantLease("b");
  ASSERT_TRUE(Eventually([&] { return c->status().role == Role::kActive; }, 30s));
  EXPECT_EQ(c->status().epoch, 3u);
  {
    MutexLock l(&hook_mu);
    release = true;
    hook_cv.SignalAll();
  }
  // b follows c (and holds its records) without ever having been the active.
  const uint64_t c_last = WriteMany(c.get(), 5, 100);
  ASSERT_TRUE(b->WaitForApplied(c_last, 30s).ok());
  EXPECT_EQ(b->status().role, Role::kStandby);
  {
    MutexLock l(&hook_mu);
    EXPECT_EQ(std::count(b_roles.begin(), b_roles.end(), Role::kActive), 0) << "b took the role after c fenced it";
  }
  ASSERT_TRUE(c->Close().ok());
  ASSERT_TRUE(b->Close().ok());
}

// Callbacks run on a thread of their own: one may close the engine (Close
// used to join the very thread the callback ran on, and the process
// aborted), and the roles arrive in order, the first once Open succeeded.
TEST(EngineTest, ARoleCallbackMayCloseTheEngine) {
  TempDir dir;
  test::FakeCluster cluster;
  Mutex mu;
  CondVar cv(&mu);
  Engine* self = nullptr;
  bool closed = false;
  Status close_status;
  std::vector<Role> roles;
  std::thread::id callback_thread;
  EngineOptions ao = ArbitratedNode(dir, &cluster, "a");
  ao.on_role_change = [&](Role r) {
    MutexLock l(&mu);
    roles.push_back(r);
    callback_thread = std::this_thread::get_id();
    if (r != Role::kActive) return;
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (self == nullptr && std::chrono::steady_clock::now() < deadline) cv.WaitUntil(deadline);
    Engine* e = self;
    mu.Unlock();
    Status st = e->Close();
    mu.Lock();
    close_status = st;
    closed = true;
    cv.SignalAll();
  };
  auto a = OpenOrDie(ao);
  {
    MutexLock l(&mu);
    self = a.get();
    cv.SignalAll();
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!closed && std::chrono::steady_clock::now() < deadline) cv.WaitUntil(deadline);
    ASSERT_TRUE(closed) << "a was never promoted, or its callback's Close never returned";
    EXPECT_TRUE(close_status.ok()) << close_status.ToString();
    EXPECT_EQ(roles, (std::vector<Role>{Role::kStandby, Role::kActive}));
    EXPECT_NE(callback_thread, std::this_thread::get_id());
  }
  WriteBatch w;
  w.Put("k", "v");
  EXPECT_FALSE(a->Write(w).ok()) << "closed from its callback, yet it took a write";
  EXPECT_TRUE(a->Close().ok());  // again, from the host: returns at once
  a.reset();
}

// Interrupt wakes every waiting call with Aborted (WaitForApplied used to
// say TimedOut, WaitForReplicas a count of 0).
TEST(EngineTest, InterruptWakesWaitersWithAborted) {
  TempDir dir;
  auto a = OpenOrDie(Node(dir, "a"));
  auto applied = std::async(std::launch::async, [&] { return a->WaitForApplied(1000000, 60s); });
  auto replicas = std::async(std::launch::async, [&] { return a->WaitForReplicas(1, 1, 60s); });
  ASSERT_EQ(replicas.wait_for(100ms), std::future_status::timeout);  // still waiting
  a->Interrupt();
  ASSERT_EQ(applied.wait_for(30s), std::future_status::ready);
  ASSERT_EQ(replicas.wait_for(30s), std::future_status::ready);
  EXPECT_EQ(applied.get().code(), StatusCode::kAborted);
  EXPECT_EQ(replicas.get().status().code(), StatusCode::kAborted);
  ASSERT_TRUE(a->Close().ok());
}

// Close from two threads at once: the second returns once the node is
// closed (it used to return at once, and reopening the directory then
// failed: the WAL was still locked). The first is held in Close by a role
// callback under way (Close waits for it), so the second surely comes second.
TEST(EngineTest, ASecondCloseReturnsOnceTheNodeIsClosed) {
  TempDir dir;
  Mutex mu;
  CondVar cv(&mu);
  bool in_callback = false, release = false;
  EngineOptions o = Node(dir, "a");
  o.on_role_change = [&](Role) {
    MutexLock l(&mu);
    in_callback = true;
    cv.SignalAll();
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!release && std::chrono::steady_clock::now() < deadline) cv.WaitUntil(deadline);
  };
  auto a = OpenOrDie(o);
  {
    MutexLock l(&mu);
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!in_callback && std::chrono::steady_clock::now() < deadline) cv.WaitUntil(deadline);
    ASSERT_TRUE(in_callback);
  }
  auto first = std::async(std::launch::async, [&] { return a->Close(); });
  WriteBatch w;
  w.Put("k", "v");
  ASSERT_TRUE(Eventually([&] { return !a->Write(w).ok(); })) << "the first Close never began";
  auto second = std::async(std::launch::async, [&] { return a->Close(); });
  EXPECT_EQ(second.wait_for(300ms), std::future_status::timeout) << "the second Close returned while the first ran";
  {
    MutexLock l(&mu);
    release = true;
    cv.SignalAll();
  }
  EXPECT_TRUE(second.get().ok());
  auto again = Engine::Open(Node(dir, "a"));
  EXPECT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_TRUE(first.get().ok());
  if (again.ok()) {
    EXPECT_TRUE((*again)->Close().ok());
  }
}

// A standby restarted with no active to hear from does not call its data
// fresh once it has applied its own log: staleness is unknown until a live
// active's heartbeat says what there is.
TEST(EngineTest, ARestartedStandbyWithoutAnActiveDoesNotClaimFreshData) {
  TempDir dir;
  auto a = OpenOrDie(Node(dir, "a"));
  const std::string a_address = Follow(*a);
  EngineOptions bo = Node(dir, "b", a_address);
  std::atomic<bool> refuse{false};
  bo.test_fault = [&](const char* step) {
    return refuse.load() && std::string_view(step) == "apply" ? Status::IOError("refused by the test")
                                                               : Status::OK();
  };
  auto b = OpenOrDie(bo);
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 1; }));
  refuse = true;  // b fails at its next apply: what it received stays unapplied
  WriteMany(a.get(), 20);
  ASSERT_TRUE(Eventually([&] { return !b->status().failure.empty(); }));
  const EngineStatus failed = b->status();
  ASSERT_LT(failed.applied_lsn, failed.last_lsn);
  b.reset();
  a.reset();  // no active any more
  refuse = false;
  b = OpenOrDie(Node(dir, "b", a_address));
  ASSERT_TRUE(Eventually([&] { return b->status().applied_lsn >= failed.last_lsn; }));  // its own log, replayed
  auto r = b->ReadWithStaleness("counter", 60s);
  EXPECT_EQ(r.status().code(), StatusCode::kTooStale)
      << "staleness " << (r.ok() && r->staleness ? r->staleness->count() : -1) << " ms with no active to hear from";
  ASSERT_TRUE(b->Close().ok());
}

// A standby whose active turns out to carry its own id (its own port under
// another name, or a duplicate id) fails with a clear error instead of
// retrying for ever; a follow address that is no HOST:PORT fails Open.
TEST(EngineTest, FollowingANodeWithTheSameIdFailsClearly) {
  TempDir dir;
  EngineOptions bad = Node(dir, "b", "this is not an address");
  auto refused = Engine::Open(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument) << refused.status().ToString();
  auto a = OpenOrDie(Node(dir, "a"));
  EngineOptions twin = Node(dir, "a", Follow(*a));
  twin.data_dir = dir.Sub("a-twin");
  auto b = OpenOrDie(twin);
  ASSERT_TRUE(Eventually([&] { return !b->status().failure.empty(); }, 30s));
  EXPECT_NE(b->status().failure.find("this node's id"), std::string::npos) << b->status().failure;
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

TEST(EngineTest, ADataDirectoryBelongsToOneNodeId) {
  // DATA_DIR/node names the node the directory is for: another id is
  // refused (it would take over that node's slot and sync set listing), and
  // an emptied directory gets a new incarnation.
  TempDir dir;
  EngineOptions a = Node(dir, "a");
  std::string first;
  {
    auto e = OpenOrDie(a);
    ASSERT_TRUE(e->Close().ok());
    first = test::ReadFileBytes(a.data_dir + "/node");
    EXPECT_EQ(first.rfind("id a\nincarnation ", 0), 0u) << first;
  }
  EngineOptions b = a;
  b.node_id = "b";
  auto refused = Engine::Open(b);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument) << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("belongs to node 'a'"), std::string::npos) << refused.status().ToString();
  {
    auto e = OpenOrDie(a);  // the same node again: the same incarnation
    ASSERT_TRUE(e->Close().ok());
    EXPECT_EQ(test::ReadFileBytes(a.data_dir + "/node"), first);
  }
  // Its log emptied, the node file left: the incarnation stands for the log.
  std::filesystem::remove_all(a.data_dir + "/wal");
  std::filesystem::remove_all(a.data_dir + "/db");
  {
    auto e = OpenOrDie(a);
    ASSERT_TRUE(e->Close().ok());
  }
  const std::string second = test::ReadFileBytes(a.data_dir + "/node");
  EXPECT_NE(second, first) << "a directory whose log was emptied is a new incarnation";
  std::filesystem::remove_all(a.data_dir);
  auto e = OpenOrDie(a);
  ASSERT_TRUE(e->Close().ok());
  EXPECT_NE(test::ReadFileBytes(a.data_dir + "/node"), second) << "an emptied directory is a new incarnation";
}

TEST(EngineTest, TwoStandbysWithOneIdAreReportedByTheActive) {
  // They push each other out for ever (each new session replaces the other);
  // the active sees the data directory change back and forth and says why.
  TempDir dir;
  const std::string log = test::CapturedStderr([&] {
    auto a = OpenOrDie(Node(dir, "a"));
    EngineOptions b1 = Node(dir, "b", Follow(*a));
    EngineOptions b2 = b1;
    b2.data_dir = dir.Sub("b-twin");
    auto first = OpenOrDie(b1);
    auto second = OpenOrDie(b2);
    EXPECT_TRUE(Eventually([] { return test::ReadFileBytes("/proc/self/fd/2").find("engine.duplicate_id") != std::string::npos; }, 30s));
    ASSERT_TRUE(second->Close().ok());
    ASSERT_TRUE(first->Close().ok());
    ASSERT_TRUE(a->Close().ok());
  });
  EXPECT_NE(log.find("two nodes run with --id b"), std::string::npos) << log;
}

TEST(EngineTest, AStandbySaysWhyItCannotReachItsActive) {
  // Its one warning names the cause: a name that does not resolve (looked
  // up by the transport, not by the follower's thread) or a refused connect.
  TempDir dir;
  test::RefusingPort refusing;
  for (const std::string& target : {std::string("no-such-host.invalid:7400"), refusing.endpoint()}) {
    const std::string sub = target.substr(0, 3) == "no-" ? "name" : "port";
    EngineOptions o = Node(dir, "b", target);
    o.data_dir = dir.Sub(sub);
    const std::string log = test::CapturedStderr([&] {
      auto b = OpenOrDie(o);
      // fd 2 is the capture file while fn runs.
      EXPECT_TRUE(Eventually([] { return test::ReadFileBytes("/proc/self/fd/2").find("upstream_unreachable") != std::string::npos; }, 30s));
      ASSERT_TRUE(b->Close().ok());
    });
    const size_t at = log.find("engine.upstream_unreachable");
    ASSERT_NE(at, std::string::npos) << log;
    const std::string line = log.substr(at, log.find('\n', at) - at);
    if (sub == "name") {
      EXPECT_NE(line.find("error=\"NotFound: cannot resolve host 'no-such-host.invalid'"), std::string::npos) << line;
    } else {
      EXPECT_NE(line.find("Connection refused"), std::string::npos) << line;
    }
  }
}

// A peer of the cluster that speaks the protocol by hand: a test stand-in
// for a buggy or hostile node that holds the cluster's secret.
class RoguePeer : public transport::Handler {
 public:
  RoguePeer() {
    transport::Options to;
    to.node_id = "rogue";
    to.cluster = "t";
    to.secret = "test-secret";
    to.io_threads = 1;
    ep_ = std::move(transport::Endpoint::Create(to, this)).value();
  }
  ~RoguePeer() override { ep_->Stop(); }
  transport::Endpoint* endpoint() { return ep_.get(); }
  bool Connect(uint16_t port) {
    auto s = ep_->Connect("127.0.0.1", port);
    return s.ok() && WaitFor([&] { return session_ && session_->established(); });
  }
  bool Send(const proto::Control& msg) {
    std::shared_ptr<transport::Session> s;
    {
      MutexLock l(&mu_);
      s = session_;
    }
    return s && s->SendControl(msg).ok();
  }
  // Waits (30 s at most) until pred, which reads the fields below, holds.
  template <class Pred>
  bool WaitFor(Pred pred) {
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    MutexLock l(&mu_);
    while (!pred() && std::chrono::steady_clock::now() < deadline) cv_.WaitUntil(deadline);
    return pred();
  }
  // The first control message of a kind received so far, if any.
  std::optional<proto::Control> Find(bool (proto::Control::*has)() const) {
    MutexLock l(&mu_);
    for (const auto& m : controls_) {
      if ((m.*has)()) return m;
    }
    return std::nullopt;
  }
  bool Has(bool (proto::Control::*has)() const) { return Find(has).has_value(); }
  // Read under WaitFor (or after the endpoint stopped).
  std::shared_ptr<transport::Session> session_;
  std::vector<proto::Control> controls_;
  uint64_t data_bytes_ = 0;
  int closed_ = 0;
  Status last_close_;  // why the last session closed

 private:
  void OnEstablished(const std::shared_ptr<transport::Session>& s) override {
    MutexLock l(&mu_);
    session_ = s;
    cv_.SignalAll();
  }
  void OnControl(const std::shared_ptr<transport::Session>&, const proto::Control& msg) override {
    if (msg.has_heartbeat()) return;
    MutexLock l(&mu_);
    controls_.push_back(msg);
    cv_.SignalAll();
  }
  void OnData(const std::shared_ptr<transport::Session>&, std::string_view payload) override {
    MutexLock l(&mu_);
    data_bytes_ += payload.size();
  }
  void OnClosed(const std::shared_ptr<transport::Session>&, const Status& why) override {
    MutexLock l(&mu_);
    ++closed_;
    last_close_ = why;
    cv_.SignalAll();
  }
  Mutex mu_;
  CondVar cv_{&mu_};
  std::unique_ptr<transport::Endpoint> ep_;
};

// Sends one fence and waits until the node has handled it (it closes the session).
bool SendFence(uint16_t port, uint64_t epoch, const std::string& new_active) {
  RoguePeer peer;
  if (!peer.Connect(port)) return false;
  proto::Control msg;
  msg.mutable_fence()->set_epoch(epoch);
  msg.mutable_fence()->set_new_active(new_active);
  return peer.Send(msg) && peer.WaitFor([&] { return peer.closed_ > 0; });
}

// A node that refuses a peer tells it why (an Error frame before the close):
// a standby used to see only the connection end.
TEST(EngineTest, ARefusedSubscriptionTellsThePeerWhy) {
  TempDir dir;
  auto a = OpenOrDie(Node(dir, "a"));
  RoguePeer standby;
  ASSERT_TRUE(standby.Connect(a->listen_port()));
  proto::Control sub;
  sub.mutable_subscribe()->set_from_lsn(0);
  ASSERT_TRUE(standby.Send(sub));
  ASSERT_TRUE(standby.WaitFor([&] { return standby.closed_ > 0; }));
  EXPECT_NE(standby.last_close_.message().find("asks for LSN 0"), std::string::npos) << standby.last_close_.ToString();
  ASSERT_TRUE(a->Close().ok());
}

// An active asked for one snapshot file twice refuses the whole request
// before sending anything (it used to send the file as often as named).
TEST(EngineTest, AnActiveRefusesASnapshotRequestNamingAFileTwice) {
  TempDir dir;
  auto a = OpenOrDie(Node(dir, "a"));
  WriteMany(a.get(), 50);
  RoguePeer standby;
  ASSERT_TRUE(standby.Connect(a->listen_port()));
  proto::Control sub;
  sub.mutable_subscribe()->set_from_lsn(1);
  sub.mutable_subscribe()->set_want_snapshot(true);
  ASSERT_TRUE(standby.Send(sub));
  ASSERT_TRUE(standby.WaitFor([&] {
    return std::any_of(standby.controls_.begin(), standby.controls_.end(),
                       [](const proto::Control& m) { return m.has_snapshot_offer(); });
  }));
  const proto::SnapshotOffer offer = standby.Find(&proto::Control::has_snapshot_offer)->snapshot_offer();
  ASSERT_GT(offer.files_size(), 0);
  proto::Control req;
  for (int i = 0; i < 3; ++i) req.mutable_snapshot_request()->add_names(offer.files(0).name());
  ASSERT_TRUE(standby.Send(req));
  ASSERT_TRUE(standby.WaitFor([&] { return standby.closed_ > 0; })) << "the active served the request";
  EXPECT_EQ(standby.data_bytes_, 0u) << "file bytes sent for a request it should refuse";
  ASSERT_TRUE(a->Close().ok());
}

// Standby "b" of a hand-driven active, once it has subscribed.
std::unique_ptr<Engine> SubscribedStandbyOf(RoguePeer* active, const TempDir& dir) {
  auto port = active->endpoint()->Listen("127.0.0.1", 0);
  if (!port.ok()) {
    ADD_FAILURE() << port.status().ToString();
    return nullptr;
  }
  auto b = OpenOrDie(Node(dir, "b", "127.0.0.1:" + std::to_string(*port)));
  if (!active->WaitFor([&] {
        return std::any_of(active->controls_.begin(), active->controls_.end(),
                           [](const proto::Control& m) { return m.has_subscribe(); });
      })) {
    ADD_FAILURE() << "b did not subscribe";
    return nullptr;
  }
  return b;
}

// An offer of a snapshot at LSN 10 (epoch 1, its seed from LSN 10), to fill in.
proto::Control SnapshotOfferAtLsn10() {
  proto::Control offer;
  auto* o = offer.mutable_snapshot_offer();
  o->set_lsn(10);
  o->set_epoch(1);
  o->set_seed_first_lsn(10);
  return offer;
}

// A standby refuses a snapshot file whose announced size is not the one
// offered, before writing a byte of it (it used to write whatever came
// until the disk was full, and compare only at install).
TEST(EngineTest, AStandbyRefusesASnapshotFileLargerThanOffered) {
  TempDir dir;
  RoguePeer active;
  auto b = SubscribedStandbyOf(&active, dir);
  ASSERT_TRUE(b);
  proto::Control offer = SnapshotOfferAtLsn10();
  auto* o = offer.mutable_snapshot_offer();
  auto* f = o->add_files();
  f->set_name("000001.sst");
  f->set_size(100);
  f->set_xxh3(1);
  ASSERT_TRUE(active.Send(offer));
  ASSERT_TRUE(active.WaitFor([&] {
    return std::any_of(active.controls_.begin(), active.controls_.end(),
                       [](const proto::Control& m) { return m.has_snapshot_request(); });
  }));
  proto::Control begin;
  begin.mutable_snapshot_file()->set_name("000001.sst");
  begin.mutable_snapshot_file()->set_size(1ull << 40);
  ASSERT_TRUE(active.Send(begin));
  EXPECT_TRUE(active.WaitFor([&] { return active.closed_ > 0; })) << "b took a file of 1 TiB offered as 100 bytes";
  ASSERT_TRUE(b->Close().ok());
}

// A seed is one WAL frame, which the standby reads whole into memory at
// install: an offer announcing a larger one is refused before anything is
// asked for or written (it used to be taken to disk, then read into memory).
TEST(EngineTest, AStandbyRefusesASnapshotSeedLargerThanAFrame) {
  TempDir dir;
  RoguePeer active;
  auto b = SubscribedStandbyOf(&active, dir);
  ASSERT_TRUE(b);
  proto::Control offer = SnapshotOfferAtLsn10();
  auto* o = offer.mutable_snapshot_offer();
  o->set_seed_size(10ull << 30);
  ASSERT_TRUE(active.Send(offer));
  EXPECT_TRUE(active.WaitFor([&] { return active.closed_ > 0; })) << "b took a seed of 10 GiB";
  EXPECT_FALSE(std::any_of(active.controls_.begin(), active.controls_.end(),
                           [](const proto::Control& m) { return m.has_snapshot_request(); }));
  ASSERT_TRUE(b->Close().ok());
}

// One running node per data directory: a second one (a mistake, a
// supervisor starting it twice) is refused before it changes anything; it
// used to remove the running node's checkpoints/ (a resync in flight) and
// finish or undo its install before the WAL's lock refused it.
TEST(EngineTest, ASecondNodeOnARunningNodesDirectoryIsRefusedBeforeItChangesAnything) {
  TempDir dir;
  auto a = OpenOrDie(Node(dir, "a"));
  const std::string in_flight = dir.Sub("a") + "/checkpoints/b-1/000001.sst";
  std::filesystem::create_directories(dir.Sub("a") + "/checkpoints/b-1");
  test::WriteFileBytes(in_flight, "being sent");
  const std::string node_file = test::ReadFileBytes(dir.Sub("a") + "/node");
  auto twice = Engine::Open(Node(dir, "a"));
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.status().code(), StatusCode::kBusy) << twice.status().ToString();
  EXPECT_NE(twice.status().message().find("in use by another running node"), std::string::npos)
      << twice.status().ToString();
  EXPECT_TRUE(std::filesystem::exists(in_flight)) << "the second node removed the first one's checkpoints";
  EXPECT_EQ(test::ReadFileBytes(dir.Sub("a") + "/node"), node_file);
  ASSERT_TRUE(a->Close().ok());
  a.reset();
  auto again = Engine::Open(Node(dir, "a"));  // closed: the directory is free
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  ASSERT_TRUE((*again)->Close().ok());
}

// A wal/ that cannot be listed is not "no log": the open fails naming it,
// and the node file keeps its incarnation (it used to get a new one, so a
// node whose wal/ was briefly unreadable lost its place in the sync set).
TEST(EngineTest, AnUnlistableWalDirectoryFailsTheOpenAndKeepsTheIncarnation) {
  TempDir dir;
  {
    auto a = OpenOrDie(Node(dir, "a"));
    WriteMany(a.get(), 5);
    ASSERT_TRUE(a->Close().ok());
  }
  const std::string node_file = test::ReadFileBytes(dir.Sub("a") + "/node");
  std::filesystem::rename(dir.Sub("a") + "/wal", dir.Sub("a") + "/wal.away");
  test::WriteFileBytes(dir.Sub("a") + "/wal", "not a directory");
  auto refused = Engine::Open(Node(dir, "a"));
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("/wal"), std::string::npos) << refused.status().ToString();
  EXPECT_EQ(test::ReadFileBytes(dir.Sub("a") + "/node"), node_file) << "the incarnation changed";
  std::filesystem::remove(dir.Sub("a") + "/wal");
  std::filesystem::rename(dir.Sub("a") + "/wal.away", dir.Sub("a") + "/wal");
  auto back = Engine::Open(Node(dir, "a"));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(test::ReadFileBytes(dir.Sub("a") + "/node"), node_file);
  ASSERT_TRUE((*back)->Close().ok());
}

// DATA_DIR/node is read exactly as it is written: a truncated incarnation
// (which would be published to etcd as it is), a duplicate or unknown line,
// or a missing line end is refused as damage, naming the file.
TEST(EngineTest, ANodeFileNotAsWrittenIsRefused) {
  TempDir dir;
  {
    auto a = OpenOrDie(Node(dir, "a"));
    ASSERT_TRUE(a->Close().ok());
  }
  const std::string path = dir.Sub("a") + "/node";
  const std::string good = test::ReadFileBytes(path);
  const std::string incarnation = good.substr(good.find("incarnation ") + 12, 32);
  for (const std::string& bad :
       {"id a\nincarnation " + incarnation.substr(0, 2) + "\n", "id a\nid a\nincarnation " + incarnation + "\n",
        good + "colour blue\n", good.substr(0, good.size() - 1), "incarnation " + incarnation + "\nid a\n"}) {
    test::WriteFileBytes(path, bad);
    auto refused = Engine::Open(Node(dir, "a"));
    ASSERT_FALSE(refused.ok()) << bad;
    EXPECT_EQ(refused.status().code(), StatusCode::kCorruption) << bad << ": " << refused.status().ToString();
    EXPECT_NE(refused.status().message().find(path), std::string::npos) << refused.status().ToString();
  }
  test::WriteFileBytes(path, good);
  auto back = Engine::Open(Node(dir, "a"));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  ASSERT_TRUE((*back)->Close().ok());
  EXPECT_EQ(test::ReadFileBytes(path), good) << "the same incarnation";
}

// A fence naming an epoch that no campaign reached (a peer's bug, or a
// forged message) costs at most an election: the node it reached can still
// be promoted later. A fence naming no plain node id is refused outright.
TEST(EngineTest, AFencePastEveryCampaignDoesNotKeepANodeFromPromotion) {
  TempDir dir;
  test::FakeCluster cluster;
  std::unique_ptr<Engine> a, b;
  const uint64_t last = ActiveAndStandby(dir, &cluster, &a, &b);
  ASSERT_GT(last, 0u);

  ASSERT_TRUE(SendFence(a->listen_port(), UINT64_MAX, "x\"\nforged log line"));
  EXPECT_EQ(a->status().role, Role::kActive) << "a fence from no plain node id was obeyed";
  ASSERT_GT(WriteMany(a.get(), 1, 50), last);

  ASSERT_TRUE(SendFence(b->listen_port(), UINT64_MAX, "rogue"));
  ASSERT_TRUE(a->Close().ok());  // a resigns: b is the only candidate
  ASSERT_TRUE(Eventually([&] { return b->status().role == Role::kActive; }, 30s))
      << "b never took the role after a fence at epoch 2^64-1";
  EXPECT_LT(b->status().epoch, 10u);
  ASSERT_GT(WriteMany(b.get(), 3, 100), last);
  ASSERT_TRUE(b->Close().ok());
}

// A write that passed the active's role check just before the node was
// demoted lands in its log before the node follows the new active, never
// after: the rejoin then cuts it as an unreplicated tail, and the node never
// applies it.
TEST(EngineTest, AWriteInFlightAtADemotionIsCutNotApplied) {
  TempDir dir;
  test::FakeCluster cluster;
  Mutex hook_mu;
  CondVar hook_cv(&hook_mu);
  bool held = false, release = false;
  std::atomic<bool> hold_next{false};
  EngineOptions ao = ArbitratedNode(dir, &cluster, "a");
  ao.test_fault = [&](const char* step) {
    if (std::string_view(step) != "write.append" || !hold_next.exchange(false)) return Status::OK();
    MutexLock l(&hook_mu);
    held = true;
    hook_cv.SignalAll();
    while (!release) hook_cv.Wait();
    return Status::OK();
  };
  auto a = OpenOrDie(ao);
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  auto b = OpenOrDie(ArbitratedNode(dir, &cluster, "b"));
  auto c = OpenOrDie(ArbitratedNode(dir, &cluster, "c"));  // a standby that stays one
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 2; }));
  const uint64_t last = WriteMany(a.get(), 10);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(c->WaitForApplied(last, 30s).ok());
  hold_next = true;
  auto pending = std::async(std::launch::async, [&] {
    WriteBatch w;
    w.Put("held", "in flight");
    return a->Write(w);
  });
  {
    MutexLock l(&hook_mu);
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!held && std::chrono::steady_clock::now() < deadline) hook_cv.WaitUntil(deadline);
    ASSERT_TRUE(held);
  }
  cluster.ExpireLease("a");  // b is promoted; a steps down while its write is held
  ASSERT_TRUE(Eventually([&] { return b->status().role == Role::kActive; }));
  const uint64_t b_last = WriteMany(b.get(), 5, 100);
  cluster.RegrantLease("a");
  {
    MutexLock l(&hook_mu);
    release = true;
    hook_cv.SignalAll();
  }
  EXPECT_EQ(pending.get().status().code(), StatusCode::kNotActive) << "acknowledged by a demoted node";
  ASSERT_TRUE(a->WaitForApplied(b_last, 30s).ok());
  EXPECT_EQ(a->status().role, Role::kStandby);
  EXPECT_EQ(*a->Get("held"), std::nullopt) << "a applied a record that is not in b's history";
  EXPECT_EQ(a->status().rewinds, 1u) << "the held record was not cut as a tail";
  // Nor was it shipped: c follows b without a snapshot (a record b lacks,
  // once applied, could only be undone by one).
  ASSERT_TRUE(c->WaitForApplied(b_last, 30s).ok());
  EXPECT_EQ(*c->Get("held"), std::nullopt);
  EXPECT_EQ(c->status().snapshots_installed, 0u) << "c received the demoted node's unacknowledged record";
  ASSERT_TRUE(c->Close().ok());
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// A node listening on every interface publishes the address it is told to:
// the wildcard itself names no one for the other nodes to reach.
TEST(EngineTest, ANodeListeningOnEveryInterfacePublishesItsAdvertisedAddress) {
  TempDir dir;
  test::FakeCluster cluster;
  EngineOptions ao = ArbitratedNode(dir, &cluster, "a");
  ao.listen_host = "0.0.0.0";
  auto refused = Engine::Open(ao);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("--advertise"), std::string::npos) << refused.status().ToString();
  ao.advertise = "127.0.0.1:0";  // port 0: the port bound
  auto a = OpenOrDie(ao);
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  EXPECT_EQ(cluster.active()->address, "127.0.0.1:" + std::to_string(a->listen_port()));
  auto b = OpenOrDie(ArbitratedNode(dir, &cluster, "b"));  // follows the published address
  const uint64_t last = WriteMany(a.get(), 5);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// A node whose applier fails says so in its session: it never campaigns,
// and an election does not wait for it (a node ahead of the others would
// otherwise be given a lease TTL + 1 s to win first; here that is 31 s).
TEST(EngineTest, AFailedStandbyIsPassedOverInAnElection) {
  TempDir dir;
  test::FakeCluster cluster;
  auto node = [&](const std::string& id) {
    EngineOptions o = ArbitratedNode(dir, &cluster, id);
    o.lease_ttl = 30s;
    return o;
  };
  auto a = OpenOrDie(node("a"));
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  std::atomic<bool> break_b{false};
  std::atomic<int> b_failures{0};
  EngineOptions bo = node("b");
  bo.on_failure = [&](const Status&) { b_failures.fetch_add(1); };
  bo.test_fault = [&](const char* step) {
    return std::string_view(step) == "apply" && break_b.load() ? Status::IOError("injected: the apply failed")
                                                              : Status::OK();
  };
  auto b = OpenOrDie(bo);
  auto c = OpenOrDie(node("c"));
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 2; }));
  uint64_t last = WriteMany(a.get(), 20);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(c->WaitForApplied(last, 30s).ok());
  // One more record: b holds it durably, then fails applying it. b and c
  // now hold the same LSNs, and b's id is the smaller: b would go first.
  break_b = true;
  last = WriteMany(a.get(), 1, 100);
  ASSERT_TRUE(Eventually([&] { return !b->status().failure.empty(); }));
  EXPECT_NE(b->status().failure.find("injected"), std::string::npos) << b->status().failure;
  EXPECT_EQ(b->status().durable_lsn, last);
  auto stale = b->Get("key1");  // its data is intact but no longer kept up: not served
  ASSERT_FALSE(stale.ok());
  EXPECT_NE(stale.status().ToString().find("injected"), std::string::npos) << stale.status().ToString();
  ASSERT_TRUE(c->WaitForApplied(last, 30s).ok());
  test::FakeArbiter reader(&cluster, "reader");
  ASSERT_TRUE(Eventually([&] {
    auto nodes = reader.GetNodes();
    return nodes.ok() && std::any_of(nodes->begin(), nodes->end(), [](const NodeInfo& n) {
             return n.id == "b" && n.failure.find("injected") != std::string::npos;
           });
  })) << "b's session does not say it failed";

  cluster.ExpireLease("a");
  ASSERT_TRUE(Eventually([&] { return c->status().role == Role::kActive; }, 15s))
      << "the election waited for the failed node";
  EXPECT_EQ(cluster.active()->id, "c");
  EXPECT_EQ(b->status().role, Role::kStandby);
  EXPECT_EQ(b_failures.load(), 1);
  WriteBatch w;
  w.Put("after", "failover");
  EXPECT_EQ(b->Write(w).status().code(), StatusCode::kNotActive);
  EXPECT_TRUE(c->Write(w).ok());
  ASSERT_TRUE(c->Close().ok());
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// Engines under remote-write:1 sharing one FakeCluster as their arbiter,
// and what the cluster lists as eligible (the sync set).
struct SyncSetCluster {
  TempDir dir;
  test::FakeCluster cluster;
  std::chrono::milliseconds grace{100};
  std::chrono::milliseconds rejoin{1000};
  EngineOptions Options(const std::string& id) {
    EngineOptions o = Node(dir, id, "", "remote-write:1");
    o.arbiter = std::make_shared<test::FakeArbiter>(&cluster, id);
    o.sync_grace = grace;
    o.sync_rejoin_backoff = rejoin;
    return o;
  }
  // Opens the first node and waits until it is the active.
  std::unique_ptr<Engine> OpenActive(const std::string& id) {
    auto e = OpenOrDie(Options(id));
    EXPECT_TRUE(Eventually([&] { return e && e->status().role == Role::kActive; }));
    return e;
  }
  bool Listed(const std::string& id) {
    auto s = cluster.sync();
    return s && std::find(s->begin(), s->end(), id) != s->end();
  }
};

std::string IncarnationOf(const std::string& data_dir) {
  const std::string text = test::ReadFileBytes(data_dir + "/node");
  const size_t at = text.find("incarnation ");
  return at == std::string::npos ? "" : text.substr(at + 12, text.find('\n', at) - at - 12);
}

TEST(EngineTest, AListedStandbyBackOnAnEmptiedDirectoryIsListedAgainWithItsNewIncarnation) {
  // The set names the data directory whose log the active judged: a listed
  // standby back on an emptied directory holds none of it; it is dropped,
  // and listed again, with its new incarnation, once it holds everything.
  SyncSetCluster sc;
  auto a = sc.OpenActive("a");
  auto b = OpenOrDie(sc.Options("b"));
  auto c = OpenOrDie(sc.Options("c"));
  ASSERT_TRUE(Eventually([&] { return sc.Listed("b") && sc.Listed("c"); }));
  WriteMany(a.get(), 10);
  const std::string b_dir = sc.Options("b").data_dir;
  const std::string old_incarnation = IncarnationOf(b_dir);
  ASSERT_FALSE(old_incarnation.empty());
  auto entries = sc.cluster.sync_entries();
  ASSERT_TRUE(entries && std::count(entries->begin(), entries->end(), "b#" + old_incarnation) == 1);
  ASSERT_TRUE(b->Close().ok());
  b.reset();
  std::filesystem::remove_all(b_dir);
  b = OpenOrDie(sc.Options("b"));
  const std::string new_incarnation = IncarnationOf(b_dir);
  ASSERT_NE(new_incarnation, old_incarnation);
  ASSERT_TRUE(Eventually([&] {
    WriteMany(a.get(), 1);
    auto e = sc.cluster.sync_entries();
    return e && std::count(e->begin(), e->end(), "b#" + new_incarnation) == 1;
  }));
  entries = sc.cluster.sync_entries();
  EXPECT_EQ(std::count(entries->begin(), entries->end(), "b#" + old_incarnation), 0);
  const uint64_t last = WriteMany(a.get(), 1);
  EXPECT_TRUE(b->WaitForApplied(last, 30s).ok());
}

TEST(EngineTest, AnIdleActiveListsAStandbyBackOnAnEmptiedDirectoryOnceItHoldsEverything) {
  // No write comes to drop its old listing: it is listed again, with its
  // new incarnation, once it holds everything, so that it can take over.
  SyncSetCluster sc;
  auto a = sc.OpenActive("a");
  auto b = OpenOrDie(sc.Options("b"));
  ASSERT_TRUE(Eventually([&] { return sc.Listed("b"); }));
  const uint64_t last = WriteMany(a.get(), 10);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  const std::string b_dir = sc.Options("b").data_dir;
  ASSERT_TRUE(b->Close().ok());
  b.reset();
  std::filesystem::remove_all(b_dir);
  b = OpenOrDie(sc.Options("b"));
  const std::string incarnation = IncarnationOf(b_dir);
  ASSERT_TRUE(b->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(Eventually([&] {
    auto e = sc.cluster.sync_entries();
    return e && *e == std::vector<std::string>{"b#" + incarnation};
  })) << "still listed with its old data directory";
  // The active goes: b, listed with the directory it has, takes over.
  sc.cluster.ExpireLease("a");
  ASSERT_TRUE(a->Close().ok());
  ASSERT_TRUE(Eventually([&] { return b->status().role == Role::kActive; }));
}

// Under remote-write:1 with two standbys, both are listed as eligible; when
// one stops, a write it lacks is acknowledged only after the arbiter no
// longer lists it (else the active and the other standby dying together
// would let it win without that write). It is listed again once back.
TEST(EngineTest, AStandbyThatLacksAnAcknowledgedWriteIsNeverListedAsEligible) {
  SyncSetCluster sc;
  sc.grace = 50ms;
  auto a = sc.OpenActive("a");
  auto b = OpenOrDie(sc.Options("b"));
  auto c = OpenOrDie(sc.Options("c"));
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 2; }));
  uint64_t last = WriteMany(a.get(), 20);
  ASSERT_TRUE(Eventually([&] { return sc.Listed("b") && sc.Listed("c"); }));
  ASSERT_TRUE(c->Close().ok());
  c.reset();
  // While etcd cannot be told, a write c lacks is not acknowledged.
  sc.cluster.HoldSyncPublishes(true);
  auto held = std::async(std::launch::async, [&] { return WriteMany(a.get(), 1, 50); });
  EXPECT_EQ(held.wait_for(500ms), std::future_status::timeout) << "acknowledged before c was unlisted";
  EXPECT_TRUE(sc.Listed("c"));
  sc.cluster.HoldSyncPublishes(false);
  ASSERT_EQ(held.wait_for(30s), std::future_status::ready);
  EXPECT_GT(held.get(), 0u);
  EXPECT_FALSE(sc.Listed("c"));
  for (int i = 0; i < 5; ++i) {
    last = WriteMany(a.get(), 1, 100 + i);
    ASSERT_GT(last, 0u);
    EXPECT_FALSE(sc.Listed("c")) << "LSN " << last << " was acknowledged while c, which lacks it, was listed";
    EXPECT_TRUE(sc.Listed("b"));
  }
  c = OpenOrDie(sc.Options("c"));
  ASSERT_TRUE(Eventually([&] { return sc.Listed("c"); })) << "c never listed again after catching up";
  last = WriteMany(a.get(), 5, 200);
  ASSERT_TRUE(c->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(c->Close().ok());
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// Under steady write load a standby rarely holds exactly the commit point at
// a given instant: one that restarted is still listed again once caught up
// (it joins on an acknowledgement that reaches the commit point).
TEST(EngineTest, ARestartedStandbyIsListedAgainUnderSteadyLoad) {
  SyncSetCluster sc;
  auto a = sc.OpenActive("a");
  auto b = OpenOrDie(sc.Options("b"));
  auto c = OpenOrDie(sc.Options("c"));
  ASSERT_TRUE(Eventually([&] { return sc.Listed("b") && sc.Listed("c"); }));
  ASSERT_TRUE(c->Close().ok());
  c.reset();
  std::atomic<bool> stop{false};
  std::atomic<int> acked{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      for (int i = 0; !stop.load(); ++i) {
        WriteBatch w;
        w.Put("w" + std::to_string(t) + "-" + std::to_string(i), "v");
        if (a->Write(w).ok()) ++acked;
      }
    });
  }
  ASSERT_TRUE(Eventually([&] { return acked.load() > 200 && !sc.Listed("c"); }));
  c = OpenOrDie(sc.Options("c"));
  const int before = acked.load();
  EXPECT_TRUE(Eventually([&] { return sc.Listed("c"); })) << "c never listed again under load";
  EXPECT_GT(acked.load(), before) << "the load stopped";
  stop = true;
  for (auto& w : writers) w.join();
  ASSERT_TRUE(c->Close().ok());
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// The async fallback withdraws every standby's eligibility in etcd before
// it acknowledges anything without them.
TEST(EngineTest, AsyncFallbackUnlistsTheStandbysFirst) {
  SyncSetCluster sc;
  auto ao = sc.Options("a");
  ao.commit_timeout = 300ms;
  ao.commit_fallback = "async";
  auto a = OpenOrDie(ao);
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  auto b = OpenOrDie(sc.Options("b"));
  ASSERT_TRUE(Eventually([&] { return sc.Listed("b"); }));
  ASSERT_GT(WriteMany(a.get(), 5), 0u);
  // On a loaded machine b may miss the 300 ms for one of these: a then
  // falls back, and restores once b is back in step. Start from there.
  ASSERT_TRUE(Eventually([&] { return !a->status().commit_degraded && sc.Listed("b"); }));
  ASSERT_TRUE(b->Close().ok());
  b.reset();
  sc.cluster.HoldSyncPublishes(true);
  auto held = std::async(std::launch::async, [&] { return WriteMany(a.get(), 1, 50); });
  EXPECT_EQ(held.wait_for(1s), std::future_status::timeout) << "acknowledged as async while b was still listed";
  EXPECT_FALSE(a->status().commit_degraded);
  sc.cluster.HoldSyncPublishes(false);
  ASSERT_EQ(held.wait_for(30s), std::future_status::ready);
  EXPECT_GT(held.get(), 0u);
  EXPECT_TRUE(a->status().commit_degraded);
  EXPECT_EQ(sc.cluster.sync(), std::optional<std::vector<std::string>>(std::vector<std::string>{}));
  ASSERT_TRUE(a->Close().ok());
}

// A standby that keeps falling behind waits longer each time before it is
// listed again (else it would stall writes for a grace every second).
TEST(EngineTest, AStandbyDroppedAgainWaitsLongerToBeListed) {
  SyncSetCluster sc;
  // A grace long enough that b never lags past it under a loaded CI: a drop
  // of b would list c at once (it holds that write), whatever its back-off.
  sc.grace = 500ms;
  sc.rejoin = 1s;
  auto a = sc.OpenActive("a");
  auto b = OpenOrDie(sc.Options("b"));
  auto c = OpenOrDie(sc.Options("c"));
  ASSERT_TRUE(Eventually([&] { return sc.Listed("b") && sc.Listed("c"); }));
  std::vector<std::chrono::steady_clock::duration> waited;
  for (int round = 0; round < 2; ++round) {
    ASSERT_TRUE(c->Close().ok());
    c.reset();
    // Taken before the write that drops c: its back-off starts later, so the
    // wait measured from here is never shorter than the back-off.
    const auto dropped = std::chrono::steady_clock::now();
    ASSERT_GT(WriteMany(a.get(), 1, 100 + round), 0u);  // c lacks it: dropped first
    ASSERT_FALSE(sc.Listed("c"));
    c = OpenOrDie(sc.Options("c"));
    ASSERT_TRUE(Eventually([&] {
      (void)WriteMany(a.get(), 1, 200 + round);  // acknowledgements that may let it join
      return sc.Listed("c");
    }));
    waited.push_back(std::chrono::steady_clock::now() - dropped);
  }
  // At least the back-off each time: 1 s, then 2 s.
  EXPECT_GE(waited[0], 1s);
  EXPECT_GE(waited[1], 2s) << "the second drop did not double the wait";
  ASSERT_TRUE(c->Close().ok());
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// A new active writes its term's set before it takes writes: the standbys
// the last active listed that are still alive (not d, listed but dead).
TEST(EngineTest, ANewActiveListsOnlyLiveStandbysBeforeItsFirstWrite) {
  SyncSetCluster sc;
  sc.grace = 30s;  // a dead listed standby would hold every write back
  auto& cluster = sc.cluster;
  auto a = sc.OpenActive("a");
  auto b = OpenOrDie(sc.Options("b"));
  auto c = OpenOrDie(sc.Options("c"));
  auto d = OpenOrDie(sc.Options("d"));
  ASSERT_TRUE(Eventually([&] {
    auto s = cluster.sync();
    return s && s->size() == 3;
  }));
  uint64_t last = WriteMany(a.get(), 10);
  for (Engine* e : {b.get(), c.get(), d.get()}) ASSERT_TRUE(e->WaitForApplied(last, 30s).ok());
  // d dies (its lease ends); with no write since, a still lists it.
  ASSERT_TRUE(d->Close().ok());
  d.reset();
  EXPECT_EQ(cluster.sync()->size(), 3u);
  cluster.ExpireLease("a");
  ASSERT_TRUE(a->Close().ok());
  a.reset();
  // b holds no more than c: the smaller id wins the tie.
  ASSERT_TRUE(Eventually([&] { return b->status().role == Role::kActive; }));
  EXPECT_EQ(cluster.sync(), std::optional<std::vector<std::string>>(std::vector<std::string>{"c"}));
  const auto started = std::chrono::steady_clock::now();
  last = WriteMany(b.get(), 1, 100);
  ASSERT_GT(last, 0u);
  EXPECT_LT(std::chrono::steady_clock::now() - started, 10s) << "the first write waited for the dead d";
  ASSERT_TRUE(c->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(c->Close().ok());
  ASSERT_TRUE(b->Close().ok());
}

// An old active whose last records were never replicated (nor applied, under
// a synchronous rule) rejoins the new active: its log is cut back to where
// its epoch ended in the new active's history, not replaced by a snapshot.
TEST(EngineTest, RejoiningOldActiveRewindsItsUnreplicatedTail) {
  TempDir dir;
  test::EtcdServer etcd(dir.path());
  ASSERT_TRUE(etcd.Start());
  auto ha = [&](const std::string& id, const std::string& rule) {
    EngineOptions o = Node(dir, id, "", rule);
    o.etcd = {etcd.endpoint()};
    o.commit_timeout = 100ms;
    return o;
  };
  auto a = OpenOrDie(ha("a", "remote-write:1"));
  ASSERT_TRUE(Eventually([&] { return a->status().role == Role::kActive; }));
  auto b = OpenOrDie(ha("b", "async"));
  ASSERT_TRUE(Eventually([&] { return a->status().standbys.size() == 1; }));
  const uint64_t shared = WriteMany(a.get(), 50);
  ASSERT_TRUE(b->WaitForApplied(shared, 30s).ok());
  ASSERT_TRUE(b->Close().ok());
  b.reset();
  // Alone, a logs writes it can never commit (strict remote-write:1).
  std::vector<std::thread> writers;
  for (int i = 0; i < 5; ++i) {
    writers.emplace_back([&, i] {
      WriteBatch w;
      w.Put("lost" + std::to_string(i), "x");
      EXPECT_FALSE(a->Write(w).ok());  // never acknowledged
    });
  }
  ASSERT_TRUE(Eventually([&] { return a->status().last_lsn >= shared + 5; }));
  a->Interrupt();
  for (auto& t : writers) t.join();
  ASSERT_TRUE(a->Close().ok());
  a.reset();
  // b becomes the active at the next epoch and writes on.
  b = OpenOrDie(ha("b", "async"));
  ASSERT_TRUE(Eventually([&] { return b->status().role == Role::kActive; }));
  const uint64_t last = WriteMany(b.get(), 20, 1000);
  // a comes back: its five records after LSN 50 are not in b's history.
  a = OpenOrDie(ha("a", "remote-write:1"));
  ASSERT_TRUE(a->WaitForApplied(last, 30s).ok());
  const EngineStatus st = a->status();
  EXPECT_EQ(st.role, Role::kStandby);
  EXPECT_EQ(st.rewinds, 1u);
  EXPECT_EQ(st.snapshots_installed, 0u) << "a snapshot where a rewind would do";
  EXPECT_EQ(*a->Get("lost0"), std::nullopt) << "an unreplicated write survived";
  ASSERT_TRUE(a->Close().ok());
  ASSERT_TRUE(b->Close().ok());
  EXPECT_EQ(DumpDb(dir.Sub("a")), DumpDb(dir.Sub("b")));
  ExpectSameRecords(dir.Sub("a"), dir.Sub("b"));
}

TEST(EngineTest, StandbySyncingOnAnIntervalStillCounts) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a", "", "remote-write:1"));
  EngineOptions so = Node(dir, "b", Follow(*active));
  so.wal_sync = "interval";
  auto standby = OpenOrDie(so);
  auto pending = std::async(std::launch::async, [&] {
    WriteBatch b;
    b.Put("k", "v");
    return active->Write(b);
  });
  ASSERT_EQ(pending.wait_for(30s), std::future_status::ready) << "remote-write never saw the standby's sync";
  EXPECT_TRUE(pending.get().ok());
}

// A standby that syncs on an interval and reconnects holds durably all it
// subscribes after: the active credits it with that much at once (towards
// remote-write, eligibility and switchovers).
TEST(EngineTest, AStandbySyncingOnAnIntervalIsCreditedOnlyWithWhatItSynced) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a"));
  const uint16_t port = active->listen_port();
  EngineOptions so = Node(dir, "b", Follow(*active));
  so.wal_sync = "interval";
  so.wal_sync_interval = 60s;  // no timed sync during this test
  auto standby = OpenOrDie(so);
  ASSERT_TRUE(Eventually([&] { return active->status().standbys.size() == 1; }));
  const uint64_t last = WriteMany(active.get(), 10);
  ASSERT_TRUE(Eventually([&] { return standby->status().last_lsn == last; }));
  EXPECT_LT(standby->status().durable_lsn, last) << "the timer synced: the test proves nothing";
  ASSERT_TRUE(active->Close().ok());
  active.reset();
  EngineOptions again = Node(dir, "a");
  again.listen_port = port;  // the standby reconnects and subscribes again
  active = OpenOrDie(again);
  ASSERT_TRUE(Eventually([&] {
    auto st = active->status();
    return st.standbys.size() == 1 && st.standbys[0].flushed_lsn > 0;
  }));
  EXPECT_LE(active->status().standbys[0].flushed_lsn, standby->status().durable_lsn)
      << "credited with records the standby does not hold durably";
  EXPECT_EQ(standby->status().durable_lsn, last);
}

// RocksDB must never get ahead of the WAL, or a power loss leaves a node
// that refuses to start: with an interval sync, nothing is applied (nor
// acknowledged as async) before it is durable.
TEST(EngineTest, NothingIsAppliedBeforeItIsDurable) {
  TempDir dir;
  EngineOptions ao = Node(dir, "a");
  ao.wal_sync = "interval";
  auto active = OpenOrDie(ao);
  EngineOptions so = Node(dir, "b", Follow(*active));
  so.wal_sync = "interval";
  auto standby = OpenOrDie(so);
  uint64_t last = 0;
  for (int i = 0; i < 100; ++i) {
    WriteBatch b;
    b.Put("k" + std::to_string(i), "v");
    auto lsn = active->Write(b);
    ASSERT_TRUE(lsn.ok());
    last = *lsn;
    EngineStatus st = active->status();
    ASSERT_LE(st.applied_lsn, st.durable_lsn) << "applied past the durable WAL";
    st = standby->status();
    ASSERT_LE(st.applied_lsn, st.durable_lsn) << "standby applied past its durable WAL";
  }
  ASSERT_TRUE(standby->WaitForApplied(last, 30s).ok());
}

// Under "interval" a write is acknowledged only once the timer's fdatasync
// covered it, and wal_sync_interval sets that timer.
TEST(EngineTest, IntervalSyncAcknowledgesOnlyAfterTheTimersSync) {
  TempDir dir;
  EngineOptions o = Node(dir, "a");
  o.wal_sync = "interval";
  o.wal_sync_interval = 0ms;
  EXPECT_EQ(Engine::Open(o).status().code(), StatusCode::kInvalidArgument);
  o.wal_sync_interval = 60s;  // no timed sync during this test
  auto e = OpenOrDie(o);
  auto pending = std::async(std::launch::async, [&] {
    WriteBatch b;
    b.Put("k", "v");
    return e->Write(b);
  });
  ASSERT_TRUE(test::Eventually([&] { return e->status().last_lsn >= 1; }));
  EXPECT_EQ(e->status().durable_lsn, 0u);
  EXPECT_EQ(pending.wait_for(0s), std::future_status::timeout) << "acknowledged before it was synced";
  e->Interrupt();  // the write gives up (it may be lost), it does not succeed
  EXPECT_FALSE(pending.get().ok());
  ASSERT_TRUE(e->Close().ok());
}

TEST(EngineTest, ScanKeysListsScansKeysWithoutValues) {
  TempDir dir;
  auto e = OpenOrDie(Node(dir, "a"));
  WriteBatch b;
  for (const char* k : {"b", "a", "c", "d"}) b.Put(k, std::string(1000, *k));
  ASSERT_TRUE(e->Write(b).ok());
  auto pairs = e->Scan("b", 2);
  auto keys = e->ScanKeys("b", 2);
  ASSERT_TRUE(pairs.ok() && keys.ok());
  ASSERT_EQ(*keys, (std::vector<std::string>{"b", "c"}));
  ASSERT_EQ(pairs->size(), 2u);
  EXPECT_EQ((*pairs)[1].first, "c");
  EXPECT_EQ(*e->ScanKeys("", 10), (std::vector<std::string>{"a", "b", "c", "d"}));
  EXPECT_TRUE(e->ScanKeys("e", 10)->empty());
}

TEST(EngineTest, RulesAreValidated) {
  TempDir dir;
  EngineOptions o = Node(dir, "a");
  o.commit = CommitRule{CommitRule::Mode::kRemoteWrite, 0};
  EXPECT_EQ(Engine::Open(o).status().code(), StatusCode::kInvalidArgument);
  auto active = OpenOrDie(Node(dir, "a"));
  EXPECT_EQ(active->SetCommitRule(CommitRule{CommitRule::Mode::kRemoteApply, -1}).code(),
            StatusCode::kInvalidArgument);
  active->Interrupt();
  WriteBatch b;
  b.Put("k", "v");
  EXPECT_TRUE(active->Write(b).status().IsAborted());
  ASSERT_TRUE(active->Close().ok());
  EXPECT_TRUE(active->Get("k").status().IsAborted());
}

TEST(EngineTest, RestartedStandbyCatchesUp) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a"));
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  uint64_t last = WriteMany(active.get(), 200);
  ASSERT_TRUE(standby->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(standby->Close().ok());
  standby.reset();
  last = WriteMany(active.get(), 300, 200);  // while it is down
  standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  ASSERT_TRUE(standby->WaitForApplied(last, 30s).ok());
  EXPECT_EQ(*standby->Get("counter"), std::optional<std::string>("499"));
  ASSERT_TRUE(standby->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  EXPECT_EQ(DumpDb(dir.Sub("b")), DumpDb(dir.Sub("a")));
  ExpectSameWal(dir.Sub("a"), dir.Sub("b"));
}

// The value of one sample of a node's metrics ("name{labels}"), or -1.
double MetricOf(Engine* e, const std::string& sample) {
  const std::string text = e->PrometheusMetrics();
  const std::string key = sample + " ";
  const size_t at = text.find(key);
  return at == std::string::npos ? -1 : std::stod(text.substr(at + key.size()));
}

// A standby catching up stores what it receives one write's worth
// (max_group_bytes, 4 MiB) at a time, however much arrives at once: no
// write holds more than recovery would cut as torn after a power loss.
TEST(EngineTest, ACatchingUpStandbyWritesAtMostOneGroupsWorthAtATime) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a"));
  uint64_t last = 0;
  for (int i = 0; i < 300; ++i) {  // about 14 MiB while no standby follows
    WriteBatch b;
    b.Put("big" + std::to_string(i), test::Payload(static_cast<uint64_t>(i), 48 << 10));
    auto lsn = active->Write(b);
    ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
    last = *lsn;
  }
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  ASSERT_TRUE(standby->WaitForApplied(last, 60s).ok());
  EXPECT_GT(MetricOf(standby.get(), "replica_wal_bytes_total{node=\"b\"}"), 8.0 * (1 << 20));
  const double largest = MetricOf(standby.get(), "replica_wal_largest_group_bytes{node=\"b\"}");
  EXPECT_GT(largest, 0);
  EXPECT_LE(largest, 4.0 * (1 << 20));
  ASSERT_TRUE(standby->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  ExpectSameWal(dir.Sub("a"), dir.Sub("b"));
}

TEST(EngineTest, RestartedActiveKeepsItsStandbys) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a"));
  const uint16_t port = active->listen_port();
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  uint64_t last = WriteMany(active.get(), 100);
  ASSERT_TRUE(standby->WaitForApplied(last, 30s).ok());
  ASSERT_TRUE(active->Close().ok());
  active.reset();
  EngineOptions again = Node(dir, "a");
  again.listen_port = port;  // same address, so the standby finds it again
  active = OpenOrDie(again);
  last = WriteMany(active.get(), 100, 100);
  ASSERT_TRUE(standby->WaitForApplied(last, 30s).ok());
  EXPECT_EQ(*standby->Get("counter"), std::optional<std::string>("199"));
}

TEST(EngineTest, BadOptionsAreClearErrors) {
  TempDir dir;
  EngineOptions o = Node(dir, "a");
  o.secret.clear();
  EXPECT_EQ(Engine::Open(o).status().code(), StatusCode::kInvalidArgument);
  o = Node(dir, "a");
  o.commit_fallback = "maybe";
  EXPECT_NE(Engine::Open(o).status().message().find("maybe"), std::string::npos);
  o = Node(dir, "a");
  o.wal_sync = "sometimes";
  EXPECT_NE(Engine::Open(o).status().message().find("sometimes"), std::string::npos);
  for (int threads : {0, 65}) {
    o = Node(dir, "a");
    o.transport_io_threads = threads;
    EXPECT_NE(Engine::Open(o).status().message().find("transport_io_threads must be 1..64"), std::string::npos)
        << threads;
  }
  EXPECT_FALSE(CommitRule::Parse("remote-write:0").ok());
  EXPECT_FALSE(CommitRule::Parse("quorum").ok());
  EXPECT_EQ(CommitRule::Parse("remote-apply:2")->ToString(), "remote-apply:2");
}

// The client port of an engine, on a free port.
std::unique_ptr<RespServer> StartResp(Engine* e) {
  RespServerOptions ro;
  ro.port = 0;
  auto server = RespServer::Start(e, ro);
  EXPECT_TRUE(server.ok()) << server.status().ToString();
  return server.ok() ? std::move(server).value() : nullptr;
}

// A standby's INFO says whether its link to the active is up, as Redis's
// master_link_status does (health checks read it).
TEST(EngineTest, RespInfoShowsTheStandbysLinkState) {
  TempDir dir;
  auto a = OpenOrDie(Node(dir, "a"));
  auto b = OpenOrDie(Node(dir, "b", Follow(*a)));
  auto server = StartResp(b.get());
  ASSERT_TRUE(server);
  ASSERT_TRUE(test::Eventually([&] { return b->status().upstream_connected; }));
  test::RespClient c(server->port());
  std::string info = c.Command({"INFO", "replication"});
  EXPECT_NE(info.find("master_link_status:up"), std::string::npos) << info;
  EXPECT_NE(info.find("master_sync_in_progress:0"), std::string::npos) << info;
  {
    // The active's view: the standby online, caught up (lag in seconds).
    auto active_server = StartResp(a.get());
    ASSERT_TRUE(active_server);
    WriteBatch w;
    w.Put("k", "v");
    auto lsn = a->Write(w);
    ASSERT_TRUE(lsn.ok());
    ASSERT_TRUE(test::Eventually([&] { return a->status().standbys.size() == 1 &&
                                              a->status().standbys[0].flushed_lsn >= *lsn; }));
    test::RespClient ac(active_server->port());
    info = ac.Command({"INFO"});
    EXPECT_NE(info.find(",state=online,offset=" + std::to_string(*lsn) + ",lag=0,name=b"), std::string::npos) << info;
    active_server->Stop();
  }
  ASSERT_TRUE(a->Close().ok());
  ASSERT_TRUE(test::Eventually([&] { return !b->status().upstream_connected; }));
  info = c.Command({"INFO", "replication"});
  EXPECT_NE(info.find("master_link_status:down"), std::string::npos) << info;
  server->Stop();
  ASSERT_TRUE(b->Close().ok());
}

// A socket connected to 127.0.0.1:port whose reads time out after 10 s (a
// missing reply fails the test instead of hanging it); -1 on failure.
int ConnectLoopback(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Reads until n bytes arrived, the peer closed, or the read timed out.
std::string ReceiveBytes(int fd, size_t n) {
  std::string got;
  char buf[4096];
  while (got.size() < n) {
    const ssize_t r = ::recv(fd, buf, std::min(sizeof buf, n - got.size()), 0);
    if (r <= 0) break;
    got.append(buf, static_cast<size_t>(r));
  }
  return got;
}

std::string EncodeCommand(const std::vector<std::string>& args) {
  std::string req = "*" + std::to_string(args.size()) + "\r\n";
  for (const auto& a : args) req += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
  return req;
}

// This process's threads now (/proc/self/status), or -1.
int ThreadCount() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  }
  return -1;
}

// One active node with the Redis-protocol server on a free port.
class RespTest : public ::testing::Test {
 protected:
  void SetUp() override {
    e = OpenOrDie(Node(dir, "a"));
    ASSERT_TRUE(e);
    server = StartResp(e.get());
    ASSERT_TRUE(server);
  }
  TempDir dir;
  std::unique_ptr<Engine> e;
  std::unique_ptr<RespServer> server;
};

// MGET, EXISTS and TYPE report a read error instead of a null, 0 or none.
TEST_F(RespTest, ReadsReportAReadErrorInsteadOfAnAnswer) {
  test::RespClient c(server->port());
  ASSERT_EQ(c.Command({"SET", "k", "v"}), "+OK");
  EXPECT_EQ(c.Command({"TYPE", "k"}), "+string");
  EXPECT_EQ(c.Command({"TYPE", "missing"}), "+none");
  EXPECT_EQ(c.Command({"EXISTS", "k", "missing", "k"}), ":2");
  ASSERT_EQ(c.Command({"MGET", "k", "missing"}), "*2");  // its elements stay unread: the last command here
  c.Close();
  ASSERT_TRUE(e->Close().ok());  // reads fail from here on
  for (const std::vector<std::string>& cmd : std::vector<std::vector<std::string>>{
           {"EXISTS", "k"}, {"TYPE", "k"}, {"MGET", "k", "missing"}}) {
    const std::string reply = c.Command(cmd);
    EXPECT_EQ(reply.rfind("-ERR", 0), 0u) << cmd[0] << ": " << reply;
  }
  server->Stop();
}

// A pipeline of SETs and MSETs shares one write (one WAL record) instead of
// one commit each; every command still gets its reply, in order, and any
// other command ends the run.
TEST_F(RespTest, PipelinedSetsShareOneWrite) {
  const uint64_t before = e->status().durable_lsn;
  std::string req;
  auto add = [&](const std::vector<std::string>& args) { req += EncodeCommand(args); };
  for (int i = 0; i < 100; ++i) add({"SET", "k" + std::to_string(i), "v" + std::to_string(i)});
  add({"MSET", "m1", "a", "m2", "b"});  // MSETs join the run too
  add({"mset", "m3", "c"});
  add({"MSET", "odd"});  // a wrong MSET is answered on its own and ends the run
  add({"GET", "k99"});
  add({"SET", "k0", "again"});
  const int fd = ConnectLoopback(server->port());
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  std::string expected;
  for (int i = 0; i < 102; ++i) expected += "+OK\r\n";
  expected += "-ERR wrong number of arguments for 'mset' command\r\n";
  expected += "$3\r\nv99\r\n+OK\r\n";
  EXPECT_EQ(ReceiveBytes(fd, expected.size()), expected);
  ::close(fd);
  // One write for the SETs and MSETs (two if the pipeline arrived in two
  // reads), one for the last SET; without merging, MSETs alone made two more.
  EXPECT_LE(e->status().durable_lsn - before, 3u) << "the SETs and MSETs of the pipeline were not merged";
  EXPECT_EQ(*e->Get("k0"), std::optional<std::string>("again"));
  EXPECT_EQ(*e->Get("k50"), std::optional<std::string>("v50"));
  EXPECT_EQ(*e->Get("m2"), std::optional<std::string>("b"));
  EXPECT_EQ(*e->Get("m3"), std::optional<std::string>("c"));
  server->Stop();
}

// DELs join the run of SETs, and each is answered with its own count, as
// of its place in the pipeline.
TEST_F(RespTest, PipelinedDelsShareTheWriteAndEachGetsItsOwnCount) {
  ASSERT_EQ(test::RespClient(server->port()).Command({"SET", "before", "x"}), "+OK");
  const uint64_t before = e->status().durable_lsn;
  std::string req;
  auto add = [&](const std::vector<std::string>& args) { req += EncodeCommand(args); };
  add({"DEL", "before", "nope"});  // stored earlier: 1
  add({"SET", "a", "1"});
  add({"DEL", "a"});               // set just before, in the same write: 1
  add({"unlink", "a"});            // just deleted: 0
  add({"MSET", "b", "2", "c", "3"});
  add({"DEL", "b", "b", "c"});     // b named twice counts once: 2
  add({"SET", "b", "again"});
  add({"DEL"});                    // a wrong DEL is answered on its own and ends the run
  add({"GET", "b"});
  const int fd = ConnectLoopback(server->port());
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  const std::string expected =
      ":1\r\n+OK\r\n:1\r\n:0\r\n+OK\r\n:2\r\n+OK\r\n"
      "-ERR wrong number of arguments for 'del' command\r\n$5\r\nagain\r\n";
  EXPECT_EQ(ReceiveBytes(fd, expected.size()), expected);
  ::close(fd);
  EXPECT_LE(e->status().durable_lsn - before, 2u) << "the DELs and SETs of the pipeline were not merged";
  EXPECT_EQ(*e->Get("before"), std::nullopt);
  EXPECT_EQ(*e->Get("a"), std::nullopt);
  EXPECT_EQ(*e->Get("c"), std::nullopt);
  server->Stop();
}

// Delete counts are taken when the batch is applied, in log order: writers
// racing on a few keys (sets and deletes from several threads, so that the
// applier takes many records in one RocksDB batch) each get the count a
// replay of the log in LSN order gives.
TEST(EngineTest, DeleteCountsFollowTheLogOrder) {
  TempDir dir;
  auto e = OpenOrDie(Node(dir, "a"));
  struct Done {
    uint64_t lsn;
    bool is_delete;
    std::vector<std::string> keys;
    uint64_t existed;
  };
  constexpr int kThreads = 6, kOps = 150;
  std::vector<std::vector<Done>> done(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kOps; ++i) {
        // Keys k0..k2; a delete names one key twice at times (counted once).
        const std::string a = "k" + std::to_string((t + i) % 3), b = "k" + std::to_string((t * 7 + i) % 3);
        WriteBatch batch;
        if ((t + i) % 2 == 0) {
          batch.Put(a, "v");
          auto lsn = e->Write(batch);
          ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
          done[t].push_back({*lsn, false, {a}, 0});
        } else {
          batch.Delete(a);
          batch.Delete(b);
          std::optional<uint64_t> existed;
          auto lsn = e->WriteCountingDeletes(batch, &existed);
          ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
          ASSERT_TRUE(existed.has_value());
          done[t].push_back({*lsn, true, {a, b}, *existed});
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  std::map<uint64_t, Done> by_lsn;
  for (const auto& list : done) {
    for (const auto& d : list) by_lsn[d.lsn] = d;
  }
  ASSERT_EQ(by_lsn.size(), static_cast<size_t>(kThreads * kOps));
  std::set<std::string> present;
  int deletes_that_found_something = 0;
  for (const auto& [lsn, d] : by_lsn) {
    if (!d.is_delete) {
      present.insert(d.keys[0]);
      continue;
    }
    const std::set<std::string> keys(d.keys.begin(), d.keys.end());
    uint64_t expected = 0;
    for (const auto& k : keys) expected += present.erase(k);
    EXPECT_EQ(d.existed, expected) << "delete at LSN " << lsn;
    deletes_that_found_something += expected > 0 ? 1 : 0;
  }
  EXPECT_GT(deletes_that_found_something, 0);
  // A batch without deletes counts 0; plain Write is unaffected.
  WriteBatch put;
  put.Put("x", "1");
  std::optional<uint64_t> none;
  ASSERT_TRUE(e->WriteCountingDeletes(put, &none).ok());
  EXPECT_EQ(none, std::optional<uint64_t>(0));
  ASSERT_TRUE(e->Close().ok());
}

// Delete by delete, each as of its place in the batch: what the client port
// needs to answer several DELs written as one batch.
TEST(EngineTest, WriteReportingDeletesSaysWhichDeletesFoundTheirKey) {
  TempDir dir;
  auto e = OpenOrDie(Node(dir, "a"));
  WriteBatch setup;
  setup.Put("old", "1");
  ASSERT_TRUE(e->Write(setup).ok());
  WriteBatch b;
  b.Delete("old");      // stored before: found
  b.Delete("old");      // just deleted: not found
  b.Delete("never");    // not found
  b.Put("new", "1");
  b.Delete("new");      // put earlier in this batch: found
  b.Put("new", "2");    // and put again: it exists after the batch
  std::optional<std::vector<bool>> found;
  ASSERT_TRUE(e->WriteReportingDeletes(b, &found).ok());
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(*found, (std::vector<bool>{true, false, false, true}));
  EXPECT_EQ(*e->Get("new"), std::optional<std::string>("2"));
  WriteBatch put;
  put.Put("x", "1");
  ASSERT_TRUE(e->WriteReportingDeletes(put, &found).ok());
  EXPECT_EQ(found, std::optional<std::vector<bool>>(std::vector<bool>{}));
  ASSERT_TRUE(e->Close().ok());
}

// Redis-compatible DEL: of clients deleting one key at once, exactly one is
// told it existed.
TEST_F(RespTest, ConcurrentDelsOfOneKeyCountItOnce) {
  constexpr int kClients = 4, kRounds = 60;
  std::vector<std::unique_ptr<test::RespClient>> clients;
  for (int i = 0; i < kClients; ++i) clients.push_back(std::make_unique<test::RespClient>(server->port()));
  for (int round = 0; round < kRounds; ++round) {
    ASSERT_EQ(clients[0]->Command({"SET", "lock", "owner"}), "+OK");
    std::vector<std::string> replies(kClients);
    std::vector<std::thread> threads;
    for (int i = 0; i < kClients; ++i) {
      threads.emplace_back([&, i] { replies[i] = clients[i]->Command({"DEL", "lock", "lock"}); });
    }
    for (auto& t : threads) t.join();
    int ones = 0;
    for (const auto& r : replies) {
      ASSERT_TRUE(r == ":1" || r == ":0") << r;
      ones += r == ":1" ? 1 : 0;
    }
    ASSERT_EQ(ones, 1) << "round " << round;
  }
  EXPECT_EQ(clients[0]->Command({"DEL", "lock"}), ":0");
  server->Stop();
}

// INFO answers Redis's server, clients and stats sections too, alone or
// together, in any case; an unknown section is an empty answer.
TEST_F(RespTest, InfoHasServerClientsAndStatsSections) {
  test::RespClient c(server->port()), other(server->port());
  ASSERT_EQ(other.Command({"PING"}), "+PONG");
  std::string all = c.Command({"INFO"});
  for (const std::string& want : std::vector<std::string>{"# Server\r\n", "redis_version:7.0.0\r\n", "replica_version:",
                                  "tcp_port:" + std::to_string(server->port()) + "\r\n", "# Clients\r\n",
                                  "connected_clients:2\r\n", "# Stats\r\n", "total_connections_received:2\r\n",
                                  "# Replication\r\nrole:master\r\n"}) {
    EXPECT_NE(all.find(want), std::string::npos) << want << " in " << all;
  }
  EXPECT_EQ(all.find("\r\n\r\n# Server"), std::string::npos);
  EXPECT_NE(all.find("\r\n\r\n# Replication"), std::string::npos) << "sections are apart by a blank line";
  EXPECT_NE(all.substr(all.size() - 2), "\n\n");
  const std::string clients = c.Command({"INFO", "Clients"});
  EXPECT_EQ(clients.rfind("# Clients\r\nconnected_clients:2\r\n", 0), 0u) << clients;
  EXPECT_EQ(clients.find("# Server"), std::string::npos) << clients;
  const std::string two = c.Command({"INFO", "stats", "SERVER"});
  EXPECT_NE(two.find("# Stats"), std::string::npos) << two;
  EXPECT_NE(two.find("# Server"), std::string::npos) << two;
  EXPECT_EQ(two.find("# Replication"), std::string::npos) << two;
  EXPECT_EQ(c.Command({"INFO", "keyspace-of-another-kind"}), "");
  other.Close();
  ASSERT_TRUE(Eventually([&] { return server->stats().connected.load() == 1; }));
  server->Stop();
}

// SETs from many connections share writes: while one write waits for its
// commit, the SETs that arrive meanwhile are gathered into the next.
TEST(EngineTest, RespSetsFromManyClientsShareWrites) {
  TempDir dir;
  // remote-write:1 without a standby holds every write (strict) until the
  // rule is relaxed; by then all the clients' SETs are queued.
  auto e = OpenOrDie(Node(dir, "a", "", "remote-write:1"));
  ASSERT_TRUE(e);
  auto server = StartResp(e.get());
  ASSERT_TRUE(server);
  const uint64_t before = e->status().last_lsn;
  constexpr int kClients = 20;
  std::vector<int> fds;
  for (int i = 0; i < kClients; ++i) {
    fds.push_back(ConnectLoopback(server->port()));
    ASSERT_GE(fds.back(), 0);
    const std::string req = EncodeCommand({"SET", "k" + std::to_string(i), "v" + std::to_string(i)});
    ASSERT_EQ(::send(fds.back(), req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  }
  ASSERT_TRUE(Eventually([&] { return server->stats().commands.load() == kClients; }));
  ASSERT_TRUE(e->SetCommitRule(*CommitRule::Parse("async")).ok());
  for (int fd : fds) {
    EXPECT_EQ(ReceiveBytes(fd, 5), "+OK\r\n");
    ::close(fd);
  }
  // One write each for the first SETs the two writers took, one for all
  // the others (one more if the last arrived as a writer took the queue);
  // a write per client would be 20.
  EXPECT_LE(e->status().last_lsn - before, 4u);
  for (int i = 0; i < kClients; ++i) {
    EXPECT_EQ(*e->Get("k" + std::to_string(i)), std::optional<std::string>("v" + std::to_string(i)));
  }
  server->Stop();
  ASSERT_TRUE(e->Close().ok());
}

// Several connections' runs of SETs and DELs share one write, and each
// command still gets its own reply: the counts are sliced per connection,
// per command, in batch order.
TEST(EngineTest, RespDelsFromManyClientsShareWritesAndKeepTheirOwnCounts) {
  TempDir dir;
  auto e = OpenOrDie(Node(dir, "a"));
  ASSERT_TRUE(e);
  WriteBatch setup;
  for (int i = 0; i < 6; ++i) setup.Put("x" + std::to_string(i), "1");
  ASSERT_TRUE(e->Write(setup).ok());
  // remote-write:1 without a standby holds every write until the rule is
  // relaxed; by then every connection's run is queued.
  ASSERT_TRUE(e->SetCommitRule(*CommitRule::Parse("remote-write:1")).ok());
  auto server = StartResp(e.get());
  ASSERT_TRUE(server);
  const uint64_t before = e->status().last_lsn;
  struct Client {
    std::vector<std::vector<std::string>> commands;
    std::string expected;
  };
  std::vector<Client> clients;
  for (int i = 0; i < 6; ++i) {
    const std::string x = "x" + std::to_string(i), y = "y" + std::to_string(i);
    if (i % 3 == 0) {  // SETs only
      clients.push_back({{{"SET", y, "v"}, {"MSET", y + "a", "1", y + "b", "2"}}, "+OK\r\n+OK\r\n"});
    } else if (i % 3 == 1) {  // a DEL naming an existing key twice, and one that is not there
      clients.push_back({{{"DEL", x, x, y}}, ":1\r\n"});
    } else {  // a SET, then a DEL of it and of an existing key, then an UNLINK of both again
      clients.push_back({{{"SET", y, "v"}, {"DEL", y, x}, {"UNLINK", x, y}}, "+OK\r\n:2\r\n:0\r\n"});
    }
  }
  size_t commands = 0;
  std::vector<int> fds;
  for (const auto& c : clients) {
    std::string req;
    for (const auto& args : c.commands) req += EncodeCommand(args);
    commands += c.commands.size();
    fds.push_back(ConnectLoopback(server->port()));
    ASSERT_GE(fds.back(), 0);
    ASSERT_EQ(::send(fds.back(), req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  }
  ASSERT_TRUE(Eventually([&] { return server->stats().commands.load() == commands; }));
  ASSERT_TRUE(e->SetCommitRule(*CommitRule::Parse("async")).ok());
  for (size_t i = 0; i < clients.size(); ++i) {
    EXPECT_EQ(ReceiveBytes(fds[i], clients[i].expected.size()), clients[i].expected) << "client " << i;
    ::close(fds[i]);
  }
  // As for SETs: at most a few writes, not one per connection or command.
  EXPECT_LE(e->status().last_lsn - before, 4u);
  EXPECT_EQ(*e->Get("x1"), std::nullopt);
  EXPECT_EQ(*e->Get("x0"), std::optional<std::string>("1"));
  EXPECT_EQ(*e->Get("y2"), std::nullopt);
  server->Stop();
  ASSERT_TRUE(e->Close().ok());
}

// Connections cost no thread each, and a command that waits (WAIT for a
// standby that is not there) holds up only its own connection. Stop, after
// the engine's Interrupt, ends it and closes every connection.
TEST_F(RespTest, ManyConnectionsShareFewThreadsAndAWaitHoldsUpOnlyItsOwn) {
  const int threads_before = ThreadCount();
  ASSERT_GT(threads_before, 0);
  test::RespClient counter(server->port());
  ASSERT_EQ(counter.Command({"DBSIZE"}), ":0");  // a worker thread now idles
  const int waiter_fd = ConnectLoopback(server->port()), counter_fd = ConnectLoopback(server->port());
  ASSERT_GE(waiter_fd, 0);
  ASSERT_GE(counter_fd, 0);
  // A WAIT that blocks until Interrupt, and a DBSIZE queued right behind it
  // (often before the idle worker took the WAIT): the DBSIZE gets a worker
  // of its own.
  const std::string wait = EncodeCommand({"WAIT", "1", "0"}), dbsize = EncodeCommand({"DBSIZE"});
  ASSERT_EQ(::send(waiter_fd, wait.data(), wait.size(), MSG_NOSIGNAL), static_cast<ssize_t>(wait.size()));
  ASSERT_EQ(::send(counter_fd, dbsize.data(), dbsize.size(), MSG_NOSIGNAL), static_cast<ssize_t>(dbsize.size()));
  EXPECT_EQ(ReceiveBytes(counter_fd, 4), ":0\r\n");
  ::close(counter_fd);
  constexpr int kClients = 300;
  std::vector<int> fds;
  const std::string ping = EncodeCommand({"PING"});
  for (int i = 0; i < kClients; ++i) {
    fds.push_back(ConnectLoopback(server->port()));
    ASSERT_GE(fds.back(), 0);
    ASSERT_EQ(::send(fds.back(), ping.data(), ping.size(), MSG_NOSIGNAL), static_cast<ssize_t>(ping.size()));
  }
  for (int fd : fds) ASSERT_EQ(ReceiveBytes(fd, 7), "+PONG\r\n");
  EXPECT_LT(ThreadCount() - threads_before, 10) << "a thread per connection?";
  e->Interrupt();  // what replicad does before stopping the port: the WAIT returns
  server->Stop();
  EXPECT_EQ(ReceiveBytes(waiter_fd, 4), "-ERR");  // Aborted: the engine is shutting down
  for (int fd : fds) {
    EXPECT_EQ(ReceiveBytes(fd, 1), "") << "a connection left open by Stop";
    ::close(fd);
  }
  ::close(waiter_fd);
}

// Worker threads for waiting commands end once idle past the timeout, all
// but two, so a burst of WAITs or SCANs leaves no crowd of threads behind.
TEST(EngineTest, RespIdleWorkersEndAfterTheTimeout) {
  TempDir dir;
  auto e = OpenOrDie(Node(dir, "a"));
  ASSERT_TRUE(e);
  RespServerOptions ro;
  ro.port = 0;
  ro.worker_idle_timeout = 200ms;
  auto server = RespServer::Start(e.get(), ro);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  const int baseline = ThreadCount();
  // Six WAITs at once (no standby: each waits its 300 ms out), so six workers.
  constexpr int kWaits = 6;
  std::vector<int> fds;
  const std::string wait = EncodeCommand({"WAIT", "1", "300"});
  for (int i = 0; i < kWaits; ++i) {
    fds.push_back(ConnectLoopback((*server)->port()));
    ASSERT_GE(fds.back(), 0);
    ASSERT_EQ(::send(fds.back(), wait.data(), wait.size(), MSG_NOSIGNAL), static_cast<ssize_t>(wait.size()));
  }
  EXPECT_TRUE(Eventually([&] { return ThreadCount() >= baseline + kWaits; }, 5s)) << "one worker per WAIT";
  for (int fd : fds) {
    EXPECT_EQ(ReceiveBytes(fd, 4), ":0\r\n");
    ::close(fd);
  }
  EXPECT_TRUE(Eventually([&] { return ThreadCount() <= baseline + 2; }, 10s)) << ThreadCount() << " threads";
  // The two kept serve the next command at once; a third is started as needed.
  test::RespClient c((*server)->port());
  EXPECT_EQ(c.Command({"WAIT", "0", "0"}), ":0");  // a worker's command (DEL no longer is)
  (*server)->Stop();
  ASSERT_TRUE(e->Close().ok());
}

// Writes key = value on the active and waits until the standby applied it;
// its LSN, or 0 (with a test failure) if either step failed.
uint64_t PutAppliedOnBoth(Engine* active, Engine* standby, const std::string& key, const std::string& value) {
  WriteBatch w;
  w.Put(key, value);
  auto lsn = active->Write(w);
  EXPECT_TRUE(lsn.ok()) << lsn.status().ToString();
  if (!lsn.ok()) return 0;
  const Status applied = standby->WaitForApplied(*lsn, 30s);
  EXPECT_TRUE(applied.ok()) << applied.ToString();
  return applied.ok() ? *lsn : 0;
}

// Reads that state their staleness: none on the active; on a standby, the
// time since it last had applied all its active reported, which grows once
// the active is gone, until a bound refuses the read.
TEST(EngineTest, ReadsStateTheirStaleness) {
  TempDir dir;
  auto a = OpenOrDie(Node(dir, "a"));
  auto b = OpenOrDie(Node(dir, "b", Follow(*a)));
  const uint64_t lsn = PutAppliedOnBoth(a.get(), b.get(), "k", "v");
  ASSERT_GT(lsn, 0u);
  auto on_active = a->ReadWithStaleness("k", 0ms);
  ASSERT_TRUE(on_active.ok()) << on_active.status().ToString();
  EXPECT_EQ(on_active->value, std::optional<std::string>("v"));
  EXPECT_EQ(on_active->staleness, std::optional<std::chrono::milliseconds>(0ms));
  EXPECT_GE(on_active->applied_lsn, lsn);
  auto on_standby = b->ReadWithStaleness("k", 10s);
  ASSERT_TRUE(on_standby.ok()) << on_standby.status().ToString();
  EXPECT_EQ(on_standby->value, std::optional<std::string>("v"));
  EXPECT_GE(on_standby->applied_lsn, lsn);
  ASSERT_TRUE(on_standby->staleness.has_value());
  EXPECT_LT(*on_standby->staleness, 10s);
  ASSERT_TRUE(a->Close().ok());  // no more heartbeats: b's data only gets older
  Status refused;
  ASSERT_TRUE(test::Eventually([&] {
    auto r = b->ReadWithStaleness("k", 300ms);
    refused = r.status();
    return !r.ok();
  }));
  EXPECT_TRUE(refused.IsTooStale()) << refused.ToString();
  EXPECT_NE(refused.message().find("the bound is 300 ms"), std::string::npos) << refused.ToString();
  auto unbounded = b->ReadWithStaleness("k", std::nullopt);  // without a bound it answers, and says how old
  ASSERT_TRUE(unbounded.ok());
  EXPECT_GT(*unbounded->staleness, 300ms);
  ASSERT_TRUE(b->Close().ok());
}

// Threads carry the names docs/operations.md lists (top -H, ps -L, perf).
TEST(EngineTest, ThreadsAreNamed) {
  TempDir dir;
  auto a = OpenOrDie(Node(dir, "a"));
  auto b = OpenOrDie(Node(dir, "b", Follow(*a)));
  ASSERT_GT(PutAppliedOnBoth(a.get(), b.get(), "k", "v"), 0u);  // the shipper to b exists by now
  std::multiset<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
    std::string name = test::ReadFileBytes(entry.path().string() + "/comm");
    while (!name.empty() && name.back() == '\n') name.pop_back();
    names.insert(name);
  }
  EXPECT_EQ(names.count("applier"), 2u);
  EXPECT_EQ(names.count("transport-io"), 2u);  // one per engine by default
  EXPECT_EQ(names.count("ship:b"), 1u);
  EXPECT_EQ(names.count("receiver"), 0u);  // the I/O thread stores what it receives
  EXPECT_EQ(names.count("follower"), 1u);
  ASSERT_TRUE(b->Close().ok());
  ASSERT_TRUE(a->Close().ok());
}

// The thread that writes a group sends it to an idle standby itself; the
// shipper thread, asleep, is not woken for it.
TEST(EngineTest, TheWriterOfAGroupShipsItToAnIdleStandby) {
  TempDir dir;
  auto active = OpenOrDie(Node(dir, "a"));
  auto standby = OpenOrDie(Node(dir, "b", Follow(*active)));
  ASSERT_GT(PutAppliedOnBoth(active.get(), standby.get(), "k", "v"), 0u);  // subscribed and caught up
  const auto sent = [&](const std::string& by) {
    return MetricOf(active.get(), "replica_standby_spans_sent_total{node=\"a\",standby=\"b\",by=\"" + by + "\"}");
  };
  const double writer0 = sent("writer"), shipper0 = sent("shipper");
  ASSERT_GE(writer0, 0) << active->PrometheusMetrics();
  ASSERT_GE(shipper0, 0);
  constexpr int kWrites = 50;
  uint64_t last = 0;
  for (int i = 0; i < kWrites; ++i) {
    WriteBatch b;
    b.Put("k" + std::to_string(i), "v");
    auto lsn = active->Write(b);
    ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
    last = *lsn;
    ASSERT_TRUE(standby->WaitForApplied(last, 30s).ok());  // idle again before the next write
  }
  const double by_writer = sent("writer") - writer0, by_shipper = sent("shipper") - shipper0;
  EXPECT_EQ(by_writer + by_shipper, kWrites);  // one span per write, each sent once
  // The shipper wakes every 100 ms to look around, and a write that comes
  // just then is its to send; the rest are the writer's.
  EXPECT_GE(by_writer, kWrites - 10) << by_shipper << " sent by the shipper";
  ASSERT_TRUE(standby->Close().ok());
  ASSERT_TRUE(active->Close().ok());
  ExpectSameWal(dir.Sub("a"), dir.Sub("b"));
}

TEST(WriteBatchTest, EncodeDecodeAndDamage) {
  WriteBatch b;
  b.Put("a", "1");
  b.Delete("b");
  b.Put(std::string("\0k", 2), std::string(1000, 'v'));
  std::string enc = b.Encode();
  auto back = WriteBatch::Decode(enc);
  ASSERT_TRUE(back.ok());
  ASSERT_EQ(back->size(), 3u);
  EXPECT_TRUE(back->ops()[1].is_delete);
  EXPECT_EQ(back->ops()[2].key, std::string("\0k", 2));
  for (size_t cut = 0; cut < enc.size(); ++cut) EXPECT_FALSE(WriteBatch::Decode(enc.substr(0, cut)).ok()) << cut;
  EXPECT_FALSE(WriteBatch::Decode(enc + "x").ok());
}

}  // namespace
}  // namespace replica
