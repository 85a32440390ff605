// TLS for the whole stream: mutual certificate verification, data intact,
// and plain or foreign-CA peers refused. Certificates are made per run with
// the openssl command (Debian package openssl).
#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <mutex>

#include "tests/support/test_util.h"
#include "transport/transport.h"

namespace replica::transport {
namespace {

using namespace std::chrono_literals;

class Sink : public Handler {
 public:
  void OnEstablished(const std::shared_ptr<Session>& s) override {
    std::lock_guard<std::mutex> l(mu_);
    ++established_;
    cv_.notify_all();
  }
  void OnData(const std::shared_ptr<Session>&, std::string_view payload) override {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return gate_open_; });  // a slow consumer, when the gate is shut
    data_ += payload;
    ++frames_;
    cv_.notify_all();
  }
  void OnReadIdle(const std::shared_ptr<Session>& s) override {
    std::lock_guard<std::mutex> l(mu_);
    idle_after_.push_back(frames_);
    idle_closed_.push_back(s->closed());
    cv_.notify_all();
  }
  void SetGate(bool open) {
    std::lock_guard<std::mutex> l(mu_);
    gate_open_ = open;
    cv_.notify_all();
  }
  void OnClosed(const std::shared_ptr<Session>&, const Status& why) override {
    std::lock_guard<std::mutex> l(mu_);
    closed_.push_back(why);
    cv_.notify_all();
  }
  template <typename Pred>
  bool WaitFor(Pred pred) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, 20s, [&] { return pred(); });
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int established_ = 0;
  bool gate_open_ = true;
  std::string data_;
  size_t frames_ = 0;
  std::vector<size_t> idle_after_;  // frames_ at each OnReadIdle
  std::vector<bool> idle_closed_;   // and whether the session had closed by then
  std::vector<Status> closed_;
};

// A CA and node certificates signed by it, in dir.
class Pki {
 public:
  Pki(const std::string& dir, const std::string& ca_name) : dir_(dir) {
    EXPECT_TRUE(test::MakeCertificateAuthority(dir, ca_name));
  }
  TlsOptions Node(const std::string& name) {
    const std::string p = dir_ + "/" + name;
    EXPECT_TRUE(test::MakeNodeCertificate(dir_, name));
    TlsOptions t;
    t.enabled = true;
    t.cert_file = p + ".crt";
    t.key_file = p + ".key";
    t.ca_file = dir_ + "/ca.crt";
    return t;
  }

 private:
  std::string dir_;
};

Options Opts(const std::string& id, TlsOptions tls) {
  Options o;
  o.node_id = id;
  o.cluster = "tls";
  o.secret = "s";
  o.tls = std::move(tls);
  o.handshake_timeout = 3s;
  return o;
}

// A server and a client with certificates of one CA; Connect() connects
// them. The destructor opens the server's gate before the endpoints stop,
// so that a test that failed with it shut does not hang.
struct TlsPair {
  test::TempDir dir;
  Pki pki{dir.path(), "ca"};
  Sink srv, cli;
  std::unique_ptr<Endpoint> server, client;
  std::shared_ptr<Session> session;
  bool Connect() {
    server = std::move(Endpoint::Create(Opts("srv", pki.Node("srv")), &srv)).value();
    const uint16_t port = *server->Listen("127.0.0.1", 0);
    client = std::move(Endpoint::Create(Opts("cli", pki.Node("cli")), &cli)).value();
    session = *client->Connect("127.0.0.1", port);
    return cli.WaitFor([&] { return cli.established_ == 1; }) && srv.WaitFor([&] { return srv.established_ == 1; });
  }
  ~TlsPair() {
    srv.SetGate(true);
    if (client) client->Stop();
    if (server) server->Stop();
  }
};

TEST(TlsTest, MutualTlsCarriesData) {
  TlsPair p;
  ASSERT_TRUE(p.Connect());
  test::TempDir& dir = p.dir;
  Sink& srv = p.srv;
  auto& session = p.session;
  auto& client = p.client;
  auto& server = p.server;
  auto mem = std::make_shared<std::string>(test::Payload(5, 200000));
  ASSERT_TRUE(session->SendData(mem, mem->data(), mem->size()).ok());
  const std::string file_bytes = test::Payload(6, 300000);
  test::WriteFileBytes(dir.Sub("span"), file_bytes);
  int fd = ::open(dir.Sub("span").c_str(), O_RDONLY);
  auto keep = std::shared_ptr<int>(new int(fd), [](int* f) { ::close(*f); delete f; });
  ASSERT_TRUE(session->SendFile(keep, fd, 0, file_bytes.size()).ok());
  ASSERT_TRUE(srv.WaitFor([&] { return srv.data_.size() == mem->size() + file_bytes.size(); }));
  EXPECT_EQ(srv.data_, *mem + file_bytes);
  // TLS encrypts in user space: the file span was read into memory, and counted.
  EXPECT_EQ(client->stats().payload_bytes_copied.load(), file_bytes.size());
  EXPECT_EQ(server->stats().tls_failures.load(), 0u);
  client->Stop();
  server->Stop();
}

