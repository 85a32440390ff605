#include "wal/wal.h"

#include <sched.h>

#include <algorithm>

#include "base/log.h"
#include "base/thread_name.h"
#include "base/wake_word.h"

namespace replica::wal {
namespace {
// Mean payload size from which a group is written with writev, uncopied.
constexpr size_t kVectoredMinPayload = 4096;

// The (epoch, first LSN) pairs of a finished segment (one that a later
// segment follows): every frame must verify, carry the next LSN and an epoch
// no lower than the one before (from min_epoch), and the last must end just
// before next_first_lsn. A frame header suffices: every record of an LZ4
// block has the block's epoch, so an epoch never starts inside a block.
Status FinishedSegmentEpochs(Env* env, const std::string& path, Lsn first_lsn, uint64_t size, Lsn next_first_lsn,
                             Epoch min_epoch, std::vector<std::pair<Epoch, Lsn>>* starts) {
  REPLICA_ASSIGN_OR_RETURN(auto file, env->NewRandomAccessFile(path));
  FrameCursor cursor(file.get(), kSegmentHeaderSize, size);
  Lsn next = first_lsn;
  Epoch epoch = min_epoch;
  for (;;) {
    FrameHeader h;
    std::string_view payload;
    std::string why;
    const uint64_t offset = cursor.offset();
    REPLICA_ASSIGN_OR_RETURN(auto outcome, cursor.Next(&h, &payload, &why));
    if (outcome == FrameCursor::Outcome::kEnd) break;
    if (outcome == FrameCursor::Outcome::kFrame && h.lsn != next) why = "frame carries LSN " + std::to_string(h.lsn);
    if (outcome == FrameCursor::Outcome::kFrame && h.lsn == next && h.epoch < epoch) {
      why = "epoch " + std::to_string(h.epoch) + " after epoch " + std::to_string(epoch);
    }
    if (outcome != FrameCursor::Outcome::kFrame || !why.empty()) {
      return Status::Corruption("segment " + path + " offset " + std::to_string(offset) + " (LSN " +
                                std::to_string(next) + "): " + why);
    }
    if (next == first_lsn || h.epoch > epoch) starts->emplace_back(h.epoch, h.lsn);
    epoch = h.epoch;
    next = h.last_lsn() + 1;
  }
  if (next != next_first_lsn) {
    return Status::Corruption("segment " + path + " ends at LSN " + std::to_string(next - 1) +
                              " but the next segment starts at LSN " + std::to_string(next_first_lsn));
  }
  return Status::OK();
}
}  // namespace

const char* SyncPolicyName(SyncPolicy p) {
  switch (p) {
    case SyncPolicy::kEveryCommit: return "every";
    case SyncPolicy::kInterval: return "interval";
    case SyncPolicy::kNone: return "none";
  }
  return "?";
}

bool ParseSyncPolicy(std::string_view text, SyncPolicy* p) {
  if (text == "every") *p = SyncPolicy::kEveryCommit;
  else if (text == "interval") *p = SyncPolicy::kInterval;
  else if (text == "none") *p = SyncPolicy::kNone;
  else return false;
  return true;
}

// One queued request. Lives on the submitting thread's stack until done.
struct Wal::Op {
  enum class Kind { kAppend, kRaw, kSync, kTruncate, kPurge };
  explicit Op(Kind k) : kind(k) {}
  Kind kind;
  // kAppend
  Epoch epoch = 0;
  const RecordIn* records = nullptr;
  size_t n = 0;
  // kRaw
  std::string_view raw;
  FrameRun run;
  // kTruncate, kPurge
  Lsn lsn_arg = 0;
  // Filled by the leader.
  Lsn first_lsn = 0;  // assigned at admission (kAppend)
  bool admitted = false;
  Status status;
  Lsn result = 0;
  // Where a queued op stands: kLook once it may have become the queue's
  // front, kDone once a leader has finished it (status and result are then
  // final; the op's thread returns without taking mu_). Changes are
  // announced through Wal::turns_.
  std::atomic<uint32_t> state{kWaiting};

  // kTaken: it was gathering a group as the queue's front, and the appender
  // that completed the group runs it; it waits for kDone like a follower.
  // kRun: it was gathering, and the group can no longer fill (an op that
  // cannot join it was queued, or the log is closing): it runs the group now.
  static constexpr uint32_t kWaiting = 0, kLook = 1, kDone = 2, kTaken = 3, kRun = 4;

