// Small command-line helpers shared by the tools: strict number parsing, the
// cluster secret from a file, and a uniform way to fail. Header-only on
// purpose (three tiny functions).
#pragma once

#include <sys/stat.h>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "base/env.h"
#include "base/numbers.h"

namespace replica::cli {

// Parses a whole decimal unsigned number; false on anything else.
inline bool ParseU64(std::string_view text, uint64_t* out) {
  const auto v = ParseDecimal(text);
  if (v) *out = *v;
  return v.has_value();
}

// The cluster secret: the first line of the file, without its line end
// ("\n" or "\r\n"). An unreadable file (or a directory) or an empty first
// line is an error.
inline Result<std::string> ReadSecretFile(const std::string& path) {
  auto data = ReadWholeFile(Env::Default(), path);
  if (!data.ok()) return data.status().WithContext("secret file");
  std::string secret = data->substr(0, data->find('\n'));
  if (!secret.empty() && secret.back() == '\r') secret.pop_back();
  if (secret.empty()) return Status::InvalidArgument("secret file " + path + ": the first line is empty");
  return secret;
}

// A warning if other users may read the secret file (any group or other
// permission bit), else empty.
inline std::string SecretFileExposed(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || (st.st_mode & 077) == 0) return std::string();
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
  return "secret file " + path + " has mode " + mode + ": other users may read the cluster secret (chmod 600 it)";
}

[[noreturn]] inline void UsageError(const char* tool, const char* fmt, std::string_view arg) {
  std::fprintf(stderr, "%s: ", tool);
  std::fprintf(stderr, fmt, static_cast<int>(arg.size()), arg.data());
  std::fprintf(stderr, "\nTry '%s --help'.\n", tool);
  std::exit(2);
}

}  // namespace replica::cli
