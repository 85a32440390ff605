// transport_bench: streaming throughput and small-message round trips of the
// transport over loopback, against a plain blocking TCP baseline measured in
// the same run (docs/performance.md).
//
//   BM_RawTcpStream/<size>        one blocking sender (the benchmark thread,
//                                 send() of <size> bytes at a time) and one
//                                 receiver thread (read() into a 1 MiB buffer)
//                                 on a loopback connection.
//   BM_TransportStream/<size>     the same bytes as data frames of <size>:
//                                 Session::SendData from one shared in-memory
//                                 buffer (zero copy), respecting flow control
//                                 (on Busy, wait for OnWritable); the
//                                 receiving endpoint's OnData counts bytes.
//   BM_TransportStreamFile/65536  the same with Session::SendFile (sendfile
//                                 path) from an 8 MiB temporary file.
//   BM_RawPingPong                blocking ping-pong of the transport's framed
//                                 message size (16-byte header + payload).
//   BM_TransportPingPong          a proto::Control (Ack) to the server, whose
//                                 OnControl echoes it; the benchmark thread
//                                 waits for the echo.
//   BM_TransportPingPongCallback  diagnostic: the same round trips driven from
//                                 the client's I/O thread (OnControl sends the
//                                 next ping), without the hand-off between the
//                                 caller's thread and the I/O thread.
//
// Every stream iteration moves kBytesPerIteration bytes and ends when all of
// them have arrived; bytes_per_second counts payload bytes. Ping-pong cases
// time every round trip with a steady clock and report p50_us / p99_us.
// Each endpoint has one I/O thread (the machine has 2 cores); sockets get
// TCP_NODELAY on both sides, as the transport sets it. Endpoints and
// connections are set up once per case, before the measurement loop.
// After the runs, a summary prints transport / raw and the goals.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include "base/log.h"
#include "bench/bench_output.h"
#include "transport/frame.h"
#include "transport/transport.h"

namespace {

using namespace std::chrono_literals;
using replica::Status;
using replica::StatusCode;
using replica::transport::Endpoint;
using replica::transport::Handler;
using replica::transport::Options;
using replica::transport::Session;
using Clock = std::chrono::steady_clock;

constexpr size_t kBytesPerIteration = 64u << 20;  // per stream iteration
constexpr size_t kMaxChunk = 1u << 20;
constexpr size_t kFileBytes = 8u << 20;           // the SendFile source
constexpr double kStreamMinTime = 2.0;             // seconds per stream case
constexpr int kPingPongRounds = 20000;
constexpr int kPingPongWarmup = 1000;
constexpr uint64_t kSeqBase = 1ull << 40;          // fixed-size varints in the Ack
constexpr auto kDeadline = 60s;                    // nothing should take this long
constexpr size_t kSendQueueBytes = 16u << 20;       // Options::max_send_queue_bytes default

std::string TempRoot() {
  const char* t = getenv("TMPDIR");
  return (t != nullptr && *t != '\0') ? t : "/tmp";
}

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

// Deterministic bytes (xorshift), so nothing compresses or dedups by accident.
std::string MakePayload(size_t n) {
  std::string out(n, '\0');
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out[i] = static_cast<char>(x);
  }
  return out;
}

// The one buffer every stream case sends from (kept alive by the frames).
std::shared_ptr<const std::string> SharedPayload() {
  static const std::shared_ptr<const std::string> p = std::make_shared<const std::string>(MakePayload(kMaxChunk));
  return p;
}

Options BenchOptions(const std::string& id) {
  Options o;
  o.node_id = id;
  o.cluster = "bench";
  o.secret = "bench-secret";
  o.io_threads = 1;
  o.max_send_queue_bytes = kSendQueueBytes;
  // Heartbeats are control messages too: keep them out of the measurements.
  o.heartbeat_interval = 60s;
  o.peer_timeout = 600s;
  o.handshake_timeout = 10s;
  return o;
}

double Percentile(std::vector<double>* v, double q) {
  if (v->empty()) return 0;
  std::sort(v->begin(), v->end());
  size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(v->size())));
  rank = std::clamp<size_t>(rank, 1, v->size());
  return (*v)[rank - 1];
}

