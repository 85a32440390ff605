// Helpers shared by the tests: temporary directories, deterministic payloads,
// byte-level corrupters for log files, and a reader that collects a whole log.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "wal/wal.h"

namespace replica::test {

// Runs cmd with sh; returns its output (stderr too) and, if asked, its exit status.
inline std::string Shell(const std::string& cmd, int* code = nullptr) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int st = ::pclose(p);
  if (code) *code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Waits until pred holds or `limit` passes; returns whether it held. For
// state that raises no event a test could wait on (stats, etcd, a peer's
// metrics page), so it looks again every `every`.
template <typename Pred>
bool Eventually(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(30),
                std::chrono::milliseconds every = std::chrono::milliseconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(every);
  }
  return true;
}

// Payload of `size` bytes determined by `seed`, so a reader can check every byte.
std::string Payload(uint64_t seed, size_t size);

std::string ReadFileBytes(const std::string& path);

// What the process writes to stderr (the log) while fn runs.
template <typename Fn>
std::string CapturedStderr(Fn fn) {
  TempDir dir;
  const std::string path = dir.Sub("stderr");
  std::fflush(stderr);
  const int saved = ::dup(2);
  FILE* f = std::fopen(path.c_str(), "w");
  ::dup2(::fileno(f), 2);
  fn();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::fclose(f);
  return ReadFileBytes(path);
}

void WriteFileBytes(const std::string& path, const std::string& data);
uint64_t FileSize(const std::string& path);
void FlipBit(const std::string& path, uint64_t offset, int bit);
void TruncateFileTo(const std::string& path, uint64_t size);
void CopyDir(const std::string& from, const std::string& to);
// Test certificates made with the openssl command: a CA in DIR/ca.crt (once
// per DIR), and for MakeNodeCertificate(dir, NAME) DIR/NAME.crt and
// DIR/NAME.key signed by it. Both return false if openssl failed.
bool MakeCertificateAuthority(const std::string& dir, const std::string& ca_name);
bool MakeNodeCertificate(const std::string& dir, const std::string& name);
// Segment file paths of a WAL directory, oldest first.
std::vector<std::string> SegmentPaths(const std::string& dir);

struct ReadRecord {
  wal::Lsn lsn;
  wal::Epoch epoch;
  uint8_t type;
  std::string payload;
};
// Reads every record from `from` to the end; fails the test on error.
std::vector<ReadRecord> ReadAll(wal::Wal* wal, wal::Lsn from);
// Same, but returns the error instead.
Status TryReadAll(wal::Wal* wal, wal::Lsn from, std::vector<ReadRecord>* out);

// Opens or fails the test.
std::unique_ptr<wal::Wal> OpenOrDie(const std::string& dir, const wal::Options& options = {});
// Appends `n` records of `size` bytes with Payload(lsn) content, one per call.
void AppendN(wal::Wal* wal, uint64_t n, size_t size, wal::Epoch epoch = 1);

// Whether the long soak rounds were asked for (REPLICA_SOAK=1).
bool SoakMode();

// A small tmpfs mounted for one test (root only), unmounted at the end.
class TinyDisk {
 public:
  TinyDisk(const std::string& path, const std::string& size) : path_(path) {
    std::filesystem::create_directories(path);
    mounted_ = ::geteuid() == 0 && Shell("mount -t tmpfs -o size=" + size + " tmpfs " + path + " 2>&1; echo rc=$?")
                                           .find("rc=0") != std::string::npos;
  }
  ~TinyDisk() {
    if (mounted_) Shell("umount " + path_);
  }
  bool mounted() const { return mounted_; }
  bool Grow(const std::string& size) {
    return Shell("mount -o remount,size=" + size + " " + path_ + " 2>&1; echo rc=$?").find("rc=0") != std::string::npos;
  }

 private:
  std::string path_;
  bool mounted_ = false;
};

}  // namespace replica::test
