// Sessions over real loopback sockets: handshake and authentication, data
// without user-space copies, flow control, heartbeats, timeouts, and every
// kind of bad input while a good session keeps streaming.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>

#include "tests/support/test_util.h"
#include "transport/frame.h"
#include "transport/transport.h"

namespace replica::transport {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Records what a Handler sees; tests wait on it with deadlines.
class Recorder : public Handler {
 public:
  void OnEstablished(const std::shared_ptr<Session>& s) override {
    std::lock_guard<std::mutex> l(mu_);
    established_.push_back(s);
    cv_.notify_all();
  }
  void OnControl(const std::shared_ptr<Session>& s, const proto::Control& msg) override {
    std::lock_guard<std::mutex> l(mu_);
    if (msg.has_heartbeat()) {
      heartbeats_.push_back(msg.heartbeat());
    } else {
      controls_.push_back(msg);
    }
    cv_.notify_all();
  }
  void OnData(const std::shared_ptr<Session>& s, std::string_view payload) override {
    {
      std::unique_lock<std::mutex> l(mu_);
      gate_cv_.wait(l, [&] { return gate_open_; });  // a slow consumer, when the gate is shut
      data_ += payload;
      ++data_frames_;
    }
    cv_.notify_all();
  }
  void OnReadIdle(const std::shared_ptr<Session>& s) override {
    std::lock_guard<std::mutex> l(mu_);
    idle_after_.push_back(data_frames_);
    idle_closed_.push_back(s->closed());
    cv_.notify_all();
  }
  void OnWritable(const std::shared_ptr<Session>&) override {
    std::lock_guard<std::mutex> l(mu_);
    ++writable_;
    cv_.notify_all();
  }
  void OnClosed(const std::shared_ptr<Session>& s, const Status& why) override {
    std::lock_guard<std::mutex> l(mu_);
    closed_.push_back(why);
    cv_.notify_all();
  }
  void FillHeartbeat(proto::Heartbeat* hb) override {
    hb->set_last_lsn(4242);
    hb->set_epoch(7);
  }

  template <typename Pred>
  bool WaitFor(Pred pred, std::chrono::milliseconds timeout = 20s) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, timeout, [&] { return pred(); });
  }
  void SetGate(bool open) {
    std::lock_guard<std::mutex> l(mu_);
    gate_open_ = open;
    gate_cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_, gate_cv_;
  bool gate_open_ = true;
  std::vector<std::shared_ptr<Session>> established_;
  std::vector<proto::Control> controls_;
  std::vector<proto::Heartbeat> heartbeats_;
  std::vector<Status> closed_;
  std::string data_;
  size_t data_frames_ = 0;
  std::vector<size_t> idle_after_;  // data_frames_ at each OnReadIdle
  std::vector<bool> idle_closed_;   // and whether the session had closed by then
  int writable_ = 0;
};

Options Opts(const std::string& id, const std::string& secret = "s3cret") {
  Options o;
  o.node_id = id;
  o.cluster = "test";
  o.secret = secret;
  o.heartbeat_interval = 50ms;
  o.peer_timeout = 5s;
  o.handshake_timeout = 2s;
  return o;
}

struct Pair {
  Recorder server_rec, client_rec;
  std::unique_ptr<Endpoint> server, client;
  uint16_t port = 0;
  std::shared_ptr<Session> client_session;

  void Start(Options so, Options co) {
    StartServer(so);
    ConnectClient(co);
  }
  void StartServer(Options so) {
    auto s = Endpoint::Create(so, &server_rec);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server = std::move(s).value();
    auto p = server->Listen("127.0.0.1", 0);  // a free port, picked by the OS
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    port = *p;
  }
  void ConnectClient(Options co) {
    auto c = Endpoint::Create(co, &client_rec);
    ASSERT_TRUE(c.ok());
    client = std::move(c).value();
    auto cs = client->Connect("127.0.0.1", port);
    ASSERT_TRUE(cs.ok());
    client_session = *cs;
  }
  bool WaitEstablished() {
    return server_rec.WaitFor([&] { return !server_rec.established_.empty(); }) &&
           client_rec.WaitFor([&] { return !client_rec.established_.empty(); });
  }
  ~Pair() {
    server_rec.SetGate(true);  // a test that failed with the gate shut must not hang here
    client_rec.SetGate(true);
    if (client) client->Stop();
    if (server) server->Stop();
  }
};

TEST(SessionTest, HandshakeThenControlBothWays) {
  Pair p;
  p.Start(Opts("srv"), Opts("cli"));
  ASSERT_TRUE(p.WaitEstablished());
  EXPECT_EQ(p.client_session->peer_id(), "srv");
  EXPECT_EQ(p.server_rec.established_[0]->peer_id(), "cli");
  proto::Control sub;
  sub.mutable_subscribe()->set_from_lsn(77);
  ASSERT_TRUE(p.client_session->SendControl(sub).ok());
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.controls_.empty(); }));
  EXPECT_EQ(p.server_rec.controls_[0].subscribe().from_lsn(), 77u);
  proto::Control ack;
  ack.mutable_ack()->set_flushed_lsn(76);
  ASSERT_TRUE(p.server_rec.established_[0]->SendControl(ack).ok());
  ASSERT_TRUE(p.client_rec.WaitFor([&] { return !p.client_rec.controls_.empty(); }));
  EXPECT_EQ(p.client_rec.controls_[0].ack().flushed_lsn(), 76u);
  EXPECT_EQ(p.server->stats().sessions_established.load(), 1u);
  EXPECT_EQ(p.server->stats().auth_failures.load(), 0u);
}