void ReportLatency(benchmark::State& state, std::vector<double>* samples_us) {
  state.counters["p50_us"] = Percentile(samples_us, 0.50);
  state.counters["p99_us"] = Percentile(samples_us, 0.99);
  state.counters["max_us"] = samples_us->empty() ? 0 : samples_us->back();  // sorted by Percentile
}

// ---------------------------------------------------------------------------
// Transport side

// One handler type for both ends. The receiver counts data bytes and echoes
// Ack control messages (echo = true); the sender sees OnWritable and echoes.
class BenchHandler final : public Handler {
 public:
  explicit BenchHandler(bool echo) : echo_(echo) {}

  void OnEstablished(const std::shared_ptr<Session>& s) override {
    std::lock_guard<std::mutex> l(mu_);
    session_ = s;
    cv_.notify_all();
  }
  void OnData(const std::shared_ptr<Session>&, std::string_view payload) override {
    const uint64_t r = received_.fetch_add(payload.size()) + payload.size();
    if (r >= target_.load()) {
      std::lock_guard<std::mutex> l(mu_);  // orders the wake-up with the waiter's check
      cv_.notify_all();
    }
  }
  void OnControl(const std::shared_ptr<Session>& s, const replica::proto::Control& msg) override {
    if (!msg.has_ack()) return;  // heartbeats
    if (echo_) {
      (void)s->SendControl(msg);
      return;
    }
    std::lock_guard<std::mutex> l(mu_);
    last_echo_ = msg.ack().flushed_lsn();
    cv_.notify_all();
  }
  void OnWritable(const std::shared_ptr<Session>&) override {
    std::lock_guard<std::mutex> l(mu_);
    writable_gen_.fetch_add(1);
    cv_.notify_all();
  }
  void OnClosed(const std::shared_ptr<Session>&, const Status& why) override {
    std::lock_guard<std::mutex> l(mu_);
    closed_ = true;
    why_ = why.ToString();
    cv_.notify_all();
  }

  bool WaitEstablished() {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, kDeadline, [&] { return session_ != nullptr || closed_; }) && session_ != nullptr;
  }

  // Stream: the cumulative byte count that ends the current iteration.
  void SetTarget(uint64_t target) { target_.store(target); }
  // False on a deadline or a closed session.
  bool WaitReceived(uint64_t target) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, kDeadline, [&] { return received_.load() >= target || closed_; }) && !closed_;
  }

  uint64_t writable_gen() const { return writable_gen_.load(); }
  // Waits for an OnWritable after generation `gen`, at most `slice`. The
  // slice is only a safety net against a missed edge; it is not polled.
  bool WaitWritable(uint64_t gen, std::chrono::milliseconds slice) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, slice, [&] { return writable_gen_.load() != gen || closed_; });
  }

  // Ping-pong: waits until the echo of `seq` is back.
  bool WaitEcho(uint64_t seq) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, kDeadline, [&] { return last_echo_ == seq || closed_; }) && !closed_;
  }

  bool closed() {
    std::lock_guard<std::mutex> l(mu_);
    return closed_;
  }
  std::string why() {
    std::lock_guard<std::mutex> l(mu_);
    return why_;
  }

 private:
  const bool echo_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Session> session_;
  bool closed_ = false;
  std::string why_;
  std::atomic<uint64_t> received_{0};
  std::atomic<uint64_t> target_{UINT64_MAX};
  std::atomic<uint64_t> writable_gen_{0};
  uint64_t last_echo_ = 0;
};

// A receiving (server) and a sending (client) endpoint with one established
// session. The handlers are declared first so that they outlive the endpoints.
struct TransportPair {
  BenchHandler server_handler{true};
  BenchHandler client_handler{false};
  std::unique_ptr<Endpoint> server;
  std::unique_ptr<Endpoint> client;
  std::shared_ptr<Session> session;  // the client's
  std::string error;

  bool Start() {
    auto s = Endpoint::Create(BenchOptions("bench-server"), &server_handler);
    if (!s.ok()) return Fail(s.status().ToString());
    server = std::move(s).value();
    auto port = server->Listen("127.0.0.1", 0);
    if (!port.ok()) return Fail(port.status().ToString());
    auto c = Endpoint::Create(BenchOptions("bench-client"), &client_handler);
    if (!c.ok()) return Fail(c.status().ToString());
    client = std::move(c).value();
    auto cs = client->Connect("127.0.0.1", *port);
    if (!cs.ok()) return Fail(cs.status().ToString());
    session = *cs;
    if (!client_handler.WaitEstablished() || !server_handler.WaitEstablished()) {
      return Fail("session not established: " + client_handler.why());
    }
    return true;
  }
  bool Fail(std::string e) {
    error = std::move(e);
    return false;
  }
  void Stop() {
    if (client) client->Stop();
    if (server) server->Stop();
  }
  ~TransportPair() { Stop(); }
};

