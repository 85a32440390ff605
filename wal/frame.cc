#include "wal/frame.h"

#include <lz4.h>
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack

#include <xxhash.h>

#include "base/coding.h"

namespace replica::wal {
namespace {

void EncodeHeaderFields(const FrameHeader& h, char* p) {
  EncodeFixed32(p + 0, h.payload_len);
  p[4] = static_cast<char>(h.frame_type);
  p[5] = static_cast<char>(h.record_type);
  EncodeFixed16(p + 6, h.flags);
  EncodeFixed64(p + 8, h.lsn);
  EncodeFixed64(p + 16, h.epoch);
  EncodeFixed32(p + 24, h.count);
  EncodeFixed32(p + 28, h.raw_len);
}

void AppendFrame(FrameHeader h, std::string_view payload, std::string* out) {
  char header[kFrameHeaderSize];
  EncodeHeaderFields(h, header);
  EncodeFixed64(header + kFrameChecksumOffset, FrameChecksum(header, payload));
  out->append(header, kFrameHeaderSize);
  out->append(payload.data(), payload.size());
}

}  // namespace

uint64_t FrameChecksum(const char* header, std::string_view payload) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, header, kFrameChecksumOffset);
  XXH3_64bits_update(&state, payload.data(), payload.size());
  return XXH3_64bits_digest(&state);
}

uint64_t RecordDigest(const RecordView& r) {
  char meta[17];
  EncodeFixed64(meta, r.lsn);
  EncodeFixed64(meta + 8, r.epoch);
  meta[16] = static_cast<char>(r.type);
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, meta, sizeof meta);
  XXH3_64bits_update(&state, r.payload.data(), r.payload.size());
  return XXH3_64bits_digest(&state);
}

bool FrameChecksumOk(const char* frame, size_t payload_len) {
  return FrameChecksum(frame, std::string_view(frame + kFrameHeaderSize, payload_len)) ==
         DecodeFixed64(frame + kFrameChecksumOffset);
}

Status DecodeFrameHeader(const char* p, FrameHeader* h) {
  h->payload_len = DecodeFixed32(p + 0);
  uint8_t ft = static_cast<uint8_t>(p[4]);
  h->record_type = static_cast<uint8_t>(p[5]);
  h->flags = DecodeFixed16(p + 6);
  h->lsn = DecodeFixed64(p + 8);
  h->epoch = DecodeFixed64(p + 16);
  h->count = DecodeFixed32(p + 24);
  h->raw_len = DecodeFixed32(p + 28);
  h->checksum = DecodeFixed64(p + kFrameChecksumOffset);
  if (ft == static_cast<uint8_t>(FrameType::kRecord)) {
    h->frame_type = FrameType::kRecord;
    if (h->count != 1) return Status::Corruption("record frame with count " + std::to_string(h->count));
    if (h->record_type == 0) return Status::Corruption("record frame with record type 0");
    if (h->payload_len > kMaxRecordPayload || h->raw_len != h->payload_len) {
      return Status::Corruption("record frame with bad length " + std::to_string(h->payload_len));
    }
  } else if (ft == static_cast<uint8_t>(FrameType::kLz4Block)) {
    h->frame_type = FrameType::kLz4Block;
    if (h->count == 0 || h->raw_len > kMaxBlockRaw ||
        h->count > h->raw_len / kBlockRecordHeaderSize || h->payload_len > kMaxFramePayload ||
        h->record_type != 0) {
      return Status::Corruption("block frame with bad counts (count " + std::to_string(h->count) +
                                ", raw " + std::to_string(h->raw_len) + ")");
    }
  } else {
    return Status::Corruption("unknown frame type " + std::to_string(ft));
  }
  if (h->flags != 0) return Status::Corruption("frame flags " + std::to_string(h->flags) + " not understood");
  if (h->lsn == 0) return Status::Corruption("frame with LSN 0");
  if (h->epoch == 0) return Status::Corruption("frame with epoch 0");
  if (h->lsn > UINT64_MAX - h->count) return Status::Corruption("frame LSN range overflows");
  return Status::OK();
}

void EncodeRecordHeader(Lsn lsn, Epoch epoch, RecordType type, std::string_view payload, char* header) {
  FrameHeader h;
  h.payload_len = static_cast<uint32_t>(payload.size());
  h.frame_type = FrameType::kRecord;
  h.record_type = static_cast<uint8_t>(type);
  h.lsn = lsn;
  h.epoch = epoch;
  h.count = 1;
  h.raw_len = h.payload_len;
  EncodeHeaderFields(h, header);
  EncodeFixed64(header + kFrameChecksumOffset, FrameChecksum(header, payload));
}

void EncodeRecordFrame(Lsn lsn, Epoch epoch, RecordType type, std::string_view payload,
                       std::string* out) {
  char header[kFrameHeaderSize];
  EncodeRecordHeader(lsn, epoch, type, payload, header);
  out->append(header, kFrameHeaderSize);
  out->append(payload.data(), payload.size());
}

