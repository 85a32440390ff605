#include "base/fault_env.h"

#include <algorithm>
#include <cerrno>

namespace replica {

class FaultInjectionEnv::File final : public WritableFile {
 public:
  File(FaultInjectionEnv* env, std::string path, std::unique_ptr<WritableFile> target)
      : env_(env), path_(std::move(path)), target_(std::move(target)) {}

  Status Append(std::string_view data) override {
    REPLICA_RETURN_IF_ERROR(env_->Mutation("append"));
    size_t fit = env_->TakeSpace(data.size());
    if (fit < data.size()) {
      if (fit > 0) REPLICA_RETURN_IF_ERROR(target_->Append(data.substr(0, fit)));
      return Status::FromErrno("write " + path_ + " (injected)", ENOSPC);
    }
    return target_->Append(data);
  }
  // One mutation, like one write(): crash points and the space budget step
  // per call, as they did before the WAL wrote with AppendV.
  Status AppendV(const std::string_view* parts, size_t n) override {
    std::string joined;
    for (size_t i = 0; i < n; ++i) joined.append(parts[i]);
    return Append(joined);
  }
  // Forwarded without a crash point: reserving space changes nothing a
  // reader sees. The next sync makes it durable (DropUnsyncedData keeps it).
  Status Preallocate(uint64_t size) override {
    Status st = target_->Preallocate(size);
    if (st.ok()) env_->RecordReserved(path_, size);
    return st;
  }
  Status Sync() override {
    std::function<void()> hook;
    {
      MutexLock l(&env_->mu_);
      hook = env_->sync_hook_;
    }
    if (hook) hook();
    REPLICA_RETURN_IF_ERROR(env_->Mutation("sync"));
    bool fail;
    {
      MutexLock l(&env_->mu_);
      fail = env_->sync_fails_;
    }
    if (fail) return Status::FromErrno("fdatasync " + path_ + " (injected)", EIO);
    // The length before the sync starts: bytes another thread appends while
    // it runs are not covered by it (the WAL's interval thread syncs while
    // the writer appends).
    const uint64_t covered = target_->Size();
    REPLICA_RETURN_IF_ERROR(target_->Sync());
    env_->RecordSynced(path_, covered, /*at_least=*/true);
    return Status::OK();
  }
  Status Close() override { return target_->Close(); }
  uint64_t Size() const override { return target_->Size(); }