// An unlinked temporary file holding kFileBytes of payload; the fd is closed
// when the last frame referring to it has been sent.
std::shared_ptr<int> MakeSourceFile(std::string* error) {
  std::string path = TempRoot() + "/transport_bench.XXXXXX";
  int fd = ::mkstemp(path.data());
  if (fd < 0) {
    *error = Errno("mkstemp " + path);
    return nullptr;
  }
  ::unlink(path.c_str());
  auto keep = std::shared_ptr<int>(new int(fd), [](int* f) {
    ::close(*f);
    delete f;
  });
  const auto payload = SharedPayload();
  for (size_t off = 0; off < kFileBytes; off += payload->size()) {
    const size_t n = std::min(payload->size(), kFileBytes - off);
    if (::pwrite(fd, payload->data(), n, static_cast<off_t>(off)) != static_cast<ssize_t>(n)) {
      *error = Errno("pwrite");
      return nullptr;
    }
  }
  return keep;
}

void TransportStream(benchmark::State& state, bool from_file) {
  const size_t chunk = static_cast<size_t>(state.range(0));
  const size_t frames = kBytesPerIteration / chunk;
  const auto payload = SharedPayload();
  std::string error;
  std::shared_ptr<int> file;
  if (from_file) {
    file = MakeSourceFile(&error);
    if (!file) {
      state.SkipWithError(error.c_str());
      return;
    }
  }
  TransportPair pair;
  if (!pair.Start()) {
    state.SkipWithError(pair.error.c_str());
    return;
  }
  Session& session = *pair.session;
  uint64_t target = 0;
  uint64_t busy = 0, missed_writable = 0;
  size_t file_off = 0;
  for (auto _ : state) {
    target += frames * chunk;
    pair.server_handler.SetTarget(target);
    const auto deadline = Clock::now() + kDeadline;
    for (size_t i = 0; i < frames && error.empty();) {
      const uint64_t gen = pair.client_handler.writable_gen();
      Status st = from_file ? session.SendFile(file, *file, file_off, chunk)
                            : session.SendData(payload, payload->data(), chunk);
      if (st.ok()) {
        ++i;
        if (from_file) file_off = (file_off + chunk) % kFileBytes;
        continue;
      }
      if (st.code() != StatusCode::kBusy) {
        error = st.ToString();
        break;
      }
      ++busy;
      // Flow control: sleep until the queue has drained below half. A wait
      // that times out with the queue already below half is an OnWritable
      // that never came (counted; the loop then simply tries again).
      if (!pair.client_handler.WaitWritable(gen, 1s) && session.queued_bytes() < kSendQueueBytes / 2) {
        ++missed_writable;
      }
      if (pair.client_handler.closed()) error = "session closed: " + pair.client_handler.why();
      if (error.empty() && Clock::now() > deadline) error = "the send queue did not drain within the deadline";
    }
    if (error.empty() && !pair.server_handler.WaitReceived(target)) {
      error = pair.server_handler.closed() ? "receiver closed: " + pair.server_handler.why()
                                           : "not all bytes arrived within the deadline";
    }
    if (!error.empty()) {
      state.SkipWithError(error.c_str());
      break;
    }
  }
  if (error.empty()) {
    const auto iters = static_cast<int64_t>(state.iterations());
    state.SetBytesProcessed(iters * static_cast<int64_t>(frames * chunk));
    state.SetItemsProcessed(iters * static_cast<int64_t>(frames));
    state.counters["busy/iter"] = iters > 0 ? static_cast<double>(busy) / static_cast<double>(iters) : 0;
    state.counters["missed_writable"] = static_cast<double>(missed_writable);
    state.counters["copied_B"] = static_cast<double>(pair.client->stats().payload_bytes_copied.load());
  }
  pair.Stop();
}

void BM_TransportStream(benchmark::State& state) { TransportStream(state, false); }
void BM_TransportStreamFile(benchmark::State& state) { TransportStream(state, true); }

