// POSIX implementation of Env.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

#include "base/env.h"

namespace replica {
namespace {

class PosixWritableFile final : public WritableFile {
 public:
  PosixWritableFile(std::string path, int fd, uint64_t size)
      : path_(std::move(path)), fd_(fd), size_(size) {}
  ~PosixWritableFile() override {
    if (fd_ >= 0) ::close(fd_);
  }

  Status Append(std::string_view data) override {
    const char* p = data.data();
    size_t left = data.size();
    while (left > 0) {
      ssize_t n = ::write(fd_, p, left);
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno("write " + path_, errno);
      }
      p += n;
      left -= static_cast<size_t>(n);
      size_.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
    }
    return Status::OK();
  }

  Status AppendV(const std::string_view* parts, size_t n) override {
    // Part i from byte `off` on is next; up to 64 iovecs per writev (parts
    // adjacent in memory share one), and a short write resumes where it
    // stopped.
    size_t i = 0;
    size_t off = 0;
    for (;;) {
      while (i < n && off == parts[i].size()) {
        ++i;
        off = 0;
      }
      if (i == n) return Status::OK();
      iovec iov[64];
      int count = 0;
      for (size_t k = i; k < n && count < 64; ++k) {
        const size_t skip = k == i ? off : 0;
        if (parts[k].size() <= skip) continue;
        char* base = const_cast<char*>(parts[k].data() + skip);
        const size_t len = parts[k].size() - skip;
        if (count > 0 && static_cast<char*>(iov[count - 1].iov_base) + iov[count - 1].iov_len == base) {
          iov[count - 1].iov_len += len;  // adjacent in memory: one iovec
        } else {
          iov[count++] = iovec{base, len};
        }
      }
      // One iovec (the usual case: a group encoded into one buffer) goes
      // through write(), which costs the kernel less than writev.
      ssize_t w = count == 1 ? ::write(fd_, iov[0].iov_base, iov[0].iov_len) : ::writev(fd_, iov, count);
      if (w < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno("write " + path_, errno);
      }
      size_.fetch_add(static_cast<uint64_t>(w), std::memory_order_relaxed);
      for (size_t left = static_cast<size_t>(w); left > 0;) {
        const size_t avail = parts[i].size() - off;
        if (left < avail) {
          off += left;
          break;
        }
        left -= avail;
        ++i;
        off = 0;
      }
    }
  }

  Status Sync() override {
    if (::fdatasync(fd_) != 0) return Status::FromErrno("fdatasync " + path_, errno);
    return Status::OK();
  }

  Status Close() override {
    if (fd_ < 0) return Status::OK();
    int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) return Status::FromErrno("close " + path_, errno);
    return Status::OK();
  }

  uint64_t Size() const override { return size_.load(std::memory_order_relaxed); }

  Status Preallocate(uint64_t size) override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Status::FromErrno("stat " + path_, errno);
    const uint64_t had = static_cast<uint64_t>(st.st_size);
    if (size <= had) return Status::OK();
    // The reservation must not take the last of the disk from what else
    // lives there (RocksDB, the other segments): only with twice it free.
    struct statvfs vfs;
    if (::fstatvfs(fd_, &vfs) == 0) {
      const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
      if (free_bytes < 2 * (size - had)) {
        return Status::IOError("not reserving " + std::to_string(size - had) + " bytes for " + path_ + ": only " +
                               std::to_string(free_bytes) + " bytes free on its filesystem");
      }
    }
    // Mode 0: the file's size grows too, so that writes into the space are
    // overwrites. The fd has no O_APPEND, so its position stays put.
    if (::fallocate(fd_, 0, 0, static_cast<off_t>(size)) == 0) return Status::OK();
    const int err = errno;
    if (err == EOPNOTSUPP || err == ENOSYS) return Status::OK();
    // A partial reservation (ENOSPC part-way) is given back.
    (void)::ftruncate(fd_, static_cast<off_t>(had));
    return Status::FromErrno("fallocate " + path_, err);
  }

 private:
  const std::string path_;
  int fd_;
  std::atomic<uint64_t> size_;  // read by Size() from other threads (a sync running beside an append)
};

class PosixRandomAccessFile final : public RandomAccessFile {
 public:
  PosixRandomAccessFile(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  ~PosixRandomAccessFile() override { ::close(fd_); }

  Result<size_t> Read(uint64_t offset, size_t n, char* scratch) const override {
    size_t done = 0;
    while (done < n) {
      ssize_t r = ::pread(fd_, scratch + done, n - done, static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno("pread " + path_, errno);
      }
      if (r == 0) break;
      done += static_cast<size_t>(r);
    }
    return done;
  }

  int NativeHandle() const override { return fd_; }

 private:
  const std::string path_;
  const int fd_;
};

class PosixFileLock final : public FileLock {
 public:
  explicit PosixFileLock(int fd) : fd_(fd) {}
  ~PosixFileLock() override {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }

