#include "transport/frame.h"

#include <xxhash.h>

#include <cstring>

#include "base/coding.h"

namespace replica::transport {
namespace {
uint32_t HeaderChecksum(const char* p) { return static_cast<uint32_t>(XXH3_64bits(p, 12)); }
}  // namespace

void EncodeFrameHeader(FrameType type, uint32_t payload_len, char* out) {
  std::memcpy(out, kFrameMagic, 4);
  out[4] = static_cast<char>(type);
  out[5] = 0;
  EncodeFixed16(out + 6, 0);
  EncodeFixed32(out + 8, payload_len);
  EncodeFixed32(out + 12, HeaderChecksum(out));
}

Status DecodeFrameHeader(const char* in, uint32_t max_payload, FrameHeader* h) {
  if (std::memcmp(in, kFrameMagic, 4) != 0) return Status::Corruption("not a replica frame (bad magic)");
  if (HeaderChecksum(in) != DecodeFixed32(in + 12)) return Status::Corruption("frame header checksum mismatch");
  uint8_t type = static_cast<uint8_t>(in[4]);
  if (type != static_cast<uint8_t>(FrameType::kControl) && type != static_cast<uint8_t>(FrameType::kData)) {
    return Status::Corruption("unknown frame type " + std::to_string(type));
  }
  if (in[5] != 0 || DecodeFixed16(in + 6) != 0) return Status::Corruption("frame flags not understood");
  h->type = static_cast<FrameType>(type);
  h->payload_len = DecodeFixed32(in + 8);
  if (h->payload_len > max_payload) {
    return Status::InvalidArgument("frame of " + std::to_string(h->payload_len) + " bytes exceeds the limit of " +
                                   std::to_string(max_payload));
  }
  return Status::OK();
}

Status FrameDecoder::Feed(std::string_view bytes) {
  if (!error_.ok()) return error_;
  if (pos_ > 0 && pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  }
  buf_.append(bytes);
  // Validate every complete header now, so a bad stream fails at once.
  size_t p = pos_;
  while (buf_.size() - p >= kFrameHeaderSize) {
    FrameHeader h;
    error_ = DecodeFrameHeader(buf_.data() + p, max_payload_, &h);
    if (!error_.ok()) return error_;
    if (buf_.size() - p - kFrameHeaderSize < h.payload_len) break;
    p += kFrameHeaderSize + h.payload_len;
  }
  return Status::OK();
}

bool FrameDecoder::Next(FrameHeader* h, std::string* payload) {
  if (!error_.ok() || buf_.size() - pos_ < kFrameHeaderSize) return false;
  if (!DecodeFrameHeader(buf_.data() + pos_, max_payload_, h).ok()) return false;
  if (buf_.size() - pos_ - kFrameHeaderSize < h->payload_len) return false;
  payload->assign(buf_.data() + pos_ + kFrameHeaderSize, h->payload_len);
  pos_ += kFrameHeaderSize + h->payload_len;
  return true;
}

}  // namespace replica::transport