TEST(SessionTest, APeerGivenByNameIsLookedUpByTheSessionNotByConnect) {
  // Connect never waits for a DNS server (a promotion sends its fences
  // through it): it returns at once for any name, and the session looks
  // the name up, connects, or closes naming the host it could not find.
  Pair p;
  p.StartServer(Opts("srv"));
  auto c = Endpoint::Create(Opts("cli"), &p.client_rec);
  ASSERT_TRUE(c.ok());
  p.client = std::move(c).value();
  auto named = p.client->Connect("localhost", p.port);
  ASSERT_TRUE(named.ok()) << named.status().ToString();
  ASSERT_TRUE(p.WaitEstablished());
  EXPECT_EQ(p.client_rec.established_[0]->peer_id(), "srv");
  // .invalid never resolves (RFC 6761). The old Connect failed here itself.
  auto nowhere = p.client->Connect("no-such-host.invalid", p.port);
  ASSERT_TRUE(nowhere.ok()) << nowhere.status().ToString();
  ASSERT_TRUE(p.client_rec.WaitFor([&] { return !p.client_rec.closed_.empty(); }));
  const Status why = p.client_rec.closed_[0];
  EXPECT_TRUE(why.IsNotFound() || why.code() == StatusCode::kTimedOut) << why.ToString();
  EXPECT_NE(why.message().find("no-such-host.invalid"), std::string::npos) << why.ToString();
  EXPECT_TRUE(nowhere.value()->closed());
  EXPECT_EQ(p.client->Connect("", p.port).status().code(), StatusCode::kInvalidArgument);
}

TEST(SessionTest, ConcurrentSendersKeepEachOnesOrderAndEveryByte) {
  // Four threads send control frames and data frames at once: some go out
  // inline on the caller's thread, some through the session's queue (and a
  // slow receiver makes inline sends meet a full socket and hand the rest
  // over). Every frame must arrive whole, each thread's in its order.
  Pair p;
  Options so = Opts("srv");
  so.max_send_queue_bytes = 64u << 20;
  p.Start(so, Opts("cli"));
  ASSERT_TRUE(p.WaitEstablished());
  constexpr int kThreads = 4, kFrames = 2000;
  std::vector<std::thread> senders;
  std::atomic<int> senders_done{0};
  auto payload = std::make_shared<std::string>(48 << 10, 'x');
  p.server_rec.SetGate(false);  // the receiver stalls at first: sockets fill up
  for (int t = 0; t < kThreads; ++t) {
    senders.emplace_back([&, t] {
      for (int i = 0; i < kFrames; ++i) {
        proto::Control msg;
        msg.mutable_ack()->set_flushed_lsn(static_cast<uint64_t>(t) << 32 | static_cast<uint64_t>(i));
        ASSERT_TRUE(p.client_session->SendControl(msg).ok());
        if (i % 50 == 0) {
          Status st = p.client_session->SendData(payload, payload->data(), payload->size());
          while (st.code() == StatusCode::kBusy) {
            std::this_thread::yield();  // a full queue: the test sender simply tries again
            st = p.client_session->SendData(payload, payload->data(), payload->size());
          }
          ASSERT_TRUE(st.ok()) << st.ToString();
        }
      }
      ++senders_done;
    });
  }
  // The gate opens once the socket buffers are full and frames queue up
  // behind them (or the senders are done: then every frame is in flight).
  test::Eventually([&] { return p.client_session->queued_bytes() >= (1u << 20) || senders_done.load() == kThreads; },
                   10s, 1ms);  // queued_bytes raises no event
  p.server_rec.SetGate(true);
  for (auto& t : senders) t.join();
  const size_t want_data = static_cast<size_t>(kThreads) * (kFrames / 50) * payload->size();
  ASSERT_TRUE(p.server_rec.WaitFor([&] {
    return p.server_rec.controls_.size() == static_cast<size_t>(kThreads * kFrames) && p.server_rec.data_.size() == want_data;
  }, 60s)) << p.server_rec.controls_.size() << " controls, " << p.server_rec.data_.size() << " data bytes";
  std::vector<int64_t> next(kThreads, 0);
  std::lock_guard<std::mutex> l(p.server_rec.mu_);
  for (const auto& c : p.server_rec.controls_) {
    const uint64_t v = c.ack().flushed_lsn();
    const int t = static_cast<int>(v >> 32);
    ASSERT_LT(t, kThreads);
    ASSERT_EQ(static_cast<int64_t>(v & 0xffffffffu), next[t]) << "thread " << t << " out of order";
    ++next[t];
  }
  EXPECT_EQ(p.server_rec.data_.find_first_not_of('x'), std::string::npos);
  EXPECT_EQ(p.client->stats().payload_bytes_copied.load(), 0u);
  EXPECT_TRUE(p.server_rec.closed_.empty());
}

