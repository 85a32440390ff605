#include "wal/epoch_history.h"

#include <xxhash.h>

#include <cstring>

#include "base/coding.h"

namespace replica::wal {
namespace {
constexpr char kEpochMagic[8] = {'R', 'P', 'L', 'E', 'P', 'O', 'C', 'H'};
constexpr size_t kFixedPart = 8 + 4 + 4;  // magic, version, count
}  // namespace

Status EpochHistory::Add(Epoch epoch, Lsn first_lsn) {
  if (!entries_.empty() && (epoch <= entries_.back().epoch || first_lsn <= entries_.back().first_lsn)) {
    return Status::InvalidArgument("epoch " + std::to_string(epoch) + " at LSN " + std::to_string(first_lsn) +
                                   " does not follow epoch " + std::to_string(entries_.back().epoch) +
                                   " at LSN " + std::to_string(entries_.back().first_lsn));
  }
  entries_.push_back({epoch, first_lsn});
  return Status::OK();
}

bool EpochHistory::TruncateAfter(Lsn last_lsn) {
  bool dropped = false;
  while (!entries_.empty() && entries_.back().first_lsn > last_lsn) {
    entries_.pop_back();
    dropped = true;
  }
  return dropped;
}

EpochEnd EpochHistory::EndOf(Epoch epoch, Lsn log_last_lsn) const {
  EpochEnd end;
  // First entry with an epoch above the one asked for.
  size_t i = 0;
  while (i < entries_.size() && entries_[i].epoch <= epoch) ++i;
  if (i > 0) end.epoch = entries_[i - 1].epoch;
  if (i < entries_.size()) {
    end.end_lsn = entries_[i].first_lsn - 1;
  } else {
    end.end_lsn = log_last_lsn;
  }
  return end;
}

Epoch EpochHistory::EpochAt(Lsn lsn) const {
  Epoch e = 0;
  for (const auto& entry : entries_) {
    if (entry.first_lsn > lsn) break;
    e = entry.epoch;
  }
  return e;
}

std::string EpochHistory::Encode() const {
  std::string out(kEpochMagic, 8);
  PutFixed32(&out, 1);  // version
  PutFixed32(&out, static_cast<uint32_t>(entries_.size()));
  for (const auto& e : entries_) {
    PutFixed64(&out, e.epoch);
    PutFixed64(&out, e.first_lsn);
  }
  PutFixed64(&out, XXH3_64bits(out.data(), out.size()));
  return out;
}

Result<EpochHistory> EpochHistory::Decode(std::string_view data) {
  if (data.size() < kFixedPart + 8 || std::memcmp(data.data(), kEpochMagic, 8) != 0) {
    return Status::Corruption("epoch history: bad magic or too short");
  }
  size_t body = data.size() - 8;
  if (XXH3_64bits(data.data(), body) != DecodeFixed64(data.data() + body)) {
    return Status::Corruption("epoch history: checksum mismatch");
  }
  uint32_t version = DecodeFixed32(data.data() + 8);
  uint32_t count = DecodeFixed32(data.data() + 12);
  if (version != 1) return Status::NotSupported("epoch history version " + std::to_string(version));
  if (data.size() != kFixedPart + 16ull * count + 8) {
    return Status::Corruption("epoch history: size does not match " + std::to_string(count) + " entries");
  }
  EpochHistory h;
  for (uint32_t i = 0; i < count; ++i) {
    const char* p = data.data() + kFixedPart + 16ull * i;
    Status st = h.Add(DecodeFixed64(p), DecodeFixed64(p + 8));
    if (!st.ok()) return Status::Corruption("epoch history: " + st.message());
  }
  return h;
}

}  // namespace replica::wal
