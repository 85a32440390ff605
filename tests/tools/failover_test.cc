// Automatic failover (docs/failover.md) with real processes: a real etcd,
// replicad nodes with --etcd, SIGKILL for crashes, SIGSTOP for a stalled etcd.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <mutex>
#include <memory>

#include "replica/client.h"
#include "replication/arbiter.h"
#include "replication/etcd.h"
#include "tests/support/etcd_server.h"
#include "tests/tools/daemon.h"

namespace replica {
namespace {

using namespace std::chrono_literals;
using test::Clock;
using test::Daemon;
using test::RespClient;

class FailoverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    etcd_ = std::make_unique<test::EtcdServer>(dir_.path());
    ASSERT_TRUE(etcd_->Start());
  }
  std::unique_ptr<Daemon> Start(const std::string& id, const std::string& extra = "") {
    return std::make_unique<Daemon>(dir_, id, "--etcd " + etcd_->endpoint() + " --cluster f " + extra);
  }
  // Three nodes with `args`; the active is SIGKILLed under load, a standby
  // takes over with every acknowledged write, and the old one rejoins.
  void KillTheActiveUnderLoad(const std::string& args);
  // Index of the only node answering ROLE with master; -1 if none within the
  // limit. Fails the test if two ever answer master in one look.
  int WaitForOneActive(const std::vector<Daemon*>& nodes, Clock::duration limit = 20s) {
    const auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline) {
      int found = -1, count = 0;
      for (size_t i = 0; i < nodes.size(); ++i) {
        if (nodes[i] && nodes[i]->Cli("ROLE").rfind("master", 0) == 0) {
          found = static_cast<int>(i);
          ++count;
        }
      }
      EXPECT_LE(count, 1) << "two nodes are active at once";
      if (count == 1) return found;
      std::this_thread::sleep_for(50ms);  // roles change in other processes; nothing to wait on
    }
    return -1;
  }
  test::TempDir dir_;
  std::unique_ptr<test::EtcdServer> etcd_;
};

// Writes SET kN vN on whichever node accepts it, remembering every
// acknowledged key, until stopped.
class Writer {
 public:
  explicit Writer(std::vector<int> ports) : ports_(std::move(ports)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Writer() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  size_t acked() const { return acked_.load(); }
  // Waits until at least n writes were acknowledged or the deadline passes.
  bool WaitAcked(size_t n, Clock::time_point deadline) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_until(l, deadline, [&] { return acked_.load() >= n; });
  }
  std::vector<std::string> keys() const { return keys_; }  // after Stop
  // The longest time between two acknowledged writes (after Stop).
  Clock::duration longest_gap() const {
    Clock::duration g{};
    for (size_t i = 1; i < times_.size(); ++i) g = std::max(g, times_[i] - times_[i - 1]);
    return g;
  }

 private:
  void Run() {
    std::vector<std::unique_ptr<RespClient>> clients;
    for (int p : ports_) clients.push_back(std::make_unique<RespClient>(p));
    size_t at = 0;
    for (int i = 0; !stop_; ++i) {
      const std::string k = "k" + std::to_string(i);
      for (size_t tries = 0; tries < clients.size() * 50 && !stop_; ++tries) {
        if (clients[at]->Command({"SET", k, "v" + std::to_string(i)}) == "+OK") {
          keys_.push_back(k);
          times_.push_back(Clock::now());
          {
            std::lock_guard<std::mutex> l(mu_);
            ++acked_;
          }
          cv_.notify_all();
          break;
        }
        at = (at + 1) % clients.size();  // not the active (or gone): try the next node
        if (at == 0) std::this_thread::sleep_for(20ms);
      }
    }
  }
  std::vector<int> ports_;
  std::atomic<bool> stop_{false};
  std::atomic<size_t> acked_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> keys_;
  std::vector<Clock::time_point> times_;
  std::thread thread_;
};

// A TCP relay to etcd for one node, which the test can cut: from then on it
// forwards nothing (connections stay open, requests time out), as a network
// partition between that node and etcd would.
class CuttableRelay {
 public:
  explicit CuttableRelay(int target_port) : target_(target_port) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    ::listen(listen_fd_, 16);
    accept_ = std::thread([this] { AcceptLoop(); });
  }
  ~CuttableRelay() {
    stop_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    ::close(listen_fd_);
    accept_.join();
    for (auto& t : pumps_) t.join();
  }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }
  void Cut() { cut_ = true; }

 private:
  void AcceptLoop() {
    for (;;) {
      int c = ::accept(listen_fd_, nullptr, nullptr);
      if (c < 0) return;
      int e = test::Connect(target_);
      pumps_.emplace_back([this, c, e] { Pump(c, e); });
      pumps_.emplace_back([this, c, e] { Pump(e, c); });
    }
  }
  void Pump(int from, int to) {
    timeval tv{0, 100000};
    ::setsockopt(from, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[16384];
    while (!stop_) {
      ssize_t n = ::recv(from, buf, sizeof buf, 0);
      if (n == 0) break;
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) continue;
        break;
      }
      if (cut_) continue;  // swallowed: the other side hears nothing
      if (::send(to, buf, static_cast<size_t>(n), MSG_NOSIGNAL) != n) break;
    }
    ::shutdown(to, SHUT_WR);
  }
  int target_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> cut_{false}, stop_{false};
  std::thread accept_;
  std::vector<std::thread> pumps_;
};

std::string Repctl(const std::string& etcd, const std::string& args, int* code) {
  return test::Shell(std::string(REPCTL_PATH) + " --etcd " + etcd + " --cluster f " + args, code);
}

// Runs `repctl ARGS` until its output holds `want` or 10 s pass; returns the
// last output. The nodes publish to etcd on their own schedule (sessions
// every 0.5 s, the sync set every 0.2 s): nothing to wait on but etcd.
std::string RepctlUntil(const std::string& etcd, const std::string& args, const std::function<bool(const std::string&)>& want) {
  std::string out;
  test::Eventually([&] {
    int code = 0;
    out = Repctl(etcd, args, &code);
    return want(out);
  }, 10s, 50ms);
  return out;
}

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

