#include "replication/resp.h"

#include <gtest/gtest.h>

namespace replica::resp {
namespace {

std::vector<std::vector<std::string>> ParseAll(const std::string& input, size_t chunk, std::string* error) {
  Parser p(1024);
  std::vector<std::vector<std::string>> out;
  std::vector<std::string> args;
  for (size_t i = 0; i < input.size(); i += chunk) {
    p.Feed(input.substr(i, chunk));
    for (;;) {
      auto o = p.Next(&args, error);
      if (o == Parser::Outcome::kCommand) out.push_back(args);
      if (o != Parser::Outcome::kCommand) {
        if (o == Parser::Outcome::kError) return out;
        break;
      }
    }
  }
  return out;
}

TEST(RespParserTest, MultibulkAndInlineInAnyChunking) {
  // The value "v\r\n\0x" holds CR, LF and NUL: bulk strings are binary-safe.
  const std::string value("v\r\n\0x", 5);
  const std::string with_nul =
      "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\n" + value + "\r\nPING\r\n\r\n*2\r\n$3\r\nGET\r\n$0\r\n\r\n";
  for (size_t chunk : {1, 2, 7, 1000}) {
    std::string error;
    auto cmds = ParseAll(with_nul, chunk, &error);
    ASSERT_EQ(cmds.size(), 3u) << "chunk " << chunk << " " << error;
    EXPECT_EQ(cmds[0][2], value);
    EXPECT_EQ(cmds[1], std::vector<std::string>{"PING"});
    EXPECT_EQ(cmds[2][1], "");
  }
}

// Inline commands (telnet, nc) are split as Redis splits them.
TEST(RespParserTest, InlineCommandsAreSplitAsRedisSplitsThem) {
  struct Case {
    std::string line;
    std::vector<std::string> args;
  };
  for (const Case& c : std::vector<Case>{
           {"PING\n", {"PING"}},                                       // a bare LF ends the line too
           {"SET k v\r\n", {"SET", "k", "v"}},
           {"GET\tk\r\n", {"GET", "k"}},                              // tabs separate words
           {"SET \"q k\" v\r\n", {"SET", "q k", "v"}},               // quotes are stripped
           {"SET k \"a\\nb\\x41\\\"\"\r\n", {"SET", "k", "a\nbA\""}},  // escapes in double quotes
           {"SET k 'it\\'s'\r\n", {"SET", "k", "it's"}},            // and \' in single quotes
           {"SET k \"\"\r\n", {"SET", "k", ""}},                     // an empty word
       }) {
    std::string error;
    auto cmds = ParseAll(c.line, 1000, &error);
    ASSERT_EQ(cmds.size(), 1u) << c.line << ": " << error;
    EXPECT_EQ(cmds[0], c.args) << c.line;
  }
  for (const std::string bad : {"SET \"k v\r\n", "SET 'k v\r\n", "SET \"k\"v x\r\n"}) {
    Parser p;
    p.Feed(bad);
    std::vector<std::string> args;
    std::string error;
    EXPECT_EQ(p.Next(&args, &error), Parser::Outcome::kError) << bad;
    EXPECT_NE(error.find("unbalanced quotes"), std::string::npos) << bad << ": " << error;
  }
}

TEST(RespParserTest, HostileInputIsAnError) {
  for (const std::string bad : {"*1\r\n$99999999999\r\n", "*1\r\n$-5\r\n", "*1\r\n:5\r\n", "*x\r\n",
                                "*1\r\n$3\r\nabcXY", "*99999999\r\n"}) {
    std::string error;
    Parser p(1024, 1000);
    p.Feed(bad);
    std::vector<std::string> args;
    EXPECT_EQ(p.Next(&args, &error), Parser::Outcome::kError) << bad;
    EXPECT_NE(error.find("Protocol error"), std::string::npos);
  }
  Parser p;
  p.Feed(std::string(70 << 10, 'a'));  // an endless inline line
  std::vector<std::string> args;
  std::string error;
  EXPECT_EQ(p.Next(&args, &error), Parser::Outcome::kError);
}

TEST(RespEncodeTest, Replies) {
  std::string out;
  AppendSimple(&out, "OK");
  AppendError(&out, "ERR bad\r\nthing");
  AppendInteger(&out, -3);
  AppendBulk(&out, "hi");
  AppendNull(&out);
  AppendArrayHeader(&out, 2);
  EXPECT_EQ(out, "+OK\r\n-ERR bad  thing\r\n:-3\r\n$2\r\nhi\r\n$-1\r\n*2\r\n");
}

}  // namespace
}  // namespace replica::resp