// OnReadIdle comes once per burst: after the last of the data frames that
// were already waiting in the socket, not after each of them, and again
// after a frame that arrives alone.
TEST(SessionTest, ReadIdleEndsABurstOfDataFrames) {
  Pair p;
  p.Start(Opts("srv"), Opts("cli"));
  ASSERT_TRUE(p.WaitEstablished());
  auto payload = std::make_shared<std::string>(1000, 'x');
  p.server_rec.SetGate(false);  // the server's I/O thread holds the first frame
  constexpr size_t kBurst = 5;
  for (size_t i = 0; i < kBurst; ++i) {
    ASSERT_TRUE(p.client_session->SendData(payload, payload->data(), payload->size()).ok());
  }
  // Every byte is in the server's socket once the client has sent it
  // (loopback delivers within the send); the stat raises no event.
  ASSERT_TRUE(
      test::Eventually([&] { return p.client->stats().data_bytes_sent.load() == kBurst * payload->size(); }, 10s, 1ms));
  p.server_rec.SetGate(true);
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.idle_after_.empty(); }));
  {
    std::lock_guard<std::mutex> l(p.server_rec.mu_);
    EXPECT_EQ(p.server_rec.idle_after_, std::vector<size_t>{kBurst});
  }
  ASSERT_TRUE(p.client_session->SendData(payload, payload->data(), payload->size()).ok());
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return p.server_rec.idle_after_.size() == 2; }));
  // Control frames alone (heartbeats every 50 ms here) end no burst.
  size_t beats;
  {
    std::lock_guard<std::mutex> l(p.server_rec.mu_);
    beats = p.server_rec.heartbeats_.size();
  }
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return p.server_rec.heartbeats_.size() >= beats + 3; }));
  std::lock_guard<std::mutex> l(p.server_rec.mu_);
  EXPECT_EQ(p.server_rec.idle_after_, (std::vector<size_t>{kBurst, kBurst + 1}));
  EXPECT_EQ(p.server_rec.data_frames_, kBurst + 1);
}

// Whole frames followed by part of one (the peer stopped mid-frame) end
// their burst at once: the handler hears of them before the connection's
// end, not only with it.
TEST(SessionTest, ReadIdleDoesNotWaitForAFrameStillArriving) {
  Pair p;
  p.Start(Opts("srv"), Opts("cli"));
  ASSERT_TRUE(p.WaitEstablished());
  p.server_rec.SetGate(false);
  auto small = std::make_shared<std::string>(1000, 's');
  auto big = std::make_shared<std::string>(32u << 20, 'b');  // more than loopback's socket buffers hold
  ASSERT_TRUE(p.client_session->SendData(small, small->data(), small->size()).ok());
  // Sent before the big one is queued: a queue that holds anything refuses
  // a frame past max_send_queue_bytes.
  ASSERT_TRUE(test::Eventually([&] { return p.client->stats().data_bytes_sent.load() >= small->size(); }, 10s, 1ms));
  ASSERT_TRUE(p.client_session->SendData(big, big->data(), big->size()).ok());
  // The big frame is stuck part-way (the server reads nothing); the client
  // then goes away mid-frame.
  p.client->Stop();
  p.server_rec.SetGate(true);
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.closed_.empty(); }));
  std::lock_guard<std::mutex> l(p.server_rec.mu_);
  EXPECT_EQ(p.server_rec.data_frames_, 1u);
  EXPECT_EQ(p.server_rec.idle_after_, std::vector<size_t>{1});
  EXPECT_EQ(p.server_rec.idle_closed_, std::vector<bool>{false}) << "the burst ended only with the connection";
}

TEST(SessionTest, WrongSecretIsRefusedAndCounted) {
  Pair p;
  p.Start(Opts("srv", "right"), Opts("cli", "wrong"));
  ASSERT_TRUE(p.client_rec.WaitFor([&] { return !p.client_rec.closed_.empty(); }));
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.closed_.empty(); }));
  EXPECT_TRUE(p.client_rec.established_.empty());
  EXPECT_TRUE(p.server_rec.established_.empty());
  // The client catches the server's proof first and refuses to go on.
  EXPECT_EQ(p.client->stats().auth_failures.load(), 1u);
  EXPECT_NE(p.client_rec.closed_[0].message().find("cluster secret"), std::string::npos)
      << p.client_rec.closed_[0].ToString();
  EXPECT_FALSE(p.client_session->SendControl(proto::Control()).ok());
}

// A peer's id becomes file names on the active (its checkpoint directory,
// its slot): one that is not a plain name is refused at the handshake. An id
// of "../../victim" made the active delete a directory outside its own.
TEST(SessionTest, APeerWhoseIdIsNotAPlainNameIsRefused) {
  for (const char* bad : {"../../victim", "b x", "a/b", ".."}) {
    Pair p;
    p.Start(Opts("srv"), Opts(bad));
    ASSERT_TRUE(p.client_rec.WaitFor([&] { return !p.client_rec.closed_.empty(); })) << bad;
    EXPECT_TRUE(p.server_rec.established_.empty()) << bad;
    EXPECT_NE(p.client_rec.closed_[0].message().find("peer node id"), std::string::npos)
        << bad << ": " << p.client_rec.closed_[0].ToString();
  }
}

TEST(SessionTest, HeartbeatsCarryLsnsAndEcho) {
  Pair p;
  p.Start(Opts("srv"), Opts("cli"));
  ASSERT_TRUE(p.WaitEstablished());
  ASSERT_TRUE(p.client_rec.WaitFor([&] {
    return p.client_rec.heartbeats_.size() >= 3 && p.client_rec.heartbeats_.back().echo_unix_us() != 0;
  }));
  const auto hb = p.client_rec.heartbeats_.back();
  EXPECT_EQ(hb.last_lsn(), 4242u);
  EXPECT_EQ(hb.epoch(), 7u);
  EXPECT_GT(hb.sent_unix_us(), hb.echo_unix_us() - 1);
}

