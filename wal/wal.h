// Wal: a segmented, append-only write-ahead log (docs/wal-format.md).
//
// The active appends records; a standby appends the active's frames byte for
// byte (AppendRaw), so both logs are identical record for record. Readers
// iterate from any retained LSN and can follow the tail without polling.
//
// Thread-safety: every public method is safe to call from any thread.
// Under SyncPolicy::kEveryCommit appends are group-committed: concurrent
// appenders queue; the first in the queue (the leader) writes the whole group
// with one write and one fdatasync, marks its ops done and wakes them all with
// one futex call. Under the other policies there is no fdatasync to share:
// an appender that finds the writer lock (write_mu_) free writes its own
// records under it, with no hand-off; one that finds it taken queues, and
// whichever queued appender next takes the lock writes every queued record
// with one write() (Combine), the others yielding the CPU meanwhile. Sync,
// Truncate and Purge travel through the queue, whose leader holds the writer
// lock too, so they never interleave with a write.
//
// Errors: a failed write or sync is sticky (as in RocksDB): the log refuses
// further appends with that error, because what reached the disk is unknown.
// Reopening recovers to the last whole record.
//
// Lifetime: Readers must be destroyed before the Wal. Close() (or the
// destructor) drains queued appends, syncs everything (whatever the policy),
// wakes waiting readers, and returns the sticky error if there was one. Close
// must not race another Close or the destructor.
//
// Lock order: write_mu_ before mu_; mu_ is a leaf; no callback runs under either.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/env.h"
#include "base/mutex.h"
#include "base/wake_word.h"
#include "wal/epoch_history.h"
#include "wal/frame.h"
#include "wal/gather_policy.h"
#include "wal/segment.h"

