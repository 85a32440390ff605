#include "replication/snapshot.h"

#include <rocksdb/db.h>
#include <rocksdb/utilities/checkpoint.h>
#include <sys/stat.h>
#include <xxhash.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <system_error>

#include "base/coding.h"
#include "base/env.h"
#include "base/log.h"

namespace replica::snapshot {
namespace fs = std::filesystem;

namespace {

constexpr char kMarker[] = "INSTALL";

Status FsError(const std::string& what, const std::error_code& ec) {
  return Status::IOError(what + ": " + ec.message());
}

Status Rename(const std::string& from, const std::string& to) {
  std::error_code ec;
  fs::rename(from, to, ec);
  if (ec) return FsError("rename " + from + " to " + to, ec);
  return Status::OK();
}

}  // namespace

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::OK();
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  return Status::IOError(what + ": " + s.ToString());
}

Result<uint64_t> HashFile(const std::string& path) {
  REPLICA_ASSIGN_OR_RETURN(auto file, Env::Default()->NewRandomAccessFile(path));
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  std::string buf(1u << 20, '\0');
  uint64_t offset = 0;
  for (;;) {
    REPLICA_ASSIGN_OR_RETURN(size_t n, file->Read(offset, buf.size(), buf.data()));
    if (n == 0) break;
    XXH3_64bits_update(state.get(), buf.data(), n);
    offset += n;
  }
  return static_cast<uint64_t>(XXH3_64bits_digest(state.get()));
}

Result<uint64_t> HashCache::Hash(const std::string& path, bool* read) {
  *read = true;
  const bool table = path.size() > 4 && path.compare(path.size() - 4, 4, ".sst") == 0;
  struct stat st {};
  if (table && ::stat(path.c_str(), &st) != 0) return Status::FromErrno("stat " + path, errno);
  const size_t slash = path.rfind('/');
  const Key id{slash == std::string::npos ? path : path.substr(slash + 1), static_cast<uint64_t>(st.st_dev),
               static_cast<uint64_t>(st.st_ino)};
  const int64_t mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  if (table) {
    MutexLock l(&mu_);
    auto it = files_.find(id);
    if (it != files_.end() && it->second.size == static_cast<uint64_t>(st.st_size) &&
        it->second.mtime_ns == mtime_ns) {
      it->second.used = true;
      *read = false;
      return it->second.xxh3;
    }
  }
  REPLICA_ASSIGN_OR_RETURN(uint64_t xxh3, HashFile(path));
  if (table) {
    MutexLock l(&mu_);
    files_[id] = Entry{static_cast<uint64_t>(st.st_size), mtime_ns, xxh3, true};
  }
  return xxh3;
}

void HashCache::Clear() {
  MutexLock l(&mu_);
  files_.clear();
}

void HashCache::Trim() {
  MutexLock l(&mu_);
  for (auto it = files_.begin(); it != files_.end();) {
    if (!it->second.used) {
      it = files_.erase(it);
    } else {
      it->second.used = false;
      ++it;
    }
  }
}

bool IsPlainFileName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos && name.size() <= 255;
}

Result<Checkpoint> MakeCheckpoint(rocksdb::DB* db, const std::string& dir, const std::string& meta_cf,
                                  const std::string& applied_key, HashCache* cache) {
  rocksdb::Checkpoint* raw = nullptr;
  auto s = rocksdb::Checkpoint::Create(db, &raw);
  if (!s.ok()) return Status::IOError("checkpoint: " + s.ToString());
  std::unique_ptr<rocksdb::Checkpoint> cp(raw);
  // log_size_for_flush = 0: flush the memtables, so the checkpoint's data is
  // all in SST files (immutable, hence reusable by name, size and hash).
  s = cp->CreateCheckpoint(dir, /*log_size_for_flush=*/0);
  if (!s.ok()) return Status::IOError("create checkpoint in " + dir + ": " + s.ToString());

  Checkpoint out;
  out.dir = dir;
  {
    // The applied LSN, from the checkpoint itself.
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
        {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
        {meta_cf, rocksdb::ColumnFamilyOptions()}};
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* ro = nullptr;
    s = rocksdb::DB::OpenForReadOnly(rocksdb::Options(), dir, cfs, &handles, &ro);
    if (!s.ok()) return Status::IOError("open checkpoint " + dir + ": " + s.ToString());
    std::string v;
    s = ro->Get(rocksdb::ReadOptions(), handles[1], applied_key, &v);
    for (auto* h : handles) ro->DestroyColumnFamilyHandle(h);
    delete ro;
    if (s.ok() && v.size() == 8) {
      out.lsn = DecodeFixed64(v.data());
    } else if (!s.IsNotFound()) {
      return Status::Corruption("checkpoint " + dir + ": cannot read the applied LSN: " + s.ToString());
    }
  }
  REPLICA_ASSIGN_OR_RETURN(auto names, Env::Default()->GetChildren(dir));
  std::sort(names.begin(), names.end());
  for (const auto& name : names) {
    const std::string path = JoinPath(dir, name);
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) continue;
    FileInfo f;
    f.name = name;
    REPLICA_ASSIGN_OR_RETURN(f.size, Env::Default()->GetFileSize(path));
    bool read = true;
    REPLICA_ASSIGN_OR_RETURN(f.xxh3, cache != nullptr ? cache->Hash(path, &read) : HashFile(path));
    if (read) out.bytes_hashed += f.size;
    out.files.push_back(std::move(f));
  }
  if (cache != nullptr) cache->Trim();
  return out;
}