TEST(SessionTest, SilentPeerIsClosed) {
  Options so = Opts("srv");
  so.peer_timeout = 300ms;
  Options co = Opts("cli");
  co.heartbeat_interval = 60s;  // the client says nothing after the handshake
  Pair p;
  p.Start(so, co);
  ASSERT_TRUE(p.WaitEstablished());
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.closed_.empty(); }));
  EXPECT_TRUE(p.server_rec.closed_[0].IsTimedOut()) << p.server_rec.closed_[0].ToString();
  EXPECT_EQ(p.server->stats().peer_timeouts.load(), 1u);
}

// Data from memory and from a file arrives intact, and the send path copies
// nothing in user space.
TEST(SessionTest, DataWithoutCopies) {
  for (bool sendfile : {true, false}) {
    Options co = Opts("cli");
    co.use_sendfile = sendfile;
    Pair p;
    p.Start(Opts("srv"), co);
    ASSERT_TRUE(p.WaitEstablished());
    auto mem = std::make_shared<std::string>(test::Payload(1, 300000));
    test::TempDir dir;
    const std::string path = dir.Sub("span");
    const std::string file_bytes = test::Payload(2, 1 << 20);
    test::WriteFileBytes(path, file_bytes);
    int fd = ::open(path.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    auto keep = std::shared_ptr<int>(new int(fd), [](int* f) { ::close(*f); delete f; });
    ASSERT_TRUE(p.client_session->SendData(mem, mem->data(), mem->size()).ok());
    ASSERT_TRUE(p.client_session->SendFile(keep, fd, 1000, file_bytes.size() - 1000).ok());
    const size_t want = mem->size() + file_bytes.size() - 1000;
    ASSERT_TRUE(p.server_rec.WaitFor([&] { return p.server_rec.data_.size() >= want; }));
    EXPECT_EQ(p.server_rec.data_, *mem + file_bytes.substr(1000));
    EXPECT_EQ(p.server_rec.data_frames_, 2u);
    // The sender counts a frame once its write completes, which may be just
    // after the receiver has it all: a bounded wait (stats raise no event).
    test::Eventually([&] { return p.client->stats().data_bytes_sent.load() >= want; }, 10s, 1ms);
    EXPECT_EQ(p.client->stats().payload_bytes_copied.load(), sendfile ? 0u : file_bytes.size() - 1000);
    EXPECT_EQ(p.client->stats().data_bytes_sent.load(), want);
  }
}

// The descriptor of this process's socket connected to 127.0.0.1:port, or -1.
int SocketConnectedTo(uint16_t port) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    const int fd = std::atoi(entry.path().filename().c_str());
    sockaddr_in peer{};
    socklen_t len = sizeof peer;
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) == 0 && peer.sin_family == AF_INET &&
        ntohs(peer.sin_port) == port) {
      return fd;
    }
  }
  return -1;
}

// sendfile(2) has no MSG_NOSIGNAL: on a connection that can no longer send
// it fails with EPIPE and raises SIGPIPE, whose default action ends the
// process. A program that embeds the engine need not ignore SIGPIPE, so the
// session must fail and close without it. The receiver stops reading after
// a first small frame, so a large span goes out in part (its header and what
// fits inline) and the strand waits to send the rest; the test then shuts the
// client's socket for writing behind the session's back (as a reset by the
// peer does), and the strand's next sendfile meets EPIPE. (The inline
// sendfile goes through the same guard; a test cannot make it, rather than
// the header's send, meet the error.)
TEST(SessionTest, AFileSpanOnAConnectionThatCannotSendClosesTheSessionWithoutSigpipe) {
  struct SigpipeDefault {
    struct sigaction before {};
    SigpipeDefault() {
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      ::sigaction(SIGPIPE, &dfl, &before);
    }
    ~SigpipeDefault() { ::sigaction(SIGPIPE, &before, nullptr); }
  } sigpipe_default;
  test::TempDir dir;
  const std::string path = dir.Sub("span");
  const size_t big = 40u << 20;  // more than the loopback buffers hold while the receiver does not read
  test::WriteFileBytes(path, test::Payload(3, big));
  int fd = ::open(path.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  auto keep = std::shared_ptr<int>(new int(fd), [](int* f) { ::close(*f); delete f; });
  Options co = Opts("cli");
  co.max_send_queue_bytes = 64u << 20;
  Pair p;
  p.Start(Opts("srv"), co);
  ASSERT_TRUE(p.WaitEstablished());
  p.server_rec.SetGate(false);  // the server's OnData holds the first frame: it reads no more
  ASSERT_TRUE(p.client_session->SendFile(keep, fd, 0, 1024).ok());
  ASSERT_TRUE(p.client_session->SendFile(keep, fd, 0, big).ok());
  const int sock = SocketConnectedTo(p.port);
  ASSERT_GE(sock, 0);
  ASSERT_EQ(::shutdown(sock, SHUT_WR), 0);
  ASSERT_TRUE(test::Eventually([&] { return p.client_session->closed(); }, 10s));
  EXPECT_NE(p.client_session->close_status().ToString().find("sendfile"), std::string::npos)
      << p.client_session->close_status().ToString();
}

TEST(SessionTest, SlowReceiverBoundsTheSendQueue) {
  Options co = Opts("cli");
  co.max_send_queue_bytes = 1 << 20;
  Pair p;
  p.Start(Opts("srv"), co);
  ASSERT_TRUE(p.WaitEstablished());
  p.server_rec.SetGate(false);  // the receiver stops consuming
  auto chunk = std::make_shared<std::string>(64 << 10, 'z');
  size_t sent = 0;
  Status st;
  // Keep offering until the sender refuses: socket buffers fill, then the queue.
  for (int i = 0; i < 100000 && st.ok(); ++i) {
    st = p.client_session->SendData(chunk, chunk->data(), chunk->size());
    if (st.ok()) sent += chunk->size();
  }
  EXPECT_EQ(st.code(), StatusCode::kBusy) << st.ToString();
  EXPECT_LE(p.client_session->queued_bytes(), co.max_send_queue_bytes + chunk->size() + 64);
  EXPECT_GE(p.client->stats().send_queue_full.load(), 1u);
  p.server_rec.SetGate(true);
  ASSERT_TRUE(p.client_rec.WaitFor([&] { return p.client_rec.writable_ > 0; })) << "no OnWritable";
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return p.server_rec.data_.size() == sent; }));
  EXPECT_TRUE(p.client_session->established());
}