// Frames that wait in OpenSSL's buffers, not in the socket, are still
// "more to read": OnReadIdle comes once, after the last of a burst.
TEST(TlsTest, ReadIdleSeesBytesBufferedInTls) {
  TlsPair p;
  ASSERT_TRUE(p.Connect());
  Sink& srv = p.srv;
  srv.SetGate(false);  // the server's I/O thread holds the first frame
  auto mem = std::make_shared<std::string>(test::Payload(7, 1000));
  constexpr size_t kBurst = 8;  // small frames: several fit one read of Asio's TLS buffer
  for (size_t i = 0; i < kBurst; ++i) ASSERT_TRUE(p.session->SendData(mem, mem->data(), mem->size()).ok());
  ASSERT_TRUE(
      test::Eventually([&] { return p.client->stats().data_bytes_sent.load() == kBurst * mem->size(); }, 10s, 1ms));
  srv.SetGate(true);
  ASSERT_TRUE(srv.WaitFor([&] { return srv.frames_ == kBurst && !srv.idle_after_.empty(); }));
  {
    std::lock_guard<std::mutex> l(srv.mu_);
    EXPECT_EQ(srv.idle_after_, std::vector<size_t>{kBurst});
  }
}

// Under TLS a frame still arriving looks like more to read; if the peer
// goes away mid-frame, the whole frames before it still end their burst,
// before OnClosed.
TEST(TlsTest, ReadIdleComesBeforeTheCloseOfAConnectionThatEndsMidFrame) {
  TlsPair p;
  ASSERT_TRUE(p.Connect());
  Sink& srv = p.srv;
  srv.SetGate(false);
  auto small = std::make_shared<std::string>(1000, 's');
  auto big = std::make_shared<std::string>(32u << 20, 'b');
  ASSERT_TRUE(p.session->SendData(small, small->data(), small->size()).ok());
  // Sent before the big one is queued: a queue that holds anything refuses
  // a frame past max_send_queue_bytes.
  ASSERT_TRUE(test::Eventually([&] { return p.client->stats().data_bytes_sent.load() >= small->size(); }, 10s, 1ms));
  ASSERT_TRUE(p.session->SendData(big, big->data(), big->size()).ok());
  p.client->Stop();
  srv.SetGate(true);
  ASSERT_TRUE(srv.WaitFor([&] { return !srv.closed_.empty(); }));
  {
    std::lock_guard<std::mutex> l(srv.mu_);
    EXPECT_EQ(srv.frames_, 1u);
    EXPECT_EQ(srv.idle_after_, std::vector<size_t>{1});
  }
}

TEST(TlsTest, PlainClientIsRefused) {
  test::TempDir dir;
  Pki pki(dir.path(), "ca");
  Sink srv, cli;
  auto server = std::move(Endpoint::Create(Opts("srv", pki.Node("srv")), &srv)).value();
  const uint16_t port = *server->Listen("127.0.0.1", 0);
  auto client = std::move(Endpoint::Create(Opts("cli", TlsOptions{}), &cli)).value();
  ASSERT_TRUE(client->Connect("127.0.0.1", port).ok());
  ASSERT_TRUE(srv.WaitFor([&] { return !srv.closed_.empty(); }));
  EXPECT_EQ(server->stats().tls_failures.load(), 1u);
  EXPECT_EQ(srv.established_, 0);
  EXPECT_EQ(cli.established_, 0);
  client->Stop();
  server->Stop();
}

TEST(TlsTest, CertificateFromAnotherCaIsRefused) {
  test::TempDir a, b;
  Pki ours(a.path(), "ours"), theirs(b.path(), "theirs");
  Sink srv, cli;
  auto server = std::move(Endpoint::Create(Opts("srv", ours.Node("srv")), &srv)).value();
  const uint16_t port = *server->Listen("127.0.0.1", 0);
  TlsOptions foreign = theirs.Node("intruder");
  foreign.ca_file = a.path() + "/ca.crt";  // it trusts us, but we do not trust it
  auto client = std::move(Endpoint::Create(Opts("cli", foreign), &cli)).value();
  ASSERT_TRUE(client->Connect("127.0.0.1", port).ok());
  ASSERT_TRUE(srv.WaitFor([&] { return !srv.closed_.empty(); }));
  EXPECT_EQ(server->stats().tls_failures.load(), 1u);
  EXPECT_EQ(srv.established_, 0);
  client->Stop();
  server->Stop();
}

TEST(TlsTest, BadCertificateFilesAreClearErrors) {
  Sink s;
  TlsOptions t;
  t.enabled = true;
  t.cert_file = "/nonexistent/cert.pem";
  auto ep = Endpoint::Create(Opts("x", t), &s);
  ASSERT_FALSE(ep.ok());
  EXPECT_NE(ep.status().message().find("/nonexistent/cert.pem"), std::string::npos) << ep.status().ToString();
}

}  // namespace
}  // namespace replica::transport