  size_t bytes() const {
    if (kind == Kind::kRaw) return raw.size();
    size_t b = 0;
    for (size_t i = 0; i < n; ++i) b += kFrameHeaderSize + records[i].payload.size();
    return b;
  }
};

Wal::Wal(std::string dir, const Options& options)
    : dir_(std::move(dir)), options_(options), env_(options.env ? options.env : Env::Default()) {}

Wal::~Wal() { (void)Close(); }

Result<std::unique_ptr<Wal>> Wal::Open(const std::string& dir, const Options& options) {
  if (options.segment_size < 4096) {
    return Status::InvalidArgument("segment_size must be at least 4096 bytes, got " +
                                   std::to_string(options.segment_size));
  }
  if (options.start_lsn == 0 || options.start_lsn > kMaxLsn) {
    return Status::InvalidArgument("start_lsn must be 1 to " + std::to_string(kMaxLsn) + ", got " +
                                   std::to_string(options.start_lsn));
  }
  if (options.sync_policy == SyncPolicy::kInterval && options.sync_interval.count() <= 0) {
    return Status::InvalidArgument("sync_interval must be positive");
  }
  std::unique_ptr<Wal> wal(new Wal(dir, options));
  REPLICA_RETURN_IF_ERROR_CTX(wal->Recover(), "open WAL " + dir);
  return wal;
}

Status Wal::CreateSegment(Lsn first_lsn, Lsn prev_first_lsn) {
  const std::string path = JoinPath(dir_, SegmentFileName(first_lsn));
  REPLICA_ASSIGN_OR_RETURN(auto file, env_->NewWritableFile(path));
  SegmentHeader h;
  h.first_lsn = first_lsn;
  h.prev_first_lsn = prev_first_lsn;
  REPLICA_RETURN_IF_ERROR(file->Append(EncodeSegmentHeader(h)));
  if (options_.sync_policy != SyncPolicy::kNone) {
    REPLICA_RETURN_IF_ERROR(file->Sync());
    REPLICA_RETURN_IF_ERROR(env_->SyncDir(dir_));
  }
  // After the header is durable: a crash never leaves a reserved segment
  // without one.
  Reserve(file.get());
  std::shared_ptr<WritableFile> old;
  {
    MutexLock l(&mu_);
    if (!segments_.empty()) segments_.back().end = cur_size_;
    segments_.push_back(Segment{first_lsn, kSegmentHeaderSize, path});
    old = std::move(cur_file_);
    cur_file_ = std::move(file);
    ++stats_.segments_created;
  }
  cur_size_ = kSegmentHeaderSize;
  // `old` is not closed here: the interval sync thread may still hold it.
  // The last owner's destructor closes it.
  if (old && options_.sync_policy == SyncPolicy::kNone) unsynced_.push_back(std::move(old));
  return Status::OK();
}

bool Wal::Reserving() const { return options_.preallocate && options_.sync_policy != SyncPolicy::kNone; }

void Wal::Reserve(WritableFile* file) {
  if (!Reserving()) return;
  Status st = file->Preallocate(options_.segment_size);
  if (!st.ok()) {
    RLOG(kWarn, "wal.preallocate_failed") << "dir=" << dir_ << " bytes=" << options_.segment_size << " error=\""
                                          << st.ToString() << "\" (appending without reserved space)";
  }
}

Status Wal::DropReserve(const std::string& path) {
  if (!Reserving()) return Status::OK();
  return env_->TruncateFile(path, cur_size_);
}

Status Wal::PersistHistory(const EpochHistory& h) {
  return WriteFileAtomically(env_, JoinPath(dir_, kEpochFileName), h.Encode())
      .WithContext("write epoch history");
}

Status Wal::Recover() NO_THREAD_SAFETY_ANALYSIS {
  // Runs before the Wal is shared: no other thread exists yet.
  const bool ro = options_.read_only;
  if (!ro) {
    REPLICA_RETURN_IF_ERROR(env_->CreateDirIfMissing(dir_));
    REPLICA_ASSIGN_OR_RETURN(lock_, env_->LockFile(JoinPath(dir_, kLockFileName)));
  }
  auto children = env_->GetChildren(dir_);
  if (!children.ok()) return children.status();

  std::vector<Lsn> names;
  for (const auto& name : *children) {
    const auto lsn = ParseSegmentFileName(name);
    const bool tmp = name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0;
    if (!lsn && !(tmp && !ro)) continue;
    // The log writes only regular files: a directory (or FIFO, ...) by one of
    // its names was put there by someone else.
    // NotFound: a dangling symlink (or an entry gone meanwhile), no file either.
    auto is_regular = env_->IsRegularFile(JoinPath(dir_, name));
    if (!is_regular.ok() && !is_regular.status().IsNotFound()) return is_regular.status();
    const bool regular = is_regular.ok() && *is_regular;
    if (lsn && !regular) {
      return Status::Corruption(JoinPath(dir_, name) +
                                " is named like a segment but is not a regular file; move it out of the WAL "
                                "directory");
    }
    if (lsn) {
      names.push_back(*lsn);
    } else if (regular) {
      REPLICA_RETURN_IF_ERROR(env_->DeleteFile(JoinPath(dir_, name)));  // an interrupted atomic write
    }
  }
  std::sort(names.begin(), names.end());

  // Without the file (a log that never started an epoch, or a lost file),
  // the history is rebuilt from the segments below, where they allow it.
  const std::string history_path = JoinPath(dir_, kEpochFileName);
  bool history_read = false;
  if (env_->FileExists(history_path)) {
    REPLICA_ASSIGN_OR_RETURN(std::string data, ReadWholeFile(env_, history_path, 64u << 20));
    auto decoded = EpochHistory::Decode(data);
    if (decoded.ok()) {
      history_ = std::move(decoded).value();
      history_read = true;
    } else if (ro && options_.salvage) {
      recovery_.history_damage = decoded.status().WithContext(history_path).message();
    } else {
      return decoded.status().WithContext(
          history_path + " (moving it away makes Open rebuild the history from the segments, which is possible "
                         "while they hold every record from LSN 1)");
    }
  }

  // Segment headers, oldest first. A last segment too short to hold its
  // header is what a crash during a segment roll leaves: remove it.
  std::deque<Segment> segs;
  Lsn removed_first = 0;
  Lsn oldest_prev_first = 0;  // prev_first_lsn of the oldest segment: 0 if the log began there
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string path = JoinPath(dir_, SegmentFileName(names[i]));
    REPLICA_ASSIGN_OR_RETURN(uint64_t size, env_->GetFileSize(path));
    const bool is_last = i + 1 == names.size();
    bool headerless = size < kSegmentHeaderSize;
    if (!headerless && is_last) {
      // Without fsync (policy none) a crash can leave a new segment's header
      // as zeros: as good as absent.
      REPLICA_ASSIGN_OR_RETURN(auto probe, env_->NewRandomAccessFile(path));
      char hb[kSegmentHeaderSize];
      REPLICA_ASSIGN_OR_RETURN(size_t n, probe->Read(0, kSegmentHeaderSize, hb));
      headerless = n == kSegmentHeaderSize && std::all_of(hb, hb + n, [](char c) { return c == 0; }) &&
                   size == kSegmentHeaderSize;
    }
    if (headerless) {
      if (!is_last) {
        return Status::Corruption("segment " + path + " is " + std::to_string(size) +
                                  " bytes (no header) but later segments exist");
      }
      RLOG(kWarn, "wal.remove_empty_segment") << "segment=" << path << " size=" << size
                                             << " reason=\"crash during segment creation\"";
      recovery_.removed_segments.push_back(path);
      removed_first = names[i];
      if (!ro) {
        REPLICA_RETURN_IF_ERROR(env_->DeleteFile(path));
        REPLICA_RETURN_IF_ERROR(env_->SyncDir(dir_));
      }
      continue;
    }
    REPLICA_ASSIGN_OR_RETURN(auto file, env_->NewRandomAccessFile(path));
    char buf[kSegmentHeaderSize];
    REPLICA_ASSIGN_OR_RETURN(size_t got, file->Read(0, kSegmentHeaderSize, buf));
    SegmentHeader h;
    REPLICA_RETURN_IF_ERROR_CTX(DecodeSegmentHeader(std::string_view(buf, got), &h), "segment " + path);
    if (h.first_lsn != names[i]) {
      return Status::Corruption("segment " + path + " says it starts at LSN " + std::to_string(h.first_lsn));
    }
    if (!segs.empty() && h.prev_first_lsn != segs.back().first_lsn) {
      return Status::Corruption("a segment is missing before " + path + ": it follows the segment starting at LSN " +
                                std::to_string(h.prev_first_lsn) + ", but the previous segment on disk starts at LSN " +
                                std::to_string(segs.back().first_lsn));
    }
    if (segs.empty()) oldest_prev_first = h.prev_first_lsn;
    segs.push_back(Segment{h.first_lsn, size, path});
  }