// A control message of 1 MiB (a logdiff reply holds up to 4 MiB).
proto::Control BigControl(uint64_t id, size_t bytes = 1u << 20) {
  proto::Control c;
  c.mutable_diff_reply()->set_id(id);
  c.mutable_diff_reply()->add_keys(std::string(bytes, 'k'));
  return c;
}

// Control messages are not refused for a full queue, but a peer that asks
// and never reads the answers must not grow the node's memory for ever (a
// logdiff client that did so took a node from 32 MB to 842 MB): past
// max_control_queue_bytes the session is closed.
TEST(SessionTest, APeerThatDoesNotReadIsClosedOnceItsControlQueueIsFull) {
  Options so = Opts("srv");
  so.max_control_queue_bytes = 4u << 20;
  Pair p;
  p.Start(so, Opts("cli"));
  ASSERT_TRUE(p.WaitEstablished());
  // The client stops reading at its first data frame (its handler holds it).
  p.client_rec.SetGate(false);
  auto chunk = std::make_shared<std::string>(1000, 'd');
  auto server_session = p.server_rec.established_[0];
  ASSERT_TRUE(server_session->SendData(chunk, chunk->data(), chunk->size()).ok());
  // Socket buffers fill (some MiB on loopback), then the queue.
  Status st;
  int sent = 0;
  for (; sent < 512 && st.ok(); ++sent) {  // far past any loopback buffers
    st = server_session->SendControl(BigControl(static_cast<uint64_t>(sent)));
    EXPECT_LE(server_session->queued_bytes(), so.max_control_queue_bytes + chunk->size() + 64) << sent;
  }
  ASSERT_EQ(st.code(), StatusCode::kBusy) << sent << " MiB of replies queued for a peer that reads nothing: "
                                          << st.ToString();
  EXPECT_NE(st.message().find("does not read"), std::string::npos) << st.ToString();
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.closed_.empty(); }));
  EXPECT_EQ(p.server_rec.closed_[0].code(), StatusCode::kBusy) << p.server_rec.closed_[0].ToString();
  EXPECT_EQ(p.server->stats().sessions_not_reading.load(), 1u);
  EXPECT_TRUE(server_session->SendControl(BigControl(99)).IsAborted());
  EXPECT_EQ(p.server->stats().sessions_not_reading.load(), 1u) << "counted once";
}

// A control message the peer would refuse (past max_frame_payload) is not
// sent: the caller is told, and the session goes on. A node sent one of
// 83,886,423 bytes, which every peer refuses at 64 MiB.
TEST(SessionTest, AControlMessageLargerThanTheFrameLimitIsNotSent) {
  Options co = Opts("cli");
  co.max_frame_payload = 1u << 20;
  Pair p;
  p.Start(Opts("srv"), co);  // the server would take it (64 MiB)
  ASSERT_TRUE(p.WaitEstablished());
  Status st = p.client_session->SendControl(BigControl(1, (1u << 20) + 1));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("max_frame_payload"), std::string::npos) << st.ToString();
  ASSERT_TRUE(p.client_session->SendControl(BigControl(2, 1000)).ok());
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.controls_.empty(); }));
  std::lock_guard<std::mutex> l(p.server_rec.mu_);
  EXPECT_EQ(p.server_rec.controls_[0].diff_reply().id(), 2u) << "the oversized message went out";
  EXPECT_TRUE(p.client_session->established());
}

// ---- a raw TCP peer for bad input

class RawPeer {
 public:
  explicit RawPeer(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    timeval tv{0, 100000};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  ~RawPeer() { ::close(fd_); }
  bool connected() const { return connected_; }
  void Send(const std::string& bytes) { (void)::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL); }
  // True once the server has closed the connection (EOF or reset).
  bool WaitClosed(std::chrono::milliseconds timeout = 10s) {
    auto deadline = Clock::now() + timeout;
    char buf[4096];
    while (Clock::now() < deadline) {
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n == 0) return true;
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return true;
      if (n > 0) received_.append(buf, static_cast<size_t>(n));
    }
    return false;
  }
  const std::string& received() const { return received_; }

 private:
  int fd_;
  bool connected_;
  std::string received_;
};

