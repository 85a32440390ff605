// Transport frames: the unit on the wire (docs/protocol.md).
//
//   frame  := header payload
//   header := magic:u32 "RPLT" | type:u8 | flags:u8 | reserved:u16 |
//             payload_len:u32 | header_checksum:u32   (16 bytes, little-endian)
//
// header_checksum is the low 32 bits of XXH3-64 over header bytes 0..12.
// A control frame's payload is a serialized proto::Control; a data frame's
// payload is raw WAL frames exactly as stored (see docs/wal-format.md).
// Pure functions over bytes; no sockets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "replica/status.h"

namespace replica::transport {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderSize = 16;
inline constexpr char kFrameMagic[4] = {'R', 'P', 'L', 'T'};

enum class FrameType : uint8_t {
  kControl = 1,
  kData = 2,
};

struct FrameHeader {
  FrameType type = FrameType::kControl;
  uint32_t payload_len = 0;
};

void EncodeFrameHeader(FrameType type, uint32_t payload_len, char* out);
// Checks magic, checksum, known type, zero flags and the length limit.
Status DecodeFrameHeader(const char* in, uint32_t max_payload, FrameHeader* h);

// Incremental decoder over a byte stream: feed whatever arrived, take whole
// frames out. Used by the fuzz target and by tests; sessions read headers and
// payloads directly into place instead.
class FrameDecoder {
 public:
  explicit FrameDecoder(uint32_t max_payload) : max_payload_(max_payload) {}
  // Appends bytes; returns the first error found (after which the stream is dead).
  Status Feed(std::string_view bytes);
  // Takes the next whole frame; false if none is complete yet.
  bool Next(FrameHeader* h, std::string* payload);

 private:
  uint32_t max_payload_;
  std::string buf_;
  size_t pos_ = 0;
  Status error_;
};

}  // namespace replica::transport