namespace replica::wal {

enum class SyncPolicy {
  kEveryCommit,  // an append returns after fdatasync (shared by its group)
  kInterval,     // an append returns after write(); a thread syncs every sync_interval
  kNone,         // an append returns after write(); the OS decides when to flush
};

const char* SyncPolicyName(SyncPolicy p);
// "every", "interval", "none"
bool ParseSyncPolicy(std::string_view text, SyncPolicy* p);

struct Options {
  Env* env = nullptr;  // nullptr: Env::Default()
  // A segment is closed once it holds this many bytes; the next frame starts a new one.
  uint64_t segment_size = 64ull << 20;
  SyncPolicy sync_policy = SyncPolicy::kEveryCommit;
  std::chrono::milliseconds sync_interval{10};
  // Store each commit group as one LZ4 block when that is smaller.
  bool compress = false;
  // Under the every and interval policies, reserve segment_size bytes of
  // disk for each new segment (fallocate). Frames then overwrite reserved
  // blocks, and an fdatasync need not journal the file's growth: about a
  // third less time per sync on ext4 (docs/performance.md). The reserved
  // tail reads as zeros, which recovery takes for the end of the log; a
  // segment is cut back to its last frame when it is finished, and at Close.
  bool preallocate = true;
  // 0 keeps every segment. Otherwise, after each segment roll, the oldest
  // segments are deleted while the log is larger than this, never past the
  // retention floor (SetRetentionFloor) and never the segment being written.
  uint64_t retention_bytes = 0;
  // First LSN of a log created empty (a standby seeded from a snapshot at
  // LSN n starts at n + 1). 1 to kMaxLsn.
  Lsn start_lsn = 1;
  // For a log created empty: the epoch history of the log it continues (a
  // standby seeded from a snapshot keeps the active's history). Entries that
  // start after start_lsn - 1 are dropped; later ones come with the records.
  EpochHistory initial_history;
  // Inspect without changing anything: no lock, no repair of a torn tail
  // (readers stop before it), no appends. For tools such as waldump.
  bool read_only = false;
  // With read_only: damage inside the last segment (a bad frame that valid
  // frames follow) does not fail Open; the log is read up to the damaged
  // frame, and RecoveryReport::corruption holds the error Open would have
  // returned. For tools that show what is left of a damaged log (waldump).
  bool salvage = false;
  // Upper bound on the bytes one group commit writes (an append larger than
  // this is written alone). Recovery also takes it as the most that one
  // unsynced write can hold (docs/wal-format.md, section 8, "Power loss").
  size_t max_group_bytes = 4u << 20;
  // Called once, outside the log's locks, when a write or fdatasync fails
  // and the log starts refusing every append and sync until it is reopened
  // (a full disk, an I/O error), from the thread that saw it: an appender,
  // or the interval-sync thread. Refusals of one request (a stale epoch, bad
  // raw frames) are not such failures.
  std::function<void(const Status&)> on_error;
  // Called by the thread that wrote a group of records, once readers can
  // see it and before the group's fdatasync (under kEveryCommit): a shipper
  // can send the group while it is being synced, without a thread of its
  // own having to wake first. It runs while the log's writes wait for it
  // (the group's writer lock is held; its state lock is not): it may read
  // the log, but must not append, sync, truncate, purge or close it, nor
  // wait for anything that does. Readers that wait (WaitForData, NextWait)
  // are woken as before.
  std::function<void()> on_written;
};

// What Open found and did.
struct RecoveryReport {
  bool torn_tail = false;  // a torn last write was found (and cut, unless read-only)
  std::string torn_segment;
  uint64_t torn_offset = 0;
  uint64_t torn_bytes = 0;  // up to the last non-zero byte (reserved zeros after it are not counted)
  std::string torn_why;
  // The torn write had valid frames after it: power loss kept a later page of
  // the unsynced writes and lost an earlier one (docs/wal-format.md, section 8).
  bool torn_lost_page = false;
  std::vector<std::string> removed_segments;  // last segments without a whole header (crash during a roll)
  // The epoch history was changed to match the log: entries past its end
  // dropped, or (the epochs file missing) rebuilt from the segments' frames.
  bool history_repaired = false;
  // Options::salvage: why the epochs file could not be used (damaged), or the
  // history not rebuilt from the segments (a Corruption's message); the
  // history then holds what the segments show (empty if none).
  std::string history_damage;
  // Options::salvage: the damage inside the last segment that readers stop
  // before (empty if none).
  std::string corruption;
};

// Upper bounds (microseconds) of the fdatasync latency buckets of WalStats.
inline constexpr std::array<uint64_t, 16> kSyncBucketMicros = {50,   100,  250,   500,   750,   1000,   1500,   2000,
                                                                2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000};

struct WalStats {
  uint64_t records = 0;
  uint64_t groups = 0;  // group commits (writes)
  // fdatasyncs of the log: group commits, Sync(), the interval thread.
  // (Syncs of a finished segment at a roll, and at close, are not counted.)
  uint64_t syncs = 0;
  uint64_t bytes = 0;
  uint64_t largest_group_bytes = 0;  // the most one group commit wrote
  uint64_t segments_created = 0;
  uint64_t segments_purged = 0;
  uint64_t sync_micros = 0;  // total time those fdatasyncs took
  // How many of them took at most kSyncBucketMicros[i] and more than the
  // bound before it (not cumulative); the last entry counts the slower ones.
  std::array<uint64_t, kSyncBucketMicros.size() + 1> sync_buckets{};
  void RecordSync(std::chrono::microseconds took) {
    const auto us = static_cast<uint64_t>(std::max<int64_t>(0, took.count()));
    ++syncs;
    sync_micros += us;
    size_t i = 0;
    while (i < kSyncBucketMicros.size() && us > kSyncBucketMicros[i]) ++i;
    ++sync_buckets[i];
  }
  // Group commit under kEveryCommit: leaders that waited for the appenders
  // they expected (GatherPolicy), and how many of them waited patiently.
  // Each such wait ended in one of three ways: the group filled, the
  // deadline passed, or an op that could not join the group was queued (or
  // the log began to close), which cut it short.
  uint64_t gathers = 0;
  uint64_t gathers_patient = 0;
  uint64_t gathers_filled = 0;
  uint64_t gathers_timed_out = 0;
  uint64_t gathers_cut_short = 0;
  // Not a total: the requests queued at this moment (appenders waiting for
  // a group, under kNone and kInterval those that found the writer busy;
  // Sync, Truncate and Purge waiting for their turn).
  uint64_t queued = 0;
};

struct SegmentInfo {
  Lsn first_lsn = 0;
  Lsn last_lsn = 0;  // first_lsn - 1 when empty
  uint64_t size = 0;
  std::string path;
};

class Reader;

class Wal {
 public:
  static Result<std::unique_ptr<Wal>> Open(const std::string& dir, const Options& options);
  ~Wal();
  Wal(const Wal&) = delete;
  Wal& operator=(const Wal&) = delete;

