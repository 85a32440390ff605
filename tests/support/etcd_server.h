// A real etcd (Debian's etcd-server) for tests: one member on 127.0.0.1,
// ports picked free at run time, data in a temporary directory. It can be
// killed, paused (SIGSTOP), resumed and restarted on the same ports and data.
#pragma once

#include <sys/types.h>

#include <string>

namespace replica::test {

// A TCP port on 127.0.0.1 that was free a moment ago.
int FreePort();

class EtcdServer {
 public:
  // data_dir must exist; etcd keeps its state in data_dir/etcd.
  explicit EtcdServer(const std::string& data_dir);
  ~EtcdServer();
  // "127.0.0.1:PORT" of the client API.
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(client_port_); }
  int client_port() const { return client_port_; }
  bool Start();  // starts and waits (bounded) until /health answers true
  void Kill(int sig);  // sends sig; waits for exit unless it is SIGSTOP/SIGCONT
  bool running() const { return pid_ > 0; }

 private:
  std::string dir_;
  int client_port_ = 0;
  int peer_port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace replica::test
