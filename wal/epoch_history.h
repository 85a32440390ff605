// EpochHistory: the (epoch, first LSN) pairs of a log, as PostgreSQL keeps
// timeline history and Kafka its leader-epoch checkpoint. Answers "where did
// epoch e end", which a rejoining node needs to cut its diverged tail.
//
// Persisted in the WAL directory as the file "epochs" (docs/wal-format.md),
// replaced atomically. Invariant kept by Wal: every epoch present in the log
// has its entry; entries past the log's end (left by a crash) are dropped on
// recovery. Not thread-safe; Wal guards it.
#pragma once

#include <string>
#include <vector>

#include "replica/status.h"
#include "wal/format.h"

namespace replica::wal {

struct EpochEntry {
  Epoch epoch = 0;
  Lsn first_lsn = 0;
  bool operator==(const EpochEntry& o) const { return epoch == o.epoch && first_lsn == o.first_lsn; }
};

// Answer to "where did epoch e end".
struct EpochEnd {
  // The largest epoch <= the one asked for that this log holds, or 0 if none.
  Epoch epoch = 0;
  // The last LSN written in that epoch: the LSN before the next epoch began,
  // or the log's last LSN if it is the latest epoch.
  Lsn end_lsn = 0;
};

class EpochHistory {
 public:
  const std::vector<EpochEntry>& entries() const { return entries_; }
  bool empty() const { return entries_.empty(); }
  Epoch last_epoch() const { return entries_.empty() ? 0 : entries_.back().epoch; }

  // Adds (epoch, first_lsn); epoch and first_lsn must exceed the last entry's.
  Status Add(Epoch epoch, Lsn first_lsn);
  // Drops entries whose first LSN is above last_lsn. Returns true if any was dropped.
  bool TruncateAfter(Lsn last_lsn);
  EpochEnd EndOf(Epoch epoch, Lsn log_last_lsn) const;
  // The epoch of the record at lsn (0 if before every entry).
  Epoch EpochAt(Lsn lsn) const;

  std::string Encode() const;
  static Result<EpochHistory> Decode(std::string_view data);

 private:
  std::vector<EpochEntry> entries_;
};

}  // namespace replica::wal
