// Helpers for tests that run replicad processes: a daemon handle, shell
// commands, raw HTTP exchanges, and INFO-based catch-up waits.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/resp_client.h"
#include "tests/support/test_util.h"

namespace replica::test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
inline const std::string kReplicad = REPLICAD_PATH;

// A replicad process; its stdout goes to a file that is read for the ready line.
class Daemon {
 public:
  Daemon(const TempDir& dir, const std::string& id, const std::string& extra) : out_(dir.Sub(id + ".out")) {
    std::remove(out_.c_str());  // a restarted node must not be taken for its predecessor
    // A fixed --listen in extra (an active restarted on its address) replaces the default.
    const std::string listen = extra.find("--listen ") == std::string::npos ? " --listen 127.0.0.1:0" : "";
    // So does a --secret or --secret-file in extra (the secret is "test").
    const std::string secret = extra.find("--secret") == std::string::npos ? " --secret test" : "";
    std::string cmd = kReplicad + " --id " + id + " --data-dir " + dir.Sub(id) + listen +
                      " --client-listen 127.0.0.1:0" + secret + " --log-level warn " + extra;
    std::fflush(nullptr);  // or the child would write this process's buffered output again
    pid_ = ::fork();
    if (pid_ == 0) {
      FILE* f = std::freopen(out_.c_str(), "w", stdout);
      (void)f;
      ::execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), nullptr);
      _exit(127);
    }
    auto deadline = Clock::now() + 20s;
    std::smatch m;
    static const std::regex ready("replication=\\S*:(\\d+) client=\\S*:(\\d+) metrics=(\\d+)");
    while (Clock::now() < deadline) {
      std::ifstream in(out_);
      std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      if (std::regex_search(text, m, ready)) {
        repl_port_ = std::stoi(m[1]);
        client_port_ = std::stoi(m[2]);
        metrics_port_ = std::stoi(m[3]);
        return;
      }
      int st;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(20ms);  // polling a file the child writes; no event to wait on
    }
    ADD_FAILURE() << id << " never became ready";
  }
  ~Daemon() { Kill(SIGKILL); }
  // Sends sig and waits; returns the exit code (or 128 + signal).
  int Kill(int sig) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  // Waits up to `limit` for the process to end on its own: its exit code
  // (or 128 + signal), or -1 if it still runs.
  int WaitExit(Clock::duration limit) {
    if (pid_ <= 0) return -1;
    // A pidfd becomes readable when the process ends: poll it with the limit.
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
    if (fd < 0) return -1;
    pollfd p{fd, POLLIN, 0};
    const int ready =
        ::poll(&p, 1, static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(limit).count()));
    ::close(fd);
    int st = 0;
    if (ready != 1 || ::waitpid(pid_, &st, 0) != pid_) return -1;
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  // What it printed on stdout so far.
  std::string Output() const {
    std::ifstream in(out_);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  std::string Cli(const std::string& args) {
    return Shell("redis-cli -h 127.0.0.1 -p " + std::to_string(client_port_) + " " + args);
  }
  int repl_port() const { return repl_port_; }
  pid_t pid() const { return pid_; }
  int client_port() const { return client_port_; }
  int metrics_port() const { return metrics_port_; }

 private:
  std::string out_;
  pid_t pid_ = -1;
  int repl_port_ = 0, client_port_ = 0, metrics_port_ = 0;
};

inline int Connect(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

// Everything the server sends until it closes the connection.
inline std::string Exchange(int port, const std::string& request) {
  int fd = Connect(port);
  (void)::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

inline uint64_t InfoField(Daemon& d, const std::string& field) {
  const std::string info = d.Cli("INFO replication");
  std::smatch m;
  if (!std::regex_search(info, m, std::regex(field + ":(\\d+)"))) return 0;
  return std::stoull(m[1]);
}

// Waits until the standby has applied everything the active holds.
inline bool CaughtUp(Daemon& active, Daemon& standby) {
  const auto deadline = Clock::now() + 60s;
  while (Clock::now() < deadline) {
    const uint64_t want = InfoField(active, "master_repl_offset");
    if (want > 0 && InfoField(standby, "slave_repl_offset") == want) return true;
    std::this_thread::sleep_for(50ms);  // polling over RESP; the daemons offer no event
  }
  return false;
}


}  // namespace replica::test

namespace replica::test {


}  // namespace replica::test