  if (segs.empty()) {
    if (ro) {
      if (removed_first == 0) return Status::NotFound("no WAL segments in " + dir_);
      return Status::NotFound("no WAL segment with a header in " + dir_ + ": " + recovery_.removed_segments.back() +
                              " holds no segment header, what a crash while creating it leaves (a writable "
                              "open removes it and starts the log there)");
    }
    Lsn first = removed_first != 0 ? removed_first : options_.start_lsn;
    bool seeded = false;
    if (history_.empty() && !options_.initial_history.empty()) {
      history_ = options_.initial_history;
      seeded = true;
    }
    if (history_.TruncateAfter(first - 1) || seeded) {
      REPLICA_RETURN_IF_ERROR(PersistHistory(history_));
    }
    REPLICA_RETURN_IF_ERROR(CreateSegment(first, 0));
    last_lsn_ = durable_lsn_ = first - 1;
    next_lsn_ = first;
    tail_epoch_ = history_.last_epoch();
  } else {
    Segment& last = segs.back();
    REPLICA_ASSIGN_OR_RETURN(auto file, env_->NewRandomAccessFile(last.path));
    REPLICA_ASSIGN_OR_RETURN(SegmentScan scan, ScanSegment(*file, last.end, last.first_lsn, options_.max_group_bytes));
    if (scan.tail == SegmentScan::Tail::kCorrupt) {
      Status damage = Status::Corruption("segment " + last.path + " offset " + std::to_string(scan.bad_offset) +
                                         " (LSN " + std::to_string(scan.last_lsn + 1) + "): " + scan.why +
                                         (scan.undecided ? std::string("; refused as damage (docs/wal-format.md, "
                                                                       "\"Undecided\")")
                                                         : std::string("; valid records follow it, so this is damage "
                                                                       "inside the log, not a torn write")));
      if (!(ro && options_.salvage)) return damage;
      recovery_.corruption = damage.message();
      scan.valid_end = scan.bad_offset;  // readers stop before the damaged frame
    }
    if (scan.tail == SegmentScan::Tail::kTorn) {
      recovery_.torn_tail = true;
      recovery_.torn_segment = last.path;
      recovery_.torn_offset = scan.valid_end;
      recovery_.torn_bytes = scan.data_end - scan.valid_end;
      recovery_.torn_why = scan.why;
      recovery_.torn_lost_page = scan.lost_page;
      RLOG(kWarn, "wal.truncate_torn_tail")
          << "segment=" << last.path << " offset=" << scan.valid_end << " dropped_bytes=" << recovery_.torn_bytes
          << " last_lsn=" << scan.last_lsn << (scan.lost_page ? " lost_page=1" : "") << " why=\"" << scan.why
          << "\"" << (ro ? " read_only=1" : "");
      if (!ro) REPLICA_RETURN_IF_ERROR(env_->TruncateFile(last.path, scan.valid_end));
    } else if (!ro && last.end > scan.valid_end) {
      // Zeros after the last frame: space reserved before a crash. It is
      // reserved afresh below, from the end of the log.
      REPLICA_RETURN_IF_ERROR(env_->TruncateFile(last.path, scan.valid_end));
    }
    last.end = scan.valid_end;
    last_lsn_ = durable_lsn_ = scan.last_lsn;
    next_lsn_ = scan.last_lsn + 1;

    bool changed = false;
    Epoch last_record_epoch = scan.last_epoch;
    if (history_read) {
      changed = history_.TruncateAfter(last_lsn_);
      // The epochs of the last segment, or of the one before it when the
      // last holds no frame (a truncation to a segment boundary, a crash
      // after a roll): the epoch of the log's last record is checked in any case.
      std::vector<std::pair<Epoch, Lsn>> tail_starts = scan.epoch_starts;
      if (scan.frames == 0 && segs.size() > 1) {
        const Segment& prev = segs[segs.size() - 2];
        REPLICA_RETURN_IF_ERROR(
            FinishedSegmentEpochs(env_, prev.path, prev.first_lsn, prev.end, last.first_lsn, 0, &tail_starts));
        if (!tail_starts.empty()) last_record_epoch = tail_starts.back().first;
      }
      for (const auto& [epoch, lsn] : tail_starts) {
        if (epoch > history_.last_epoch()) {
          RLOG(kWarn, "wal.repair_epoch_history") << "epoch=" << epoch << " first_lsn=" << lsn;
          REPLICA_RETURN_IF_ERROR(history_.Add(epoch, lsn));
          changed = true;
        } else if (history_.EpochAt(lsn) != epoch) {
          return Status::Corruption("epoch history says LSN " + std::to_string(lsn) + " is in epoch " +
                                    std::to_string(history_.EpochAt(lsn)) + " but the log says epoch " +
                                    std::to_string(epoch));
        }
      }
    } else {
      // No usable file: the history is exactly the epoch changes of the
      // frames, provided the segments still hold the log from its start.
      std::vector<std::pair<Epoch, Lsn>> starts;
      std::vector<std::pair<Epoch, Lsn>> seg_starts;
      Status walked;
      for (size_t i = 0; i + 1 < segs.size() && walked.ok(); ++i) {
        walked = FinishedSegmentEpochs(env_, segs[i].path, segs[i].first_lsn, segs[i].end, segs[i + 1].first_lsn,
                                       starts.empty() ? 0 : starts.back().first, &seg_starts);
        for (const auto& start : seg_starts) {
          if (starts.empty() || start.first > starts.back().first) starts.push_back(start);
        }
        seg_starts.clear();
      }
      if (walked.ok()) {
        for (const auto& [epoch, lsn] : scan.epoch_starts) {
          if (starts.empty() || epoch > starts.back().first) {
            starts.emplace_back(epoch, lsn);
          } else if (epoch < starts.back().first) {
            walked = Status::Corruption("segment " + last.path + " starts with epoch " + std::to_string(epoch) +
                                        " after epoch " + std::to_string(starts.back().first));
          }
        }
      }
      const Segment& first = segs.front();
      if (walked.ok() && !starts.empty() && (first.first_lsn != 1 || oldest_prev_first != 0)) {
        walked = Status::Corruption(
            "the epoch history (" + history_path + ") is " + (recovery_.history_damage.empty() ? "missing" : "damaged") +
            " and cannot be rebuilt from the segments: they hold the log from LSN " + std::to_string(first.first_lsn) +
            " only, and the epochs of the records before it are unknown. Restore the file (a copy from a node "
            "holding the same log will do) or re-seed this node from the active");
      }
      if (!walked.ok()) {
        if (!(ro && options_.salvage)) return walked;
        if (recovery_.history_damage.empty()) recovery_.history_damage = walked.message();
      }
      for (const auto& [epoch, lsn] : starts) {
        if (epoch > history_.last_epoch()) (void)history_.Add(epoch, lsn);
      }
      if (!starts.empty()) {
        RLOG(kWarn, "wal.rebuild_epoch_history") << "epochs=" << starts.size() << " last_epoch=" << starts.back().first
                                                 << " reason=\"" << (recovery_.history_damage.empty() ? "no epochs file" : recovery_.history_damage) << "\"";
        last_record_epoch = starts.back().first;
        changed = true;
      }
    }
    recovery_.history_repaired = changed;
    if (changed && !ro) REPLICA_RETURN_IF_ERROR(PersistHistory(history_));
    // Appends are refused below the epoch of the log's last record, whatever
    // the history says.
    tail_epoch_ = std::max(history_.last_epoch(), last_record_epoch);
    segments_ = std::move(segs);
    if (!ro) {
      REPLICA_ASSIGN_OR_RETURN(auto wf, env_->ReopenWritableFile(segments_.back().path));
      cur_file_ = std::move(wf);
      cur_size_ = cur_file_->Size();
      Reserve(cur_file_.get());
      // What recovery kept must be durable before anything is built on it.
      REPLICA_RETURN_IF_ERROR(cur_file_->Sync());
    }
  }
  if (!ro && options_.sync_policy == SyncPolicy::kInterval) {
    sync_thread_ = NamedThread("wal-sync", [this] { SyncLoop(); });
  }
  return Status::OK();
}

Result<Lsn> Wal::Append(Epoch epoch, RecordType type, std::string_view payload) {
  RecordIn r{type, payload};
  return AppendBatch(epoch, &r, 1);
}

Result<Lsn> Wal::AppendBatch(Epoch epoch, const RecordIn* records, size_t n) {
  if (n == 0) return Status::InvalidArgument("empty batch");
  if (epoch == 0) return Status::InvalidArgument("epoch 0 is reserved; epochs start at 1");
  for (size_t i = 0; i < n; ++i) {
    if (records[i].payload.size() > kMaxRecordPayload) {
      return Status::InvalidArgument("record of " + std::to_string(records[i].payload.size()) +
                                     " bytes exceeds the limit of " + std::to_string(kMaxRecordPayload));
    }
    if (static_cast<uint8_t>(records[i].type) == 0) return Status::InvalidArgument("record type 0");
  }
  Op op(Op::Kind::kAppend);
  op.epoch = epoch;
  op.records = records;
  op.n = n;
  REPLICA_RETURN_IF_ERROR(Submit(&op));
  return op.result;
}