  // Appends one record in epoch `epoch`; returns its LSN once the sync policy
  // is met. StaleEpoch if epoch is below the epoch of the log's last record.
  Result<Lsn> Append(Epoch epoch, RecordType type, std::string_view payload) EXCLUDES(mu_);
  // Appends records with consecutive LSNs; returns the last LSN.
  // InvalidArgument (not sticky) if the last would be above kMaxLsn.
  Result<Lsn> AppendBatch(Epoch epoch, const RecordIn* records, size_t n) EXCLUDES(mu_);
  // Appends whole frames received from a peer, stored unchanged after every
  // checksum, LSN continuity (they must start at last_lsn() + 1) and epoch
  // order is verified. Returns the last LSN.
  Result<Lsn> AppendRaw(std::string_view frames) EXCLUDES(mu_);

  // Forces an fdatasync of everything written (any policy).
  Status Sync() EXCLUDES(mu_);
  // Removes every record after last_kept, crash-safely (newest segment first).
  // last_kept must be a frame boundary (not inside an LZ4 block), and at least
  // first_lsn() - 1. Readers open at the time fail with Aborted from then on.
  Status Truncate(Lsn last_kept) EXCLUDES(mu_);
  // Deletes whole segments all of whose records are <= upto, oldest first;
  // never the segment being written. Returns the new first retained LSN.
  Result<Lsn> Purge(Lsn upto) EXCLUDES(mu_);
  // Automatic retention never deletes records at or above lsn.
  void SetRetentionFloor(Lsn lsn) EXCLUDES(mu_);
  Status Close() EXCLUDES(mu_, write_mu_);

  // Reader positioned at `from`, which must lie in [first_lsn(), last_lsn() + 1].
  // Purged if it is below first_lsn().
  Result<std::unique_ptr<Reader>> NewReader(Lsn from) EXCLUDES(mu_);

  Lsn first_lsn() const EXCLUDES(mu_);    // first retained LSN
  // Last LSN written, visible to readers. Under kEveryCommit it may be ahead
  // of durable_lsn() while a group's fdatasync runs: readers (shippers) see
  // records before their appenders return.
  Lsn last_lsn() const EXCLUDES(mu_);
  Lsn durable_lsn() const EXCLUDES(mu_);  // last LSN known to be on disk
  // Waits until durable_lsn() >= lsn or the deadline passes; returns whether
  // it is. Under SyncPolicy::kNone nothing becomes durable without Sync().
  bool WaitForDurable(Lsn lsn, std::chrono::steady_clock::time_point deadline) EXCLUDES(mu_);
  Epoch last_epoch() const EXCLUDES(mu_);
  EpochHistory epoch_history() const EXCLUDES(mu_);
  // Where did `epoch` end in this log (see EpochHistory::EndOf).
  EpochEnd EndOfEpoch(Epoch epoch) const EXCLUDES(mu_);
  std::vector<SegmentInfo> segments() const EXCLUDES(mu_);
  uint64_t size_bytes() const EXCLUDES(mu_);
  // Lag in bytes: the record bytes of this log after `lsn` (what a replica
  // holding up to lsn lacks). Whole segments count in full (less their
  // headers); in the segment where lsn falls, the part after it is estimated
  // by the segment's average record size (offsets of records are not indexed).
  uint64_t BytesAfter(Lsn lsn) const EXCLUDES(mu_);
  WalStats stats() const EXCLUDES(mu_);
  const RecoveryReport& recovery() const { return recovery_; }
  const std::string& dir() const { return dir_; }
  const Options& options() const { return options_; }

