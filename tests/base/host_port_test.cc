// HOST:PORT parsing and host resolution (base/host_port.h).
#include "base/host_port.h"

#include <gtest/gtest.h>

namespace replica {
namespace {

TEST(HostPortTest, ParsesAddressesNamesAndBracketedIpv6) {
  struct Case {
    const char* text;
    const char* host;
    uint16_t port;
  };
  for (const Case& c : {Case{"10.0.0.1:7000", "10.0.0.1", 7000}, Case{"node-a.example:1", "node-a.example", 1},
                        Case{"[::1]:7400", "::1", 7400}, Case{"[fe80::1%eth0]:0", "fe80::1%eth0", 0},
                        Case{"localhost:65535", "localhost", 65535}}) {
    auto hp = ParseHostPort(c.text);
    ASSERT_TRUE(hp.ok()) << c.text << ": " << hp.status().ToString();
    EXPECT_EQ(hp->host, c.host) << c.text;
    EXPECT_EQ(hp->port, c.port) << c.text;
    EXPECT_EQ(hp->ToString(), c.text) << "ToString reads back as the text";
  }
}

TEST(HostPortTest, RefusesWhatIsNotHostPortAndSaysWhy) {
  struct Case {
    const char* text;
    const char* why;
  };
  for (const Case& c : {Case{"", "no ':PORT'"}, Case{"host", "no ':PORT'"}, Case{":7000", "no host"},
                        Case{"host:", "the port must be"}, Case{"host:70000", "the port must be"},
                        Case{"host:-1", "the port must be"}, Case{"host:7x", "the port must be"},
                        Case{"host:000007000", "the port must be"}, Case{"::1:7000", "goes in brackets, as in [::1]:7000"},
                        Case{"[::1]", "no ':PORT' after"}, Case{"[::1:7000", "not closed"},
                        Case{"[10.0.0.1]:7000", "only an IPv6 address"}, Case{"a b:1", "a character"},
                        Case{"http://h:1", "a character"}}) {
    auto hp = ParseHostPort(c.text);
    ASSERT_FALSE(hp.ok()) << c.text;
    EXPECT_EQ(hp.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(hp.status().message().find(c.why), std::string::npos) << c.text << ": " << hp.status().ToString();
    EXPECT_NE(hp.status().message().find(std::string("'") + c.text + "'"), std::string::npos) << "names the text";
  }
}

TEST(HostPortTest, ResolvesNamesAndKeepsAddresses) {
  auto v4 = ResolveHost("127.0.0.1", false);
  ASSERT_TRUE(v4.ok()) << v4.status().ToString();
  EXPECT_EQ(*v4, std::vector<std::string>{"127.0.0.1"});
  auto v6 = ResolveHost("::1", false);
  ASSERT_TRUE(v6.ok()) << v6.status().ToString();
  EXPECT_EQ(*v6, std::vector<std::string>{"::1"});
  auto name = ResolveHost("localhost", false);
  ASSERT_TRUE(name.ok()) << name.status().ToString();
  ASSERT_FALSE(name->empty());
  for (const auto& a : *name) EXPECT_TRUE(a == "127.0.0.1" || a == "::1") << a;
  // An IPv6 zone stays on the address (a link-local address needs it).
  auto zoned = ResolveHost("fe80::1%lo", false);
  ASSERT_TRUE(zoned.ok()) << zoned.status().ToString();
  EXPECT_EQ(*zoned, std::vector<std::string>{"fe80::1%lo"});
  // .invalid never resolves (RFC 6761); the resolver answers that locally.
  auto none = ResolveHost("no-such-host.invalid", false);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("no-such-host.invalid"), std::string::npos);
}

TEST(HostPortTest, WildcardHosts) {
  EXPECT_TRUE(IsWildcardHost("0.0.0.0"));
  EXPECT_TRUE(IsWildcardHost("::"));
  EXPECT_FALSE(IsWildcardHost("127.0.0.1"));
  EXPECT_FALSE(IsWildcardHost("::1"));
  EXPECT_FALSE(IsWildcardHost("localhost"));
}

}  // namespace
}  // namespace replica
