// Wal::Reader: iterates records (or raw frame runs) from an LSN.
#include "wal/wal.h"

namespace replica::wal {

Reader::Reader(Wal* wal, Lsn from, uint64_t generation)
    : wal_(wal), next_lsn_(from), generation_(generation) {}

Reader::~Reader() = default;

Status Reader::CorruptionHere(const std::string& why) const {
  return Status::Corruption("segment " + seg_path_ + " offset " + std::to_string(cursor_ ? cursor_->offset() : 0) +
                            " (LSN " + std::to_string(frame_lsn_) + "): " + why);
}

Result<bool> Reader::Position() {
  MutexLock l(&wal_->mu_);
  if (wal_->closed_) return Status::Aborted("the WAL is closed");
  if (generation_ != wal_->generation_.load()) return Status::Aborted("the log was truncated under this reader");
  visible_last_ = wal_->last_lsn_;
  if (next_lsn_ > visible_last_) return false;
  if (!file_) {
    if (next_lsn_ < wal_->segments_.front().first_lsn) {
      return Status::Purged("LSN " + std::to_string(next_lsn_) + " was purged; the log starts at LSN " +
                            std::to_string(wal_->segments_.front().first_lsn));
    }
    size_t i = wal_->segments_.size() - 1;
    while (wal_->segments_[i].first_lsn > next_lsn_) --i;
    seg_first_ = wal_->segments_[i].first_lsn;
    seg_path_ = wal_->segments_[i].path;
    frame_lsn_ = seg_first_;
  }
  size_t i = 0;
  while (i < wal_->segments_.size() && wal_->segments_[i].first_lsn != seg_first_) ++i;
  if (i == wal_->segments_.size() && next_lsn_ >= wal_->segments_.front().first_lsn) {
    // Our segment was purged after we read all of it: carry on in the next.
    file_.reset();
    cursor_.reset();
    i = wal_->segments_.size() - 1;
    while (wal_->segments_[i].first_lsn > next_lsn_) --i;
    seg_first_ = wal_->segments_[i].first_lsn;
    seg_path_ = wal_->segments_[i].path;
    frame_lsn_ = seg_first_;
  }
  if (i == wal_->segments_.size()) {
    return Status::Purged("segment " + seg_path_ + " was purged while being read (at LSN " +
                          std::to_string(next_lsn_) + ")");
  }
  seg_end_ = wal_->segments_[i].end;
  next_seg_first_.reset();
  if (i + 1 < wal_->segments_.size()) next_seg_first_ = wal_->segments_[i + 1].first_lsn;
  return true;
}

Result<bool> Reader::Ready() {
  if (generation_ != wal_->generation_.load()) return Status::Aborted("the log was truncated under this reader");
  for (;;) {
    if (!file_ || next_lsn_ > visible_last_ || cursor_->offset() >= seg_end_) {
      REPLICA_ASSIGN_OR_RETURN(bool more, Position());
      if (!more) return false;
    }
    if (!file_) {
      auto opened = wal_->env_->NewRandomAccessFile(seg_path_);
      if (!opened.ok()) {
        if (opened.status().IsNotFound()) return Status::Purged("segment " + seg_path_ + " was purged");
        return opened.status();
      }
      std::shared_ptr<RandomAccessFile> file = std::move(opened).value();
      char buf[kSegmentHeaderSize];
      REPLICA_ASSIGN_OR_RETURN(size_t got, file->Read(0, kSegmentHeaderSize, buf));
      SegmentHeader h;
      REPLICA_RETURN_IF_ERROR_CTX(DecodeSegmentHeader(std::string_view(buf, got), &h), "segment " + seg_path_);
      if (h.first_lsn != seg_first_) {
        return Status::Corruption("segment " + seg_path_ + " says it starts at LSN " + std::to_string(h.first_lsn));
      }
      // Only a segment whose header checked out becomes current.
      file_ = std::move(file);
      cursor_ = std::make_unique<FrameCursor>(file_.get(), kSegmentHeaderSize, seg_end_);
    }
    cursor_->set_end(seg_end_);
    if (cursor_->offset() < seg_end_) return true;
    // End of this segment: the next one must carry on where it stopped.
    if (!next_seg_first_) return CorruptionHere("the segment ends before LSN " + std::to_string(next_lsn_));
    if (frame_lsn_ != *next_seg_first_) {
      return CorruptionHere("the segment ends at LSN " + std::to_string(frame_lsn_ - 1) +
                            " but the next segment starts at LSN " + std::to_string(*next_seg_first_));
    }
    file_.reset();
    cursor_.reset();
  }
}

Result<bool> Reader::Next(RecordView* record) {
  if (generation_ != wal_->generation_.load()) return Status::Aborted("the log was truncated under this reader");
  for (;;) {
    if (block_pos_ < block_.size()) {
      const RecordView& r = block_[block_pos_++];
      if (r.lsn < next_lsn_) continue;
      *record = r;
      ++next_lsn_;
      return true;
    }
    REPLICA_ASSIGN_OR_RETURN(bool more, Ready());
    if (!more) return false;
    FrameHeader h;
    std::string_view payload;
    std::string why;
    const uint64_t frame_offset = cursor_->offset();
    // As NextRaw: the checksums of the frames skipped before the start LSN
    // are not checked, so damage there does not stop a reader after it.
    REPLICA_ASSIGN_OR_RETURN(auto outcome, cursor_->Next(&h, &payload, &why, next_lsn_));
    if (outcome != FrameCursor::Outcome::kFrame) return CorruptionHere(why);
    if (h.lsn != frame_lsn_) {
      cursor_->Seek(frame_offset);
      return CorruptionHere("frame carries LSN " + std::to_string(h.lsn));
    }
    frame_lsn_ = h.last_lsn() + 1;
    if (h.last_lsn() < next_lsn_) continue;  // before the start LSN
    if (h.frame_type == FrameType::kRecord) {
      *record = RecordView{h.lsn, h.epoch, h.record_type, payload};
      ++next_lsn_;
      return true;
    }
    Status st = DecodeBlock(h, payload, &block_raw_, &block_);
    if (!st.ok()) {
      cursor_->Seek(frame_offset);
      frame_lsn_ = h.lsn;
      return CorruptionHere(st.message());
    }
    block_pos_ = 0;
    block_offset_ = frame_offset;
    block_first_ = h.lsn;
  }
}

Result<bool> Reader::WaitForData(std::chrono::steady_clock::time_point deadline) {
  MutexLock l(&wal_->mu_);
  for (;;) {
    if (wal_->closed_ || wal_->closing_) return Status::Aborted("the WAL is closed");
    if (generation_ != wal_->generation_.load()) return Status::Aborted("the log was truncated under this reader");
    if (next_lsn_ <= wal_->last_lsn_) return true;
    if (!wal_->data_cv_.WaitUntil(deadline) && std::chrono::steady_clock::now() >= deadline) {
      return next_lsn_ <= wal_->last_lsn_;
    }
  }
}

Result<bool> Reader::NextWait(RecordView* record, std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    REPLICA_ASSIGN_OR_RETURN(bool got, Next(record));
    if (got) return true;
    REPLICA_ASSIGN_OR_RETURN(bool more, WaitForData(deadline));
    if (!more) return false;
  }
}