std::string StagingDir(const std::string& data_dir) { return JoinPath(data_dir, "resync"); }
std::string StagingDb(const std::string& data_dir) { return JoinPath(StagingDir(data_dir), "db"); }
std::string StagingWal(const std::string& data_dir) { return JoinPath(StagingDir(data_dir), "wal"); }

Status LinkFile(const std::string& from, const std::string& to) {
  std::error_code ec;
  fs::create_hard_link(from, to, ec);
  if (ec) return FsError("link " + from + " to " + to, ec);
  return Status::OK();
}

Status RemoveTree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) return FsError("remove " + path, ec);
  return Status::OK();
}

namespace {

// The steps after the commit point; each is redone or skipped as needed.
Status FinishInstall(const std::string& data_dir) {
  Env* env = Env::Default();
  const std::string marker = JoinPath(data_dir, kMarker);
  if (env->FileExists(marker)) {
    for (const char* part : {"db", "wal"}) {
      const std::string staged = JoinPath(StagingDir(data_dir), part);
      const std::string live = JoinPath(data_dir, part);
      const std::string old = JoinPath(data_dir, std::string("old-") + part);
      if (!env->FileExists(staged)) continue;  // already moved in
      if (env->FileExists(live)) {
        REPLICA_RETURN_IF_ERROR(RemoveTree(old));
        REPLICA_RETURN_IF_ERROR(Rename(live, old));
      }
      REPLICA_RETURN_IF_ERROR(Rename(staged, live));
    }
    REPLICA_RETURN_IF_ERROR(env->SyncDir(data_dir));
    REPLICA_RETURN_IF_ERROR(env->DeleteFile(marker));
    REPLICA_RETURN_IF_ERROR(env->SyncDir(data_dir));
    REPLICA_RETURN_IF_ERROR(RemoveTree(StagingDir(data_dir)));
  }
  REPLICA_RETURN_IF_ERROR(RemoveTree(JoinPath(data_dir, "old-db")));
  REPLICA_RETURN_IF_ERROR(RemoveTree(JoinPath(data_dir, "old-wal")));
  return Status::OK();
}

}  // namespace

Status RecoverInstall(const std::string& data_dir) {
  if (Env::Default()->FileExists(JoinPath(data_dir, kMarker))) {
    RLOG(kWarn, "snapshot.install_resumed") << "data_dir=" << data_dir
                                            << " reason=\"a crash interrupted a snapshot install after its commit "
                                               "point; finishing it\"";
  }
  return FinishInstall(data_dir);
}

Status CommitInstall(const std::string& data_dir) {
  Env* env = Env::Default();
  REPLICA_RETURN_IF_ERROR(env->SyncDir(StagingDb(data_dir)));
  REPLICA_RETURN_IF_ERROR(env->SyncDir(StagingWal(data_dir)));
  REPLICA_RETURN_IF_ERROR(env->SyncDir(StagingDir(data_dir)));
  REPLICA_RETURN_IF_ERROR(WriteFileAtomically(env, JoinPath(data_dir, kMarker), "snapshot install\n"));
  return FinishInstall(data_dir);
}

}  // namespace replica::snapshot
