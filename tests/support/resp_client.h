// A Redis-protocol client for tests, header-only (engine-level and
// process-level tests both use it).
#pragma once

#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace replica::test {

// A Redis-protocol client on one connection (what a client library does):
// Command sends one command and returns the first line of the reply, or ""
// if the connection failed (it reconnects on the next call).
class RespClient {
 public:
  explicit RespClient(int port) : port_(port) {}
  ~RespClient() { Close(); }
  std::string Command(const std::vector<std::string>& args) {
    if (fd_ < 0) {
      fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(static_cast<uint16_t>(port_));
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      timeval tv{5, 0};
      ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        Close();
        return "";
      }
    }
    std::string req = "*" + std::to_string(args.size()) + "\r\n";
    for (const auto& a : args) req += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
    if (::send(fd_, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
      Close();
      return "";
    }
    std::string line;
    char c;
    while (::recv(fd_, &c, 1, 0) == 1) {
      if (c == '\n') break;
      if (c != '\r') line += c;
    }
    if (line.empty()) {
      Close();
      return "";
    }
    if (line[0] == '$' && line != "$-1") {  // a bulk string: its body, by its length
      const size_t n = std::strtoull(line.c_str() + 1, nullptr, 10);
      std::string body(n + 2, '\0');  // and the CRLF after it
      size_t got = 0;
      while (got < body.size()) {
        const ssize_t r = ::recv(fd_, body.data() + got, body.size() - got, 0);
        if (r <= 0) {
          Close();
          return "";
        }
        got += static_cast<size_t>(r);
      }
      body.resize(n);
      return body;
    }
    return line;
  }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int port_;
  int fd_ = -1;
};

}  // namespace replica::test