Result<Lsn> Wal::AppendRaw(std::string_view frames) {
  auto run = VerifyFrameRun(frames, 0, 0);
  if (!run.ok()) return run.status().WithContext("raw append");
  Op op(Op::Kind::kRaw);
  op.raw = frames;
  op.run = std::move(run).value();
  REPLICA_RETURN_IF_ERROR(Submit(&op));
  return op.result;
}

Status Wal::Sync() {
  Op op(Op::Kind::kSync);
  return Submit(&op);
}

Status Wal::Truncate(Lsn last_kept) {
  Op op(Op::Kind::kTruncate);
  op.lsn_arg = last_kept;
  return Submit(&op);
}

Result<Lsn> Wal::Purge(Lsn upto) {
  Op op(Op::Kind::kPurge);
  op.lsn_arg = upto;
  REPLICA_RETURN_IF_ERROR(Submit(&op));
  return op.result;
}

void Wal::SetRetentionFloor(Lsn lsn) {
  MutexLock l(&mu_);
  retention_floor_ = lsn;
}

Status Wal::Submit(Op* op) {
  // Without group commit an appender writes its own records (under
  // write_mu_), so that concurrent appenders pay no hand-off: there is no
  // fdatasync to share, only the write() each would make anyway. Not while
  // ops are queued: then it queues behind them, so that a Sync, Truncate or
  // Purge waits for the appenders already writing, never for an unbounded
  // stream of newcomers taking the (unfair) writer lock first.
  if (options_.sync_policy != SyncPolicy::kEveryCommit && (op->kind == Op::Kind::kAppend || op->kind == Op::Kind::kRaw)) {
    if (queued_.load(std::memory_order_acquire) == 0 && write_mu_.TryLock()) {
      Status admissible;
      {
        MutexLock l(&mu_);
        admissible = Admissible();
        if (admissible.ok()) {
          Op* group[1] = {op};
          RunGroup(op, group, /*queued=*/false);
        }
      }
      write_mu_.Unlock();
      WakeQueueIfWaiting();  // one of them takes the writer lock now
      if (!admissible.ok()) return admissible;
      ReportError();
      return op->status;
    }
    return Combine(op);
  }
  bool run;  // this thread runs the next group
  {
    MutexLock l(&mu_);
    REPLICA_RETURN_IF_ERROR(Admissible());
    queue_.push_back(op);
    queued_.store(queue_.size(), std::memory_order_release);
    op->state.store(Op::kWaiting, std::memory_order_relaxed);
    run = queue_.front() == op;
    if (!run && gatherer_ != nullptr) {
      if (NextGroupSize() < queue_.size()) {
        // This op cannot join the group a leader is gathering (maintenance,
        // or past max_group_bytes): waiting longer gains nothing.
        EndGather();
      } else if (queue_.size() >= gather_target_) {
        // This append completes the group: it runs the group itself, at
        // once, instead of waking the leader to do it.
        gatherer_->state.store(Op::kTaken, std::memory_order_relaxed);
        gatherer_ = nullptr;
        gather_policy_.Filled();
        ++stats_.gathers_filled;
        run = true;
      }
    }
  }
  for (;;) {
    if (run && Gather(op)) return Lead(op);
    for (;;) {
      const uint32_t seen = turns_.Load();  // before the state: no Bump is missed
      const uint32_t state = op->state.load(std::memory_order_acquire);
      if (state == Op::kDone) return op->status;
      if (state == Op::kLook) break;
      turns_.WaitOnce(seen);
    }
    MutexLock l(&mu_);
    run = queue_.front() == op;  // kLook goes to the front only; this is defensive
    uint32_t look = Op::kLook;
    if (!run) op->state.compare_exchange_strong(look, Op::kWaiting, std::memory_order_relaxed);
  }
}

Status Wal::Combine(Op* op) {
  {
    MutexLock l(&mu_);
    REPLICA_RETURN_IF_ERROR(Admissible());
    queue_.push_back(op);
    queued_.store(queue_.size(), std::memory_order_release);
    op->state.store(Op::kWaiting, std::memory_order_relaxed);
  }
  // The group this thread runs. Its ops are marked done outside the locks,
  // so the list cannot live in the Wal; and not in a thread_local either,
  // which a nested call (an on_written hook appending to another log)
  // would overwrite.
  std::vector<Op*> group;
  std::atomic_thread_fence(std::memory_order_seq_cst);  // see WakeQueueIfWaiting
  for (int tries = 0;; ++tries) {
    const uint32_t seen = turns_.Load();  // before the state and the lock: no Bump is missed
    if (op->state.load(std::memory_order_acquire) == Op::kDone) {
      ReportError();
      return op->status;
    }
    if (write_mu_.TryLock()) {
      bool ran = false;
      bool empty = false;
      {
        MutexLock l(&mu_);
        empty = queue_.empty();
        // The appends at the queue's front, whoever queued them (this op
        // may be among them, or already written by an earlier holder, which
        // marks it done soon). Not a Sync, Truncate or Purge: its own
        // thread leads it, and wakes the queue when done.
        const Op* front = queue_.empty() ? nullptr : queue_.front();
        if (front != nullptr && (front->kind == Op::Kind::kAppend || front->kind == Op::Kind::kRaw)) {
          group.assign(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(NextGroupSize()));
          RunGroup(group.front(), group, /*queued=*/true);
          ran = true;
        }
      }
      write_mu_.Unlock();
      if (ran) {
        // Outside both locks, as in Lead: an op's thread may return as soon
        // as its op is done, so nothing of an op is touched after that.
        bool mine = false;
        for (Op* g : group) {
          if (g == op) {
            mine = true;
          } else {
            g->state.store(Op::kDone, std::memory_order_release);
          }
        }
        turns_.Bump();  // the group's sleepers, and the queue's next ones
        if (mine) {
          ReportError();  // only once this op is finished, as in Lead
          return op->status;
        }
        continue;
      }
      // Nothing to run: a Sync, Truncate or Purge heads the queue (its
      // thread wakes the queue when done), or the queue was empty (another
      // holder wrote this op and will wake it). In that case an appender
      // may have queued since and, finding the lock taken, have gone to
      // sleep.
      if (empty) WakeQueueIfWaiting();
    }
    // The holder of the writer lock is most likely running on the other
    // CPU and done within a write(): give the CPU to another appender, so
    // that it queues its records for the next group, and only sleep once
    // that has not been enough for a while (a slow disk, a stalled write).
    if (tries < kCombineYields) {
      sched_yield();
    } else {
      turns_.WaitOnce(seen);
    }
  }
}

void Wal::WakeQueueIfWaiting() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (queued_.load(std::memory_order_relaxed) > 0) turns_.Bump();
}

Status Wal::Admissible() const {
  if (options_.read_only) return Status::NotSupported("the WAL was opened read-only");
  if (closing_ || closed_) return Status::Aborted("the WAL is closed");
  return bg_error_;
}