std::string Frame(FrameType type, const std::string& payload) {
  char h[kFrameHeaderSize];
  EncodeFrameHeader(type, static_cast<uint32_t>(payload.size()), h);
  return std::string(h, sizeof h) + payload;
}

std::string HelloFrame(uint32_t version) {
  proto::Control c;
  c.mutable_hello()->set_protocol_version(version);
  c.mutable_hello()->set_cluster("test");
  c.mutable_hello()->set_node_id("raw");
  c.mutable_hello()->set_nonce(std::string(32, 'n'));
  return Frame(FrameType::kControl, c.SerializeAsString());
}

TEST(SessionTest, OtherProtocolVersionIsRefusedWithAnError) {
  Pair p;
  p.Start(Opts("srv"), Opts("cli"));
  RawPeer raw(p.port);
  ASSERT_TRUE(raw.connected());
  raw.Send(HelloFrame(99));
  ASSERT_TRUE(raw.WaitClosed());
  EXPECT_NE(raw.received().find("version 99"), std::string::npos) << "the refusal says why";
  EXPECT_EQ(p.server->stats().version_mismatches.load(), 1u);
}

// Before authentication, a peer's Error text is anyone's: it reaches the
// close status (and the log line) cut short. A forged log line once came
// this way.
TEST(SessionTest, AnUnauthenticatedPeersErrorTextIsCutShort) {
  Pair p;
  p.StartServer(Opts("srv"));
  RawPeer raw(p.port);
  ASSERT_TRUE(raw.connected());
  const std::string text = "x\"\n2026-12-02T00:00:00.000Z WARN engine.promoted node=evil " + std::string(3000, 'e');
  proto::Control c;
  c.mutable_error()->set_message(text);
  raw.Send(Frame(FrameType::kControl, c.SerializeAsString()));
  ASSERT_TRUE(raw.WaitClosed());
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.closed_.empty(); }));
  const std::string why = p.server_rec.closed_[0].message();
  EXPECT_LT(why.size(), 300u) << why;
  EXPECT_NE(why.find("(" + std::to_string(text.size()) + " bytes)"), std::string::npos) << why;
}

// A server that is not yet proved to be of the cluster names itself in its
// Challenge: a name that is not a plain one is refused before it is used
// or logged, as the server refuses the client's.
TEST(SessionTest, AServerWhoseIdIsNotAPlainNameIsRefused) {
  const int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(lfd, 1), 0);
  socklen_t len = sizeof a;
  ::getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
  Recorder rec;
  auto ep = std::move(Endpoint::Create(Opts("cli"), &rec)).value();
  auto session = ep->Connect("127.0.0.1", ntohs(a.sin_port));
  ASSERT_TRUE(session.ok());
  const int fd = ::accept(lfd, nullptr, nullptr);
  ASSERT_GE(fd, 0);
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  auto read_exactly = [&](size_t n) {
    std::string out(n, '\0');
    size_t got = 0;
    while (got < n) {
      const ssize_t r = ::recv(fd, out.data() + got, n - got, 0);
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    out.resize(got);
    return out;
  };
  const std::string header = read_exactly(kFrameHeaderSize);  // the client's Hello
  FrameHeader h;
  ASSERT_TRUE(header.size() == kFrameHeaderSize && DecodeFrameHeader(header.data(), kMaxHandshakeFrame, &h).ok());
  ASSERT_EQ(read_exactly(h.payload_len).size(), h.payload_len);
  proto::Control c;
  c.mutable_challenge()->set_nonce(std::string(32, 'n'));
  c.mutable_challenge()->set_node_id("evil\n2026-12-02T00:00:00.000Z WARN engine.promoted node=evil");
  c.mutable_challenge()->set_proof(std::string(32, 'p'));
  const std::string frame = Frame(FrameType::kControl, c.SerializeAsString());
  ASSERT_EQ(::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL), static_cast<ssize_t>(frame.size()));
  ASSERT_TRUE(rec.WaitFor([&] { return !rec.closed_.empty(); }));
  EXPECT_NE(rec.closed_[0].message().find("peer node id"), std::string::npos) << rec.closed_[0].ToString();
  EXPECT_EQ(ep->stats().protocol_errors.load(), 1u);
  EXPECT_EQ(ep->stats().auth_failures.load(), 0u) << "the id was used before it was checked";
  EXPECT_EQ((*session)->peer_id(), "");
  ep->Stop();
  ::close(fd);
  ::close(lfd);
}

