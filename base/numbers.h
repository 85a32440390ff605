// Whole decimal numbers read from text that may be damaged or hostile
// (command lines, etcd keys, state files).
#pragma once

#include <charconv>
#include <cstdint>
#include <optional>
#include <string_view>

namespace replica {

// The number TEXT spells in decimal digits, all of it; nullopt for anything
// else (empty, a sign, blanks, trailing characters, past 2^64 - 1).
inline std::optional<uint64_t> ParseDecimal(std::string_view text) {
  uint64_t v = 0;
  if (text.empty() || text.front() < '0' || text.front() > '9') return std::nullopt;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || ptr != text.data() + text.size()) return std::nullopt;
  return v;
}

}  // namespace replica