void BM_TransportPingPong(benchmark::State& state) {
  TransportPair pair;
  if (!pair.Start()) {
    state.SkipWithError(pair.error.c_str());
    return;
  }
  replica::proto::Control msg;
  auto* ack = msg.mutable_ack();
  ack->set_applied_lsn(kSeqBase);
  ack->set_epoch(1);
  uint64_t seq = kSeqBase;
  std::string error;
  auto round_trip = [&]() -> bool {
    ack->set_flushed_lsn(++seq);
    Status st = pair.session->SendControl(msg);
    if (!st.ok()) {
      error = st.ToString();
      return false;
    }
    if (!pair.client_handler.WaitEcho(seq)) {
      error = "no echo: " + pair.client_handler.why();
      return false;
    }
    return true;
  };
  for (int i = 0; i < kPingPongWarmup; ++i) {
    if (!round_trip()) {
      state.SkipWithError(error.c_str());
      return;
    }
  }
  std::vector<double> samples;
  samples.reserve(static_cast<size_t>(state.max_iterations));
  for (auto _ : state) {
    const auto t0 = Clock::now();
    if (!round_trip()) {
      state.SkipWithError(error.c_str());
      break;
    }
    samples.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  if (error.empty()) {
    state.counters["msg_B"] = static_cast<double>(replica::transport::kFrameHeaderSize + msg.ByteSizeLong());
    ReportLatency(state, &samples);
  }
  pair.Stop();
}

size_t TransportPingSize(std::string* frame);

// The same round trip driven from the client's I/O thread: OnControl takes
// the echo's time and sends the next ping itself, so no other thread is woken
// on the client side (the transport alone, without the hand-off between the
// caller's thread and the I/O thread that BM_TransportPingPong includes).
class PingDriver final : public Handler {
 public:
  void OnEstablished(const std::shared_ptr<Session>& s) override {
    std::lock_guard<std::mutex> l(mu_);
    session_ = s;
    cv_.notify_all();
  }
  void OnControl(const std::shared_ptr<Session>& s, const replica::proto::Control& msg) override {
    if (!msg.has_ack()) return;
    const auto now = Clock::now();
    if (msg.ack().flushed_lsn() != seq_) return;
    if (count_ >= warmup_) samples_.push_back(std::chrono::duration<double, std::micro>(now - sent_).count());
    if (++count_ < warmup_ + rounds_) {
      Send(s.get());
      return;
    }
    std::lock_guard<std::mutex> l(mu_);
    done_ = true;
    cv_.notify_all();
  }
  void OnClosed(const std::shared_ptr<Session>&, const Status& why) override {
    std::lock_guard<std::mutex> l(mu_);
    closed_ = true;
    why_ = why.ToString();
    cv_.notify_all();
  }
  bool WaitEstablished() {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, kDeadline, [&] { return session_ != nullptr || closed_; }) && session_ != nullptr;
  }
  // Runs warmup + rounds round trips; false with *error on failure.
  bool Run(Session* s, int warmup, int rounds, std::vector<double>* samples, std::string* error) {
    {
      std::lock_guard<std::mutex> l(mu_);
      warmup_ = warmup;
      rounds_ = rounds;
      count_ = 0;
      done_ = false;
      samples_.clear();
      samples_.reserve(static_cast<size_t>(rounds));
    }
    Send(s);  // later pings are sent by OnControl, which cannot run before this returns a frame
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, kDeadline * 5, [&] { return done_ || closed_; }) || closed_) {
      *error = closed_ ? "session closed: " + why_ : "ping-pong did not finish";
      return false;
    }
    *samples = std::move(samples_);
    return true;
  }
  std::string why() {
    std::lock_guard<std::mutex> l(mu_);
    return why_;
  }

 private:
  void Send(Session* s) {
    msg_.mutable_ack()->set_flushed_lsn(++seq_);
    msg_.mutable_ack()->set_applied_lsn(kSeqBase);
    msg_.mutable_ack()->set_epoch(1);
    sent_ = Clock::now();
    (void)s->SendControl(msg_);
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Session> session_;
  bool closed_ = false;
  bool done_ = false;
  std::string why_;
  // Touched by the thread in Run before the first ping, then by OnControl only.
  replica::proto::Control msg_;
  uint64_t seq_ = kSeqBase;
  Clock::time_point sent_;
  int warmup_ = 0, rounds_ = 0, count_ = 0;
  std::vector<double> samples_;
};

