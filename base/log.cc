#include "base/log.h"

#include <atomic>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>

namespace replica {
namespace {
std::atomic<LogLevel> g_level{LogLevel::kInfo};

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "DEBUG";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kWarn: return "WARN";
    case LogLevel::kError: return "ERROR";
    case LogLevel::kOff: return "OFF";
  }
  return "?";
}
}  // namespace

std::string EscapeControl(std::string text) {
  auto is_control = [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; };
  if (std::none_of(text.begin(), text.end(), is_control)) return text;
  std::string out;
  out.reserve(text.size() + 16);
  for (const char c : text) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (is_control(c)) {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

LogLevel GetLogLevel() { return g_level.load(std::memory_order_relaxed); }
void SetLogLevel(LogLevel level) { g_level.store(level, std::memory_order_relaxed); }

bool ParseLogLevel(std::string_view text, LogLevel* level) {
  if (text == "debug") *level = LogLevel::kDebug;
  else if (text == "info") *level = LogLevel::kInfo;
  else if (text == "warn") *level = LogLevel::kWarn;
  else if (text == "error") *level = LogLevel::kError;
  else if (text == "off") *level = LogLevel::kOff;
  else return false;
  return true;
}

LogLine::LogLine(LogLevel level, std::string_view event) {
  auto now = std::chrono::system_clock::now();
  std::time_t secs = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char stamp[64];
  std::snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
  out_ << stamp << ' ' << LevelName(level) << ' ' << event << ' ';
}

LogLine::~LogLine() {
  std::string line = EscapeControl(out_.str());
  line += '\n';
  // One fwrite per event keeps concurrent lines whole.
  std::fwrite(line.data(), 1, line.size(), stderr);
}

std::string ProgressText(uint64_t done, uint64_t total, double seconds, bool bytes) {
  const double scale = bytes ? 1024.0 * 1024.0 : 1.0;
  const double d = static_cast<double>(done) / scale, t = static_cast<double>(total) / scale;
  const double rate = seconds > 0 ? d / seconds : 0;
  char buf[160];
  int n;
  if (bytes) {
    n = std::snprintf(buf, sizeof buf, "%.1f of %.1f MiB", d, t);
  } else {
    n = std::snprintf(buf, sizeof buf, "%llu of %llu records", static_cast<unsigned long long>(done),
                      static_cast<unsigned long long>(total));
  }
  std::string out(buf, static_cast<size_t>(std::max(n, 0)));
  if (total > 0) {
    std::snprintf(buf, sizeof buf, " (%.0f%%)", std::min(100.0, 100.0 * static_cast<double>(done) / static_cast<double>(total)));
    out += buf;
  }
  std::snprintf(buf, sizeof buf, bytes ? ", %.1f MiB/s" : ", %.0f records/s", rate);
  out += buf;
  if (rate > 0 && t > d) {
    std::snprintf(buf, sizeof buf, ", about %.0f s left", (t - d) / rate);
    out += buf;
  }
  return out;
}

}  // namespace replica
