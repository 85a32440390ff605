#include "replication/resp.h"

#include <charconv>

namespace replica::resp {
namespace {
constexpr size_t kMaxLine = 64u << 10;

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool IsBlank(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f'; }

// An inline command's words, as redis-cli and Redis split them: blanks
// separate words; "double quotes" take \n \r \t \b \a \\ \" and \xHH;
// 'single quotes' take \'; a closing quote must end the word. False on
// unbalanced quotes.
bool SplitInline(std::string_view line, std::vector<std::string>* args) {
  size_t i = 0;
  while (true) {
    while (i < line.size() && IsBlank(line[i])) ++i;
    if (i == line.size()) return true;
    std::string word;
    bool dq = false, sq = false, done = false;
    while (!done) {
      if (dq) {
        if (i == line.size()) return false;
        if (line[i] == '\\' && i + 3 < line.size() && line[i + 1] == 'x' && HexValue(line[i + 2]) >= 0 &&
            HexValue(line[i + 3]) >= 0) {
          word += static_cast<char>(HexValue(line[i + 2]) * 16 + HexValue(line[i + 3]));
          i += 4;
        } else if (line[i] == '\\' && i + 1 < line.size()) {
          const char e = line[i + 1];
          word += e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : e == 'b' ? '\b' : e == 'a' ? '\a' : e;
          i += 2;
        } else if (line[i] == '"') {
          if (i + 1 < line.size() && !IsBlank(line[i + 1])) return false;  // "foo"bar
          ++i;
          done = true;
        } else {
          word += line[i++];
        }
      } else if (sq) {
        if (i == line.size()) return false;
        if (line[i] == '\\' && i + 1 < line.size() && line[i + 1] == '\'') {
          word += '\'';
          i += 2;
        } else if (line[i] == '\'') {
          if (i + 1 < line.size() && !IsBlank(line[i + 1])) return false;
          ++i;
          done = true;
        } else {
          word += line[i++];
        }
      } else if (i == line.size() || IsBlank(line[i])) {
        done = true;
      } else if (line[i] == '"') {
        dq = true;
        ++i;
      } else if (line[i] == '\'') {
        sq = true;
        ++i;
      } else {
        word += line[i++];
      }
    }
    args->push_back(std::move(word));
  }
}

bool ParseLength(std::string_view s, long long* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}
}  // namespace

void Parser::Feed(std::string_view bytes) {
  if (pos_ > 0 && pos_ * 2 > buf_.size()) {
    buf_.erase(0, pos_);
    mb_pos_ -= std::min(mb_pos_, pos_);
    pos_ = 0;
    if (buf_.capacity() > (1u << 20) && buf_.size() * 4 < buf_.capacity()) buf_.shrink_to_fit();
  }
  buf_.append(bytes);
}

size_t Parser::FindLineEnd(size_t from) const {
  size_t p = buf_.find("\r\n", from);
  return p;
}

Parser::Outcome Parser::Next(std::vector<std::string>* args, std::string* error) {
  args->clear();
  for (;;) {
    if (pos_ >= buf_.size()) {
      // All consumed: an idle connection keeps no large buffer after a
      // large command.
      if (!in_multibulk_) {
        if (buf_.capacity() > (1u << 20)) std::string().swap(buf_);
        buf_.clear();
        pos_ = 0;
        mb_pos_ = 0;
      }
      return Outcome::kNeedMore;
    }
    if (buf_[pos_] != '*') {
      // Inline command: one line of words (what telnet sends), ended by LF
      // or CRLF, split as Redis splits it (SplitInline).
      size_t end = buf_.find('\n', pos_);
      if (end == std::string::npos) {
        if (buf_.size() - pos_ > kMaxLine) {
          *error = "Protocol error: too big inline request";
          return Outcome::kError;
        }
        return Outcome::kNeedMore;
      }
      std::string_view line(buf_.data() + pos_, end - pos_);
      pos_ = end + 1;
      if (!SplitInline(line, args)) {
        *error = "Protocol error: unbalanced quotes in request";
        return Outcome::kError;
      }
      if (args->empty()) continue;  // an empty line is ignored, as Redis does
      return Outcome::kCommand;
    }
    // Multibulk: *N\r\n then N times $len\r\n<len bytes>\r\n. The command
    // is consumed only once whole; what is parsed of it is kept meanwhile.
    if (buffered() > kMaxQueryBuffer) {
      *error = "Protocol error: query buffer over " + std::to_string(kMaxQueryBuffer) + " bytes";
      return Outcome::kError;
    }
    if (!in_multibulk_) {
      size_t end = FindLineEnd(pos_);
      if (end == std::string::npos) {
        if (buf_.size() - pos_ > kMaxLine) {
          *error = "Protocol error: too big multibulk count";
          return Outcome::kError;
        }
        return Outcome::kNeedMore;
      }
      long long n = 0;
      if (!ParseLength(std::string_view(buf_.data() + pos_ + 1, end - pos_ - 1), &n) ||
          n > static_cast<long long>(max_args_)) {
        *error = "Protocol error: invalid multibulk length";
        return Outcome::kError;
      }
      if (n <= 0) {
        pos_ = end + 2;
        continue;
      }
      in_multibulk_ = true;
      mb_total_ = n;
      mb_pos_ = end + 2;
      mb_args_.clear();
      mb_args_.reserve(static_cast<size_t>(std::min<long long>(n, 1024)));
    }
    size_t p = mb_pos_;
    while (static_cast<long long>(mb_args_.size()) < mb_total_) {
      if (p >= buf_.size()) return Outcome::kNeedMore;
      if (buf_[p] != '$') {
        *error = std::string("Protocol error: expected '$', got '") + buf_[p] + "'";
        return Outcome::kError;
      }
      size_t end = FindLineEnd(p);
      if (end == std::string::npos) {
        if (buf_.size() - p > kMaxLine) {
          *error = "Protocol error: invalid bulk length";
          return Outcome::kError;
        }
        return Outcome::kNeedMore;
      }
      long long len = 0;
      if (!ParseLength(std::string_view(buf_.data() + p + 1, end - p - 1), &len) || len < 0 ||
          len > static_cast<long long>(max_bulk_)) {
        *error = "Protocol error: invalid bulk length";
        return Outcome::kError;
      }
      const size_t data = end + 2;
      if (buf_.size() - data < static_cast<size_t>(len) + 2) return Outcome::kNeedMore;
      if (buf_[data + static_cast<size_t>(len)] != '\r' || buf_[data + static_cast<size_t>(len) + 1] != '\n') {
        *error = "Protocol error: bulk string not followed by CRLF";
        return Outcome::kError;
      }
      mb_args_.emplace_back(buf_.data() + data, static_cast<size_t>(len));
      p = data + static_cast<size_t>(len) + 2;
      mb_pos_ = p;
    }
    pos_ = p;
    in_multibulk_ = false;
    *args = std::move(mb_args_);
    mb_args_.clear();
    return Outcome::kCommand;
  }
}

void AppendSimple(std::string* out, std::string_view s) {
  out->push_back('+');
  out->append(s);
  out->append("\r\n");
}
void AppendError(std::string* out, std::string_view s) {
  out->push_back('-');
  for (char c : s) out->push_back(c == '\r' || c == '\n' ? ' ' : c);  // an error is one line
  out->append("\r\n");
}
void AppendInteger(std::string* out, long long v) {
  out->push_back(':');
  out->append(std::to_string(v));
  out->append("\r\n");
}
void AppendBulk(std::string* out, std::string_view s) {
  out->push_back('$');
  out->append(std::to_string(s.size()));
  out->append("\r\n");
  out->append(s);
  out->append("\r\n");
}
void AppendNull(std::string* out) { out->append("$-1\r\n"); }
void AppendArrayHeader(std::string* out, size_t n) {
  out->push_back('*');
  out->append(std::to_string(n));
  out->append("\r\n");
}

}  // namespace replica::resp