// How many node sessions publish commit rule `rule`, once `nodes` do (or 10 s pass).
size_t WaitForRuleEverywhere(const std::string& etcd, const std::string& rule, size_t nodes) {
  const std::string want = "\"commit\":\"" + rule + "\"";
  return Count(RepctlUntil(etcd, "status --json", [&](const std::string& out) { return Count(out, want) >= nodes; }), want);
}

void FailoverTest::KillTheActiveUnderLoad(const std::string& args) {
  const std::string rule = "--commit remote-write:1" + args;
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id, rule));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int first = WaitForOneActive(nodes);
  ASSERT_GE(first, 0);
  Writer writer({d[0]->client_port(), d[1]->client_port(), d[2]->client_port()});
  ASSERT_TRUE(writer.WaitAcked(300, Clock::now() + 30s));
  const size_t before = writer.acked();
  const auto killed_at = Clock::now();
  EXPECT_EQ(d[first]->Kill(SIGKILL), 128 + SIGKILL);
  nodes[first] = nullptr;
  ASSERT_TRUE(writer.WaitAcked(before + 1, Clock::now() + 30s)) << "no write was accepted after the active died";
  std::printf("failover: first write accepted %lld ms after the SIGKILL\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - killed_at).count()));
  writer.WaitAcked(before + 300, Clock::now() + 30s);
  writer.Stop();
  const int second = WaitForOneActive(nodes);
  ASSERT_GE(second, 0);
  ASSERT_NE(second, first);
  // remote-write:1: every acknowledged write is on the new active.
  test::RespClient c(d[second]->client_port());
  for (const auto& k : writer.keys()) ASSERT_EQ(c.Command({"GET", k}), "v" + k.substr(1)) << k;
  // The old active comes back as a standby and catches up.
  d[first] = Start(std::string(1, static_cast<char>('a' + first)), rule);
  nodes[first] = d[first].get();
  EXPECT_EQ(WaitForOneActive(nodes), second);
  for (int i = 0; i < 3; ++i) {
    if (i != second) {
      EXPECT_TRUE(test::CaughtUp(*d[second], *d[i])) << "node " << i;
      EXPECT_EQ(d[i]->Cli("ROLE").rfind("slave", 0), 0u);
    }
  }
  const std::string size = d[second]->Cli("DBSIZE");
  for (int i = 0; i < 3; ++i) EXPECT_EQ(d[i]->Cli("DBSIZE"), size) << "node " << i;
}

TEST_F(FailoverTest, ActiveKilledUnderLoadIsReplacedLosingNoAcknowledgedWriteAndRejoins) { KillTheActiveUnderLoad(""); }

// The same with three replication I/O threads per node (one is the default):
// the fence, the catch-up of the old active and the shipping run on a pool.
TEST_F(FailoverTest, ActiveKilledUnderLoadWithSeveralTransportThreads) {
  KillTheActiveUnderLoad(" --transport-io-threads 3");
}

TEST_F(FailoverTest, ExactlyOneActiveEveryRound) {
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  int active = WaitForOneActive(nodes);
  for (int round = 0; round < 4; ++round) {
    ASSERT_GE(active, 0) << "round " << round;
    EXPECT_EQ(d[active]->Cli("SET round " + std::to_string(round)), "OK\n");
    // The others follow it.
    for (int i = 0; i < 3; ++i) {
      if (i != active) {
        EXPECT_TRUE(test::CaughtUp(*d[active], *d[i])) << "round " << round << " node " << i;
      }
    }
    d[active]->Kill(SIGKILL);
    nodes[active] = nullptr;
    const int next = WaitForOneActive(nodes);  // one of the two left, and only one
    ASSERT_GE(next, 0) << "round " << round;
    EXPECT_NE(next, active);
    d[active] = Start(std::string(1, static_cast<char>('a' + active)));
    nodes[active] = d[active].get();
    active = WaitForOneActive(nodes);
    EXPECT_EQ(active, next) << "the restarted node took the role back";
  }
}

TEST_F(FailoverTest, AnActiveCutOffFromEtcdStopsAcceptingWritesBeforeItsLeaseEnds) {
  auto a = Start("a");
  std::vector<Daemon*> nodes = {a.get()};
  ASSERT_EQ(WaitForOneActive(nodes), 0);
  RespClient c(a->client_port());
  ASSERT_EQ(c.Command({"SET", "x", "1"}), "+OK");
  etcd_->Kill(SIGSTOP);
  const auto paused = Clock::now();
  std::string reply;
  while (Clock::now() - paused < 5s) {
    reply = c.Command({"SET", "x", "2"});
    if (reply != "+OK") break;
    std::this_thread::sleep_for(20ms);
  }
  const auto refused_after = Clock::now() - paused;
  etcd_->Kill(SIGCONT);
  EXPECT_NE(reply, "+OK");
  EXPECT_NE(reply.find("READONLY"), std::string::npos) << reply;
  // The lease (2 s) cannot have ended at etcd before this node stopped.
  EXPECT_LT(refused_after, 2s);
  // etcd back: the cluster accepts writes again (the node campaigns anew).
  ASSERT_EQ(WaitForOneActive(nodes), 0);
  const auto deadline = Clock::now() + 15s;
  while (c.Command({"SET", "x", "3"}) != "+OK" && Clock::now() < deadline) std::this_thread::sleep_for(50ms);
  EXPECT_EQ(c.Command({"GET", "x"}), "3");
}

