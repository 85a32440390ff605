// Snapshot resync, the file side (docs/replication.md, "Snapshot resync"):
// RocksDB checkpoints on the active, the staging directory and the crash-safe
// install on the standby. The engine drives the protocol; this file knows
// nothing of sessions.
//
// Layout under DATA_DIR while a resync runs:
//   checkpoints/NAME/   active: a checkpoint being sent (removed afterwards)
//   resync/db/          standby: the checkpoint being received
//   resync/WAL-SEED     standby: the active's frames holding the checkpoint LSN
//   resync/wal/         standby: the new log, built from the seed
//   INSTALL             standby: present from the moment resync/ is complete
//                       until db/ and wal/ are replaced (the commit point)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "base/mutex.h"
#include "replica/status.h"

namespace rocksdb {
class DB;
class Status;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace replica::snapshot {

inline constexpr char kSeedName[] = "WAL-SEED";
// The engine's column family for its own bookkeeping, and the key in it that
// holds the applied LSN (u64 little-endian), written with the data it covers.
inline constexpr char kMetaColumnFamily[] = "replica_meta";
inline constexpr char kAppliedKey[] = "applied_lsn";

struct FileInfo {
  std::string name;
  uint64_t size = 0;
  uint64_t xxh3 = 0;
};

struct Checkpoint {
  std::string dir;
  uint64_t lsn = 0;  // applied LSN stored in the checkpoint
  std::vector<FileInfo> files;
  uint64_t bytes_hashed = 0;  // read to hash its files: the bytes a HashCache did not know
};

// A RocksDB status as ours: Corruption stays Corruption, the rest is IOError;
// `what` says what was being done.
Status FromRocks(const rocksdb::Status& s, const std::string& what);

// XXH3-64 of a whole file, read in 1 MiB pieces.
Result<uint64_t> HashFile(const std::string& path);

// The XXH3 of RocksDB's table files (*.sst), remembered by the file they are
// of: its name (RocksDB never reuses a file number within a database, and a
// checkpoint keeps the names), device and inode (a checkpoint's files are
// hard links to the database's), size and modification time, so that each
// checkpoint reads only the table files written since the last one. Table
// files are never changed in place; one that is (its size or time changed)
// is hashed again, and so is a new file on a reused inode, which has a new
// number. Other files (MANIFEST, OPTIONS, CURRENT) are small and always
// hashed. Clear() when the database is replaced (file numbers start over).
// Thread-safe.
class HashCache {
 public:
  // The file's XXH3; *read says whether the file was read for it (false:
  // known).
  Result<uint64_t> Hash(const std::string& path, bool* read) EXCLUDES(mu_);
  // Forgets every file but those hashed (or looked up) since the last call:
  // the cache holds no more than one checkpoint's table files.
  void Trim() EXCLUDES(mu_);
  void Clear() EXCLUDES(mu_);

 private:
  struct Entry {
    uint64_t size = 0;
    int64_t mtime_ns = 0;
    uint64_t xxh3 = 0;
    bool used = false;
  };
  Mutex mu_;
  struct Key {
    std::string name;  // the file's name, without its directory
    uint64_t device = 0, inode = 0;
    bool operator<(const Key& o) const {
      return std::tie(device, inode, name) < std::tie(o.device, o.inode, o.name);
    }
  };
  std::map<Key, Entry> files_ GUARDED_BY(mu_);
};

// A plain name of a file inside a directory: no '/', not "." or "..", not empty.
bool IsPlainFileName(const std::string& name);

// Creates a RocksDB checkpoint of db in dir (which must not exist), with
// memtables flushed so that it needs no RocksDB log, and lists its files.
// The applied LSN is read back from the checkpoint itself (meta_cf /
// applied_key, u64 little-endian), so it matches the data exactly. Given a
// cache, table files it knows are not read again.
Result<Checkpoint> MakeCheckpoint(rocksdb::DB* db, const std::string& dir, const std::string& meta_cf,
                                  const std::string& applied_key, HashCache* cache = nullptr);

// Paths of the standby's staging area.
std::string StagingDir(const std::string& data_dir);
std::string StagingDb(const std::string& data_dir);
std::string StagingWal(const std::string& data_dir);

// Finishes an install that crashed after its commit point, or removes the
// debris of one that was finished. A staging area without the marker is kept
// (its files may be reused by the next resync). Call before opening db/ and wal/.
Status RecoverInstall(const std::string& data_dir);

// With db/ and wal/ closed: marks resync/ complete, then moves resync/db and
// resync/wal into place. A crash anywhere in it is finished by RecoverInstall.
Status CommitInstall(const std::string& data_dir);

// A hard link: to names the same file as from.
Status LinkFile(const std::string& from, const std::string& to);

// Removes a directory tree; missing is fine.
Status RemoveTree(const std::string& path);

}  // namespace replica::snapshot