size_t Wal::NextGroupSize() const {
  // The leader alone for maintenance, else the appends (and sync requests)
  // queued behind it, up to max_group_bytes.
  const Op* front = queue_.front();
  if (front->kind == Op::Kind::kTruncate || front->kind == Op::Kind::kPurge) return 1;
  size_t n = 0;
  size_t bytes = 0;
  for (const Op* op : queue_) {
    if (op->kind == Op::Kind::kTruncate || op->kind == Op::Kind::kPurge) break;
    if (n > 0 && bytes + op->bytes() > options_.max_group_bytes) break;
    bytes += op->bytes();
    ++n;
  }
  return n;
}

void Wal::EndGather() {
  gatherer_->state.store(Op::kRun, std::memory_order_release);
  gatherer_ = nullptr;
  ++stats_.gathers_cut_short;
  turns_.Bump();  // rare: the leader waits on the shared word
}

bool Wal::Gather(Op* op) {
  // Only the queue's front gathers; a thread that took the group over from
  // the front runs it as it stands.
  std::chrono::steady_clock::time_point deadline;
  {
    MutexLock l(&mu_);
    if (queue_.front() != op || options_.sync_policy != SyncPolicy::kEveryCommit) return true;
    if (op->kind != Op::Kind::kAppend && op->kind != Op::Kind::kRaw) return true;
    const size_t want = std::min<size_t>(expected_group_, 64);
    // Nothing to wait for: the group is there, or cannot grow (an op that
    // cannot join it is queued, or the log is closing).
    if (want <= 1 || queue_.size() >= want || NextGroupSize() < queue_.size() || closing_) return true;
    deadline = std::chrono::steady_clock::now() + gather_policy_.Wait(last_sync_time_);
    gather_target_ = want;
    gatherer_ = op;
    ++stats_.gathers;
    if (gather_policy_.patient()) ++stats_.gathers_patient;
  }
  for (;;) {
    const uint32_t seen = turns_.Load();
    const uint32_t state = op->state.load(std::memory_order_acquire);
    // Taken over (or already done): wait for the group as a follower.
    if (state == Op::kTaken || state == Op::kDone) return false;
    if (state == Op::kRun) return true;  // EndGather: run what has arrived
    if (turns_.WaitOnceUntil(seen, deadline)) continue;
    MutexLock l(&mu_);
    // Ended while the deadline passed: taken over (follow), or cut short (run).
    if (gatherer_ != op) return op->state.load(std::memory_order_relaxed) == Op::kRun;
    gatherer_ = nullptr;  // the wait is over: run what has arrived
    gather_policy_.TimedOut();
    ++stats_.gathers_timed_out;
    return true;
  }
}

Status Wal::Lead(Op* leader) {
  std::vector<Op*> group;
  {
    MutexLock w(&write_mu_);
    MutexLock l(&mu_);
    const size_t n = NextGroupSize();
    group.assign(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(n));
    RunGroup(leader, group, /*queued=*/true);
  }
  // Outside both locks, so that a woken appender can append again at once.
  // An op must not be touched once it is marked done: its thread may have
  // returned already.
  for (Op* op : group) {
    if (op != leader) op->state.store(Op::kDone, std::memory_order_release);
  }
  // One system call wakes the whole group (and the next leader). The
  // group's other appenders may have returned already, and Close with them
  // (it waits only for the queue to drain): the Wal must outlive every
  // Append call still running, this leader's included, as any method call.
  turns_.Bump();
  ReportError();
  return leader->status;
}

void Wal::SetError(const Status& st) {
  if (!bg_error_.ok()) return;
  RLOG(kError, "wal.write_failed") << "dir=" << dir_ << " error=\"" << st.ToString()
                                  << "\" (appends refused until reopened)";
  bg_error_ = st;
  error_unreported_.store(true, std::memory_order_release);
}

void Wal::ReportError() {
  if (!error_unreported_.load(std::memory_order_acquire)) return;
  Status st;
  {
    MutexLock l(&mu_);
    if (!error_unreported_.exchange(false)) return;  // another thread reports it
    st = bg_error_;
  }
  if (options_.on_error) options_.on_error(st);
}

void Wal::RunGroup(Op* leader, std::span<Op* const> group, bool queued) {
  const bool maintenance = leader->kind == Op::Kind::kTruncate || leader->kind == Op::Kind::kPurge;

  Status st = bg_error_;
  bool mutated = !maintenance;  // a failed write always leaves the disk unknown
  // A Sync asks for an fdatasync; under kEveryCommit so does any admitted
  // record (a group whose appends were all refused writes nothing to sync).
  bool want_sync = false;
  Lsn group_last = last_lsn_;
  EpochHistory new_history;
  bool history_changed = false;
  if (st.ok() && !maintenance) {
    // Admission: assign LSNs in queue order, refuse stale epochs and gaps.
    Lsn next = next_lsn_;
    Epoch tail = tail_epoch_;
    // Copied only when the group starts an epoch (rarely).
    const EpochHistory* current_history = &history_;
    auto change_history = [&] {
      if (!history_changed) new_history = *current_history;
      history_changed = true;
    };
    for (Op* op : group) {
      if (op->kind == Op::Kind::kSync) {
        want_sync = true;
        op->admitted = true;
        continue;
      }
      if (op->kind == Op::Kind::kAppend) {
        if (op->epoch < tail) {
          op->status = Status::StaleEpoch("append in epoch " + std::to_string(op->epoch) +
                                          " after epoch " + std::to_string(tail) + " was written");
          continue;
        }
        if (next > kMaxLsn || op->n - 1 > kMaxLsn - next) {
          op->status = Status::InvalidArgument("appending " + std::to_string(op->n) + " records at LSN " +
                                               std::to_string(next) + " would pass the largest LSN, " +
                                               std::to_string(kMaxLsn));
          continue;
        }
        if (op->epoch > tail) {
          change_history();
          (void)new_history.Add(op->epoch, next);
        }
        op->first_lsn = next;
        next += op->n;
        tail = op->epoch;
        op->result = next - 1;
      } else {  // kRaw
        if (op->run.first_lsn != next) {
          op->status = Status::InvalidArgument("raw frames start at LSN " + std::to_string(op->run.first_lsn) +
                                               " but the log continues at LSN " + std::to_string(next));
          continue;
        }
        if (op->run.epoch_starts.front().first < tail) {
          op->status = Status::StaleEpoch("raw frames of epoch " + std::to_string(op->run.epoch_starts.front().first) +
                                          " after epoch " + std::to_string(tail) + " was written");
          continue;
        }
        for (const auto& [epoch, lsn] : op->run.epoch_starts) {
          if (epoch > tail) {
            change_history();
            (void)new_history.Add(epoch, lsn);
            tail = epoch;
          }
        }
        next = op->run.last_lsn + 1;
        op->result = op->run.last_lsn;
      }
      op->admitted = true;
      if (options_.sync_policy == SyncPolicy::kEveryCommit) want_sync = true;
    }
    next_lsn_ = next;
    tail_epoch_ = tail;
    group_last = next - 1;
  }

  if (st.ok()) {
    mu_.Unlock();
    if (maintenance) {
      if (leader->kind == Op::Kind::kTruncate) {
        st = DoTruncate(leader->lsn_arg, &mutated);
      } else {
        mutated = true;
        auto r = DoPurge(leader->lsn_arg, /*retention=*/false);
        st = r.status();
        if (r.ok()) leader->result = *r;
      }
      mu_.Lock();
    } else {
      // Encode into parts_, a (header, payload) pair per frame.
      uint64_t records = 0;
      const uint64_t group_bytes = Vectored(group) ? EncodeHeaders(group, &records) : EncodeCopies(group, &records);
      rolled_ = false;
      if (history_changed) st = PersistHistory(new_history);
      if (st.ok()) st = WriteParts();
      // Readers see the group once it is written: under kEveryCommit while
      // its fdatasync runs, so that a shipper sends it to standbys in
      // parallel with the local sync (appenders still return only once the
      // policy is met).
      mu_.Lock();
      if (st.ok() && group_bytes > 0) {
        last_lsn_ = group_last;
        segments_.back().end = cur_size_;
        if (history_changed) history_ = std::move(new_history);
        data_cv_.SignalAll();
      }
      const bool notify = st.ok() && group_bytes > 0 && options_.on_written;
      if (want_sync || notify) {
        mu_.Unlock();
        if (notify) options_.on_written();
        if (want_sync && st.ok()) st = SyncFrames();
        mu_.Lock();
      }
      if (st.ok()) {
        if (group_bytes > 0) {
          ++stats_.groups;
          stats_.records += records;
          stats_.bytes += group_bytes;
          stats_.largest_group_bytes = std::max<uint64_t>(stats_.largest_group_bytes, group_bytes);
        }
        if (want_sync) {
          durable_lsn_ = last_lsn_;
          last_sync_time_ = sync_time_;
          stats_.RecordSync(sync_time_);
        }
        if (queued) {
          // Appenders in flight now: this group's, which return and append
          // again, and those already queued behind it (Gather waits for as
          // many). The group's ops are still at the front of queue_ here.
          size_t in_flight = 0;
          for (Op* op : queue_) in_flight += op->kind == Op::Kind::kAppend || op->kind == Op::Kind::kRaw ? 1 : 0;
          expected_group_ = std::max<size_t>(1, in_flight);
        }
      }
      if (st.ok() && rolled_ && options_.retention_bytes > 0) {
        // Still the leader, and the group is published: retention may run.
        // A failed unlink leaves a consistent log, so it is logged, not sticky.
        mu_.Unlock();
        auto r = DoPurge(UINT64_MAX, /*retention=*/true);
        if (!r.ok()) RLOG(kWarn, "wal.retention_failed") << "dir=" << dir_ << " error=\"" << r.status().ToString() << "\"";
        mu_.Lock();
      }
    }
  }

  if (!st.ok() && !mutated) {
    leader->status = st;  // refused before touching anything: not sticky
  } else if (!st.ok()) {
    SetError(st);
    // Every op of the group fails with it, admitted or not (a group that
    // starts after an earlier failure admits nothing), unless it already
    // carries its own refusal.
    for (Op* op : group) {
      if (op->status.ok()) op->status = st;
    }
  } else if (leader->kind == Op::Kind::kSync) {
    leader->result = durable_lsn_;
  }
  if (queued) {
    for (size_t i = 0; i < group.size(); ++i) queue_.pop_front();
    queued_.store(queue_.size(), std::memory_order_release);
    // The next front leads (it cannot finish before it is woken, so waking
    // it under mu_ is safe); Close waits on durable_cv_ for the queue to drain.
    if (!queue_.empty()) queue_.front()->state.store(Op::kLook, std::memory_order_release);
  }
  // Readers were woken when the group was written; a failed group wakes them
  // again so that they look at the log as it now stands.
  if (!st.ok()) data_cv_.SignalAll();
  durable_cv_.SignalAll();
}