// The active is cut off from etcd but not from its clients. Every write
// acknowledged, by either node, is recorded with the time its client saw the
// acknowledgement: the old active's last one comes before the new active's
// first, so the two never acknowledged writes in overlapping intervals.
TEST_F(FailoverTest, NoTwoNodesAcknowledgeWritesInOverlappingIntervals) {
  CuttableRelay relay(etcd_->client_port());
  auto a = std::make_unique<Daemon>(dir_, "a", "--etcd " + relay.endpoint() + " --cluster f");
  std::vector<Daemon*> nodes = {a.get(), nullptr};
  ASSERT_EQ(WaitForOneActive(nodes), 0);
  auto b = Start("b");
  nodes[1] = b.get();
  ASSERT_EQ(WaitForOneActive(nodes), 0);
  std::atomic<bool> stop{false};
  std::vector<Clock::time_point> acks[2];  // read only after the writers joined
  std::mutex mu;
  std::condition_variable cv;
  size_t counts[2] = {0, 0};  // guarded by mu
  auto wait_count = [&](int n, size_t want, Clock::duration limit) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, limit, [&] { return counts[n] >= want; });
  };
  std::vector<std::thread> writers;
  for (int n = 0; n < 2; ++n) {
    writers.emplace_back([&, n] {
      RespClient c(nodes[n]->client_port());
      for (int i = 0; !stop; ++i) {
        if (c.Command({"SET", "k" + std::to_string(n), std::to_string(i)}) == "+OK") {
          acks[n].push_back(Clock::now());
          std::lock_guard<std::mutex> l(mu);
          ++counts[n];
          cv.notify_all();
        }
        std::this_thread::sleep_for(2ms);
      }
    });
  }
  wait_count(0, 50, 5s);
  relay.Cut();  // a hears nothing from etcd from now on
  const auto cut_at = Clock::now();
  wait_count(1, 50, 20s);
  stop = true;
  for (auto& t : writers) t.join();
  ASSERT_GE(acks[0].size(), 50u);
  ASSERT_GE(acks[1].size(), 50u) << "b never took over";
  EXPECT_LT(acks[0].back(), acks[1].front()) << "a acknowledged a write after b had begun to";
  EXPECT_LT(acks[0].back() - cut_at, 2s) << "a went on acknowledging writes without its lease";
  std::printf("partition: a's last ack %lld ms after the cut, b's first %lld ms after it\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(acks[0].back() - cut_at).count()),
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(acks[1].front() - cut_at).count()));
}

TEST_F(FailoverTest, EtcdRestartedTheActiveKeepsItsRole) {
  auto a = Start("a");
  std::vector<Daemon*> nodes = {a.get(), nullptr};
  ASSERT_EQ(WaitForOneActive(nodes), 0);
  auto b = Start("b");
  nodes[1] = b.get();
  RespClient c(a->client_port());
  ASSERT_EQ(c.Command({"SET", "k", "before"}), "+OK");
  etcd_->Kill(SIGKILL);
  ASSERT_TRUE(etcd_->Start());  // same ports, same data: the lease is still there
  const auto deadline = Clock::now() + 15s;
  while (c.Command({"SET", "k", "after"}) != "+OK" && Clock::now() < deadline) std::this_thread::sleep_for(50ms);
  EXPECT_EQ(c.Command({"GET", "k"}), "after") << "a did not take writes again";
  EXPECT_EQ(WaitForOneActive(nodes), 0) << "the role moved";
  EXPECT_EQ(b->Cli("ROLE").rfind("slave", 0), 0u);
}

TEST(EtcdClusterFailoverTest, LosingOneOfThreeEtcdMembersDoesNotDisturbTheActive) {
  test::TempDir dir;
  std::vector<std::unique_ptr<test::EtcdServer>> members;
  std::string cluster, endpoints;
  for (const char* name : {"e1", "e2", "e3"}) {
    members.push_back(std::make_unique<test::EtcdServer>(dir.path(), name));
    cluster += std::string(cluster.empty() ? "" : ",") + name + "=http://127.0.0.1:" +
               std::to_string(members.back()->peer_port());
    endpoints += std::string(endpoints.empty() ? "" : ",") + members.back()->endpoint();
  }
  for (auto& m : members) m->Launch(cluster);
  for (auto& m : members) ASSERT_TRUE(m->WaitHealthy());
  auto a = std::make_unique<Daemon>(dir, "a", "--etcd " + endpoints + " --cluster f");
  auto b = std::make_unique<Daemon>(dir, "b", "--etcd " + endpoints + " --cluster f");
  RespClient ca(a->client_port()), cb(b->client_port());
  const auto deadline = Clock::now() + 20s;
  RespClient* active = nullptr;
  while (!active && Clock::now() < deadline) {
    if (ca.Command({"SET", "k", "0"}) == "+OK") active = &ca;
    else if (cb.Command({"SET", "k", "0"}) == "+OK") active = &cb;
    else std::this_thread::sleep_for(50ms);
  }
  ASSERT_NE(active, nullptr);
  // The member each node talks to first dies (maybe etcd's leader: then an
  // election runs). The same node stays the active; its writes may pause
  // while etcd elects a leader, but no failover happens.
  members[0]->Kill(SIGKILL);
  const auto until = Clock::now() + 5s;
  int ok = 0;
  Clock::duration refused{};
  auto last = Clock::now();
  while (Clock::now() < until) {
    const bool accepted = active->Command({"SET", "k", std::to_string(ok + 1)}) == "+OK";
    if (accepted) {
      ++ok;
    } else {
      refused += Clock::now() - last;
    }
    last = Clock::now();
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_GT(ok, 50);
  EXPECT_LT(refused, 1500ms) << "writes were refused for too long";
  EXPECT_EQ(active->Command({"SET", "k", "final"}), "+OK") << "the active changed";
  EXPECT_EQ(active->Command({"GET", "k"}), "final");
}

TEST_F(FailoverTest, RepctlStatusSwitchoverUnderLoadAndFence) {
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id, "--commit remote-write:1"));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int first = WaitForOneActive(nodes);
  ASSERT_GE(first, 0);
  int code = 0;
  std::string out = Repctl(etcd_->endpoint(), "status", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find(std::string("active: ") + static_cast<char>('a' + first)), std::string::npos) << out;
  for (const char* id : {"a ", "b ", "c "}) EXPECT_NE(out.find(std::string("\n") + id), std::string::npos) << out;
  EXPECT_NE(out.find("LAG(ms)"), std::string::npos) << out;
  EXPECT_NE(out.find("LAG(bytes)"), std::string::npos) << out;
  // A standby sends writers to the active's client port.
  const int other = (first + 1) % 3;
  const std::string want = "127.0.0.1:" + std::to_string(d[first]->client_port());
  std::string ro;
  for (auto until = Clock::now() + 5s; Clock::now() < until; std::this_thread::sleep_for(50ms)) {
    ro = d[other]->Cli("SET x y");  // the standby learns the address from etcd within moments
    if (ro.find(want) != std::string::npos) break;
  }
  EXPECT_NE(ro.find("READONLY"), std::string::npos) << ro;
  EXPECT_NE(ro.find(want), std::string::npos) << ro;
  EXPECT_NE(d[other]->Cli("INFO replication").find("master_port:" + std::to_string(d[first]->client_port())),
            std::string::npos);
  out = Repctl(etcd_->endpoint(), "status --json", &code);
  EXPECT_EQ(code, 0);
  EXPECT_NE(out.find("\"nodes\":["), std::string::npos) << out;
  EXPECT_NE(out.find("\"lag_ms\":"), std::string::npos) << out;
  EXPECT_NE(out.find("\"lag_bytes\":"), std::string::npos) << out;
  // An option for another command is a usage error, not silently ignored.
  for (const char* wrong : {"promote --to a", "fence a --json", "switchover --force"}) {
    out = Repctl(etcd_->endpoint(), wrong, &code);
    EXPECT_EQ(code, 2) << wrong << ": " << out;
    EXPECT_NE(out.find("goes with"), std::string::npos) << wrong << ": " << out;
  }

  // Planned switchover under load: no acknowledged write lost.
  Writer writer({d[0]->client_port(), d[1]->client_port(), d[2]->client_port()});
  writer.WaitAcked(200, Clock::now() + 30s);
  const int target = (first + 1) % 3;
  const std::string target_id(1, static_cast<char>('a' + target));
  out = Repctl(etcd_->endpoint(), "switchover --to " + target_id, &code);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("switched over"), std::string::npos) << out;
  const size_t at_switch = writer.acked();
  writer.WaitAcked(at_switch + 200, Clock::now() + 30s);
  writer.Stop();
  EXPECT_EQ(WaitForOneActive(nodes), target);
  std::printf("switchover: longest gap between acknowledged writes %lld ms\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(writer.longest_gap()).count()));
  RespClient c(d[target]->client_port());
  for (const auto& k : writer.keys()) ASSERT_EQ(c.Command({"GET", k}), "v" + k.substr(1)) << k;

  // Manual fence: the active gives up its role; another node takes over.
  out = Repctl(etcd_->endpoint(), "fence " + target_id, &code);
  EXPECT_EQ(code, 0) << out;
  const int after = WaitForOneActive(nodes);
  ASSERT_GE(after, 0);
  EXPECT_NE(c.Command({"SET", "k", "v"}), "+OK") << "the fenced node still accepts writes";
  // A standby has nothing to fence: said so, and nothing is written.
  const int third = 3 - after - target;
  if (third >= 0 && third < 3 && third != after && third != target) {
    out = Repctl(etcd_->endpoint(), "fence " + std::string(1, static_cast<char>('a' + third)), &code);
    EXPECT_EQ(code, 0) << out;
    EXPECT_NE(out.find("is a standby (the active is "), std::string::npos) << out;
    EXPECT_EQ(WaitForOneActive(nodes), after);
  }
  // Errors name the problem and exit non-zero.
  out = Repctl(etcd_->endpoint(), "fence nosuchnode", &code);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("no node 'nosuchnode'"), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "promote --force a", &code);
  EXPECT_EQ(code, 1) << "a forced promotion while an active exists";
  test::RefusingPort dead;
  out = Repctl(dead.endpoint(), "status", &code);
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("etcd unreachable"), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "frobnicate", &code);
  EXPECT_EQ(code, 2);
  out = Repctl(etcd_->endpoint(), "--timeout -5 switchover", &code);  // not quietly 1 s
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--timeout must be"), std::string::npos) << out;
}

