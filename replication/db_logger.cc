#include "replication/db_logger.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <system_error>

#include "base/log.h"

namespace replica {
namespace {

class DbLogger final : public rocksdb::Logger {
 public:
  explicit DbLogger(int fd) : fd_(fd) {}
  ~DbLogger() override {
    if (fd_ >= 0) ::close(fd_);
  }

  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override { Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap); }
  void Logv(const rocksdb::InfoLogLevel level, const char* format, va_list ap) override {
    const bool header = level == rocksdb::InfoLogLevel::HEADER_LEVEL;
    if (!header && level < GetInfoLogLevel()) return;
    char msg[4096];
    const int n = std::vsnprintf(msg, sizeof msg, format, ap);
    if (n < 0) return;
    size_t len = std::min(static_cast<size_t>(n), sizeof msg - 1);
    while (len > 0 && msg[len - 1] == '\n') --len;
    const std::string_view text(msg, len);
    if (fd_ >= 0) {
      static const char* const kNames[] = {"DEBUG", "INFO", "WARN", "ERROR", "FATAL", "HEADER"};
      const auto idx = static_cast<size_t>(level);
      timespec ts{};
      ::clock_gettime(CLOCK_REALTIME, &ts);
      tm t{};
      ::gmtime_r(&ts.tv_sec, &t);
      char prefix[64];
      const int p = std::snprintf(prefix, sizeof prefix, "%04d/%02d/%02d-%02d:%02d:%02d.%06ldZ %s ", t.tm_year + 1900,
                                  t.tm_mon + 1, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, ts.tv_nsec / 1000,
                                  idx < 6 ? kNames[idx] : "?");
      std::string line;
      line.reserve(static_cast<size_t>(p) + len + 1);
      line.append(prefix, static_cast<size_t>(std::max(p, 0)));
      line.append(text);
      line += '\n';
      // One write per line (O_APPEND): lines from concurrent threads do not
      // interleave. A line that cannot be written is dropped.
      (void)!::write(fd_, line.data(), line.size());
    }
    if (header || level < rocksdb::InfoLogLevel::WARN_LEVEL) return;
    if (level == rocksdb::InfoLogLevel::WARN_LEVEL) {
      RLOG(kWarn, "rocksdb.log") << "message=\"" << text << "\"";
    } else {
      RLOG(kError, "rocksdb.log") << "message=\"" << text << "\"";
    }
  }

 private:
  const int fd_;
};

}  // namespace

std::shared_ptr<rocksdb::Logger> NewDbLogger(const std::string& db_dir) {
  std::error_code ec;
  std::filesystem::create_directories(db_dir, ec);
  const std::string path = db_dir + "/LOG";
  std::filesystem::rename(path, path + ".old", ec);  // absent on a first start
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    RLOG(kWarn, "engine.db_log_unavailable") << "path=" << path << " (RocksDB's info log goes to the node's log only)";
  }
  return std::make_shared<DbLogger>(fd);
}

}  // namespace replica
