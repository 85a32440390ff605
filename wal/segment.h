// Segment files: naming, the segment header, a buffered cursor over the frames
// of one segment, and the recovery scan (docs/wal-format.md).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/env.h"
#include "wal/frame.h"

namespace replica::wal {

std::string SegmentFileName(Lsn first_lsn);
// Parses "<20 digits>.wal"; nullopt for any other name.
std::optional<Lsn> ParseSegmentFileName(const std::string& name);

struct SegmentHeader {
  uint16_t version = kFormatVersion;
  uint32_t incompat_flags = 0;
  Lsn first_lsn = 0;
  // first_lsn of the segment before this one (0 for the first segment ever).
  // Lets recovery notice a missing segment in the middle.
  Lsn prev_first_lsn = 0;
};

std::string EncodeSegmentHeader(const SegmentHeader& h);
Status DecodeSegmentHeader(std::string_view bytes, SegmentHeader* h);

// Reads consecutive frames of one segment file through a read-ahead buffer.
// Not thread-safe; one owner.
class FrameCursor {
 public:
  enum class Outcome {
    kFrame,       // *h and *payload describe a whole, verified frame
    kEnd,         // offset() == end: nothing more
    kIncomplete,  // the frame's header or payload runs past end
    kBad,         // bad header or checksum; *why says which
  };

  FrameCursor(const RandomAccessFile* file, uint64_t offset, uint64_t end)
      : file_(file), offset_(offset), end_(end) {}

  void set_end(uint64_t end) { end_ = end; }
  uint64_t offset() const { return offset_; }
  uint64_t end() const { return end_; }
  // Repositions; drops nothing that is buffered and still valid.
  void Seek(uint64_t offset) { offset_ = offset; }

  // Reads the frame at offset(); on kFrame advances past it. *payload stays
  // valid until the next call. The checksum is verified for frames whose
  // last LSN is at least verify_from: a reader skipping the frames before
  // its start LSN uses only their headers (damage in a payload there must
  // not stop it from reading what follows; a damaged length breaks LSN
  // continuity). Skipped frames are still read whole.
  Result<Outcome> Next(FrameHeader* h, std::string_view* payload, std::string* why, Lsn verify_from = 0);

 private:
  // Makes [off, off+n) resident in buf_; false if the file is shorter.
  Result<bool> Fill(uint64_t off, size_t n);

  const RandomAccessFile* file_;
  uint64_t offset_;
  uint64_t end_;
  std::string buf_;
  uint64_t buf_off_ = 0;  // file offset of buf_[0]
  size_t buf_len_ = 0;
};

// What recovery found in a segment.
struct SegmentScan {
  enum class Tail { kClean, kTorn, kCorrupt };
  Tail tail = Tail::kClean;
  uint64_t valid_end = 0;  // offset just past the last good frame
  Lsn last_lsn = 0;        // first_lsn - 1 if the segment holds no frame
  Epoch last_epoch = 0;
  size_t frames = 0;
  // (epoch, first LSN) for each epoch seen, in order.
  std::vector<std::pair<Epoch, Lsn>> epoch_starts;
  uint64_t bad_offset = 0;  // where the torn or corrupt frame starts
  std::string why;          // what was wrong with it
  // kTorn although valid frames follow: the bad frame reads as a lost page
  // (power loss), and everything from it on was never synced.
  bool lost_page = false;
  // Just past the last non-zero byte of the file (== valid_end when only
  // zeros, reserved space, follow the last good frame: a clean end).
  uint64_t data_end = 0;
  // Bytes checksummed while looking for a valid frame after a bad one
  // (bounded: past the bound the tail is kCorrupt, as it cannot be told).
  uint64_t searched_bytes = 0;
  bool undecided = false;  // kCorrupt because that bound was reached
};

// Scans every frame of a segment whose frames must start at first_lsn.
// A bad frame followed by any valid frame is kCorrupt (damage in the middle),
// unless a page it touches before the next valid frame reads as zeros and at
// most max_unsynced_bytes bytes of data follow its start (a write lost to power
// loss: kTorn, lost_page); a bad or incomplete frame with nothing valid after
// it is kTorn (a crash cut the last write short); nothing but zero bytes after
// the last good frame is kClean (space reserved by preallocation).
Result<SegmentScan> ScanSegment(const RandomAccessFile& file, uint64_t file_size, Lsn first_lsn,
                                uint64_t max_unsynced_bytes);

}  // namespace replica::wal
