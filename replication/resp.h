// RESP (the Redis serialization protocol): a request parser and reply
// encoders. Pure functions over bytes, so they are unit-tested and fuzzed.
// Limits make hostile input harmless: a bulk string is at most max_bulk
// bytes, a command at most max_args arguments, an inline line 64 KiB, and
// the unconsumed input at most kMaxQueryBuffer.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace replica::resp {

inline constexpr size_t kMaxQueryBuffer = 512u << 20;

class Parser {
 public:
  explicit Parser(size_t max_bulk = 64u << 20, size_t max_args = 1u << 20) : max_bulk_(max_bulk), max_args_(max_args) {}
  void Feed(std::string_view bytes);
  enum class Outcome { kCommand, kNeedMore, kError };
  // kCommand: *args holds the next command. kError: *error says why; the
  // stream cannot be resynchronised and the connection must close.
  Outcome Next(std::vector<std::string>* args, std::string* error);
  size_t buffered() const { return buf_.size() - pos_; }

 private:
  // Finds "\r\n" from `from`; npos if absent.
  size_t FindLineEnd(size_t from) const;
  std::string buf_;
  size_t pos_ = 0;  // start of the first unconsumed command
  const size_t max_bulk_;
  const size_t max_args_;
  // A multibulk command received in part: the arguments parsed so far and
  // where the next one starts, so that each byte is parsed once however
  // slowly the command arrives.
  bool in_multibulk_ = false;
  long long mb_total_ = 0;
  size_t mb_pos_ = 0;
  std::vector<std::string> mb_args_;
};

void AppendSimple(std::string* out, std::string_view s);   // +s
void AppendError(std::string* out, std::string_view s);    // -s
void AppendInteger(std::string* out, long long v);         // :v
void AppendBulk(std::string* out, std::string_view s);     // $len s
void AppendNull(std::string* out);                         // $-1
void AppendArrayHeader(std::string* out, size_t n);        // *n

}  // namespace replica::resp
