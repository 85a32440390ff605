// FaultInjectionEnv: wraps a real Env and injects the failures that a log must
// survive. For tests only (linked into replica_testing, never into products).
//
//  - crash at a chosen mutation: after N more mutating calls succeed (append,
//    sync, create, delete, rename, truncate, dir sync), every later one fails,
//    as if the process had died there. Stepping N from 0 upwards walks a
//    multi-step operation through every point of interruption.
//  - disk full: appends past a byte budget write only the bytes that fit (a
//    short write) and fail with ENOSPC.
//  - failing fsync: Sync returns EIO.
//  - power loss: DropUnsyncedData() cuts every file written through this Env
//    back to the length it had at its last successful Sync. Given keep_page,
//    the pages (kPowerLossPage bytes) of unsynced data it keeps survive and
//    the others before the last one kept read as zeros (the disk wrote a
//    later page without an earlier one); after it the file is cut, or reads
//    as zeros where a synced reservation reaches.
//
// Thread-safe.
#pragma once

#include <functional>
#include <map>
#include <string>

#include "base/env.h"
#include "base/mutex.h"

namespace replica {

class FaultInjectionEnv final : public Env {
 public:
  explicit FaultInjectionEnv(Env* target) : target_(target) {}

  // -1 (the default) disables. 0 fails the very next mutation.
  void CrashAfterMutations(int64_t n) EXCLUDES(mu_);
  bool crashed() const EXCLUDES(mu_);
  // How many mutating calls have succeeded so far.
  int64_t mutations() const EXCLUDES(mu_);
  // -1 disables. Counts bytes appended from now on.
  void SetSpaceBudget(int64_t bytes) EXCLUDES(mu_);
  void SetSyncFails(bool fail) EXCLUDES(mu_);
  // Runs at the start of every Sync (outside the Env's lock), e.g. to hold a
  // writer inside its fsync while a test lines up more work behind it.
  void SetSyncHook(std::function<void()> hook) EXCLUDES(mu_);
  static constexpr uint64_t kPowerLossPage = 4096;
  // keep_page(path, page index): whether that page's unsynced bytes survive.
  Status DropUnsyncedData(const std::function<bool(const std::string& path, uint64_t page)>& keep_page = {})
      EXCLUDES(mu_);

  Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override;
  Result<std::unique_ptr<WritableFile>> ReopenWritableFile(const std::string& path) override;
  Result<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) override {
    return target_->NewRandomAccessFile(path);
  }
  Result<std::vector<std::string>> GetChildren(const std::string& dir) override {
    return target_->GetChildren(dir);
  }
  Result<uint64_t> GetFileSize(const std::string& path) override { return target_->GetFileSize(path); }
  bool FileExists(const std::string& path) override { return target_->FileExists(path); }
  Result<bool> IsRegularFile(const std::string& path) override { return target_->IsRegularFile(path); }
  Status DeleteFile(const std::string& path) override;
  Status RenameFile(const std::string& from, const std::string& to) override;
  Status TruncateFile(const std::string& path, uint64_t size) override;
  Status CreateDirIfMissing(const std::string& dir) override;
  Status SyncDir(const std::string& dir) override;
  Result<std::unique_ptr<FileLock>> LockFile(const std::string& path) override {
    return target_->LockFile(path);
  }

 private:
  class File;
  friend class File;

  // Consumes one mutation; returns the injected error if the crash point is reached.
  Status Mutation(const char* what) EXCLUDES(mu_);
  // How many of want bytes fit the space budget (and consumes them).
  size_t TakeSpace(size_t want) EXCLUDES(mu_);
  // The file is durable up to size (at_least: up to at least size, for a
  // sync that may end after another that covered more).
  void RecordSynced(const std::string& path, uint64_t size, bool at_least = false) EXCLUDES(mu_);
  // A reservation (Preallocate); RecordSynced makes it durable: after a power
  // loss the file keeps that length, and what was not synced reads as zeros.
  void RecordReserved(const std::string& path, uint64_t size) EXCLUDES(mu_);
  struct Reserved {
    uint64_t pending = 0;  // reserved, not yet made durable by a sync
    uint64_t synced = 0;   // the length a power loss leaves
  };

  Env* const target_;
  mutable Mutex mu_;
  int64_t crash_after_ GUARDED_BY(mu_) = -1;
  bool crashed_ GUARDED_BY(mu_) = false;
  int64_t mutations_ GUARDED_BY(mu_) = 0;
  int64_t space_budget_ GUARDED_BY(mu_) = -1;
  bool sync_fails_ GUARDED_BY(mu_) = false;
  std::function<void()> sync_hook_ GUARDED_BY(mu_);
  std::map<std::string, uint64_t> synced_size_ GUARDED_BY(mu_);
  std::map<std::string, Reserved> reserved_size_ GUARDED_BY(mu_);
};

}  // namespace replica
