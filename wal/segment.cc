#include "wal/segment.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>

#include "base/coding.h"

namespace replica::wal {

std::string SegmentFileName(Lsn first_lsn) {
  char name[40];
  std::snprintf(name, sizeof name, "%020llu%s", static_cast<unsigned long long>(first_lsn), kSegmentSuffix);
  return name;
}

std::optional<Lsn> ParseSegmentFileName(const std::string& name) {
  const size_t suffix = std::strlen(kSegmentSuffix);
  if (name.size() != kSegmentNameDigits + suffix) return std::nullopt;
  if (name.compare(kSegmentNameDigits, suffix, kSegmentSuffix) != 0) return std::nullopt;
  Lsn v = 0;
  for (int i = 0; i < kSegmentNameDigits; ++i) {
    char c = name[static_cast<size_t>(i)];
    if (c < '0' || c > '9') return std::nullopt;
    Lsn d = static_cast<Lsn>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return std::nullopt;
    v = v * 10 + d;
  }
  return v;
}

std::string EncodeSegmentHeader(const SegmentHeader& h) {
  std::string out(kSegmentHeaderSize, '\0');
  char* p = out.data();
  std::memcpy(p, kSegmentMagic, 8);
  EncodeFixed16(p + 8, h.version);
  EncodeFixed16(p + 10, static_cast<uint16_t>(kSegmentHeaderSize));
  EncodeFixed32(p + 12, h.incompat_flags);
  EncodeFixed64(p + 16, h.first_lsn);
  EncodeFixed64(p + 24, h.prev_first_lsn);
  EncodeFixed64(p + 32, XXH3_64bits(p, 32));
  return out;
}

Status DecodeSegmentHeader(std::string_view bytes, SegmentHeader* h) {
  if (bytes.size() < kSegmentHeaderSize) {
    return Status::Corruption("segment header is " + std::to_string(bytes.size()) + " bytes, need " +
                              std::to_string(kSegmentHeaderSize));
  }
  const char* p = bytes.data();
  if (std::memcmp(p, kSegmentMagic, 8) != 0) return Status::Corruption("not a WAL segment (bad magic)");
  if (XXH3_64bits(p, 32) != DecodeFixed64(p + 32)) return Status::Corruption("segment header checksum mismatch");
  h->version = DecodeFixed16(p + 8);
  uint16_t header_size = DecodeFixed16(p + 10);
  h->incompat_flags = DecodeFixed32(p + 12);
  h->first_lsn = DecodeFixed64(p + 16);
  h->prev_first_lsn = DecodeFixed64(p + 24);
  if (h->version != kFormatVersion) {
    return Status::NotSupported("segment format version " + std::to_string(h->version) +
                                " (this build reads version " + std::to_string(kFormatVersion) + ")");
  }
  if (header_size != kSegmentHeaderSize) {
    return Status::NotSupported("segment header of " + std::to_string(header_size) + " bytes (this build reads " +
                                std::to_string(kSegmentHeaderSize) + ")");
  }
  if ((h->incompat_flags & ~kKnownIncompatFlags) != 0) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%x", h->incompat_flags & ~kKnownIncompatFlags);
    return Status::NotSupported(std::string("segment uses unknown incompatible features ") + hex);
  }
  if (h->first_lsn == 0) return Status::Corruption("segment header with first LSN 0");
  return Status::OK();
}

Result<bool> FrameCursor::Fill(uint64_t off, size_t n) {
  if (off >= buf_off_ && off + n <= buf_off_ + buf_len_) return true;
  constexpr size_t kReadAhead = 256 << 10;
  size_t want = n > kReadAhead ? n : kReadAhead;
  if (off + want > end_) want = end_ > off ? static_cast<size_t>(end_ - off) : 0;
  if (want < n) return false;
  if (buf_.size() < want) buf_.resize(want);
  REPLICA_ASSIGN_OR_RETURN(size_t got, file_->Read(off, want, buf_.data()));
  buf_off_ = off;
  buf_len_ = got;
  return got >= n;
}

Result<FrameCursor::Outcome> FrameCursor::Next(FrameHeader* h, std::string_view* payload, std::string* why,
                                               Lsn verify_from) {
  if (offset_ >= end_) return Outcome::kEnd;
  REPLICA_ASSIGN_OR_RETURN(bool have_header, Fill(offset_, kFrameHeaderSize));
  if (!have_header) {
    *why = "incomplete frame header";
    return Outcome::kIncomplete;
  }
  const char* hp = buf_.data() + (offset_ - buf_off_);
  Status st = DecodeFrameHeader(hp, h);
  if (!st.ok()) {
    *why = st.message();
    return Outcome::kBad;
  }
  REPLICA_ASSIGN_OR_RETURN(bool have_frame, Fill(offset_, h->frame_size()));
  if (!have_frame) {
    *why = "frame of " + std::to_string(h->frame_size()) + " bytes runs past the end";
    return Outcome::kIncomplete;
  }
  const char* fp = buf_.data() + (offset_ - buf_off_);
  if (h->last_lsn() >= verify_from && !FrameChecksumOk(fp, h->payload_len)) {
    *why = "checksum mismatch";
    return Outcome::kBad;
  }
  *payload = std::string_view(fp + kFrameHeaderSize, h->payload_len);
  offset_ += h->frame_size();
  return Outcome::kFrame;
}

