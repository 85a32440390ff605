// A real etcd (Debian's etcd-server) for tests: one member on 127.0.0.1,
// ports picked free at run time, data in a temporary directory. It can be
// killed, paused (SIGSTOP), resumed and restarted on the same ports and data.
#pragma once

#include <sys/types.h>

#include <string>

namespace replica::test {

// A TCP port on 127.0.0.1 that was free a moment ago.
int FreePort();

// A port on 127.0.0.1 that refuses connections for as long as this object
// lives: bound, never listening, so no other process can take it meanwhile
// (a port merely free a moment ago can be taken by a test running alongside).
class RefusingPort {
 public:
  RefusingPort();
  ~RefusingPort();
  RefusingPort(const RefusingPort&) = delete;
  RefusingPort& operator=(const RefusingPort&) = delete;
  int port() const { return port_; }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  friend class SilentPort;
  int fd_ = -1;
  int port_ = 0;
};

// A port on 127.0.0.1 that accepts connections (the kernel's backlog) but
// never answers: a member that is up but stalled, for as long as this lives.
class SilentPort {
 public:
  SilentPort();
  std::string endpoint() const { return bound_.endpoint(); }

 private:
  RefusingPort bound_;  // bound; listening from the constructor on
};

class EtcdServer {
 public:
  // data_dir must exist; etcd keeps its state in data_dir/etcd-NAME.
  explicit EtcdServer(const std::string& data_dir, const std::string& name = "t");
  ~EtcdServer();
  // "127.0.0.1:PORT" of the client API.
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(client_port_); }
  int client_port() const { return client_port_; }
  // Starts and waits (bounded) until /health answers true. A first start
  // whose port was taken meanwhile is retried on other ports.
  bool Start();
  // For a cluster: every member is launched with the same initial cluster
  // ("n1=http://127.0.0.1:P1,..."), then each waits until healthy.
  void Launch(const std::string& initial_cluster = "");
  bool WaitHealthy();
  std::string name() const { return name_; }
  int peer_port() const { return peer_port_; }
  void Kill(int sig);  // sends sig; waits for exit unless it is SIGSTOP/SIGCONT
  bool running() const { return pid_ > 0; }

 private:
  enum class Health { kHealthy, kExited, kTimedOut };
  Health AwaitHealth();          // bounded: 20 s
  bool Report(Health h) const;   // a test failure unless healthy
  bool LogMentions(const std::string& text) const;
  std::string dir_;
  std::string name_;
  int client_port_ = 0;
  int peer_port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace replica::test