TEST(SessionTest, BadInputClosesOnlyThatConnection) {
  Options so = Opts("srv");
  so.handshake_timeout = 500ms;
  so.max_frame_payload = 1 << 20;
  Pair p;
  p.Start(so, Opts("cli"));
  ASSERT_TRUE(p.WaitEstablished());

  // A good session streams the whole time.
  std::atomic<bool> stop{false};
  std::atomic<size_t> good_sent{0};
  std::thread streamer([&] {
    auto chunk = std::make_shared<std::string>(test::Payload(9, 4096));
    while (!stop.load()) {
      if (p.client_session->SendData(chunk, chunk->data(), chunk->size()).ok()) {
        good_sent += chunk->size();
      } else {
        std::this_thread::yield();
      }
    }
  });

  char hdr[kFrameHeaderSize];
  EncodeFrameHeader(FrameType::kControl, 10, hdr);
  std::string bad_checksum(hdr, sizeof hdr);
  bad_checksum[13] ^= 1;
  EncodeFrameHeader(FrameType::kControl, 100 << 20, hdr);
  std::string oversized(hdr, sizeof hdr);
  std::string unknown_type = Frame(FrameType::kControl, "x");
  unknown_type[4] = 9;
  std::map<std::string, std::string> cases = {
      {"garbage", "GET / HTTP/1.1\r\nHost: x\r\n\r\n"},
      {"bad_checksum", bad_checksum + std::string(10, 'a')},
      {"oversized", oversized},
      {"unknown_type", unknown_type},
      {"data_before_handshake", Frame(FrameType::kData, "wal bytes")},
      {"unparseable_control", Frame(FrameType::kControl, std::string(40, '\xff'))},
      {"control_before_hello", Frame(FrameType::kControl, [] {
         proto::Control c;
         c.mutable_subscribe()->set_from_lsn(1);
         return c.SerializeAsString();
       }())},
      {"truncated_frame", Frame(FrameType::kControl, std::string(100, 'a')).substr(0, 50)},
      {"slowloris", "R"},
      {"silent", ""},
  };
  std::vector<std::unique_ptr<RawPeer>> peers;
  for (const auto& [name, bytes] : cases) {
    peers.push_back(std::make_unique<RawPeer>(p.port));
    ASSERT_TRUE(peers.back()->connected()) << name;
    peers.back()->Send(bytes);
  }
  size_t i = 0;
  for (const auto& [name, bytes] : cases) {
    EXPECT_TRUE(peers[i++]->WaitClosed()) << name << ": the server kept the connection open";
  }
  const auto& st = p.server->stats();
  EXPECT_GE(st.protocol_errors.load(), 6u);
  EXPECT_GE(st.handshake_timeouts.load(), 3u);  // truncated, slowloris, silent
  EXPECT_EQ(st.sessions_established.load(), 1u);

  stop = true;
  streamer.join();
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return p.server_rec.data_.size() == good_sent.load(); }))
      << "the good session lost data";
  EXPECT_TRUE(p.client_session->established());
  std::lock_guard<std::mutex> l(p.server_rec.mu_);
  EXPECT_EQ(p.server_rec.closed_.size(), cases.size()) << "only the bad connections closed";
}

using test::CapturedStderr;

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Anyone who can connect can have connections closed or refused before
// they authenticate, as often as they like: a line each (85 a second in the
// audit) is limited to one per 10 s, which says how many it left out.
TEST(SessionTest, ClosesAndRefusalsBeforeAuthenticationAreLoggedAtMostOnceIn10s) {
  Options so = Opts("srv");
  so.handshake_timeout = 1s;  // long enough that a refused peer's Hello is read first, even on a loaded machine
  Pair p;
  p.StartServer(so);
  constexpr size_t kEach = 5;
  const std::string log = CapturedStderr([&] {
    std::vector<std::unique_ptr<RawPeer>> peers;
    for (size_t i = 0; i < 2 * kEach; ++i) {
      peers.push_back(std::make_unique<RawPeer>(p.port));
      ASSERT_TRUE(peers.back()->connected());
      if (i < kEach) peers.back()->Send(HelloFrame(99));  // refused; the others time out
    }
    ASSERT_TRUE(p.server_rec.WaitFor([&] { return p.server_rec.closed_.size() == 2 * kEach; }));
  });
  EXPECT_EQ(p.server->stats().version_mismatches.load(), kEach);
  EXPECT_EQ(p.server->stats().handshake_timeouts.load(), kEach);
  EXPECT_EQ(Count(log, " transport.refused "), 1u) << log;
  EXPECT_EQ(Count(log, " transport.closed "), 1u) << log;
}

// Established sessions are held up to max_connections: a connection
// accepted past it is closed at once, and the sessions held are not
// disturbed; a freed place can be taken again.
TEST(SessionTest, ConnectionsPastTheCapAreClosedAtOnce) {
  Options so = Opts("srv");
  so.max_connections = 1;  // the client's session
  Pair p;
  p.Start(so, Opts("cli"));
  ASSERT_TRUE(p.WaitEstablished());
  RawPeer refused(p.port);
  ASSERT_TRUE(refused.connected());  // the kernel accepts; the endpoint closes it
  EXPECT_TRUE(refused.WaitClosed(1s)) << "a connection past the cap was kept (the handshake timeout is 2 s)";
  EXPECT_EQ(p.server->stats().connections_refused.load(), 1u);
  EXPECT_TRUE(p.client_session->established());
  proto::Control c;
  c.mutable_heartbeat()->set_last_lsn(7);
  EXPECT_TRUE(p.client_session->SendControl(c).ok());
  // The place frees once the session closed.
  p.client->Stop();
  ASSERT_TRUE(p.server_rec.WaitFor([&] { return !p.server_rec.closed_.empty(); }));
  Recorder rec;
  auto again = std::move(Endpoint::Create(Opts("cli2"), &rec)).value();
  ASSERT_TRUE(again->Connect("127.0.0.1", p.port).ok());
  ASSERT_TRUE(rec.WaitFor([&] { return !rec.established_.empty() || !rec.closed_.empty(); }));
  EXPECT_EQ(rec.established_.size(), 1u) << "a freed place was not taken again";
  again->Stop();
}

