// Structured, one-line-per-event logging to stderr.
//
//   RLOG(kWarn, "wal.truncate_tail") << "segment=" << path << " offset=" << off;
//
// prints "2026-11-25T10:00:00.123Z WARN wal.truncate_tail segment=... offset=...".
// The level is process-wide; below it the stream expression is not evaluated.
// One event is always exactly one line: control characters in what a line
// holds (a peer's message, a file name) are written escaped, \n, \r or \xNN,
// so nobody can add a line of their own by getting text logged.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace replica {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

LogLevel GetLogLevel();
void SetLogLevel(LogLevel level);
// Accepts debug|info|warn|error|off; returns false for anything else.
bool ParseLogLevel(std::string_view text, LogLevel* level);

// Progress of long work, for log lines and displays: "120.5 of 260.0 MiB
// (46%), 30.1 MiB/s, about 5 s left" when bytes, or "12000 of 50000 records
// (24%), 8000 records/s, about 5 s left". done may exceed total (an estimate).
std::string ProgressText(uint64_t done, uint64_t total, double seconds, bool bytes);

// text with newline, carriage return, every other byte below 0x20 and 0x7f
// written as \n, \r or \xNN (what LogLine does to each line).
std::string EscapeControl(std::string text);

class LogLine {
 public:
  LogLine(LogLevel level, std::string_view event);
  ~LogLine();
  LogLine(const LogLine&) = delete;
  LogLine& operator=(const LogLine&) = delete;
  template <typename T>
  LogLine& operator<<(const T& v) {
    out_ << v;
    return *this;
  }

 private:
  std::ostringstream out_;
};

}  // namespace replica

// A for-statement (not if/else), so that it nests safely under a bare if.
#define RLOG(level, event)                                                                      \
  for (bool _rlog_on = ::replica::LogLevel::level >= ::replica::GetLogLevel(); _rlog_on; _rlog_on = false) \
  ::replica::LogLine(::replica::LogLevel::level, event)
