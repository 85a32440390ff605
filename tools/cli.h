// Small command-line helpers shared by the tools: strict number parsing and a
// uniform way to fail. Header-only on purpose (two tiny functions).
#pragma once

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace replica::cli {

// Parses a whole decimal unsigned number; false on anything else.
inline bool ParseU64(std::string_view text, uint64_t* out) {
  if (text.empty()) return false;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), *out);
  return ec == std::errc() && ptr == text.data() + text.size();
}

[[noreturn]] inline void UsageError(const char* tool, const char* fmt, std::string_view arg) {
  std::fprintf(stderr, "%s: ", tool);
  std::fprintf(stderr, fmt, static_cast<int>(arg.size()), arg.data());
  std::fprintf(stderr, "\nTry '%s --help'.\n", tool);
  std::exit(2);
}

}  // namespace replica::cli