// A failed node's session says so (NodeInfo::failure): repctl shows it,
// never lists it as eligible, and will not hand the active role to it. The
// failed session here is published by the test, as a node would on failing.
TEST_F(FailoverTest, RepctlShowsAFailedNodeAndWillNotSwitchOverToIt) {
  auto a = Start("a");
  ASSERT_EQ(WaitForOneActive({a.get()}), 0);
  EtcdArbiterOptions ao;
  ao.endpoints = {etcd_->endpoint()};
  ao.cluster = "f";
  auto arbiter = NewEtcdArbiter(ao);
  ASSERT_TRUE(arbiter.ok()) << arbiter.status().ToString();
  NodeInfo broken;
  broken.id = "broken";
  broken.address = "127.0.0.1:1";
  broken.role = "standby";
  broken.durable_lsn = 1000000;  // ahead of everyone: still not a target
  broken.failure = "IOError: apply: injected disk error";
  ASSERT_TRUE((*arbiter)->Start(broken).ok());
  std::string out = RepctlUntil(etcd_->endpoint(), "status", [](const std::string& o) {
    return o.find("broken: FAILED") != std::string::npos;
  });
  EXPECT_NE(out.find("broken: FAILED (restart it; see its engine.failed log line): IOError: apply: injected disk error"),
            std::string::npos) << out;
  const size_t row = out.find("\nbroken ");
  ASSERT_NE(row, std::string::npos) << out;
  const std::string line = out.substr(row + 1, out.find('\n', row + 1) - row - 1);
  EXPECT_NE(line.find(" FAILED "), std::string::npos) << line;
  EXPECT_NE(line.find(" no "), std::string::npos) << "a failed node listed as eligible: " << line;
  int code = 0;
  out = Repctl(etcd_->endpoint(), "status --json", &code);
  EXPECT_EQ(code, 0);
  EXPECT_NE(out.find("\"eligible\":false,\"commit\":\"\",\"wal_first_lsn\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"failure\":\"IOError: apply: injected disk error\""), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "switchover --to broken", &code);
  EXPECT_NE(code, 0) << out;
  EXPECT_NE(out.find("broken has failed: IOError: apply: injected disk error"), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "switchover", &code);  // the only standby has failed
  EXPECT_NE(code, 0) << out;
  EXPECT_NE(out.find("no standby to switch over to"), std::string::npos) << out;
  EXPECT_EQ(a->Cli("ROLE").rfind("master", 0), 0u) << "the active moved";
  (*arbiter)->Stop();
}

// Usage errors need no etcd: the help lists no internal option, and a
// command given more words than it takes is refused (exit 2).
TEST(RepctlTest, HelpAndExtraWords) {
  int code = -1;
  std::string out = test::Shell(std::string(REPCTL_PATH) + " --help", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("--timeout"), std::string::npos) << out;
  EXPECT_EQ(out.find("--command"), std::string::npos) << "the positional COMMAND is internal: " << out;
  for (const char* args :
       {"status extra", "fence a b", "switchover b", "promote --force a b", "remove a b", "--time 5 status"}) {
    out = Repctl("127.0.0.1:1", args, &code);
    EXPECT_EQ(code, 2) << args << ": " << out;
  }
}