void BM_TransportPingPongCallback(benchmark::State& state) {
  BenchHandler server_handler(true);
  PingDriver driver;
  std::unique_ptr<Endpoint> server, client;
  std::string error;
  std::vector<double> samples;
  auto s = Endpoint::Create(BenchOptions("bench-server"), &server_handler);
  if (s.ok()) server = std::move(s).value();
  auto port = server ? server->Listen("127.0.0.1", 0) : replica::Result<uint16_t>(s.status());
  auto c = Endpoint::Create(BenchOptions("bench-client"), &driver);
  if (c.ok()) client = std::move(c).value();
  if (!port.ok() || !client) {
    error = !port.ok() ? port.status().ToString() : c.status().ToString();
  } else {
    auto cs = client->Connect("127.0.0.1", *port);
    if (!cs.ok()) {
      error = cs.status().ToString();
    } else if (!driver.WaitEstablished() || !server_handler.WaitEstablished()) {
      error = "session not established: " + driver.why();
    } else {
      // One timed iteration holds all the round trips: the loop must run
      // state.max_iterations times, so each iteration just takes its sample.
      if (!driver.Run(cs->get(), kPingPongWarmup, static_cast<int>(state.max_iterations), &samples, &error)) {
        samples.clear();
      }
    }
  }
  if (!error.empty()) state.SkipWithError(error.c_str());
  size_t i = 0;
  for (auto _ : state) {
    if (!error.empty()) break;
    state.SetIterationTime(i < samples.size() ? samples[i++] * 1e-6 : 0);
  }
  if (error.empty()) {
    std::string frame;
    state.counters["msg_B"] = static_cast<double>(TransportPingSize(&frame));
    ReportLatency(state, &samples);
  }
  if (client) client->Stop();
  if (server) server->Stop();
}

// ---------------------------------------------------------------------------
// Raw TCP baseline

void SetNoDelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// A connected loopback pair: client (the benchmark thread's end) and server.
struct RawConn {
  int client = -1;
  int server = -1;
  std::string error;

  bool Open() {
    int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0) return Fail(Errno("socket"));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(l, 1) != 0 ||
        ::getsockname(l, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      ::close(l);
      return Fail(Errno("listen"));
    }
    client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (client < 0 || ::connect(client, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      ::close(l);
      return Fail(Errno("connect"));
    }
    server = ::accept4(l, nullptr, nullptr, SOCK_CLOEXEC);
    ::close(l);
    if (server < 0) return Fail(Errno("accept"));
    SetNoDelay(client);
    SetNoDelay(server);
    return true;
  }
  bool Fail(std::string e) {
    error = std::move(e);
    return false;
  }
  // Tells the server side's thread to finish (it reads EOF).
  void ShutdownClient() {
    if (client >= 0) ::shutdown(client, SHUT_RDWR);
  }
  ~RawConn() {
    if (client >= 0) ::close(client);
    if (server >= 0) ::close(server);
  }
};