 private:
  friend class Reader;
  struct Op;
  struct Segment {
    Lsn first_lsn;
    uint64_t end;  // bytes visible to readers
    std::string path;
  };

  Wal(std::string dir, const Options& options);
  Status Recover();
  Status CreateSegment(Lsn first_lsn, Lsn prev_first_lsn) REQUIRES(write_mu_) EXCLUDES(mu_);
  // Whether segments get reserved space (options_.preallocate, and a sync
  // policy that fsyncs: reserving only makes fdatasync cheaper).
  bool Reserving() const;
  // Reserves space for the current segment; a failure only costs speed, so
  // it is logged, not returned.
  void Reserve(WritableFile* file) REQUIRES(write_mu_);
  // Cuts the current segment back to cur_size_ when segments are reserved
  // (also when the reservation failed part-way: nothing to cut is harmless).
  Status DropReserve(const std::string& path) REQUIRES(write_mu_);

  Status Submit(Op* op) EXCLUDES(mu_, write_mu_);
  // An append or raw append under the kNone and kInterval policies that
  // found the writer lock taken: it queues, and whichever queued appender
  // next takes the writer lock writes every queued record with one write()
  // (flat combining), the others yielding the CPU meanwhile.
  Status Combine(Op* op) EXCLUDES(mu_, write_mu_);
  static constexpr int kCombineYields = 64;
  // Called after releasing write_mu_ without running the queue: an appender
  // that queued meanwhile may have stopped yielding and gone to sleep, so
  // the queue is woken if anything is queued. Its seq_cst fence pairs with
  // the one Combine makes after queuing: either this load sees the queue
  // grow, or that appender's TryLock sees the writer lock free.
  void WakeQueueIfWaiting() EXCLUDES(mu_, write_mu_);
  // Why nothing may be appended now (closed, read-only, a sticky error).
  Status Admissible() const REQUIRES(mu_);
  // Runs the group that `leader`, the queue's front, heads, then wakes its ops.
  Status Lead(Op* leader) EXCLUDES(mu_, write_mu_);
  // How many ops from the queue's front the next group takes.
  size_t NextGroupSize() const REQUIRES(mu_);
  // A new leader under kEveryCommit waits for the appenders it expects (see
  // expected_group_), so that one fdatasync serves all of them, for as long
  // as gather_policy_ allows. The appender that completes the group runs it
  // (the leader then waits as a follower). Returns whether `op`'s thread is
  // to run the group now.
  bool Gather(Op* op) EXCLUDES(mu_);
  // Tells the gathering leader to run its group now, as it stands.
  void EndGather() REQUIRES(mu_);
  // Admits, writes and (by policy) syncs `group`; mu_ is released during
  // I/O. `queued`: the group is the front of queue_ and leaves it.
  void RunGroup(Op* leader, std::span<Op* const> group, bool queued) REQUIRES(mu_, write_mu_);
  // Encoding a group's admitted records into parts_, a (header, payload)
  // pair per frame: EncodeHeaders encodes only the headers (into group_buf_)
  // and points at the appenders' payloads, when Vectored says so;
  // EncodeCopies builds whole frames in group_buf_ (LZ4 blocks, raw frames).
  // Both return the group's stored bytes and add its records to *records.
  bool Vectored(std::span<Op* const> group) const;
  uint64_t EncodeHeaders(std::span<Op* const> group, uint64_t* records) REQUIRES(write_mu_);
  uint64_t EncodeCopies(std::span<Op* const> group, uint64_t* records) REQUIRES(write_mu_);
  // Writes parts_ (rolling segments as needed); SyncFrames then makes
  // everything written durable.
  Status WriteParts() REQUIRES(write_mu_) EXCLUDES(mu_);
  Status SyncFrames() REQUIRES(write_mu_) EXCLUDES(mu_);
  Status RollSegment(Lsn first_lsn) REQUIRES(write_mu_) EXCLUDES(mu_);
  Status PersistHistory(const EpochHistory& h) EXCLUDES(mu_);
  // *mutated turns true once the first file changes; before that a failure
  // (a bad argument) leaves the log as it was and is not sticky.
  Status DoTruncate(Lsn last_kept, bool* mutated) REQUIRES(write_mu_) EXCLUDES(mu_);
  Result<Lsn> DoPurge(Lsn upto, bool retention) REQUIRES(write_mu_) EXCLUDES(mu_);
  void SyncLoop() EXCLUDES(mu_);
  Lsn readable_lsn() const REQUIRES(mu_) { return last_lsn_; }
  Lsn first_lsn_locked() const REQUIRES(mu_) { return segments_.front().first_lsn; }

