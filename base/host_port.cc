#include "base/host_port.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <memory>

namespace replica {

std::string HostPort::ToString() const {
  const std::string p = std::to_string(port);
  return host.find(':') != std::string::npos ? "[" + host + "]:" + p : host + ":" + p;
}

Result<HostPort> ParseHostPort(std::string_view text) {
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument("'" + std::string(text) + "' is not HOST:PORT: " + why);
  };
  HostPort out;
  std::string_view port;
  const bool bracketed = !text.empty() && text.front() == '[';
  if (bracketed) {
    const size_t close = text.find(']');
    if (close == std::string_view::npos) return bad("an IPv6 address opened with '[' is not closed with ']'");
    out.host = std::string(text.substr(1, close - 1));
    if (out.host.find(':') == std::string::npos) return bad("only an IPv6 address goes in brackets");
    if (close + 1 >= text.size() || text[close + 1] != ':') return bad("no ':PORT' after the ']'");
    port = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("no ':PORT'");
    out.host = std::string(text.substr(0, colon));
    port = text.substr(colon + 1);
  }
  if (out.host.empty()) return bad("no host");
  for (char c : out.host) {
    if (static_cast<unsigned char>(c) <= ' ' || c == '/' || c == '[' || c == ']') {
      return bad("the host holds a character no host name or address has");
    }
  }
  if (!bracketed && out.host.find(':') != std::string::npos) {
    return bad("an IPv6 address goes in brackets, as in [" + out.host + "]:" + std::string(port));
  }
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string_view::npos) {
    return bad("the port must be a number 0..65535");
  }
  const unsigned long p = std::stoul(std::string(port));
  if (p > 65535) return bad("the port must be a number 0..65535");
  out.port = static_cast<uint16_t>(p);
  return out;
}

Result<std::vector<std::string>> ResolveHost(const std::string& host, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  if (int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &res); rc != 0) {
    return Status::NotFound("cannot resolve host '" + host + "': " + ::gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, &::freeaddrinfo);
  std::vector<std::string> out;
  for (const addrinfo* a = res; a != nullptr; a = a->ai_next) {
    if (a->ai_family != AF_INET && a->ai_family != AF_INET6) continue;
    char buf[NI_MAXHOST] = {};  // numeric, with an IPv6 zone ("fe80::1%eth0") kept
    if (::getnameinfo(a->ai_addr, a->ai_addrlen, buf, sizeof buf, nullptr, 0, NI_NUMERICHOST) != 0) continue;
    if (std::find(out.begin(), out.end(), buf) == out.end()) out.emplace_back(buf);
  }
  if (out.empty()) return Status::NotFound("host '" + host + "' has no IPv4 or IPv6 address");
  return out;
}

bool IsWildcardHost(std::string_view host) {
  in_addr v4{};
  in6_addr v6{};
  const std::string h(host);
  if (::inet_pton(AF_INET, h.c_str(), &v4) == 1) return v4.s_addr == INADDR_ANY;
  if (::inet_pton(AF_INET6, h.c_str(), &v6) == 1) return IN6_IS_ADDR_UNSPECIFIED(&v6);
  return false;
}

}  // namespace replica