bool Wal::Vectored(std::span<Op* const> group) const {
  // Large plain records (no compression, no raw frames) are not copied:
  // writev takes the payloads from the callers' buffers. Small ones are,
  // which costs less than the kernel's work per extra iovec (100 B records
  // ran 10-20% slower uncopied).
  if (options_.compress) return false;
  size_t frames = 0;
  size_t payload_bytes = 0;
  for (const Op* op : group) {
    if (!op->admitted || op->kind == Op::Kind::kSync) continue;
    if (op->kind == Op::Kind::kRaw) return false;
    frames += op->n;
    payload_bytes += op->bytes() - op->n * kFrameHeaderSize;
  }
  return frames > 0 && payload_bytes >= frames * kVectoredMinPayload;
}

uint64_t Wal::EncodeHeaders(std::span<Op* const> group, uint64_t* records) {
  size_t frames = 0;
  for (const Op* op : group) frames += op->admitted && op->kind == Op::Kind::kAppend ? op->n : 0;
  group_buf_.assign(frames * kFrameHeaderSize, '\0');  // sized once: the parts point into it
  parts_.clear();
  char* header = group_buf_.data();
  uint64_t bytes = 0;
  for (const Op* op : group) {
    if (!op->admitted || op->kind != Op::Kind::kAppend) continue;
    for (size_t i = 0; i < op->n; ++i) {
      const RecordIn& r = op->records[i];
      EncodeRecordHeader(op->first_lsn + i, op->epoch, r.type, r.payload, header);
      parts_.emplace_back(header, kFrameHeaderSize);
      parts_.push_back(r.payload);
      header += kFrameHeaderSize;
      bytes += kFrameHeaderSize + r.payload.size();
    }
    *records += op->n;
  }
  return bytes;
}

uint64_t Wal::EncodeCopies(std::span<Op* const> group, uint64_t* records) {
  // Consecutive appends of one epoch share an LZ4 block when compressing;
  // raw frames are stored as received.
  group_buf_.clear();
  std::vector<RecordIn> batch;
  batch.swap(encode_batch_);  // reused: no allocation per group
  batch.clear();
  Lsn batch_first = 0;
  Epoch batch_epoch = 0;
  size_t batch_raw = 0;
  auto flush = [&] {
    if (batch.empty()) return;
    EncodeRecords(batch_first, batch_epoch, batch.data(), batch.size(), options_.compress, &group_buf_);
    batch.clear();
    batch_raw = 0;
  };
  for (const Op* op : group) {
    if (!op->admitted || op->kind == Op::Kind::kSync) continue;
    if (op->kind == Op::Kind::kRaw) {
      flush();
      group_buf_.append(op->raw);
      *records += op->run.last_lsn - op->run.first_lsn + 1;
      continue;
    }
    size_t raw = op->bytes();
    if (!batch.empty() && (op->epoch != batch_epoch || batch_raw + raw > kMaxBlockRaw)) flush();
    if (batch.empty()) {
      batch_first = op->first_lsn;
      batch_epoch = op->epoch;
    }
    batch.insert(batch.end(), op->records, op->records + op->n);
    batch_raw += raw;
    *records += op->n;
  }
  flush();
  batch.swap(encode_batch_);
  // The same (header, payload) pairs as EncodeHeaders, here adjacent in
  // group_buf_ (AppendV joins adjacent parts into one iovec again). The
  // frames are this log's own encoding or verified raw input: they decode.
  parts_.clear();
  for (size_t pos = 0; pos < group_buf_.size();) {
    FrameHeader h;
    (void)DecodeFrameHeader(group_buf_.data() + pos, &h);
    parts_.emplace_back(group_buf_.data() + pos, kFrameHeaderSize);
    parts_.emplace_back(group_buf_.data() + pos + kFrameHeaderSize, h.payload_len);
    pos += h.frame_size();
  }
  return group_buf_.size();
}