// Damage in etcd that the operator must see and get past (docs/operations.md,
// engine.sync_set_unreadable): a sync key that is no JSON array made every
// repctl command fail, promote --force included; a node session that is no
// JSON was left out of status, and numbers that are not LSNs shown as 0.
TEST_F(FailoverTest, RepctlShowsADamagedSyncSetAndSessionsAndPromotesPastThem) {
  etcd::Options eo;
  eo.endpoints = {etcd_->endpoint()};
  auto client = etcd::Client::Create(eo);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  const std::string prefix = ClusterPrefix("f");
  ASSERT_TRUE((*client)->Put(prefix + "sync", "{\"a\":1}").ok());
  ASSERT_TRUE((*client)->Put(prefix + "nodes/y", "not json").ok());
  ASSERT_TRUE((*client)->Put(prefix + "nodes/z", "{\"id\":\"z\",\"address\":\"127.0.0.1:1\",\"role\":\"standby\","
                                                 "\"last_lsn\":\"abc\",\"durable_lsn\":-5,\"applied_lsn\":1e30}")
                  .ok());
  // A synchronous rule: with the sync set unreadable, a never does campaign.
  auto a = Start("a", "--commit remote-write:1");
  std::string out = RepctlUntil(etcd_->endpoint(), "status", [](const std::string& o) {
    return o.find("\na ") != std::string::npos;
  });
  EXPECT_NE(out.find("active: (none)"), std::string::npos) << out;
  EXPECT_NE(out.find("repctl: WARNING: the sync set is UNREADABLE (Corruption: etcd key /replica/f/sync is not a JSON "
                     "array)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("sync set (eligible for promotion): UNREADABLE (Corruption: "), std::string::npos) << out;
  EXPECT_NE(out.find("y: UNREADABLE session: Corruption: a node session is not a JSON object: not json"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("\ny            UNREADABLE "), std::string::npos) << out;
  EXPECT_NE(out.find("\nz            UNREADABLE "), std::string::npos) << out;
  EXPECT_NE(out.find("z: UNREADABLE in part (read as 0): last_lsn is \"abc\", not a whole number 0..2^63-1; "
                     "durable_lsn is -5, not a whole number 0..2^63-1; applied_lsn is 1E30, not"),
            std::string::npos)
      << out;
  const size_t row = out.find("\na ");
  ASSERT_NE(row, std::string::npos) << out;
  const std::string line = out.substr(row + 1, out.find('\n', row + 1) - row - 1);
  EXPECT_NE(line.find(" standby "), std::string::npos) << line;
  EXPECT_NE(line.find(" ? "), std::string::npos) << "eligibility is unknown: " << line;
  int code = 0;
  out = Repctl(etcd_->endpoint(), "status --json 2>/dev/null", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("\"sync_set\":null,\"sync_set_unreadable\":\"Corruption: etcd key /replica/f/sync is not a "
                     "JSON array\""),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("\"unreadable_sessions\":[{\"key\":\"y\",\"why\":\"Corruption: a node session is not a JSON "
                     "object: not json\"}]"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("\"unreadable\":\"last_lsn is \\\"abc\\\", not"), std::string::npos) << out;
  EXPECT_NE(out.find("\"eligible\":null"), std::string::npos) << out;
  // The way out the log line names: promote --force.
  out = Repctl(etcd_->endpoint(), "promote --force a", &code);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("promoted a"), std::string::npos) << out;
  EXPECT_EQ(WaitForOneActive({a.get()}), 0);
}

// An active whose WAL's disk fills can accept no write: the node fails,
// steps down, shuts down with exit status 70, and a standby takes over.
// Before, it kept the active role (and the lease) while refusing every write.
TEST_F(FailoverTest, AnActiveWhoseDiskFillsHandsOverAndExitsWith70) {
  test::TinyDisk disk(dir_.Sub("a") + "/wal", "2m");
  if (!disk.mounted()) GTEST_SKIP() << "needs root and tmpfs to fill a disk";
  auto a = Start("a");
  ASSERT_EQ(WaitForOneActive({a.get()}), 0);
  auto b = Start("b");
  auto c = Start("c");
  ASSERT_TRUE(test::CaughtUp(*a, *b));
  // 6 MB of values; the active's log has room for 2.
  test::Shell("redis-benchmark -h 127.0.0.1 -p " + std::to_string(a->client_port()) +
              " -t set -d 1000 -r 100000 -c 4 -q -n 6000");
  EXPECT_EQ(a->WaitExit(60s), 70) << a->Output();
  EXPECT_NE(a->Output().find("after a failure (exit status 70)"), std::string::npos) << a->Output();
  const int next = WaitForOneActive({b.get(), c.get()});
  ASSERT_GE(next, 0) << "no standby took over";
  Daemon* active = next == 0 ? b.get() : c.get();
  EXPECT_EQ(active->Cli("SET after disk-full"), "OK\n");
  EXPECT_EQ(active->Cli("GET after"), "disk-full\n");
}

TEST_F(FailoverTest, RepctlSetCommitReseedAndRemove) {
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int act = WaitForOneActive(nodes);
  ASSERT_GE(act, 0);
  const int s1 = (act + 1) % 3, s2 = (act + 2) % 3;
  auto id = [](int i) { return std::string(1, static_cast<char>('a' + i)); };
  int code = 0;

  // The commit rule, changed at run time and kept in etcd.
  std::string out = Repctl(etcd_->endpoint(), "set-commit remote-apply:1", &code);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("commit rule is now remote-apply:1 on the active " + id(act)), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "status", &code);
  EXPECT_NE(out.find("commit rule: remote-apply:1"), std::string::npos) << out;
  EXPECT_NE(out.find("WAL SIZE"), std::string::npos) << out;
  // Every node takes the rule (a standby judges eligibility by it).
  EXPECT_EQ(WaitForRuleEverywhere(etcd_->endpoint(), "remote-apply:1", 3), 3u);
  out = Repctl(etcd_->endpoint(), "set-commit sometimes", &code);
  EXPECT_EQ(code, 2) << out;
  RespClient c(d[act]->client_port());
  for (int i = 0; i < 200; ++i) ASSERT_EQ(c.Command({"SET", "k" + std::to_string(i), "v" + std::to_string(i)}), "+OK");

  // A damaged standby (its RocksDB changed behind its back), found by
  // logdiff --live and repaired by repctl reseed.
  ASSERT_TRUE(test::CaughtUp(*d[act], *d[s1]));
  EXPECT_EQ(d[s1]->Kill(SIGTERM), 0);
  test::Shell("ldb --db=" + dir_.Sub(id(s1)) + "/db put k42 flipped");
  d[s1] = Start(id(s1));
  nodes[s1] = d[s1].get();
  ASSERT_TRUE(test::CaughtUp(*d[act], *d[s1]));
  auto live = [&](int* rc) {
    return test::Shell(std::string(LOGDIFF_PATH) + " --live --no-progress --cluster f --secret test " + id(act) +
                           "=127.0.0.1:" + std::to_string(d[act]->repl_port()) + " " + id(s1) + "=127.0.0.1:" +
                           std::to_string(d[s1]->repl_port()),
                       rc);
  };
  out = live(&code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("value cf default key \"k42\""), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "reseed " + id(s1), &code);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("reseeded " + id(s1) + " from a snapshot of " + id(act)), std::string::npos) << out;
  ASSERT_TRUE(test::CaughtUp(*d[act], *d[s1]));
  out = live(&code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(out.rfind("logdiff: IDENTICAL", 0), 0u) << out;
  out = Repctl(etcd_->endpoint(), "reseed " + id(act), &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("is the active"), std::string::npos) << out;

  // A standby shut down for good: its slot stays until it is removed.
  // (remote-apply:1 is still met by the other standby.)
  EXPECT_EQ(d[s2]->Kill(SIGTERM), 0);
  nodes[s2] = nullptr;
  out = Repctl(etcd_->endpoint(), "remove " + id(s1), &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("is running"), std::string::npos) << out;
  // Its session is gone, its slot stays.
  out = RepctlUntil(etcd_->endpoint(), "status", [&](const std::string& o) {
    return o.find("not running: repctl remove " + id(s2)) != std::string::npos;
  });
  EXPECT_NE(out.find("not running: repctl remove " + id(s2) + " forgets it"), std::string::npos) << out;
  // A mistyped id is refused: its removal would stay in etcd for good.
  out = Repctl(etcd_->endpoint(), "remove " + id(s2) + "x", &code);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("no running node keeps a slot for " + id(s2) + "x"), std::string::npos) << out;
  EXPECT_NE(out.find(id(s2) + " (on " + id(act) + ")"), std::string::npos) << "the slots kept are named: " << out;
  out = Repctl(etcd_->endpoint(), "remove --force " + id(s2) + "x", &code);
  EXPECT_EQ(code, 0) << out;
  out = Repctl(etcd_->endpoint(), "remove " + id(s2) + "x", &code);
  EXPECT_EQ(code, 0) << "a repeat is not refused: " << out;
  EXPECT_NE(out.find("was removed already"), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "remove " + id(s2), &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("removed " + id(s2)), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "status", &code);
  EXPECT_EQ(out.find("repctl remove " + id(s2)), std::string::npos) << out;
  EXPECT_EQ(c.Command({"SET", "after", "removal"}), "+OK");
}

TEST_F(FailoverTest, ClientFollowsTheActiveAcrossAKillAndASwitchover) {
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id, "--commit remote-write:1"));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int first = WaitForOneActive(nodes);
  ASSERT_GE(first, 0);
  ClientOptions o;
  o.etcd = {etcd_->endpoint()};
  o.cluster = "f";
  auto opened = Client::Open(o);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  auto& client = *opened;
  int n = 0;
  auto write = [&](int count) {
    for (int i = 0; i < count; ++i, ++n) {
      Status st = client->Set("c" + std::to_string(n), "v" + std::to_string(n));
      ASSERT_TRUE(st.ok()) << "write " << n << ": " << st.ToString();
    }
  };
  write(100);
  EXPECT_EQ(client->active(), "127.0.0.1:" + std::to_string(d[first]->client_port()));

  // The active dies: the next writes wait for the new active and go there.
  EXPECT_EQ(d[first]->Kill(SIGKILL), 128 + SIGKILL);
  nodes[first] = nullptr;
  const auto killed = Clock::now();
  write(1);
  std::printf("client: first write acknowledged %lld ms after the SIGKILL\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - killed).count()));
  write(99);
  const int second = WaitForOneActive(nodes);
  ASSERT_GE(second, 0);
  EXPECT_EQ(client->active(), "127.0.0.1:" + std::to_string(d[second]->client_port()));

  // A planned switchover: the client follows the -READONLY redirect.
  const int third = 3 - first - second;
  int code = 0;
  std::string out = Repctl(etcd_->endpoint(), "switchover --to " + std::string(1, static_cast<char>('a' + third)), &code);
  ASSERT_EQ(code, 0) << out;
  write(100);
  EXPECT_EQ(client->active(), "127.0.0.1:" + std::to_string(d[third]->client_port()));
  EXPECT_GE(client->moves(), 2u);
  // Every acknowledged write is there (remote-write:1), read back through the client.
  for (int i = 0; i < n; ++i) {
    auto got = client->Get("c" + std::to_string(i));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ASSERT_EQ(*got, std::optional<std::string>("v" + std::to_string(i))) << i;
  }
  auto del = client->Del("c0");
  ASSERT_TRUE(del.ok());
  EXPECT_TRUE(*del);
  EXPECT_EQ(*client->Get("c0"), std::nullopt);
  // Errors that are not about roles come back at once.
  ClientOptions none;
  EXPECT_EQ(Client::Open(none).status().code(), StatusCode::kInvalidArgument);
  ClientOptions lost = o;
  lost.cluster = "nosuchcluster";
  lost.timeout = 500ms;
  auto c2 = Client::Open(lost);
  ASSERT_TRUE(c2.ok());
  Status st = (*c2)->Set("x", "y");
  EXPECT_EQ(st.code(), StatusCode::kTimedOut) << st.ToString();
  EXPECT_NE(st.message().find("has no active"), std::string::npos) << st.ToString();
}

TEST_F(FailoverTest, RuleSetAtRunTimeGovernsTheNextElection) {
  // Started async; made remote-write:1 with repctl. The standbys judge
  // eligibility by the new rule, so the node elected after the active dies
  // holds every acknowledged write.
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int first = WaitForOneActive(nodes);
  ASSERT_GE(first, 0);
  int code = 0;
  std::string out = Repctl(etcd_->endpoint(), "set-commit remote-write:1", &code);
  ASSERT_EQ(code, 0) << out;
  ASSERT_EQ(WaitForRuleEverywhere(etcd_->endpoint(), "remote-write:1", 3), 3u);
  Writer writer({d[0]->client_port(), d[1]->client_port(), d[2]->client_port()});
  ASSERT_TRUE(writer.WaitAcked(300, Clock::now() + 30s));
  const size_t before = writer.acked();
  EXPECT_EQ(d[first]->Kill(SIGKILL), 128 + SIGKILL);
  nodes[first] = nullptr;
  ASSERT_TRUE(writer.WaitAcked(before + 100, Clock::now() + 30s)) << "no write was accepted after the active died";
  writer.Stop();
  const int second = WaitForOneActive(nodes);
  ASSERT_GE(second, 0);
  RespClient c(d[second]->client_port());
  for (const auto& k : writer.keys()) ASSERT_EQ(c.Command({"GET", k}), "v" + k.substr(1)) << k;
  out = Repctl(etcd_->endpoint(), "status", &code);
  EXPECT_NE(out.find("commit rule: remote-write:1"), std::string::npos) << "the new active took the stored rule\n" << out;
}

TEST_F(FailoverTest, NoEligibleStandbyMeansNoPromotionUntilForced) {
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id, "--commit remote-write:1"));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int act = WaitForOneActive(nodes);
  ASSERT_GE(act, 0);
  const int late = (act + 1) % 3, other = (act + 2) % 3;
  const std::string late_id(1, static_cast<char>('a' + late));
  // Both standbys listed as eligible first, so that the late one must be
  // unlisted before a write it lacks is acknowledged.
  const std::string both = "\"sync_set\":[\"" + std::string(1, static_cast<char>('a' + std::min(late, other))) +
                           "\",\"" + std::string(1, static_cast<char>('a' + std::max(late, other))) + "\"]";
  const std::string listed = RepctlUntil(etcd_->endpoint(), "status --json",
                                         [&](const std::string& o) { return o.find(both) != std::string::npos; });
  ASSERT_NE(listed.find(both), std::string::npos) << listed;
  // The late standby stops; writes go on with the other one, which alone
  // stays eligible.
  EXPECT_EQ(d[late]->Kill(SIGTERM), 0);
  nodes[late] = nullptr;
  RespClient c(d[act]->client_port());
  for (int i = 0; i < 100; ++i) ASSERT_EQ(c.Command({"SET", "k" + std::to_string(i), "v"}), "+OK");
  ASSERT_TRUE(test::CaughtUp(*d[act], *d[other]));
  // The first write the late standby lacked was acknowledged only after
  // etcd stopped listing it: at once, the set names only the other one.
  const std::string other_id(1, static_cast<char>('a' + other));
  const std::string only_other = "\"sync_set\":[\"" + other_id + "\"]";
  int code = 0;
  std::string out = Repctl(etcd_->endpoint(), "status --json", &code);
  ASSERT_NE(out.find(only_other), std::string::npos) << out;
  // Then the active and the eligible standby die together.
  d[act]->Kill(SIGKILL);
  d[other]->Kill(SIGKILL);
  nodes[act] = nodes[other] = nullptr;
  d[late] = Start(late_id, "--commit remote-write:1");
  nodes[late] = d[late].get();
  // Not eligible: it lacks acknowledged writes, so it does not take over.
  EXPECT_EQ(WaitForOneActive(nodes, 5s), -1) << "a node that lacks acknowledged writes promoted itself";
  out = Repctl(etcd_->endpoint(), "status", &code);
  EXPECT_NE(out.find("active: (none)"), std::string::npos) << out;
  // The operator accepts the loss.
  out = Repctl(etcd_->endpoint(), "promote --force " + late_id, &code);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("WARNING: forcing " + late_id), std::string::npos) << out;
  EXPECT_NE(out.find("promoted " + late_id), std::string::npos) << out;
  EXPECT_EQ(WaitForOneActive(nodes), late);
  // Alone, it can acknowledge writes only once the rule asks for no standby.
  out = Repctl(etcd_->endpoint(), "set-commit async", &code);
  ASSERT_EQ(code, 0) << out;
  out = Repctl(etcd_->endpoint(), "status", &code);
  EXPECT_NE(out.find("sync set: not used under the async rule"), std::string::npos) << out;
  RespClient l(d[late]->client_port());
  EXPECT_EQ(l.Command({"SET", "after", "forced"}), "+OK");
  EXPECT_EQ(l.Command({"GET", "k99"}), "$-1") << "the writes it never had are lost, as repctl warned";
}