// Connections that never send a byte hold no place a real peer needs: past
// max_pending_handshakes the oldest handshake is closed for the newcomer,
// and they are not counted against max_connections. 256 idle connections
// (re-opened when dropped) once let no real peer in at all.
TEST(SessionTest, IdleConnectionsCannotKeepARealPeerOut) {
  Options so = Opts("srv");
  so.max_connections = 4;
  so.max_pending_handshakes = 4;
  so.handshake_timeout = 60s;  // the idle ones stay until evicted
  Pair p;
  p.StartServer(so);
  constexpr size_t kIdle = 12;
  std::vector<std::unique_ptr<RawPeer>> idle;
  for (size_t i = 0; i < kIdle; ++i) {
    idle.push_back(std::make_unique<RawPeer>(p.port));
    ASSERT_TRUE(idle.back()->connected());
  }
  // The endpoint has taken each of them (stats raise no event).
  const auto& st = p.server->stats();
  ASSERT_TRUE(test::Eventually([&] { return st.connections_accepted.load() + st.connections_refused.load() == kIdle; }));
  p.ConnectClient(Opts("cli"));
  ASSERT_TRUE(p.client_rec.WaitFor([&] { return !p.client_rec.established_.empty() || !p.client_rec.closed_.empty(); }));
  ASSERT_EQ(p.client_rec.established_.size(), 1u)
      << "a real peer was kept out: " << (p.client_rec.closed_.empty() ? "" : p.client_rec.closed_[0].ToString());
  ASSERT_TRUE(p.WaitEstablished());
  EXPECT_EQ(st.connections_refused.load(), 0u);
  // The oldest were closed, one for each newer connection past the cap.
  EXPECT_EQ(st.handshakes_evicted.load(), kIdle + 1 - so.max_pending_handshakes);
  for (size_t i = 0; i + so.max_pending_handshakes < kIdle + 1; ++i) {
    EXPECT_TRUE(idle[i]->WaitClosed(5s)) << "idle connection " << i << " was not evicted";
  }
  EXPECT_EQ(st.sessions_established.load(), 1u);
}

TEST(SessionTest, StopClosesEverySession) {
  Recorder server_rec, client_rec;
  auto server = std::move(Endpoint::Create(Opts("srv"), &server_rec)).value();
  uint16_t port = *server->Listen("127.0.0.1", 0);
  auto client = std::move(Endpoint::Create(Opts("cli"), &client_rec)).value();
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(client->Connect("127.0.0.1", port).ok());
  ASSERT_TRUE(server_rec.WaitFor([&] { return server_rec.established_.size() == 5; }));
  server->Stop();
  EXPECT_EQ(server_rec.closed_.size(), 5u);
  ASSERT_TRUE(client_rec.WaitFor([&] { return client_rec.closed_.size() == 5; }));
  client->Stop();
  EXPECT_FALSE(client->Connect("127.0.0.1", port).ok());
  // Handles outlive their endpoint safely: they only say the session is closed.
  server.reset();
  client.reset();
  EXPECT_TRUE(client_rec.established_[0]->SendControl(proto::Control()).IsAborted());
  EXPECT_FALSE(server_rec.established_[0]->established());
  EXPECT_EQ(server_rec.established_[0]->peer_id(), "cli");
}

TEST(SessionTest, ConnectToNothingReportsClosed) {
  Recorder rec;
  auto ep = std::move(Endpoint::Create(Opts("cli"), &rec)).value();
  // A port that was free a moment ago: bind, read it, close.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  ASSERT_TRUE(ep->Connect("127.0.0.1", ntohs(a.sin_port)).ok());
  ASSERT_TRUE(rec.WaitFor([&] { return !rec.closed_.empty(); }));
  EXPECT_TRUE(rec.closed_[0].IsIOError()) << rec.closed_[0].ToString();
  EXPECT_EQ(Endpoint::Create(Options{}, &rec).status().code(), StatusCode::kInvalidArgument);  // no secret
}

// A listener whose accept queue is full drops new SYNs, as an address that
// does not answer does: the connect is given up after the handshake
// timeout, not after the kernel's two minutes of SYN retries.
TEST(SessionTest, AConnectThatGetsNoAnswerTimesOut) {
  const int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(lfd, 0), 0);  // never accepted from
  socklen_t len = sizeof a;
  ::getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
  std::vector<int> fillers;
  for (int i = 0; i < 4; ++i) {  // fill the queue; later SYNs are dropped
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    (void)::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    fillers.push_back(fd);
  }
  Recorder rec;
  Options o = Opts("cli");
  o.handshake_timeout = 500ms;
  auto ep = std::move(Endpoint::Create(o, &rec)).value();
  ASSERT_TRUE(ep->Connect("127.0.0.1", ntohs(a.sin_port)).ok());
  ASSERT_TRUE(rec.WaitFor([&] { return !rec.closed_.empty(); })) << "the connect was not given up";
  EXPECT_TRUE(rec.closed_[0].IsTimedOut()) << rec.closed_[0].ToString();
  EXPECT_NE(rec.closed_[0].message().find("no answer within 500 ms"), std::string::npos) << rec.closed_[0].ToString();
  ep->Stop();
  for (int fd : fillers) ::close(fd);
  ::close(lfd);
}

}  // namespace
}  // namespace replica::transport