 private:
  int fd_;
};

static std::string DirName(const std::string& path) {
  auto pos = path.rfind('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

class PosixEnv final : public Env {
 public:
  Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override {
    // No O_APPEND: writes go to the file position, which Preallocate does not
    // move (with O_APPEND they would land after the reserved space).
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return Status::FromErrno("create " + path, errno);
    return std::unique_ptr<WritableFile>(new PosixWritableFile(path, fd, 0));
  }

  Result<std::unique_ptr<WritableFile>> ReopenWritableFile(const std::string& path) override {
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno("open for append " + path, errno);
    struct stat st;
    if (::fstat(fd, &st) != 0 || ::lseek(fd, st.st_size, SEEK_SET) < 0) {
      int err = errno;
      ::close(fd);
      return Status::FromErrno("stat " + path, err);
    }
    return std::unique_ptr<WritableFile>(
        new PosixWritableFile(path, fd, static_cast<uint64_t>(st.st_size)));
  }

  Result<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT) return Status::NotFound(path);
      return Status::FromErrno("open " + path, errno);
    }
    return std::unique_ptr<RandomAccessFile>(new PosixRandomAccessFile(path, fd));
  }

  Result<std::vector<std::string>> GetChildren(const std::string& dir) override {
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) {
      if (errno == ENOENT) return Status::NotFound(dir);
      return Status::FromErrno("opendir " + dir, errno);
    }
    std::vector<std::string> names;
    while (struct dirent* e = ::readdir(d)) {
      std::string_view name(e->d_name);
      if (name == "." || name == "..") continue;
      names.emplace_back(name);
    }
    ::closedir(d);
    return names;
  }

  Result<uint64_t> GetFileSize(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return Status::NotFound(path);
      return Status::FromErrno("stat " + path, errno);
    }
    return static_cast<uint64_t>(st.st_size);
  }

  bool FileExists(const std::string& path) override { return ::access(path.c_str(), F_OK) == 0; }

  Result<bool> IsRegularFile(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) return Status::NotFound(path);
      return Status::FromErrno("stat " + path, errno);
    }
    return S_ISREG(st.st_mode);
  }

  Status DeleteFile(const std::string& path) override {
    if (::unlink(path.c_str()) != 0) return Status::FromErrno("unlink " + path, errno);
    return Status::OK();
  }

  Status RenameFile(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) {
      return Status::FromErrno("rename " + from + " -> " + to, errno);
    }
    return Status::OK();
  }

  Status TruncateFile(const std::string& path, uint64_t size) override {
    if (::truncate(path.c_str(), static_cast<off_t>(size)) != 0) {
      return Status::FromErrno("truncate " + path, errno);
    }
    return Status::OK();
  }

  Status CreateDirIfMissing(const std::string& dir) override {
    const bool created = ::mkdir(dir.c_str(), 0755) == 0;
    if (!created && errno != EEXIST) return Status::FromErrno("mkdir " + dir, errno);
    struct stat st;
    if (::stat(dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
      return Status::FromErrno("mkdir " + dir + " (it exists and is not a directory)", ENOTDIR);
    }
    // A new directory's entry is in its parent: without this fsync a power
    // loss could lose it (and the synced files in it) on a filesystem that
    // does not order metadata, such as the wal/ of a node's first start.
    if (created) {
      std::string path = dir;
      while (path.size() > 1 && path.back() == '/') path.pop_back();
      Status synced = SyncDir(DirName(path));
      // A parent this process may write but not read (mode -wx) cannot be
      // opened to sync: the directory exists, and a start must not fail on
      // it here and pass the next time.
      if (!synced.ok() && synced.sys_errno() == EACCES) return Status::OK();
      return synced;
    }
    return Status::OK();
  }

  Status SyncDir(const std::string& dir) override {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno("open dir " + dir, errno);
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    if (rc != 0) return Status::FromErrno("fsync dir " + dir, err);
    return Status::OK();
  }

  Result<std::unique_ptr<FileLock>> LockFile(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return Status::FromErrno("open lock file " + path, errno);
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      ::close(fd);
      if (err == EWOULDBLOCK) return Status::Busy(path + " is locked by another process");
      return Status::FromErrno("flock " + path, err);
    }
    return std::unique_ptr<FileLock>(new PosixFileLock(fd));
  }
};

}  // namespace

Env* Env::Default() {
  static PosixEnv* env = new PosixEnv();  // never destroyed: used until exit
  return env;
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

Status WriteFileAtomically(Env* env, const std::string& path, std::string_view data) {
  const std::string tmp = path + ".tmp";
  REPLICA_ASSIGN_OR_RETURN(auto file, env->NewWritableFile(tmp));
  REPLICA_RETURN_IF_ERROR(file->Append(data));
  REPLICA_RETURN_IF_ERROR(file->Sync());
  REPLICA_RETURN_IF_ERROR(file->Close());
  REPLICA_RETURN_IF_ERROR(env->RenameFile(tmp, path));
  return env->SyncDir(DirName(path));
}

Result<std::string> ReadWholeFile(Env* env, const std::string& path, uint64_t max_bytes) {
  REPLICA_ASSIGN_OR_RETURN(bool regular, env->IsRegularFile(path));
  if (!regular) return Status::InvalidArgument(path + " is not a regular file");
  REPLICA_ASSIGN_OR_RETURN(uint64_t size, env->GetFileSize(path));
  if (size > max_bytes) {
    return Status::InvalidArgument(path + " is " + std::to_string(size) + " bytes, more than the " +
                                   std::to_string(max_bytes) + " such a file can hold");
  }
  REPLICA_ASSIGN_OR_RETURN(auto file, env->NewRandomAccessFile(path));
  std::string data(size, '\0');
  REPLICA_ASSIGN_OR_RETURN(size_t n, file->Read(0, size, data.data()));
  data.resize(n);
  return data;
}

}  // namespace replica