namespace {

// Where the first whole frame with a good checksum and an LSN above after_lsn
// starts in [from, data end), if any. Used only once damage has been found.
// Frames are looked for at offsets [from, starts_before) of data; one that
// starts there may run to the end of data (a payload can end in zeros).
//
// Every offset whose bytes decode as a header costs a checksum over the
// frame it claims. A torn record whose payload holds many header images
// (a value that is itself log bytes, or one made to look so) would make
// that quadratic: a thousand of them claiming 60 MiB each kept Open busy
// for seconds, a 32 MiB record for over an hour. So the bytes checksummed
// are capped at twice the data plus 4 GiB (a second or so; 64 claims of the
// largest frame), ample for damage among real frames; past it the search
// gives up (*gave_up), and the caller cannot tell a torn tail from damage.
std::optional<size_t> FirstValidFrameAfter(std::string_view data, size_t from, size_t starts_before, Lsn after_lsn,
                                           uint64_t* hashed, bool* gave_up) {
  const uint64_t budget = 2 * static_cast<uint64_t>(data.size()) + (4ull << 30);
  *gave_up = false;
  for (size_t pos = from; pos < starts_before && pos + kFrameHeaderSize <= data.size(); ++pos) {
    FrameHeader h;
    if (!DecodeFrameHeader(data.data() + pos, &h).ok()) continue;
    // A later record, not an image of an old one inside some payload.
    if (h.lsn <= after_lsn || data.size() - pos - kFrameHeaderSize < h.payload_len) continue;
    if (*hashed + h.frame_size() > budget) {
      *gave_up = true;
      return std::nullopt;
    }
    *hashed += h.frame_size();
    if (FrameChecksumOk(data.data() + pos, h.payload_len)) return pos;
  }
  return std::nullopt;
}

// The page that power loss takes from a write. The kernel writes a file back in pages,
// and ext4 converts reserved ("unwritten") space in blocks of this size, so a
// write that power loss took reads back as whole pages of zeros, or, for the
// page where the synced part of the file ended, as zeros from there on.
constexpr uint64_t kLostPage = 4096;

// If the damaged frame at `at` (rest holds the file from `at` on) shows a lost
// write, says where: some page of the file that the frame touches reads as
// zeros from the frame's start (at least a header's worth) or the page's
// start, whichever is later, to the page's end, and that page ends at or
// before `valid_next`, where the first valid frame after the damage starts
// (relative to `at`): the later pages of the write survived, so they come
// after the lost one. The frame's extent is trusted only when its header
// decodes and continues the log (next_lsn, an epoch of at least min_epoch);
// otherwise only the pages that start at or before its checksum's first byte
// are looked at. A flipped bit or a scribbled record shows no such page, and
// stays damage inside the log.
std::optional<std::string> LostPage(std::string_view rest, uint64_t at, uint64_t valid_next, Lsn next_lsn,
                                     Epoch min_epoch) {
  // An untrusted header: the pages that start within its first 33 bytes, so
  // that a page of zeros takes in its whole checksum. A page that holds only
  // the checksum's last bytes cannot explain a header that fails: zeros there
  // would leave it decoding, and a checksum's high byte is zero by chance.
  uint64_t extent = std::min<uint64_t>(kFrameChecksumOffset + 1, valid_next);
  FrameHeader h;
  if (rest.size() >= kFrameHeaderSize && DecodeFrameHeader(rest.data(), &h).ok() && h.lsn == next_lsn &&
      h.epoch >= min_epoch) {
    extent = std::min<uint64_t>(h.frame_size(), valid_next);
  }
  for (uint64_t page = at / kLostPage * kLostPage; page < at + extent; page += kLostPage) {
    const uint64_t from = std::max(page, at);
    const uint64_t to = page + kLostPage;
    if (to - at > valid_next) break;  // reaches into the frames that survived
    // On the frame's first page, zeros count only if they cover its whole
    // header (a written header is never all zeros): a few zeros just before
    // the page's end can be a length's low bytes.
    if (from == at && to - from < kFrameHeaderSize) continue;
    const std::string_view run = rest.substr(from - at, to - from);
    if (std::all_of(run.begin(), run.end(), [](char c) { return c == '\0'; })) {
      return "bytes " + std::to_string(from) + ".." + std::to_string(to) +
             " read as zeros: a write lost to power loss (never synced, so never acknowledged)";
    }
  }
  return std::nullopt;
}

// Just past the last non-zero byte in [from, end), or `from` if there is none.
Result<uint64_t> DataEnd(const RandomAccessFile& file, uint64_t from, uint64_t end) {
  constexpr size_t kChunk = 1 << 20;
  std::string buf(kChunk, '\0');
  const std::string zeros(kChunk, '\0');
  uint64_t data_end = from;
  for (uint64_t off = from; off < end;) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(kChunk, end - off));
    REPLICA_ASSIGN_OR_RETURN(size_t got, file.Read(off, want, buf.data()));
    if (got == 0) break;
    if (std::memcmp(buf.data(), zeros.data(), got) == 0) {
      off += got;
      continue;
    }
    for (size_t i = got; i > 0; --i) {
      if (buf[i - 1] != '\0') {
        data_end = off + i;
        break;
      }
    }
    off += got;
  }
  return data_end;
}

}  // namespace