Status Wal::WriteParts() {
  std::shared_ptr<WritableFile> file;
  {
    MutexLock l(&mu_);
    file = cur_file_;
  }
  // parts_ holds (header, payload) pairs, one frame each. Frames go to the
  // current segment until it has reached segment_size; the next frame then
  // starts a new segment. The cut depends only on the frame sequence, so a
  // standby appending the same frames gets the same files.
  size_t chunk = 0;
  uint64_t pending = 0;
  for (size_t k = 0; k + 1 < parts_.size(); k += 2) {
    if (cur_size_ + pending >= options_.segment_size) {
      if (k > chunk) {
        REPLICA_RETURN_IF_ERROR(file->AppendV(parts_.data() + chunk, k - chunk));
        cur_size_ += pending;
      }
      FrameHeader h;
      REPLICA_RETURN_IF_ERROR(DecodeFrameHeader(parts_[k].data(), &h));
      REPLICA_RETURN_IF_ERROR(RollSegment(h.lsn));
      {
        MutexLock l(&mu_);
        file = cur_file_;
      }
      chunk = k;
      pending = 0;
    }
    pending += parts_[k].size() + parts_[k + 1].size();
  }
  if (parts_.size() > chunk) {
    REPLICA_RETURN_IF_ERROR(file->AppendV(parts_.data() + chunk, parts_.size() - chunk));
    cur_size_ += pending;
  }
  return Status::OK();
}

Status Wal::SyncFrames() {
  std::shared_ptr<WritableFile> file;
  {
    MutexLock l(&mu_);
    file = cur_file_;
  }
  {
    // Segments rolled without a sync (policy none), then their directory.
    for (const auto& old : unsynced_) REPLICA_RETURN_IF_ERROR(old->Sync());
    if (!unsynced_.empty()) REPLICA_RETURN_IF_ERROR(env_->SyncDir(dir_));
    unsynced_.clear();
    const auto start = std::chrono::steady_clock::now();
    REPLICA_RETURN_IF_ERROR(file->Sync());
    sync_time_ = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start);
  }
  return Status::OK();
}

Status Wal::RollSegment(Lsn first_lsn) {
  std::shared_ptr<WritableFile> old;
  Lsn prev_first;
  std::string old_path;
  {
    MutexLock l(&mu_);
    old = cur_file_;
    prev_first = segments_.back().first_lsn;
    old_path = segments_.back().path;
  }
  // A finished segment ends at its last frame (only the last segment may
  // hold reserved zeros), before the next one exists.
  REPLICA_RETURN_IF_ERROR(DropReserve(old_path));
  if (options_.sync_policy != SyncPolicy::kNone) REPLICA_RETURN_IF_ERROR(old->Sync());
  REPLICA_RETURN_IF_ERROR(CreateSegment(first_lsn, prev_first));
  rolled_ = true;
  return Status::OK();
}

Result<Lsn> Wal::DoPurge(Lsn upto, bool retention) {
  uint64_t purged = 0;
  for (;;) {
    std::string path;
    {
      MutexLock l(&mu_);
      if (segments_.size() < 2) break;
      const Lsn seg_last = segments_[1].first_lsn - 1;
      if (seg_last > upto) break;
      if (retention) {
        if (seg_last >= retention_floor_) break;
        uint64_t total = 0;
        for (const auto& s : segments_) total += s.end;
        if (total <= options_.retention_bytes) break;
      }
      path = segments_.front().path;
    }
    // Oldest first: a crash part-way leaves a shorter, still contiguous log.
    REPLICA_RETURN_IF_ERROR(env_->DeleteFile(path));
    // Each unlink is made durable before the next, so that a crash can never
    // leave an older segment behind a deleted newer one (a hole).
    REPLICA_RETURN_IF_ERROR(env_->SyncDir(dir_));
    MutexLock l(&mu_);
    segments_.pop_front();
    ++stats_.segments_purged;
    ++purged;
  }
  if (purged > 0) {
    RLOG(kInfo, "wal.purge") << "dir=" << dir_ << " segments=" << purged << " first_lsn=" << first_lsn()
                             << (retention ? " reason=retention" : "");
  }
  return first_lsn();
}

Status Wal::DoTruncate(Lsn last_kept, bool* mutated) {
  std::deque<Segment> segs;
  Lsn last;
  EpochHistory history;
  {
    MutexLock l(&mu_);
    segs = segments_;
    last = last_lsn_;
    history = history_;
  }
  if (last_kept > last) {
    return Status::InvalidArgument("cannot truncate to LSN " + std::to_string(last_kept) + ": the log ends at LSN " +
                                   std::to_string(last));
  }
  if (last_kept + 1 < segs.front().first_lsn) {
    return Status::Purged("cannot truncate to LSN " + std::to_string(last_kept) + ": the log starts at LSN " +
                          std::to_string(segs.front().first_lsn));
  }
  if (last_kept == last) return Status::OK();
  const Lsn cut = last_kept + 1;
  size_t idx = segs.size() - 1;
  while (segs[idx].first_lsn > cut) --idx;
  // Find the frame that starts at `cut`.
  uint64_t offset = kSegmentHeaderSize;
  if (segs[idx].first_lsn != cut) {
    REPLICA_ASSIGN_OR_RETURN(auto file, env_->NewRandomAccessFile(segs[idx].path));
    FrameCursor cursor(file.get(), kSegmentHeaderSize, segs[idx].end);
    for (;;) {
      FrameHeader h;
      std::string_view payload;
      std::string why;
      REPLICA_ASSIGN_OR_RETURN(auto outcome, cursor.Next(&h, &payload, &why));
      if (outcome != FrameCursor::Outcome::kFrame) {
        return Status::Corruption("segment " + segs[idx].path + " offset " + std::to_string(cursor.offset()) +
                                  ": " + why + " (while looking for LSN " + std::to_string(cut) + ")");
      }
      if (h.lsn == cut) {
        offset = cursor.offset() - h.frame_size();
        break;
      }
      if (h.lsn < cut && cut <= h.last_lsn()) {
        return Status::InvalidArgument("LSN " + std::to_string(last_kept) + " is inside the LZ4 block holding LSNs " +
                                       std::to_string(h.lsn) + ".." + std::to_string(h.last_lsn()) +
                                       "; truncate at a block boundary");
      }
    }
  }
  RLOG(kWarn, "wal.truncate") << "dir=" << dir_ << " last_kept=" << last_kept << " dropped_records="
                              << (last - last_kept) << " segment=" << segs[idx].path << " offset=" << offset;
  *mutated = true;
  std::shared_ptr<WritableFile> file;
  {
    MutexLock l(&mu_);
    file = std::move(cur_file_);
    ++generation_;  // readers must not read on
    // From here on nothing past the cut is visible: NewReader refuses to start
    // there, and last_lsn() says so, while the files are being cut.
    last_lsn_ = std::min(last_lsn_, last_kept);
    durable_lsn_ = std::min(durable_lsn_, last_kept);
    data_cv_.SignalAll();
    durable_cv_.SignalAll();
  }
  file.reset();  // closed by its last owner (the sync thread may hold it)
  // Segments rolled without a sync (policy none) that the cut keeps must be
  // durable before durable_lsn_ says so below.
  for (const auto& old : unsynced_) REPLICA_RETURN_IF_ERROR(old->Sync());
  unsynced_.clear();
  // Newest first: a crash part-way leaves a log that ends later, still a clean
  // prefix of what it was, and the epoch history's extra entries are dropped
  // on recovery.
  for (size_t j = segs.size() - 1; j > idx; --j) {
    REPLICA_RETURN_IF_ERROR(env_->DeleteFile(segs[j].path));
    REPLICA_RETURN_IF_ERROR(env_->SyncDir(dir_));  // ordered: never a hole after a crash
    MutexLock l(&mu_);
    segments_.pop_back();
  }
  REPLICA_RETURN_IF_ERROR(env_->TruncateFile(segs[idx].path, offset));
  REPLICA_ASSIGN_OR_RETURN(auto wf, env_->ReopenWritableFile(segs[idx].path));
  std::shared_ptr<WritableFile> reopened = std::move(wf);
  cur_size_ = offset;
  Reserve(reopened.get());
  REPLICA_RETURN_IF_ERROR(reopened->Sync());
  REPLICA_RETURN_IF_ERROR(env_->SyncDir(dir_));
  if (history.TruncateAfter(last_kept)) REPLICA_RETURN_IF_ERROR(PersistHistory(history));
  MutexLock l(&mu_);
  segments_.back().end = offset;
  cur_file_ = std::move(reopened);
  cur_size_ = offset;
  last_lsn_ = durable_lsn_ = last_kept;
  next_lsn_ = cut;
  history_ = std::move(history);
  tail_epoch_ = history_.last_epoch();
  return Status::OK();
}