TEST_F(FailoverTest, ARemovedNodeStaysRemovedAcrossSwitchovers) {
  // The active keeps a slot for a stopped standby; after a switchover the
  // new active has none, and repctl remove used to say "nothing to remove"
  // and write nothing: a switchover back brought the old active's slot back
  // (its slots file), holding its log for a node gone for good.
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int act = WaitForOneActive(nodes);
  ASSERT_GE(act, 0);
  const int other = (act + 1) % 3, gone = (act + 2) % 3;
  const std::string act_id(1, static_cast<char>('a' + act)), other_id(1, static_cast<char>('a' + other)),
      gone_id(1, static_cast<char>('a' + gone));
  {
    RespClient c(d[act]->client_port());
    for (int i = 0; i < 20; ++i) ASSERT_EQ(c.Command({"SET", "k" + std::to_string(i), "v"}), "+OK");
  }
  ASSERT_TRUE(test::CaughtUp(*d[act], *d[gone]));
  EXPECT_EQ(d[gone]->Kill(SIGTERM), 0);
  nodes[gone] = nullptr;
  const std::string forgets = "repctl remove " + gone_id + " forgets it";
  std::string out = RepctlUntil(etcd_->endpoint(), "status", [&](const std::string& o) { return o.find(forgets) != std::string::npos; });
  ASSERT_NE(out.find(forgets), std::string::npos) << out;
  int code = 0;
  out = Repctl(etcd_->endpoint(), "switchover --to " + other_id, &code);
  ASSERT_EQ(code, 0) << out;
  out = Repctl(etcd_->endpoint(), "remove " + gone_id, &code);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("removed " + gone_id), std::string::npos) << out;
  out = Repctl(etcd_->endpoint(), "switchover --to " + act_id, &code);
  ASSERT_EQ(code, 0) << out;
  ASSERT_EQ(WaitForOneActive(nodes), act);
  // The old active drops the slot it kept from its first term.
  out = RepctlUntil(etcd_->endpoint(), "status", [&](const std::string& o) { return o.find(forgets) == std::string::npos; });
  EXPECT_EQ(out.find(forgets), std::string::npos) << out;
  // Back under its id, the node is welcome again, and the removal is over.
  etcd::Options eo;
  eo.endpoints = {etcd_->endpoint()};
  auto client = etcd::Client::Create(eo);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  const std::string key = ClusterPrefix("f") + "ctl/remove/" + gone_id;
  auto before = (*client)->Get(key);
  ASSERT_TRUE(before.ok() && before->has_value()) << "the removal stands while the node is away";
  d[gone] = Start(gone_id);
  nodes[gone] = d[gone].get();
  ASSERT_TRUE(test::CaughtUp(*d[act], *d[gone]));
  EXPECT_TRUE(test::Eventually([&] {
    auto got = (*client)->Get(key);
    return got.ok() && !got->has_value();
  })) << "the key goes once the node has a session again";
}