bool EncodeRecords(Lsn lsn, Epoch epoch, const RecordIn* recs, size_t n, bool try_compress,
                   std::string* out) {
  if (try_compress && n > 0) {
    size_t raw_len = 0;
    for (size_t i = 0; i < n; ++i) raw_len += kBlockRecordHeaderSize + recs[i].payload.size();
    if (raw_len <= kMaxBlockRaw) {
      std::string raw;
      raw.reserve(raw_len);
      for (size_t i = 0; i < n; ++i) {
        char rh[kBlockRecordHeaderSize] = {};
        rh[0] = static_cast<char>(recs[i].type);
        EncodeFixed32(rh + 4, static_cast<uint32_t>(recs[i].payload.size()));
        raw.append(rh, sizeof rh);
        raw.append(recs[i].payload);
      }
      int bound = LZ4_compressBound(static_cast<int>(raw.size()));
      std::string packed(static_cast<size_t>(bound), '\0');
      int got = LZ4_compress_default(raw.data(), packed.data(), static_cast<int>(raw.size()), bound);
      // A block pays one header for all records; plain frames pay one each.
      size_t plain_size = n * kFrameHeaderSize + raw_len - n * kBlockRecordHeaderSize;
      if (got > 0 && kFrameHeaderSize + static_cast<size_t>(got) < plain_size) {
        packed.resize(static_cast<size_t>(got));
        FrameHeader h;
        h.payload_len = static_cast<uint32_t>(got);
        h.frame_type = FrameType::kLz4Block;
        h.lsn = lsn;
        h.epoch = epoch;
        h.count = static_cast<uint32_t>(n);
        h.raw_len = static_cast<uint32_t>(raw.size());
        AppendFrame(h, packed, out);
        return true;
      }
    }
  }
  for (size_t i = 0; i < n; ++i) EncodeRecordFrame(lsn + i, epoch, recs[i].type, recs[i].payload, out);
  return false;
}

Status DecodeBlock(const FrameHeader& h, std::string_view payload, std::string* raw,
                   std::vector<RecordView>* out) {
  raw->resize(h.raw_len);
  int got = LZ4_decompress_safe(payload.data(), raw->data(), static_cast<int>(payload.size()),
                                static_cast<int>(h.raw_len));
  if (got < 0 || static_cast<uint32_t>(got) != h.raw_len) {
    return Status::Corruption("LZ4 block at LSN " + std::to_string(h.lsn) + " does not decompress to " +
                              std::to_string(h.raw_len) + " bytes");
  }
  out->clear();
  size_t pos = 0;
  for (uint32_t i = 0; i < h.count; ++i) {
    if (raw->size() - pos < kBlockRecordHeaderSize) {
      return Status::Corruption("LZ4 block at LSN " + std::to_string(h.lsn) + " ends inside record " +
                                std::to_string(i));
    }
    const char* rh = raw->data() + pos;
    uint8_t type = static_cast<uint8_t>(rh[0]);
    uint32_t len = DecodeFixed32(rh + 4);
    pos += kBlockRecordHeaderSize;
    if (type == 0 || len > raw->size() - pos) {
      return Status::Corruption("LZ4 block at LSN " + std::to_string(h.lsn) + ": bad record " +
                                std::to_string(i));
    }
    out->push_back(RecordView{h.lsn + i, h.epoch, type, std::string_view(raw->data() + pos, len)});
    pos += len;
  }
  if (pos != raw->size()) {
    return Status::Corruption("LZ4 block at LSN " + std::to_string(h.lsn) + " has trailing bytes");
  }
  return Status::OK();
}

Result<FrameRun> VerifyFrameRun(std::string_view bytes, Lsn expected_first, Epoch min_epoch) {
  FrameRun run;
  if (expected_first == 0 && bytes.size() >= kFrameHeaderSize) {
    FrameHeader first;
    REPLICA_RETURN_IF_ERROR_CTX(DecodeFrameHeader(bytes.data(), &first), "frame at byte 0");
    expected_first = first.lsn;
  }
  run.first_lsn = expected_first;
  Lsn next = expected_first;
  Epoch epoch = min_epoch;
  size_t pos = 0;
  std::string block_raw;  // scratch for decoding blocks
  std::vector<RecordView> block_records;
  while (pos < bytes.size()) {
    const std::string where = "frame at byte " + std::to_string(pos) + " (expected LSN " +
                              std::to_string(next) + ")";
    if (bytes.size() - pos < kFrameHeaderSize) return Status::Corruption(where + ": truncated header");
    FrameHeader h;
    REPLICA_RETURN_IF_ERROR_CTX(DecodeFrameHeader(bytes.data() + pos, &h), where);
    if (bytes.size() - pos - kFrameHeaderSize < h.payload_len) {
      return Status::Corruption(where + ": truncated payload");
    }
    if (!FrameChecksumOk(bytes.data() + pos, h.payload_len)) return Status::Corruption(where + ": bad checksum");
    if (h.frame_type == FrameType::kLz4Block) {
      // A good checksum says only that the bytes are the sender's: a block
      // that does not decode into its records would stop every reader of
      // the log at this LSN, and be sent on to the next standby.
      REPLICA_RETURN_IF_ERROR_CTX(
          DecodeBlock(h, std::string_view(bytes.data() + pos + kFrameHeaderSize, h.payload_len), &block_raw, &block_records),
          where);
    }
    if (h.lsn != next) {
      return Status::Corruption(where + ": LSN " + std::to_string(h.lsn) + " breaks continuity");
    }
    if (h.epoch < epoch) {
      return Status::StaleEpoch(where + ": epoch " + std::to_string(h.epoch) + " is below " +
                                std::to_string(epoch));
    }
    if (run.frames == 0 || h.epoch > epoch) run.epoch_starts.emplace_back(h.epoch, h.lsn);
    epoch = h.epoch;
    next = h.last_lsn() + 1;
    pos += h.frame_size();
    ++run.frames;
  }
  if (run.frames == 0) return Status::InvalidArgument("empty frame run");
  run.last_lsn = next - 1;
  return run;
}

}  // namespace replica::wal
