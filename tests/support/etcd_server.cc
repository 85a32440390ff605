#include "tests/support/etcd_server.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace replica::test {

int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  ::close(fd);
  return port;
}

RefusingPort::RefusingPort() {
  fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (fd_ >= 0 && ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port_ = ntohs(a.sin_port);
  }
  EXPECT_GT(port_, 0) << "no port to refuse connections on";
}

RefusingPort::~RefusingPort() {
  if (fd_ >= 0) ::close(fd_);
}

SilentPort::SilentPort() { EXPECT_EQ(::listen(bound_.fd_, 16), 0) << "listen on a silent port"; }

namespace {

// GET /health; true if etcd says it is healthy.
bool Healthy(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  timeval tv{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  bool ok = false;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    const char req[] = "GET /health HTTP/1.0\r\nHost: x\r\n\r\n";
    if (::write(fd, req, sizeof req - 1) == static_cast<ssize_t>(sizeof req - 1)) {
      std::string resp;
      char buf[1024];
      ssize_t n;
      while ((n = ::read(fd, buf, sizeof buf)) > 0) resp.append(buf, static_cast<size_t>(n));
      ok = resp.find("\"health\":\"true\"") != std::string::npos;
    }
  }
  ::close(fd);
  return ok;
}

}  // namespace

EtcdServer::EtcdServer(const std::string& data_dir, const std::string& name) : dir_(data_dir), name_(name) {
  client_port_ = FreePort();
  peer_port_ = FreePort();
}

EtcdServer::~EtcdServer() {
  if (pid_ > 0) {
    ::kill(pid_, SIGCONT);
    Kill(SIGKILL);
  }
}

bool EtcdServer::Start() {
  // The ports were free when picked, but a test running alongside can take
  // one before etcd binds it; etcd then exits at once. A first start (no
  // data yet) is retried on other ports; a restart keeps its ports.
  const std::string data = dir_ + "/etcd-" + name_;
  const bool fresh = !std::filesystem::exists(data);
  for (int attempt = 1;; ++attempt) {
    Launch();
    const Health h = AwaitHealth();
    if (h == Health::kHealthy) return true;
    if (h == Health::kExited && fresh && attempt < 4 && LogMentions("address already in use")) {
      std::fprintf(stderr, "etcd: port %d or %d was taken before etcd bound it; starting again on others\n",
                   client_port_, peer_port_);
      std::filesystem::remove_all(data);
      std::filesystem::remove(dir_ + "/etcd-" + name_ + ".log");
      client_port_ = FreePort();
      peer_port_ = FreePort();
      continue;
    }
    return Report(h);
  }
}

bool EtcdServer::LogMentions(const std::string& text) const {
  std::ifstream in(dir_ + "/etcd-" + name_ + ".log");
  std::stringstream all;
  all << in.rdbuf();
  return all.str().find(text) != std::string::npos;
}

bool EtcdServer::Report(Health h) const {
  const std::string log = dir_ + "/etcd-" + name_ + ".log";
  if (h == Health::kExited) ADD_FAILURE() << "etcd exited at start; see " << log;
  if (h == Health::kTimedOut) ADD_FAILURE() << "etcd not healthy within 20 s; see " << log;
  return h == Health::kHealthy;
}

void EtcdServer::Launch(const std::string& initial_cluster) {
  const std::string client = "http://127.0.0.1:" + std::to_string(client_port_);
  const std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
  const std::string cluster = initial_cluster.empty() ? name_ + "=" + peer : initial_cluster;
  const std::string log = dir_ + "/etcd-" + name_ + ".log";
  std::fflush(nullptr);
  pid_ = ::fork();
  if (pid_ == 0) {
    FILE* f = std::freopen(log.c_str(), "a", stderr);
    (void)f;
    ::execlp("etcd", "etcd", "--name", name_.c_str(), "--data-dir", (dir_ + "/etcd-" + name_).c_str(),
             "--listen-client-urls", client.c_str(), "--advertise-client-urls", client.c_str(), "--listen-peer-urls",
             peer.c_str(), "--initial-advertise-peer-urls", peer.c_str(), "--initial-cluster", cluster.c_str(),
             // Elections well inside a 2 s lease (etcd's defaults: 100 / 1000 ms).
             "--heartbeat-interval", "50", "--election-timeout", "400", "--log-level", "error", nullptr);
    _exit(127);
  }
}

bool EtcdServer::WaitHealthy() { return Report(AwaitHealth()); }

EtcdServer::Health EtcdServer::AwaitHealth() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    if (Healthy(client_port_)) return Health::kHealthy;
    int st;
    if (pid_ > 0 && ::waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      return Health::kExited;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // no event to wait on: poll /health
  }
  return Health::kTimedOut;
}

void EtcdServer::Kill(int sig) {
  if (pid_ <= 0) return;
  ::kill(pid_, sig);
  if (sig == SIGSTOP || sig == SIGCONT) return;
  int st;
  ::waitpid(pid_, &st, 0);
  pid_ = -1;
}

}  // namespace replica::test