  const std::string dir_;
  const Options options_;
  Env* const env_;
  std::unique_ptr<FileLock> lock_;
  RecoveryReport recovery_;

  // Held by whoever writes the files: the queue's leader for its whole group,
  // or (policies other than kEveryCommit) an appender writing its own records
  // or the queued ones (Combine).
  Mutex write_mu_ ACQUIRED_BEFORE(mu_){Mutex::Adaptive{}};
  // Adaptive too: combining appenders queue under it while the writer takes
  // it around each write(), for a few instructions each time (8 threads of
  // 100 B records: 73 against 64 MiB/s, medians of four alternating runs).
  mutable Mutex mu_{Mutex::Adaptive{}};
  // Readers (shippers, appliers): new records visible, truncation or close.
  // Signalled when a group is written, not again when it is synced, so that
  // a tailing reader wakes once per group.
  CondVar data_cv_{&mu_};
  // WaitForDurable and Close: a group ended (synced or failed), an interval
  // sync, a truncation or close.
  CondVar durable_cv_{&mu_};
  CondVar sync_cv_{&mu_};  // the interval sync thread
  std::deque<Op*> queue_ GUARDED_BY(mu_);
  std::atomic<size_t> queued_{0};  // queue_.size(), readable without mu_
  // Bumped after a group's ops are marked done; queued ops wait on it.
  WakeWord turns_;
  std::deque<Segment> segments_ GUARDED_BY(mu_);
  EpochHistory history_ GUARDED_BY(mu_);
  Lsn last_lsn_ GUARDED_BY(mu_) = 0;     // last written (maybe not yet synced), visible to readers
  Lsn durable_lsn_ GUARDED_BY(mu_) = 0;
  Lsn next_lsn_ GUARDED_BY(mu_) = 1;     // LSN the next admitted record gets
  Epoch tail_epoch_ GUARDED_BY(mu_) = 0; // epoch of the last admitted record
  Lsn retention_floor_ GUARDED_BY(mu_) = UINT64_MAX;
  std::atomic<uint64_t> generation_{0};  // bumped by Truncate; readers check it on every call
  Status bg_error_ GUARDED_BY(mu_);
  // Sets bg_error_ (the first failure only) and marks it for ReportError.
  void SetError(const Status& st) REQUIRES(mu_);
  // Calls options_.on_error once for bg_error_, if it is set and not yet
  // reported; cheap otherwise.
  void ReportError() EXCLUDES(mu_);
  std::atomic<bool> error_unreported_{false};
  // Group commit sizing. With closed-loop appenders, back-to-back fsyncs split
  // them into two alternating cohorts; so a leader waits (for as long as
  // gather_policy_ says) until as many ops are queued as were in flight when
  // the last group finished: that group plus those queued behind it.
  size_t expected_group_ GUARDED_BY(mu_) = 1;
  GatherPolicy gather_policy_ GUARDED_BY(mu_);
  Op* gatherer_ GUARDED_BY(mu_) = nullptr;     // the leader gathering, if any
  size_t gather_target_ GUARDED_BY(mu_) = 0;  // the queue length it waits for
  std::chrono::microseconds last_sync_time_ GUARDED_BY(mu_){200};
  bool closing_ GUARDED_BY(mu_) = false;
  bool closed_ GUARDED_BY(mu_) = false;
  WalStats stats_ GUARDED_BY(mu_);
  // The segment being written; swapped by the leader under mu_, used by the
  // leader and (for Sync) the interval thread.
  std::shared_ptr<WritableFile> cur_file_ GUARDED_BY(mu_);

