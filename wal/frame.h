// Encoding, decoding and verification of WAL frames (docs/wal-format.md).
// Pure functions over bytes: no files, no locks.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "replica/status.h"
#include "wal/format.h"

namespace replica::wal {

struct FrameHeader {
  uint32_t payload_len = 0;
  FrameType frame_type = FrameType::kRecord;
  uint8_t record_type = 0;
  uint16_t flags = 0;
  Lsn lsn = 0;
  Epoch epoch = 0;
  uint32_t count = 0;
  uint32_t raw_len = 0;
  uint64_t checksum = 0;

  Lsn last_lsn() const { return lsn + count - 1; }
  size_t frame_size() const { return kFrameHeaderSize + payload_len; }
};

// A record as the caller appends it.
struct RecordIn {
  RecordType type = RecordType::kData;
  std::string_view payload;
};

// Decodes the fixed fields; checks only what needs no payload (known type,
// sane lengths and counts). Returns a Corruption describing the first problem.
Status DecodeFrameHeader(const char* p, FrameHeader* h);
// XXH3-64 over header bytes [0, 32) and the payload.
uint64_t FrameChecksum(const char* header, std::string_view payload);
// Checksum check of a whole frame already in memory (header + payload).
bool FrameChecksumOk(const char* frame, size_t payload_len);

// The 40-byte header of a plain record frame (checksum included), for a
// writer that stores it and the payload without joining them (writev).
void EncodeRecordHeader(Lsn lsn, Epoch epoch, RecordType type, std::string_view payload, char* header);
// Appends one plain record frame to out.
void EncodeRecordFrame(Lsn lsn, Epoch epoch, RecordType type, std::string_view payload,
                       std::string* out);
// Appends the records as one LZ4 block frame if that is smaller than plain
// frames; otherwise appends plain frames. Records get LSNs lsn, lsn+1, ...
// Returns true if a block was written.
bool EncodeRecords(Lsn lsn, Epoch epoch, const RecordIn* recs, size_t n, bool try_compress,
                   std::string* out);

// One decoded record; payload points into a buffer owned by whoever decoded it.
struct RecordView {
  Lsn lsn = 0;
  Epoch epoch = 0;
  uint8_t type = 0;
  std::string_view payload;
};

// A digest of one record (LSN, epoch, type and payload): two logs hold the
// same record at an LSN exactly when the digests agree (up to XXH3 collisions).
uint64_t RecordDigest(const RecordView& r);

// Decompresses a verified block payload into *raw and splits it into records.
Status DecodeBlock(const FrameHeader& h, std::string_view payload, std::string* raw,
                   std::vector<RecordView>* out);

// Summary of a verified run of whole frames (raw replication input).
struct FrameRun {
  Lsn first_lsn = 0;
  Lsn last_lsn = 0;
  size_t frames = 0;
  // (epoch, first LSN) for every epoch change inside the run, including the
  // first frame's epoch.
  std::vector<std::pair<Epoch, Lsn>> epoch_starts;
};

// Verifies that bytes are whole frames with good checksums, consecutive LSNs
// starting at expected_first (0: at whatever LSN the first frame carries),
// and non-decreasing epochs starting at or above min_epoch. Blocks are
// decompressed too: a block must decode into exactly its count of records
// of its raw length, each of a type other than 0.
Result<FrameRun> VerifyFrameRun(std::string_view bytes, Lsn expected_first, Epoch min_epoch);

}  // namespace replica::wal
