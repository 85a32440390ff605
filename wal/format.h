// On-disk format constants of the write-ahead log, shared by writer, readers
// and tools. The format is specified in docs/wal-format.md; keep the two in step.
#pragma once

#include <cstddef>
#include <cstdint>

namespace replica::wal {

using Lsn = uint64_t;    // log sequence number: 1, 2, 3, ... without gaps
using Epoch = uint64_t;  // grows with every promotion
// The largest LSN a record can have: a frame's lsn + count must not overflow
// a u64 (DecodeFrameHeader refuses it), so the writer stops here.
inline constexpr Lsn kMaxLsn = UINT64_MAX - 1;

// ---- segment files: "<first LSN, 20 digits>.wal" ----
inline constexpr char kSegmentMagic[8] = {'R', 'P', 'L', 'W', 'A', 'L', '\r', '\n'};
inline constexpr uint16_t kFormatVersion = 1;
// Segment header: magic[8] version:u16 header_size:u16 incompat_flags:u32
//                 first_lsn:u64 prev_first_lsn:u64 checksum:u64 (XXH3-64 of bytes 0..32)
inline constexpr size_t kSegmentHeaderSize = 40;
// Bits a reader must understand to read the segment. None are defined yet; a
// segment with any bit set is refused with NotSupported.
inline constexpr uint32_t kKnownIncompatFlags = 0;
inline constexpr int kSegmentNameDigits = 20;
inline constexpr const char* kSegmentSuffix = ".wal";
inline constexpr const char* kEpochFileName = "epochs";
inline constexpr const char* kLockFileName = "LOCK";

// ---- frames ----
// Frame header: payload_len:u32 frame_type:u8 record_type:u8 flags:u16
//               lsn:u64 epoch:u64 count:u32 raw_len:u32 checksum:u64
// checksum = XXH3-64 over header bytes 0..32 followed by the stored payload.
inline constexpr size_t kFrameHeaderSize = 40;
inline constexpr size_t kFrameChecksumOffset = 32;

enum class FrameType : uint8_t {
  kRecord = 1,    // one record; payload is the record's payload
  kLz4Block = 2,  // `count` records of one epoch, LZ4-compressed together
};

// Record types. Types 1..127 are defined by the engine; readers hand every
// type through, so new types need no format change.
enum class RecordType : uint8_t {
  kData = 1,        // a replicated write batch
  kEpochStart = 2,  // first record written by a newly promoted active
};

// Inside a decompressed LZ4 block, each record: type:u8 pad[3] len:u32 payload.
inline constexpr size_t kBlockRecordHeaderSize = 8;

// Limits that make a corrupt length harmless.
inline constexpr uint32_t kMaxRecordPayload = 32u << 20;     // 32 MiB
inline constexpr uint32_t kMaxFramePayload = 64u << 20;      // 64 MiB
inline constexpr uint32_t kMaxBlockRaw = 4u << 20;           // 4 MiB decompressed

}  // namespace replica::wal