  // Owned by the writer (write_mu_).
  std::string group_buf_ GUARDED_BY(write_mu_);
  std::vector<RecordIn> encode_batch_ GUARDED_BY(write_mu_);
  std::vector<std::string_view> parts_ GUARDED_BY(write_mu_);
  uint64_t cur_size_ GUARDED_BY(write_mu_) = 0;
  std::chrono::microseconds sync_time_ GUARDED_BY(write_mu_){0};  // of the last group's fdatasync
  bool rolled_ GUARDED_BY(write_mu_) = false;  // the current group rolled a segment
  // Segments closed without fdatasync (policy none); Sync() syncs them.
  std::vector<std::shared_ptr<WritableFile>> unsynced_ GUARDED_BY(write_mu_);

  std::thread sync_thread_;
};

// A run of whole frames as stored, for sending without re-encoding: the bytes
// [offset, offset + length) of file. The file stays readable while the span
// lives, even if its segment is purged.
struct RawSpan {
  Lsn first_lsn = 0;  // LSN of the first record in the span
  Lsn last_lsn = 0;
  std::shared_ptr<const RandomAccessFile> file;
  std::string segment_path;
  uint64_t offset = 0;
  size_t length = 0;
  // Copies the bytes out (the zero-copy sender uses file->NativeHandle()).
  Status ReadInto(std::string* out) const;
};

// Iterates records from an LSN. Not thread-safe: one owner.
class Reader {
 public:
  ~Reader();
  // Next record, or false when caught up with the log's end. The record's
  // payload stays valid until the next call. A frame that fails its
  // checksum fails the call with Corruption; as in NextRaw, the frames
  // skipped before the start LSN are not checked.
  Result<bool> Next(RecordView* record);
  // Like Next, but when caught up waits (without polling) until a record
  // arrives or the deadline passes (then false).
  Result<bool> NextWait(RecordView* record, std::chrono::steady_clock::time_point deadline);
  // The next run of whole stored frames, at most max_bytes (but always at
  // least one frame), within one segment; nullopt when caught up. If the
  // reader stands inside an LZ4 block, the span starts at that block.
  // The checksum of every frame handed out is verified (frames skipped
  // before the start LSN are not): a damaged frame ends the span before it,
  // and the next call fails with Corruption naming its segment, offset and
  // LSN (next_lsn() is then the first LSN not handed out).
  Result<std::optional<RawSpan>> NextRaw(size_t max_bytes);
  // Waits until a record at next_lsn() is readable or the deadline passes.
  // Returns false on timeout.
  Result<bool> WaitForData(std::chrono::steady_clock::time_point deadline);
  Lsn next_lsn() const { return next_lsn_; }
  // The log's bytes (segment headers included) before where the reader
  // stands: every retained segment before its current one, and that one up
  // to the next frame to read. After Next failed, that is where the damage
  // starts (or the end of the segment before one that cannot be opened).
  uint64_t bytes_before() const;

 private:
  friend class Wal;
  Reader(Wal* wal, Lsn from, uint64_t generation);
  // Positions on the segment holding next_lsn_ (or the current one's
  // successor) and refreshes the visible end. Returns false when caught up.
  Result<bool> Position();
  Status CorruptionHere(const std::string& why) const;
  // Ensures a segment is open and the cursor can read; false when caught up.
  Result<bool> Ready();

  Wal* const wal_;
  Lsn next_lsn_;
  uint64_t generation_;
  // Current segment.
  Lsn seg_first_ = 0;
  std::string seg_path_;
  std::shared_ptr<RandomAccessFile> file_;
  std::unique_ptr<FrameCursor> cursor_;
  Lsn frame_lsn_ = 0;  // LSN the next frame in the segment must carry
  std::optional<Lsn> next_seg_first_;
  uint64_t seg_end_ = 0;      // visible bytes of the current segment
  Lsn visible_last_ = 0;      // last LSN readable when Position last looked
  uint64_t block_offset_ = 0; // file offset of the block being handed out
  Lsn block_first_ = 0;
  // Decoded LZ4 block being handed out.
  std::string block_raw_;
  std::vector<RecordView> block_;
  size_t block_pos_ = 0;
};

}  // namespace replica::wal