Result<std::optional<RawSpan>> Reader::NextRaw(size_t max_bytes) {
  if (block_pos_ < block_.size()) {
    // Standing inside a block: the span restarts at the block's frame.
    cursor_->Seek(block_offset_);
    frame_lsn_ = block_first_;
    block_.clear();
    block_pos_ = 0;
  }
  for (;;) {
    REPLICA_ASSIGN_OR_RETURN(bool more, Ready());
    if (!more) return std::optional<RawSpan>();
    // The cursor verifies the checksum of every frame that goes out, as the
    // receiver does again: damage in this log is found here, by segment,
    // offset and LSN, instead of being shipped to every standby (the cursor
    // reads whole frames anyway). Frames skipped before the start LSN are
    // not checked: damage there must not stop a reader after it (the seed
    // of a snapshot, a standby past the damage).
    RawSpan span;
    span.file = file_;
    span.segment_path = seg_path_;
    while (cursor_->offset() < seg_end_) {
      const uint64_t frame_offset = cursor_->offset();
      FrameHeader h;
      std::string_view payload;
      std::string why;
      auto next = cursor_->Next(&h, &payload, &why, next_lsn_);
      if (!next.ok()) {  // a read error: what is good goes out, as for damage
        cursor_->Seek(frame_offset);
        if (span.length > 0) break;
        return next.status();
      }
      const FrameCursor::Outcome outcome = *next;
      if (outcome != FrameCursor::Outcome::kFrame || h.lsn != frame_lsn_) {
        cursor_->Seek(frame_offset);
        if (span.length > 0) break;  // hand out what is good; the next call reports the damage
        return CorruptionHere(outcome != FrameCursor::Outcome::kFrame ? why
                                                                       : "frame carries LSN " + std::to_string(h.lsn));
      }
      if (h.last_lsn() < next_lsn_) {  // before the start LSN
        frame_lsn_ = h.last_lsn() + 1;
        continue;
      }
      if (h.last_lsn() > visible_last_ || (span.length > 0 && span.length + h.frame_size() > max_bytes)) {
        cursor_->Seek(frame_offset);
        break;
      }
      if (span.length == 0) {
        span.first_lsn = h.lsn;
        span.offset = frame_offset;
      }
      span.length += h.frame_size();
      span.last_lsn = h.last_lsn();
      frame_lsn_ = h.last_lsn() + 1;
      next_lsn_ = frame_lsn_;
    }
    if (span.length > 0) return std::optional<RawSpan>(std::move(span));
    if (cursor_->offset() < seg_end_) return std::optional<RawSpan>();  // the next frame is not visible yet
  }
}

uint64_t Reader::bytes_before() const {
  MutexLock l(&wal_->mu_);
  uint64_t bytes = 0;
  for (const auto& seg : wal_->segments_) {
    if (seg.first_lsn >= seg_first_) break;
    bytes += seg.end;
  }
  return bytes + (cursor_ ? cursor_->offset() : 0);
}

Status RawSpan::ReadInto(std::string* out) const {
  out->resize(length);
  REPLICA_ASSIGN_OR_RETURN(size_t got, file->Read(offset, length, out->data()));
  if (got != length) {
    return Status::IOError("short read of " + segment_path + " at offset " + std::to_string(offset));
  }
  return Status::OK();
}

}  // namespace replica::wal