void Wal::SyncLoop() {
  MutexLock l(&mu_);
  while (!closing_) {
    sync_cv_.WaitUntil(std::chrono::steady_clock::now() + options_.sync_interval);
    if (closing_ || !bg_error_.ok() || durable_lsn_ >= last_lsn_ || !cur_file_) continue;
    // Everything up to last_lsn_ is in cur_file_ or in older segments, which
    // were synced when they were closed.
    std::shared_ptr<WritableFile> file = cur_file_;
    Lsn target = last_lsn_;
    const uint64_t generation = generation_.load();
    mu_.Unlock();
    const auto start = std::chrono::steady_clock::now();
    Status st = file->Sync();
    const auto took = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start);
    mu_.Lock();
    if (!st.ok()) {
      SetError(st);
      mu_.Unlock();
      ReportError();
      mu_.Lock();
      continue;
    }
    // A truncation in the meantime makes `target` meaningless.
    if (generation == generation_.load() && target > durable_lsn_) {
      durable_lsn_ = std::min(target, last_lsn_);
      durable_cv_.SignalAll();  // WaitForDurable
    }
    stats_.RecordSync(took);
  }
}

Status Wal::Close() {
  std::shared_ptr<WritableFile> file;
  {
    MutexLock l(&mu_);
    if (closed_ || closing_) return Status::OK();
    closing_ = true;
    if (gatherer_ != nullptr) EndGather();  // nothing more can join its group
    while (!queue_.empty()) durable_cv_.Wait();
    sync_cv_.SignalAll();
  }
  if (sync_thread_.joinable()) sync_thread_.join();
  Status st;
  {
    MutexLock w(&write_mu_);  // an appender writing its own records finishes first
    MutexLock l(&mu_);
    file = std::move(cur_file_);
    st = bg_error_;
    if (file && bg_error_.ok() && (durable_lsn_ < last_lsn_ || !unsynced_.empty())) {
      // A clean close leaves everything durable, whatever the policy.
      mu_.Unlock();
      for (const auto& old : unsynced_) {
        if (st.ok()) st = old->Sync();
      }
      if (st.ok() && !unsynced_.empty()) st = env_->SyncDir(dir_);
      if (st.ok()) st = file->Sync();
      mu_.Lock();
      if (st.ok()) durable_lsn_ = last_lsn_;
    }
    unsynced_.clear();
    if (file && st.ok() && Reserving()) {
      // A closed log's files end at their last frame.
      const std::string path = segments_.back().path;
      mu_.Unlock();
      st = DropReserve(path);
      if (st.ok()) st = file->Sync();
      mu_.Lock();
    }
  }
  if (file) {
    Status cst = file->Close();
    if (st.ok()) st = cst;
  }
  {
    MutexLock l(&mu_);
    closed_ = true;
    data_cv_.SignalAll();
    durable_cv_.SignalAll();
  }
  lock_.reset();
  return st;
}

Result<std::unique_ptr<Reader>> Wal::NewReader(Lsn from) {
  MutexLock l(&mu_);
  if (closed_) return Status::Aborted("the WAL is closed");
  if (from < first_lsn_locked()) {
    return Status::Purged("LSN " + std::to_string(from) + " is no longer retained; the log starts at LSN " +
                          std::to_string(first_lsn_locked()));
  }
  if (from > last_lsn_ + 1) {
    return Status::InvalidArgument("LSN " + std::to_string(from) + " is past the end of the log (last LSN " +
                                   std::to_string(last_lsn_) + ")");
  }
  return std::unique_ptr<Reader>(new Reader(this, from, generation_));
}

Lsn Wal::first_lsn() const {
  MutexLock l(&mu_);
  return first_lsn_locked();
}
Lsn Wal::last_lsn() const {
  MutexLock l(&mu_);
  return last_lsn_;
}
bool Wal::WaitForDurable(Lsn lsn, std::chrono::steady_clock::time_point deadline) {
  MutexLock l(&mu_);
  while (durable_lsn_ < lsn && !closed_ && !closing_) {
    if (!durable_cv_.WaitUntil(deadline) && std::chrono::steady_clock::now() >= deadline) break;
  }
  return durable_lsn_ >= lsn;
}

Lsn Wal::durable_lsn() const {
  MutexLock l(&mu_);
  return durable_lsn_;
}

Epoch Wal::last_epoch() const {
  MutexLock l(&mu_);
  return history_.last_epoch();
}
EpochHistory Wal::epoch_history() const {
  MutexLock l(&mu_);
  return history_;
}
EpochEnd Wal::EndOfEpoch(Epoch epoch) const {
  MutexLock l(&mu_);
  return history_.EndOf(epoch, last_lsn_);
}
std::vector<SegmentInfo> Wal::segments() const {
  MutexLock l(&mu_);
  std::vector<SegmentInfo> out;
  for (size_t i = 0; i < segments_.size(); ++i) {
    Lsn last = i + 1 < segments_.size() ? segments_[i + 1].first_lsn - 1 : last_lsn_;
    out.push_back(SegmentInfo{segments_[i].first_lsn, last, segments_[i].end, segments_[i].path});
  }
  return out;
}
uint64_t Wal::BytesAfter(Lsn lsn) const {
  MutexLock l(&mu_);
  uint64_t bytes = 0;
  for (size_t i = 0; i < segments_.size(); ++i) {
    const Lsn first = segments_[i].first_lsn;
    const Lsn last = i + 1 < segments_.size() ? segments_[i + 1].first_lsn - 1 : last_lsn_;
    if (last < first || last <= lsn) continue;
    const uint64_t body = segments_[i].end > kSegmentHeaderSize ? segments_[i].end - kSegmentHeaderSize : 0;
    if (first > lsn) {
      bytes += body;
    } else {
      bytes += static_cast<uint64_t>(static_cast<double>(body) * static_cast<double>(last - lsn) /
                                     static_cast<double>(last - first + 1));
    }
  }
  return bytes;
}

uint64_t Wal::size_bytes() const {
  MutexLock l(&mu_);
  uint64_t total = 0;
  for (const auto& s : segments_) total += s.end;
  return total;
}
WalStats Wal::stats() const {
  MutexLock l(&mu_);
  WalStats s = stats_;
  s.queued = queue_.size();
  return s;
}

}  // namespace replica::wal