bool SendAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadExact(int fd, char* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void BM_RawTcpStream(benchmark::State& state) {
  const size_t chunk = static_cast<size_t>(state.range(0));
  const size_t frames = kBytesPerIteration / chunk;
  const auto payload = SharedPayload();
  RawConn conn;
  if (!conn.Open()) {
    state.SkipWithError(conn.error.c_str());
    return;
  }
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<uint64_t> received{0}, target{UINT64_MAX};
  bool rx_done = false;
  std::thread rx([&] {
    std::vector<char> buf(1u << 20);
    for (;;) {
      ssize_t n = ::read(conn.server, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      const uint64_t r = received.fetch_add(static_cast<uint64_t>(n)) + static_cast<uint64_t>(n);
      if (r >= target.load()) {
        std::lock_guard<std::mutex> l(mu);
        cv.notify_all();
      }
    }
    std::lock_guard<std::mutex> l(mu);
    rx_done = true;
    cv.notify_all();
  });
  std::string error;
  uint64_t total = 0;
  for (auto _ : state) {
    total += frames * chunk;
    target.store(total);
    for (size_t i = 0; i < frames; ++i) {
      if (!SendAll(conn.client, payload->data(), chunk)) {
        error = Errno("send");
        break;
      }
    }
    if (error.empty()) {
      std::unique_lock<std::mutex> l(mu);
      if (!cv.wait_for(l, kDeadline, [&] { return received.load() >= total || rx_done; }) || rx_done) {
        error = "not all bytes arrived";
      }
    }
    if (!error.empty()) {
      state.SkipWithError(error.c_str());
      break;
    }
  }
  conn.ShutdownClient();
  rx.join();
  if (error.empty()) {
    const auto iters = static_cast<int64_t>(state.iterations());
    state.SetBytesProcessed(iters * static_cast<int64_t>(frames * chunk));
    state.SetItemsProcessed(iters * static_cast<int64_t>(frames));
  }
}

// The size of the transport's ping-pong message on the wire: a frame header
// and a serialized Control with an Ack like the ones BM_TransportPingPong sends.
size_t TransportPingSize(std::string* frame) {
  replica::proto::Control msg;
  msg.mutable_ack()->set_flushed_lsn(kSeqBase + 1);
  msg.mutable_ack()->set_applied_lsn(kSeqBase);
  msg.mutable_ack()->set_epoch(1);
  const std::string body = msg.SerializeAsString();
  frame->assign(replica::transport::kFrameHeaderSize, '\0');
  replica::transport::EncodeFrameHeader(replica::transport::FrameType::kControl, static_cast<uint32_t>(body.size()),
                                        frame->data());
  *frame += body;
  return frame->size();
}

void BM_RawPingPong(benchmark::State& state) {
  std::string ping;
  const size_t n = TransportPingSize(&ping);
  RawConn conn;
  if (!conn.Open()) {
    state.SkipWithError(conn.error.c_str());
    return;
  }
  std::thread echo([&] {
    std::string buf(n, '\0');
    while (ReadExact(conn.server, buf.data(), n) && SendAll(conn.server, buf.data(), n)) {
    }
  });
  std::string pong(n, '\0');
  std::string error;
  auto round_trip = [&]() -> bool {
    if (!SendAll(conn.client, ping.data(), n) || !ReadExact(conn.client, pong.data(), n)) {
      error = Errno("ping-pong");
      return false;
    }
    return true;
  };
  for (int i = 0; i < kPingPongWarmup && error.empty(); ++i) round_trip();
  std::vector<double> samples;
  samples.reserve(static_cast<size_t>(state.max_iterations));
  for (auto _ : state) {
    if (!error.empty()) {
      state.SkipWithError(error.c_str());
      break;
    }
    const auto t0 = Clock::now();
    if (!round_trip()) {
      state.SkipWithError(error.c_str());
      break;
    }
    samples.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  conn.ShutdownClient();
  echo.join();
  if (error.empty()) {
    state.counters["msg_B"] = static_cast<double>(n);
    ReportLatency(state, &samples);
  }
}

// ---------------------------------------------------------------------------
// Summary: transport / raw from the medians of the repetitions (or the single
// run), with the goals of the issue.

class SummaryReporter : public benchmark::BenchmarkReporter {
 public:
  SummaryReporter(std::unique_ptr<benchmark::BenchmarkReporter> inner, bool text_output)
      : inner_(std::move(inner)), text_output_(text_output) {}

  bool ReportContext(const Context& context) override {
    inner_->SetOutputStream(&GetOutputStream());
    inner_->SetErrorStream(&GetErrorStream());
    return inner_->ReportContext(context);
  }

  void ReportRuns(const std::vector<Run>& runs) override {
    inner_->ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      std::string key = r.run_name.function_name;
      if (!r.run_name.args.empty()) key += "/" + r.run_name.args;
      for (const char* c : {"bytes_per_second", "p50_us", "p99_us"}) {
        auto it = r.counters.find(c);
        if (it == r.counters.end()) continue;
        if (r.run_type == Run::RT_Aggregate) {
          if (r.aggregate_name == "median") medians_[{key, c}] = it->second.value;
        } else {
          samples_[{key, c}].push_back(it->second.value);
        }
      }
    }
  }

  void Finalize() override {
    inner_->Finalize();
    PrintSummary(text_output_ ? GetOutputStream() : GetErrorStream());
  }

 private:
  using Key = std::pair<std::string, std::string>;

  bool Get(const std::string& name, const std::string& counter, double* out) const {
    if (auto it = medians_.find({name, counter}); it != medians_.end()) {
      *out = it->second;
      return true;
    }
    auto it = samples_.find({name, counter});
    if (it == samples_.end() || it->second.empty()) return false;
    std::vector<double> v = it->second;
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    *out = n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    return true;
  }

  // a / b; goal_min > 0: pass when a/b >= goal_min; goal_max > 0: when a/b <= goal_max.
  void Line(std::ostream& os, const std::string& what, const std::string& a, const std::string& b,
            const std::string& counter, double scale, const char* unit, double goal_min, double goal_max) const {
    double va, vb;
    if (!Get(a, counter, &va) || !Get(b, counter, &vb)) return;  // filtered out
    va /= scale;
    vb /= scale;
    const double ratio = vb > 0 ? va / vb : 0;
    char buf[512];
    std::snprintf(buf, sizeof buf, "  %-44s %10.1f / %10.1f %-6s = %5.2fx", what.c_str(), va, vb, unit, ratio);
    os << buf;
    if (goal_min > 0) {
      std::snprintf(buf, sizeof buf, "  (goal >= %.2fx: %s)", goal_min, ratio >= goal_min ? "MET" : "MISSED");
      os << buf;
    }
    if (goal_max > 0) {
      std::snprintf(buf, sizeof buf, "  (goal <= %.2fx: %s)", goal_max,
                    vb > 0 && ratio <= goal_max ? "MET" : "MISSED");
      os << buf;
    }
    os << "\n";
  }

  void PrintSummary(std::ostream& os) const {
    os << "\nTransport / raw summary (medians when repeated)\n";
    for (const char* size : {"4096", "65536", "1048576"}) {
      Line(os, std::string("stream ") + size + " B: SendData / raw", std::string("BM_TransportStream/") + size,
           std::string("BM_RawTcpStream/") + size, "bytes_per_second", 1048576.0, "MiB/s",
           std::string(size) == "65536" ? 0.80 : 0, 0);
    }
    Line(os, "stream 65536 B: SendFile / raw", "BM_TransportStreamFile/65536", "BM_RawTcpStream/65536",
         "bytes_per_second", 1048576.0, "MiB/s", 0, 0);
    Line(os, "round trip p50: transport / raw", "BM_TransportPingPong", "BM_RawPingPong", "p50_us", 1.0, "us", 0, 0);
    Line(os, "round trip p99: transport / raw", "BM_TransportPingPong", "BM_RawPingPong", "p99_us", 1.0, "us", 0,
         1.5);
  }

  std::unique_ptr<benchmark::BenchmarkReporter> inner_;
  const bool text_output_;
  std::map<Key, double> medians_;
  std::map<Key, std::vector<double>> samples_;
};

// Registration order is run order: each raw baseline runs right before the
// transport case compared with it, so that a ratio compares measurements
// taken close together.
void RegisterAll() {
  for (int64_t size : {int64_t{4096}, int64_t{65536}, int64_t{1048576}}) {
    benchmark::RegisterBenchmark("BM_RawTcpStream", BM_RawTcpStream)->Arg(size)->MinTime(kStreamMinTime)->UseRealTime();
    benchmark::RegisterBenchmark("BM_TransportStream", BM_TransportStream)
        ->Arg(size)
        ->MinTime(kStreamMinTime)
        ->UseRealTime();
    if (size == 65536) {
      benchmark::RegisterBenchmark("BM_TransportStreamFile", BM_TransportStreamFile)
          ->Arg(size)
          ->MinTime(kStreamMinTime)
          ->UseRealTime();
    }
  }
  benchmark::RegisterBenchmark("BM_RawPingPong", BM_RawPingPong)->Iterations(kPingPongRounds)->UseRealTime();
  benchmark::RegisterBenchmark("BM_TransportPingPong", BM_TransportPingPong)->Iterations(kPingPongRounds)->UseRealTime();
  benchmark::RegisterBenchmark("BM_TransportPingPongCallback", BM_TransportPingPongCallback)
      ->Iterations(kPingPongRounds)
      ->UseManualTime();
}

}  // namespace

int main(int argc, char** argv) {
  replica::SetLogLevel(replica::LogLevel::kWarn);  // no per-session info lines between the results
  // Before Initialize consumes the output flags; the summary reporter
  // wraps the reporter they ask for.
  replica::bench::Output output = replica::bench::OutputFromFlags(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  RegisterAll();

  SummaryReporter reporter(std::move(output.reporter), output.console);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
