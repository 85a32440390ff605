// Node and cluster names. They become file names (a standby's checkpoint
// and slot on the active), etcd key segments and log fields, so they are
// kept to a safe alphabet: 1 to 64 of [A-Za-z0-9._-], and not "." or "..".
#pragma once

#include <string>
#include <string_view>

#include "replica/status.h"

namespace replica {

inline Status CheckName(std::string_view what, std::string_view name) {
  bool ok = !name.empty() && name.size() <= 64 && name != "." && name != "..";
  for (const char c : name) {
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                c == '_' || c == '-');
  }
  if (ok) return Status::OK();
  std::string shown(name.substr(0, 80));
  return Status::InvalidArgument(std::string(what) + " '" + shown + (name.size() > 80 ? "...'" : "'") +
                                 ": use 1 to 64 letters, digits, '.', '_' or '-' (not '.' or '..')");
}

}  // namespace replica
