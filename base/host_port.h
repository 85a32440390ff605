// HOST:PORT, as every option and tool takes a network address: an IPv4
// address ("10.0.0.1:7000"), a host name ("node-a:7000"), or an IPv6 address
// in brackets ("[::1]:7000"), and how a host name becomes addresses.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "replica/status.h"

namespace replica {

struct HostPort {
  std::string host;  // without brackets
  uint16_t port = 0;
  // "host:port", with an IPv6 host in brackets: what ParseHostPort reads back.
  std::string ToString() const;
};

// InvalidArgument naming the text and what is wrong with it. Port 0 is
// accepted (callers that cannot use it say so).
Result<HostPort> ParseHostPort(std::string_view text);

// The numeric addresses HOST stands for: itself if it is one, else what the
// system resolver (getaddrinfo) returns for it, in the resolver's order.
// `passive`: for a socket to listen on. NotFound with the resolver's message.
Result<std::vector<std::string>> ResolveHost(const std::string& host, bool passive);

// Whether HOST is a wildcard address (0.0.0.0 or ::): a socket bound to it
// listens on every interface, and it names no one for a peer to reach.
bool IsWildcardHost(std::string_view host);

}  // namespace replica