Result<SegmentScan> ScanSegment(const RandomAccessFile& file, uint64_t file_size, Lsn first_lsn,
                                uint64_t max_unsynced_bytes) {
  SegmentScan scan;
  scan.valid_end = kSegmentHeaderSize;
  scan.last_lsn = first_lsn - 1;
  FrameCursor cursor(&file, kSegmentHeaderSize, file_size);
  for (;;) {
    FrameHeader h;
    std::string_view payload;
    std::string why;
    REPLICA_ASSIGN_OR_RETURN(auto outcome, cursor.Next(&h, &payload, &why));
    if (outcome == FrameCursor::Outcome::kEnd) {
      scan.data_end = scan.valid_end;
      return scan;
    }
    if (outcome == FrameCursor::Outcome::kFrame) {
      // A whole frame with a good checksum was written on purpose: if it does
      // not continue the log, the log is damaged, not torn.
      if (h.lsn != scan.last_lsn + 1 || h.epoch < scan.last_epoch) {
        scan.bad_offset = scan.valid_end;
        scan.why = h.lsn != scan.last_lsn + 1
                       ? "LSN " + std::to_string(h.lsn) + " where " + std::to_string(scan.last_lsn + 1) +
                             " was expected"
                       : "epoch " + std::to_string(h.epoch) + " after epoch " + std::to_string(scan.last_epoch);
        scan.tail = SegmentScan::Tail::kCorrupt;
        return scan;
      }
      {
        if (scan.frames == 0 || h.epoch > scan.last_epoch) scan.epoch_starts.emplace_back(h.epoch, h.lsn);
        scan.last_lsn = h.last_lsn();
        scan.last_epoch = h.epoch;
        scan.valid_end = cursor.offset();
        ++scan.frames;
        continue;
      }
    }
    // A bad, incomplete or out-of-sequence frame at valid_end: reserved
    // space, torn or corrupt?
    REPLICA_ASSIGN_OR_RETURN(scan.data_end, DataEnd(file, scan.valid_end, file_size));
    if (scan.data_end == scan.valid_end) return scan;  // zeros only: the clean end of a preallocated segment
    scan.bad_offset = scan.valid_end;
    scan.why = why;
    // A frame's header is never all zeros (its type byte is not), so only
    // offsets before data_end can start one, and a frame starting there
    // ends at most a largest frame later: the zeros a reserved segment
    // holds past that are not read (a 1 GiB segment with 8 bytes of a torn
    // write took 1 GiB of memory).
    const uint64_t read_end = std::min<uint64_t>(file_size, scan.data_end + kFrameHeaderSize + kMaxFramePayload);
    std::string rest(static_cast<size_t>(read_end - scan.valid_end), '\0');
    REPLICA_ASSIGN_OR_RETURN(size_t got, file.Read(scan.valid_end, rest.size(), rest.data()));
    rest.resize(got);
    const size_t starts_before = static_cast<size_t>(scan.data_end - scan.valid_end);
    bool gave_up = false;
    const std::optional<size_t> valid_next =
        FirstValidFrameAfter(rest, 1, starts_before, scan.last_lsn, &scan.searched_bytes, &gave_up);
    if (gave_up) {
      scan.tail = SegmentScan::Tail::kCorrupt;
      scan.undecided = true;
      scan.why += "; the " + std::to_string(starts_before) + " bytes after it hold more frame headers than " +
                  "recovery checks (" + std::to_string(scan.searched_bytes) +
                  " bytes checksummed): it cannot tell a torn tail from damage";
      return scan;
    }
    if (!valid_next) {
      scan.tail = SegmentScan::Tail::kTorn;
      return scan;
    }
    scan.tail = SegmentScan::Tail::kCorrupt;
    // Valid frames follow. If the bad frame lost a page, power loss wrote a
    // later page of the last unsynced write without an earlier one: had any
    // frame after it been synced, that page would have been too. One write
    // holds at most max_unsynced_bytes bytes; more after the cut is damage.
    if (auto lost = LostPage(rest, scan.valid_end, *valid_next, scan.last_lsn + 1, scan.last_epoch)) {
      const uint64_t after = scan.data_end - scan.valid_end;
      if (after > max_unsynced_bytes) {
        scan.why += "; " + *lost + ", but " + std::to_string(after) + " bytes follow, more than one write (" +
                    std::to_string(max_unsynced_bytes) + ") can hold";
        return scan;
      }
      scan.tail = SegmentScan::Tail::kTorn;
      scan.lost_page = true;
      scan.why += "; " + *lost;
    }
    return scan;
  }
}

}  // namespace replica::wal
