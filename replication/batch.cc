// WriteBatch encoding and the small value helpers of the public API.
#include "base/coding.h"
#include "replica/engine.h"

namespace replica {

const char* RoleName(Role role) { return role == Role::kActive ? "active" : "standby"; }

Result<CommitRule> CommitRule::Parse(const std::string& text) {
  CommitRule r;
  if (text == "async") return r;
  auto colon = text.find(':');
  std::string mode = text.substr(0, colon);
  if (colon == std::string::npos || (mode != "remote-write" && mode != "remote-apply")) {
    return Status::InvalidArgument("commit rule '" + text + "': expected async, remote-write:N or remote-apply:N");
  }
  const std::string n = text.substr(colon + 1);
  if (n.empty() || n.size() > 3 || n.find_first_not_of("0123456789") != std::string::npos || std::stoi(n) < 1) {
    return Status::InvalidArgument("commit rule '" + text + "': N must be a number from 1 to 999");
  }
  r.mode = mode == "remote-write" ? Mode::kRemoteWrite : Mode::kRemoteApply;
  r.count = std::stoi(n);
  return r;
}

std::string CommitRule::ToString() const {
  switch (mode) {
    case Mode::kAsync: return "async";
    case Mode::kRemoteWrite: return "remote-write:" + std::to_string(count);
    case Mode::kRemoteApply: return "remote-apply:" + std::to_string(count);
  }
  return "?";
}

void WriteBatch::Put(std::string key, std::string value) { ops_.push_back({false, std::move(key), std::move(value)}); }
void WriteBatch::Delete(std::string key) { ops_.push_back({true, std::move(key), {}}); }

// batch := version:u8 (1) count:u32 op*
// op    := kind:u8 (1 put, 2 delete) key_len:u32 key [value_len:u32 value]
std::string WriteBatch::Encode() const {
  std::string out;
  out.push_back(1);
  PutFixed32(&out, static_cast<uint32_t>(ops_.size()));
  for (const auto& op : ops_) {
    out.push_back(op.is_delete ? 2 : 1);
    PutFixed32(&out, static_cast<uint32_t>(op.key.size()));
    out += op.key;
    if (!op.is_delete) {
      PutFixed32(&out, static_cast<uint32_t>(op.value.size()));
      out += op.value;
    }
  }
  return out;
}

Result<WriteBatch> WriteBatch::Decode(std::string_view p) {
  auto bad = [](const char* why) { return Status::Corruption(std::string("write batch: ") + why); };
  if (p.size() < 5 || p[0] != 1) return bad("unknown version or too short");
  uint32_t count = DecodeFixed32(p.data() + 1);
  size_t pos = 5;
  auto take = [&](std::string* out) -> bool {
    if (p.size() - pos < 4) return false;
    uint32_t len = DecodeFixed32(p.data() + pos);
    pos += 4;
    if (p.size() - pos < len) return false;
    out->assign(p.data() + pos, len);
    pos += len;
    return true;
  };
  WriteBatch b;
  for (uint32_t i = 0; i < count; ++i) {
    if (pos >= p.size()) return bad("ends early");
    char kind = p[pos++];
    Op op;
    op.is_delete = kind == 2;
    if (kind != 1 && kind != 2) return bad("unknown operation");
    if (!take(&op.key)) return bad("truncated key");
    if (!op.is_delete && !take(&op.value)) return bad("truncated value");
    b.ops_.push_back(std::move(op));
  }
  if (pos != p.size()) return bad("trailing bytes");
  return b;
}

}  // namespace replica