 private:
  FaultInjectionEnv* const env_;
  const std::string path_;
  std::unique_ptr<WritableFile> target_;
};

void FaultInjectionEnv::CrashAfterMutations(int64_t n) {
  MutexLock l(&mu_);
  crash_after_ = n;
  crashed_ = false;
}

bool FaultInjectionEnv::crashed() const {
  MutexLock l(&mu_);
  return crashed_;
}

int64_t FaultInjectionEnv::mutations() const {
  MutexLock l(&mu_);
  return mutations_;
}

void FaultInjectionEnv::SetSpaceBudget(int64_t bytes) {
  MutexLock l(&mu_);
  space_budget_ = bytes;
}

void FaultInjectionEnv::SetSyncFails(bool fail) {
  MutexLock l(&mu_);
  sync_fails_ = fail;
}

void FaultInjectionEnv::SetSyncHook(std::function<void()> hook) {
  MutexLock l(&mu_);
  sync_hook_ = std::move(hook);
}

Status FaultInjectionEnv::Mutation(const char* what) {
  MutexLock l(&mu_);
  if (crashed_ || crash_after_ == 0) {
    crashed_ = true;
    return Status::IOError(std::string("injected crash before ") + what);
  }
  if (crash_after_ > 0) --crash_after_;
  ++mutations_;
  return Status::OK();
}

size_t FaultInjectionEnv::TakeSpace(size_t want) {
  MutexLock l(&mu_);
  if (space_budget_ < 0) return want;
  size_t fit = want <= static_cast<uint64_t>(space_budget_) ? want : static_cast<size_t>(space_budget_);
  space_budget_ -= static_cast<int64_t>(fit);
  return fit;
}

void FaultInjectionEnv::RecordSynced(const std::string& path, uint64_t size, bool at_least) {
  MutexLock l(&mu_);
  // Two syncs of one file can end in either order: what the earlier-started
  // one covered never undoes what the other made durable (a truncation
  // lowers it, in TruncateFile).
  uint64_t& synced = synced_size_[path];
  synced = at_least ? std::max(synced, size) : size;
  // The sync also makes the file's reservation durable.
  auto r = reserved_size_.find(path);
  if (r != reserved_size_.end()) r->second.synced = r->second.pending;
}

void FaultInjectionEnv::RecordReserved(const std::string& path, uint64_t size) {
  MutexLock l(&mu_);
  Reserved& r = reserved_size_[path];
  r.pending = std::max(r.pending, size);
}

Result<std::unique_ptr<WritableFile>> FaultInjectionEnv::NewWritableFile(const std::string& path) {
  REPLICA_RETURN_IF_ERROR(Mutation("create"));
  REPLICA_ASSIGN_OR_RETURN(auto file, target_->NewWritableFile(path));
  {
    MutexLock l(&mu_);
    reserved_size_.erase(path);
  }
  RecordSynced(path, 0);
  return std::unique_ptr<WritableFile>(new File(this, path, std::move(file)));
}

Result<std::unique_ptr<WritableFile>> FaultInjectionEnv::ReopenWritableFile(const std::string& path) {
  REPLICA_ASSIGN_OR_RETURN(auto file, target_->ReopenWritableFile(path));
  RecordSynced(path, file->Size());
  return std::unique_ptr<WritableFile>(new File(this, path, std::move(file)));
}

Status FaultInjectionEnv::DeleteFile(const std::string& path) {
  REPLICA_RETURN_IF_ERROR(Mutation("delete"));
  REPLICA_RETURN_IF_ERROR(target_->DeleteFile(path));
  MutexLock l(&mu_);
  synced_size_.erase(path);
  reserved_size_.erase(path);
  return Status::OK();
}

Status FaultInjectionEnv::RenameFile(const std::string& from, const std::string& to) {
  REPLICA_RETURN_IF_ERROR(Mutation("rename"));
  REPLICA_RETURN_IF_ERROR(target_->RenameFile(from, to));
  MutexLock l(&mu_);
  auto it = synced_size_.find(from);
  if (it != synced_size_.end()) {
    synced_size_[to] = it->second;
    synced_size_.erase(from);
  }
  reserved_size_.erase(to);
  if (auto r = reserved_size_.find(from); r != reserved_size_.end()) {
    reserved_size_[to] = r->second;
    reserved_size_.erase(from);
  }
  return Status::OK();
}

Status FaultInjectionEnv::TruncateFile(const std::string& path, uint64_t size) {
  REPLICA_RETURN_IF_ERROR(Mutation("truncate"));
  REPLICA_RETURN_IF_ERROR(target_->TruncateFile(path, size));
  MutexLock l(&mu_);
  auto it = synced_size_.find(path);
  if (it != synced_size_.end() && it->second > size) it->second = size;
  // A truncation gives the reserved space past it back (as it does on disk).
  if (auto r = reserved_size_.find(path); r != reserved_size_.end()) {
    r->second.pending = std::min(r->second.pending, size);
    r->second.synced = std::min(r->second.synced, size);
  }
  return Status::OK();
}

Status FaultInjectionEnv::CreateDirIfMissing(const std::string& dir) {
  REPLICA_RETURN_IF_ERROR(Mutation("mkdir"));
  return target_->CreateDirIfMissing(dir);
}

Status FaultInjectionEnv::SyncDir(const std::string& dir) {
  REPLICA_RETURN_IF_ERROR(Mutation("sync dir"));
  return target_->SyncDir(dir);
}

Status FaultInjectionEnv::DropUnsyncedData(const std::function<bool(const std::string&, uint64_t)>& keep_page) {
  std::map<std::string, uint64_t> sizes;
  std::map<std::string, Reserved> reserved;
  {
    MutexLock l(&mu_);
    sizes = synced_size_;
    reserved = reserved_size_;
  }
  for (const auto& [path, size] : sizes) {
    auto cur = target_->GetFileSize(path);
    if (!cur.ok()) continue;  // deleted since
    // The unsynced bytes that survive: the pages keep_page keeps; the others
    // read as zeros up to the last page kept.
    std::string kept;
    if (keep_page && *cur > size) {
      REPLICA_ASSIGN_OR_RETURN(auto file, target_->NewRandomAccessFile(path));
      std::string tail(static_cast<size_t>(*cur - size), '\0');
      REPLICA_ASSIGN_OR_RETURN(size_t got, file->Read(size, tail.size(), tail.data()));
      tail.resize(got);
      // Only pages that were written: reserved space past the last non-zero
      // byte was never written (a payload's trailing zeros are lost with it,
      // as part of an unsynced frame).
      while (!tail.empty() && tail.back() == '\0') tail.pop_back();
      uint64_t kept_end = size;
      for (uint64_t page = size / kPowerLossPage; page * kPowerLossPage < size + tail.size(); ++page) {
        const uint64_t lo = std::max(page * kPowerLossPage, size);
        const uint64_t hi = std::min((page + 1) * kPowerLossPage, size + tail.size());
        if (keep_page(path, page)) {
          kept_end = hi;
        } else {
          std::fill(tail.begin() + static_cast<std::ptrdiff_t>(lo - size),
                    tail.begin() + static_cast<std::ptrdiff_t>(hi - size), '\0');
        }
      }
      tail.resize(static_cast<size_t>(kept_end - size));
      kept = std::move(tail);
    }
    if (*cur > size) REPLICA_RETURN_IF_ERROR(target_->TruncateFile(path, size));
    if (!kept.empty()) {
      REPLICA_ASSIGN_OR_RETURN(auto wf, target_->ReopenWritableFile(path));
      REPLICA_RETURN_IF_ERROR(wf->Append(kept));
      REPLICA_RETURN_IF_ERROR(wf->Close());
    }
    // A durable reservation keeps the file that long: what was written into
    // it and not synced reads as zeros, as unwritten extents do.
    auto r = reserved.find(path);
    if (r != reserved.end() && r->second.synced > size + kept.size()) {
      REPLICA_RETURN_IF_ERROR(target_->TruncateFile(path, r->second.synced));
    }
  }
  return Status::OK();
}

}  // namespace replica
