// The etcd client against a real etcd (Debian's etcd-server) on loopback.
#include "replication/etcd.h"
#include "replication/arbiter.h"

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <mutex>

#include "tests/support/etcd_server.h"
#include "tests/support/test_util.h"

namespace replica::etcd {
namespace {

using namespace std::chrono_literals;

class EtcdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = std::make_unique<test::EtcdServer>(dir_.path());
    ASSERT_TRUE(server_->Start());
    client_ = NewClient({server_->endpoint()});
  }
  std::unique_ptr<Client> NewClient(std::vector<std::string> endpoints) {
    Options o;
    o.endpoints = std::move(endpoints);
    o.timeout = 1000ms;
    auto c = Client::Create(o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return std::move(c).value();
  }
  test::TempDir dir_;
  std::unique_ptr<test::EtcdServer> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(EtcdTest, PutGetPrefixDeleteWithBinaryBytes) {
  const std::string binary("\x00\xff\x01 v=\n", 7);
  ASSERT_TRUE(client_->Put("/t/a", binary).ok());
  ASSERT_TRUE(client_->Put("/t/b", "2").ok());
  ASSERT_TRUE(client_->Put("/u/c", "3").ok());
  auto got = client_->Get("/t/a");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->value, binary);
  EXPECT_GT((*got)->mod_revision, 0);
  auto all = client_->GetPrefix("/t/");
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[1].key, "/t/b");
  ASSERT_TRUE(client_->Delete("/t/a").ok());
  EXPECT_FALSE(client_->Get("/t/a")->has_value());
}

TEST_F(EtcdTest, CreateIfAbsentTransactionHasOneWinner) {
  auto other = NewClient({server_->endpoint()});
  auto create = [](Client* c, const std::string& who) {
    return c->Txn({{"/t/active", Compare::Target::kVersion, Compare::Result::kEqual, 0, {}}},
                  {Op::Put("/t/active", who)}, {Op::Get("/t/active")});
  };
  auto first = create(client_.get(), "a");
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_TRUE(first->succeeded);
  auto second = create(other.get(), "b");
  ASSERT_TRUE(second.ok());
  EXPECT_FALSE(second->succeeded);
  ASSERT_EQ(second->gets.size(), 1u);
  ASSERT_TRUE(second->gets[0].has_value());
  EXPECT_EQ(second->gets[0]->value, "a");
}