TEST_F(FailoverTest, ASwitchoverToAPausedNodeSaysTheActiveHandedOverAndTheTargetDidNotTakeIt) {
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int act = WaitForOneActive(nodes);
  ASSERT_GE(act, 0);
  const int target = (act + 1) % 3;
  const std::string target_id(1, static_cast<char>('a' + target));
  ASSERT_EQ(::kill(d[target]->pid(), SIGSTOP), 0);
  int code = 0;
  const std::string out = Repctl(etcd_->endpoint(), "switchover --to " + target_id + " --timeout 3", &code);
  ASSERT_EQ(::kill(d[target]->pid(), SIGCONT), 0);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("handed over"), std::string::npos) << out;
  EXPECT_NE(out.find(target_id + " did not take the role"), std::string::npos) << out;
  EXPECT_GE(WaitForOneActive(nodes), 0) << "a node takes the role in the end";
}

TEST_F(FailoverTest, ANodeRestartedOnAnEmptiedDataDirectoryIsNotEligible) {
  // The sync set lists each member with its data directory's incarnation.
  // A listed node restarted on an emptied directory holds none of the
  // acknowledged writes: started alone after a full stop it promoted itself
  // with an empty log, and every node that came back was resynced to it.
  std::vector<std::unique_ptr<Daemon>> d;
  for (const char* id : {"a", "b", "c"}) d.push_back(Start(id, "--commit remote-write:1"));
  std::vector<Daemon*> nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int act = WaitForOneActive(nodes);
  ASSERT_GE(act, 0);
  const int wiped = (act + 1) % 3, other = (act + 2) % 3;
  const std::string both = "\"sync_set\":[\"" + std::string(1, static_cast<char>('a' + std::min(wiped, other))) +
                           "\",\"" + std::string(1, static_cast<char>('a' + std::max(wiped, other))) + "\"]";
  const std::string listed = RepctlUntil(etcd_->endpoint(), "status --json",
                                         [&](const std::string& o) { return o.find(both) != std::string::npos; });
  ASSERT_NE(listed.find(both), std::string::npos) << listed;
  {
    RespClient c(d[act]->client_port());
    for (int i = 0; i < 100; ++i) ASSERT_EQ(c.Command({"SET", "k" + std::to_string(i), "v"}), "+OK");
  }
  // A standby that lagged past the grace during the writes was unlisted;
  // it is listed again on an acknowledgement once caught up (and past its
  // back-off), so writes go on until both are listed.
  ASSERT_TRUE(test::Eventually([&] {
    RespClient c(d[act]->client_port());
    if (c.Command({"SET", "tick", "v"}) != "+OK") return false;
    int code = 0;
    return Repctl(etcd_->endpoint(), "status --json", &code).find(both) != std::string::npos;
  })) << "both standbys listed again";
  ASSERT_TRUE(test::CaughtUp(*d[act], *d[wiped]));
  ASSERT_TRUE(test::CaughtUp(*d[act], *d[other]));
  // A full stop, standbys first (docs/operations.md).
  EXPECT_EQ(d[wiped]->Kill(SIGTERM), 0);
  EXPECT_EQ(d[other]->Kill(SIGTERM), 0);
  EXPECT_EQ(d[act]->Kill(SIGTERM), 0);
  const std::string wiped_id(1, static_cast<char>('a' + wiped));
  std::filesystem::remove_all(dir_.Sub(wiped_id));
  const std::string log = dir_.Sub(wiped_id + ".log");  // its stderr (the shell redirects it)
  d[wiped] = Start(wiped_id, "--commit remote-write:1 2>" + log);
  ASSERT_TRUE(test::Eventually([&] { return test::ReadFileBytes(log).find("engine.not_eligible") != std::string::npos; }, 20s))
      << test::ReadFileBytes(log);
  EXPECT_NE(test::ReadFileBytes(log).find("with another data directory"), std::string::npos) << test::ReadFileBytes(log);
  EXPECT_EQ(d[wiped]->Cli("ROLE").rfind("slave", 0), 0u) << "it promoted itself with an empty log";
  // The nodes that hold the writes come back; one of them takes over, and
  // the emptied one is given everything.
  for (int i : {act, other}) d[i] = Start(std::string(1, static_cast<char>('a' + i)), "--commit remote-write:1");
  nodes = {d[0].get(), d[1].get(), d[2].get()};
  const int next = WaitForOneActive(nodes);
  ASSERT_GE(next, 0);
  EXPECT_NE(next, wiped);
  RespClient c(d[next]->client_port());
  for (int i = 0; i < 100; ++i) ASSERT_EQ(c.Command({"GET", "k" + std::to_string(i)}), "v") << i;
  ASSERT_TRUE(test::CaughtUp(*d[next], *d[wiped]));
  RespClient w(d[wiped]->client_port());
  EXPECT_EQ(w.Command({"GET", "k99"}), "v");
}

}  // namespace
}  // namespace replica
