// Env: the small file-system interface every module does its file I/O
// through, so that tests can substitute a fault-injecting implementation
// (see base/fault_env.h). Modelled on leveldb's Env, cut to what we use.
//
// Thread-safety: an Env is safe to use from any thread. A WritableFile is used
// by one thread at a time (the caller serialises). A RandomAccessFile is safe
// for concurrent reads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "replica/status.h"

namespace replica {

class WritableFile {
 public:
  virtual ~WritableFile() = default;
  // Appends all of data or returns an error; on error some prefix of data may
  // have reached the file (a short write), and Size() says how much.
  virtual Status Append(std::string_view data) = 0;
  // Appends the parts in order, as one Append of their concatenation would
  // (the POSIX file uses writev, so nothing is copied to join them, and
  // parts adjacent in memory go out as one).
  virtual Status AppendV(const std::string_view* parts, size_t n) {
    for (size_t i = 0; i < n; ++i) REPLICA_RETURN_IF_ERROR(Append(parts[i]));
    return Status::OK();
  }
  // Makes appended data durable (fdatasync).
  virtual Status Sync() = 0;
  virtual Status Close() = 0;
  // The write position: the file's size when opened plus what this object
  // appended (space reserved by Preallocate is not counted). May be called
  // from another thread while one appends (it may then lag that append).
  virtual uint64_t Size() const = 0;
  // Reserves disk blocks so that the file is at least `size` bytes long; the
  // reserved bytes read as zeros and the write position does not move.
  // Appending into reserved space makes fdatasync cheaper (the file's size
  // and block map need not be journalled each time). Files that cannot do it
  // return OK and reserve nothing. The POSIX file refuses (an error, nothing
  // reserved) when less than twice the request is free on the filesystem.
  virtual Status Preallocate(uint64_t size) {
    (void)size;
    return Status::OK();
  }
};

class RandomAccessFile {
 public:
  virtual ~RandomAccessFile() = default;
  // Reads up to n bytes at offset into scratch; returns how many were read
  // (fewer only at end of file).
  virtual Result<size_t> Read(uint64_t offset, size_t n, char* scratch) const = 0;
  // The OS file descriptor for zero-copy sends (sendfile), or -1 if this file
  // has none (in-memory or fault-injecting wrappers may still return one).
  virtual int NativeHandle() const { return -1; }
};

// Held while a process owns a directory; released on destruction.
class FileLock {
 public:
  virtual ~FileLock() = default;
};

class Env {
 public:
  virtual ~Env() = default;
  // The process-wide POSIX Env. Never destroyed.
  static Env* Default();

  // Creates (or truncates) path for appending.
  virtual Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) = 0;
  // Opens an existing file for appending at its end.
  virtual Result<std::unique_ptr<WritableFile>> ReopenWritableFile(const std::string& path) = 0;
  virtual Result<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) = 0;

  // Names (not paths) of the entries of dir, without "." and "..".
  virtual Result<std::vector<std::string>> GetChildren(const std::string& dir) = 0;
  virtual Result<uint64_t> GetFileSize(const std::string& path) = 0;
  virtual bool FileExists(const std::string& path) = 0;
  // Whether path (symlinks followed) is a regular file, not a directory, FIFO,
  // socket or device; NotFound if nothing is there.
  virtual Result<bool> IsRegularFile(const std::string& path) = 0;
  virtual Status DeleteFile(const std::string& path) = 0;
  // Atomic replace of to (POSIX rename).
  virtual Status RenameFile(const std::string& from, const std::string& to) = 0;
  virtual Status TruncateFile(const std::string& path, uint64_t size) = 0;
  // Creates dir (not its parents) unless it exists; a directory it creates
  // is made durable (fsync of the parent).
  virtual Status CreateDirIfMissing(const std::string& dir) = 0;
  // fsync on the directory, so that creations, renames and deletions in it
  // survive a crash.
  virtual Status SyncDir(const std::string& dir) = 0;
  // An exclusive advisory lock (flock) on path, created if missing; Busy if
  // another process holds it.
  virtual Result<std::unique_ptr<FileLock>> LockFile(const std::string& path) = 0;
};

// Writes data to path atomically: temp file, fsync, rename, fsync of the directory.
Status WriteFileAtomically(Env* env, const std::string& path, std::string_view data);
// Reads a whole (small) file. A file larger than max_bytes is refused
// before anything is read (InvalidArgument naming both sizes), and so is
// anything but a regular file (a FIFO would block the open, a pipe or a
// /proc file reads as empty).
Result<std::string> ReadWholeFile(Env* env, const std::string& path, uint64_t max_bytes = 1u << 20);

std::string JoinPath(const std::string& dir, const std::string& name);

}  // namespace replica