TEST_F(EtcdTest, LeaseKeepsItsKeysOnlyWhileRefreshed) {
  auto lease = client_->LeaseGrant(2);
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  ASSERT_TRUE(client_->Put("/t/session", "x", *lease).ok());
  // Refreshed for longer than its TTL: the key stays.
  const auto until = std::chrono::steady_clock::now() + 3s;
  while (std::chrono::steady_clock::now() < until) {
    auto ttl = client_->LeaseKeepAlive(*lease);
    ASSERT_TRUE(ttl.ok()) << ttl.status().ToString();
    EXPECT_GE(*ttl, 2);
    std::this_thread::sleep_for(500ms);  // the refresh cadence under test
  }
  EXPECT_TRUE(client_->Get("/t/session")->has_value());
  // No longer refreshed: etcd deletes it within TTL + 0.5 s; await it.
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (client_->Get("/t/session")->has_value() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_FALSE(client_->Get("/t/session")->has_value());
  auto expired = client_->LeaseKeepAlive(*lease);
  EXPECT_TRUE(expired.status().IsNotFound()) << expired.status().ToString();
}

TEST_F(EtcdTest, WatchSeesPutsAndDeletesUnderAPrefix) {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<WatchEvent::Type, std::string>> seen;
  auto w = client_->StartWatch(
      "/t/", true, 0,
      [&](const WatchEvent& e, int64_t) {
        std::lock_guard<std::mutex> l(mu);
        seen.emplace_back(e.type, e.kv.key + "=" + e.kv.value);
        cv.notify_all();
      },
      [&](const Status&) {});
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ASSERT_TRUE(client_->Put("/t/x", "1").ok());
  ASSERT_TRUE(client_->Put("/other", "1").ok());
  ASSERT_TRUE(client_->Delete("/t/x").ok());
  std::unique_lock<std::mutex> l(mu);
  ASSERT_TRUE(cv.wait_for(l, 10s, [&] { return seen.size() >= 2; }));
  EXPECT_EQ(seen[0].first, WatchEvent::Type::kPut);
  EXPECT_EQ(seen[0].second, "/t/x=1");
  EXPECT_EQ(seen[1].first, WatchEvent::Type::kDelete);
  EXPECT_EQ(seen.size(), 2u) << "a key outside the prefix was reported";
  l.unlock();
  (*w)->Stop();  // returns promptly, stream closed
}

TEST_F(EtcdTest, AWatchOnAMemberThatNeverAnswersFailsInTimeAndTheNextTryUsesAnother) {
  test::SilentPort stalled;
  auto c = NewClient({stalled.endpoint(), server_->endpoint()});
  auto none = [](const WatchEvent&, int64_t) {};
  auto ignore = [](const Status&) {};
  const auto start = std::chrono::steady_clock::now();
  auto first = c->StartWatch("/t/", true, 0, none, ignore);
  ASSERT_FALSE(first.ok());
  EXPECT_NE(first.status().ToString().find("not confirmed"), std::string::npos) << first.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "bounded by the request timeout (1 s)";
  auto second = c->StartWatch("/t/", true, 0, none, ignore);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
}

TEST_F(EtcdTest, AnUnreachableMemberIsSkipped) {
  test::RefusingPort dead;
  auto c = NewClient({dead.endpoint(), server_->endpoint()});
  ASSERT_TRUE(c->Put("/t/k", "v").ok());
  EXPECT_EQ((*c->Get("/t/k"))->value, "v");
}

// The test harness itself: a port picked free that another process takes
// before etcd binds it must not fail the test that wanted an etcd (a first
// start is retried on other ports).
TEST(EtcdServerTest, AFirstStartWhosePortWasTakenMovesToAnother) {
  test::TempDir dir;
  test::EtcdServer server(dir.path());
  const int wanted = server.client_port();
  // Bound, not listening: etcd cannot bind it, and the health checks of the
  // first try are refused at once.
  struct Fd {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ~Fd() {
      if (fd >= 0) ::close(fd);
    }
  } taker;
  ASSERT_GE(taker.fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(wanted));
  ASSERT_EQ(::bind(taker.fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << "port " << wanted;
  ASSERT_TRUE(server.Start());
  EXPECT_NE(server.client_port(), wanted);
  Options o;
  o.endpoints = {server.endpoint()};
  o.timeout = 5000ms;
  auto c = Client::Create(o);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE((*c)->Put("/t/k", "v").ok());
}

TEST_F(EtcdTest, NoReachableMemberIsAClearError) {
  test::RefusingPort dead;
  auto c = NewClient({dead.endpoint()});
  auto r = c->Get("/t/k");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().ToString().find("etcd unreachable"), std::string::npos) << r.status().ToString();
  server_->Kill(SIGSTOP);  // a member that accepts nothing in time
  auto slow = client_->Get("/t/k");
  server_->Kill(SIGCONT);
  EXPECT_FALSE(slow.ok());
}

std::unique_ptr<Arbiter> NewArbiter(const std::string& endpoint) {
  EtcdArbiterOptions o;
  o.endpoints = {endpoint};
  o.cluster = "t";
  auto a = NewEtcdArbiter(o);
  EXPECT_TRUE(a.ok()) << a.status().ToString();
  return std::move(a).value();
}

NodeInfo Me(const std::string& id) {
  NodeInfo n;
  n.id = id;
  n.address = "127.0.0.1:1" + id.substr(0, 1);
  n.role = "standby";
  return n;
}

TEST_F(EtcdTest, ArbiterCampaignHasOneWinnerAndTheEpochGrows) {
  auto a = NewArbiter(server_->endpoint());
  auto b = NewArbiter(server_->endpoint());
  ASSERT_TRUE(a->Start(Me("a")).ok());
  ASSERT_TRUE(b->Start(Me("b")).ok());
  EXPECT_GT(a->LeaseDeadline(), std::chrono::steady_clock::now());
  auto won = a->Campaign(Me("a"), 0);
  ASSERT_TRUE(won.ok()) << won.status().ToString();
  ASSERT_EQ(*won, std::optional<uint64_t>(1));
  auto lost = b->Campaign(Me("b"), 0);
  ASSERT_TRUE(lost.ok());
  EXPECT_EQ(*lost, std::nullopt);
  auto active = b->GetActive();
  ASSERT_TRUE(active.ok() && active->has_value());
  EXPECT_EQ((*active)->id, "a");
  EXPECT_EQ((*active)->epoch, 1u);
  EXPECT_EQ(b->GetNodes()->size(), 2u);
  // b resigning frees only its own key: a stays the active. (A failed
  // standby resigned once and, before, deleted the healthy active's key.)
  ASSERT_TRUE(b->Resign("b").ok());
  ASSERT_TRUE(b->GetActive()->has_value()) << "b's resignation deleted a's key";
  EXPECT_EQ((*b->GetActive())->id, "a");
  // a goes away (its lease revoked): b sees the change and wins the next
  // epoch, never lower than what its own log has seen.
  const auto before = std::chrono::steady_clock::now();
  const uint64_t seen = b->changes();
  a->Stop();
  b->WaitForChange(seen, before + 5s);
  EXPECT_LT(std::chrono::steady_clock::now() - before, 4s) << "the watch did not report the change";
  EXPECT_FALSE(b->GetActive()->has_value());
  auto next = b->Campaign(Me("b"), 7);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(*next, std::optional<uint64_t>(8));
  EXPECT_EQ(b->GetNodes()->size(), 1u);
  ASSERT_TRUE(b->PublishSyncSet({"x", "y"}).ok());
  EXPECT_EQ(**b->GetSyncSet(), (std::vector<std::string>{"x", "y"}));
}

// An epoch key that is not a plain count below 2^63 stops elections with a
// clear error. "-2" used to be read as 2^64 - 2: the next winner got epoch
// 2^64 - 1 and the one after it epoch 0, fenced by the first for ever.
TEST_F(EtcdTest, ACampaignOverADamagedEpochKeyFailsClearly) {
  auto a = NewArbiter(server_->endpoint());
  ASSERT_TRUE(a->Start(Me("a")).ok());
  for (const char* bad : {"-2", "18446744073709551615", "9223372036854775808", "1e3", " 5", ""}) {
    ASSERT_TRUE(client_->Put("/replica/t/epoch", bad).ok());
    auto won = a->Campaign(Me("a"), 0);
    ASSERT_FALSE(won.ok()) << "'" << bad << "' won epoch " << (won.ok() && *won ? **won : 0);
    EXPECT_EQ(won.status().code(), StatusCode::kCorruption) << won.status().ToString();
    EXPECT_NE(won.status().message().find("not an epoch"), std::string::npos) << won.status().ToString();
    EXPECT_FALSE(a->GetActive()->has_value());
  }
  ASSERT_TRUE(client_->Put("/replica/t/epoch", "9223372036854775807").ok());  // the largest: no successor
  auto won = a->Campaign(Me("a"), 0);
  ASSERT_FALSE(won.ok());
  EXPECT_EQ(won.status().code(), StatusCode::kCorruption) << won.status().ToString();
  ASSERT_TRUE(client_->Put("/replica/t/epoch", "41").ok());
  won = a->Campaign(Me("a"), 0);
  ASSERT_TRUE(won.ok()) << won.status().ToString();
  EXPECT_EQ(*won, std::optional<uint64_t>(42));
}

TEST(OperatorRequestTest, NamesTheNodeAndTheEpochItWasMadeIn) {
  EXPECT_EQ(OperatorRequest("b", 7), "b@7");
  EXPECT_EQ(ParseOperatorRequest("b@7"), (std::pair<std::string, uint64_t>("b", 7)));
  EXPECT_EQ(ParseOperatorRequest("node@x@12"), (std::pair<std::string, uint64_t>("node@x", 12)));
  for (const char* bad : {"b", "@7", "b@", "b@-1", "b@7x", ""}) {
    EXPECT_EQ(ParseOperatorRequest(bad).first, "") << bad;
  }
  EXPECT_EQ(ParseEpoch("0"), std::optional<uint64_t>(0));
  EXPECT_EQ(ParseEpoch("9223372036854775807"), std::optional<uint64_t>(kMaxEpoch));
  EXPECT_EQ(ParseEpoch("9223372036854775808"), std::nullopt);
  EXPECT_EQ(ParseEpoch("+1"), std::nullopt);
}

TEST_F(EtcdTest, ArbiterLeaseDeadlineStopsWhenEtcdIsUnreachable) {
  auto a = NewArbiter(server_->endpoint());
  ASSERT_TRUE(a->Start(Me("a")).ok());
  const auto first = a->LeaseDeadline();
  // Renewals move the deadline on (await one).
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (a->LeaseDeadline() == first && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(50ms);
  EXPECT_GT(a->LeaseDeadline(), first);
  server_->Kill(SIGSTOP);
  const auto paused = std::chrono::steady_clock::now();
  // Never later than TTL - margin after the last renewal was sent.
  EXPECT_LE(a->LeaseDeadline(), paused + 1500ms + 10ms);
  std::this_thread::sleep_for(2s);  // renewals fail meanwhile (bounded by the request timeout)
  EXPECT_LT(a->LeaseDeadline(), std::chrono::steady_clock::now()) << "the deadline moved without etcd";
  server_->Kill(SIGCONT);
  a->Stop();
}

TEST(EtcdEndpointsTest, ParseEndpoints) {
  auto eps = ParseEndpoints("http://127.0.0.1:2379,localhost:2380/");
  ASSERT_TRUE(eps.ok());
  EXPECT_EQ(*eps, (std::vector<std::string>{"127.0.0.1:2379", "localhost:2380"}));
  for (const char* bad : {"", "nohost", "h:", ":1", "h:x1", "https://h:1", "a:1,,b:2"}) {
    EXPECT_FALSE(ParseEndpoints(bad).ok()) << bad;
  }
  EXPECT_EQ(PrefixEnd("/a/"), "/a0");
}

}  // namespace
}  // namespace replica::etcd
