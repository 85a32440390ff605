#include "replication/resp_commands.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <climits>
#include <cstdlib>

#include "base/host_port.h"
#include "replication/resp.h"

namespace replica::resp {
namespace {

// Where clients should go: the active's client port when it published one
// (high availability), else its replication address (static mode).
const std::string& MasterAddress(const EngineStatus& s) {
  return s.active_client_address.empty() ? s.active_address : s.active_client_address;
}

// An address as ROLE and INFO report it: host and port apart (port 0 when
// unknown).
HostPort SplitAddress(const std::string& address) {
  auto hp = ParseHostPort(address);
  return hp.ok() ? *hp : HostPort{address, 0};
}

// A standby as ROLE and INFO report it, like Redis a replica: where its
// clients reach it, or, if it has no client port, its host and port 0 (the
// port of its replication connection is no port anyone can connect to).
HostPort StandbyAddress(const EngineStatus::Standby& sb) {
  if (!sb.client_address.empty()) return SplitAddress(sb.client_address);
  return HostPort{SplitAddress(sb.address).host, 0};
}

// A whole decimal integer as Redis reads one: an optional '-', digits, no
// blanks or '+' (" 5" and "+1" are not integers).
bool ParseInt(const std::string& s, long long* v) {
  if (s.empty()) return false;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *v);
  return ec == std::errc() && end == s.data() + s.size();
}

}  // namespace

std::string Upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return s;
}

bool Commands::MayBlock(const std::string& name) {
  // WAIT waits for standbys; DBSIZE reads the whole store and SCAN up to
  // 100,000 keys. (Writes wait for their commit rule too, but the client
  // port writes them itself, in shared batches.)
  return name == "WAIT" || name == "DBSIZE" || name == "SCAN";
}

bool Commands::IsPlainDel(const std::vector<std::string>& args) {
  if (args.size() < 2) return false;
  const std::string name = Upper(args[0]);
  return name == "DEL" || name == "UNLINK";
}

bool Commands::IsPlainSet(const std::vector<std::string>& args) {
  if (args.size() < 3 || args.size() % 2 == 0) return false;
  const std::string name = Upper(args[0]);
  return (name == "SET" && args.size() == 3) || name == "MSET";
}

void Commands::AppendStatusError(const Status& st, std::string* out) {
  if (st.code() == StatusCode::kNotActive) {
    EngineStatus s = engine_->status();
    AppendError(out, "READONLY You can't write against a read only replica. The active is at " +
                               (MasterAddress(s).empty() ? std::string("unknown") : MasterAddress(s)));
  } else {
    AppendError(out, "ERR " + st.ToString());
  }
}

void Commands::Role(std::string* out) {
  EngineStatus s = engine_->status();
  if (s.role == Role::kActive) {
    AppendArrayHeader(out, 3);
    AppendBulk(out, "master");
    AppendInteger(out, static_cast<long long>(s.last_lsn));
    AppendArrayHeader(out, s.standbys.size());
    for (const auto& sb : s.standbys) {
      const HostPort hp = StandbyAddress(sb);
      AppendArrayHeader(out, 3);
      AppendBulk(out, hp.host);
      AppendBulk(out, std::to_string(hp.port));
      AppendBulk(out, std::to_string(sb.flushed_lsn));
    }
  } else {
    const std::string& master = MasterAddress(s);
    const HostPort hp = SplitAddress(master);
    AppendArrayHeader(out, 5);
    AppendBulk(out, "slave");
    AppendBulk(out, hp.host);
    AppendInteger(out, hp.port);
    // As Redis names the link's states: connect (no link), sync (a snapshot
    // is being received), connected (streaming).
    AppendBulk(out, !s.upstream_connected ? "connect" : s.receiving_snapshot ? "sync" : "connected");
    AppendInteger(out, static_cast<long long>(s.applied_lsn));
  }
}

void Commands::Info(const std::vector<std::string>& sections, std::string* out) {
  // Sections are matched as Redis does, ignoring case; several may be named
  // (Redis 7). No name, `default`, `all` and `everything` give every one.
  auto wanted = [&](const char* name) {
    if (sections.empty()) return true;
    for (const std::string& section : sections) {
      const std::string upper = Upper(section);
      if (upper == name || upper == "ALL" || upper == "DEFAULT" || upper == "EVERYTHING") return true;
    }
    return false;
  };
  std::string text;
  if (wanted("SERVER")) {
    const auto up = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - started_);
    // redis_version: the protocol level served, which client libraries
    // check before using a command; replica_version is this program's.
    text += "# Server\r\nredis_version:7.0.0\r\nreplica_version:" REPLICA_VERSION "\r\nredis_mode:standalone\r\n"
            "arch_bits:" + std::to_string(sizeof(void*) * 8) + "\r\nprocess_id:" + std::to_string(::getpid()) +
            "\r\ntcp_port:" + std::to_string(port_.load()) + "\r\nuptime_in_seconds:" + std::to_string(up.count()) +
            "\r\nuptime_in_days:" + std::to_string(up.count() / 86400) + "\r\n\r\n";
  }
  if (wanted("CLIENTS")) {
    text += "# Clients\r\nconnected_clients:" + std::to_string(stats_->connected.load()) +
            "\r\nmaxclients:" + std::to_string(options_->max_clients) + "\r\n\r\n";
  }
  if (wanted("STATS")) {
    text += "# Stats\r\ntotal_connections_received:" + std::to_string(stats_->connections.load()) +
            "\r\ntotal_commands_processed:" + std::to_string(stats_->commands.load()) +
            "\r\nrejected_connections:" + std::to_string(stats_->rejected_clients.load()) + "\r\n\r\n";
  }
  if (wanted("REPLICATION")) {
    Replication(&text);
    text += "\r\n";
  }
  if (!text.empty()) text.resize(text.size() - 2);  // no blank line after the last section
  AppendBulk(out, text);
}

void Commands::Replication(std::string* out) {
  EngineStatus s = engine_->status();
  std::string& text = *out;
  text += "# Replication\r\n";
  if (s.role == Role::kActive) {
    text += "role:master\r\nconnected_slaves:" + std::to_string(s.standbys.size()) + "\r\n";
    for (size_t i = 0; i < s.standbys.size(); ++i) {
      const auto& sb = s.standbys[i];
      const HostPort hp = StandbyAddress(sb);
      text += "slave" + std::to_string(i) + ":ip=" + hp.host + ",port=" + std::to_string(hp.port) +
              // Redis's states and lag (whole seconds): send_bulk while a
              // snapshot is sent; lag since the standby last held everything.
              ",state=" + (sb.resyncing ? "send_bulk" : "online") + ",offset=" + std::to_string(sb.flushed_lsn) +
              ",lag=" + std::to_string(sb.lag_ms / 1000) + ",name=" + sb.id +
              ",applied=" + std::to_string(sb.applied_lsn) + "\r\n";
    }
    text += "master_repl_offset:" + std::to_string(s.last_lsn) + "\r\n";
  } else {
    const std::string& master = MasterAddress(s);
    const HostPort hp = SplitAddress(master);
    text += "role:slave\r\nmaster_host:" + hp.host + "\r\nmaster_port:" + std::to_string(hp.port) +
            "\r\nmaster_link_status:" + (s.upstream_streaming() ? "up" : "down") +
            "\r\nmaster_sync_in_progress:" + (s.receiving_snapshot ? "1" : "0") +
            "\r\nslave_repl_offset:" + std::to_string(s.applied_lsn) + "\r\nslave_read_only:1\r\n";
  }
  text += "replica_epoch:" + std::to_string(s.epoch) + "\r\nreplica_last_lsn:" + std::to_string(s.last_lsn) +
          "\r\nreplica_durable_lsn:" + std::to_string(s.durable_lsn) + "\r\nreplica_applied_lsn:" +
          std::to_string(s.applied_lsn) + "\r\n";
}

void Commands::Execute(const std::vector<std::string>& args, CommandState* conn, std::string* out) {
  const std::string cmd = Upper(args[0]);
  const size_t argc = args.size();
  auto arity_error = [&] {
    std::string lower = args[0];
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
    AppendError(out, "ERR wrong number of arguments for '" + lower + "' command");
  };
  if (cmd == "PING") {
    if (argc > 2) return arity_error();
    return argc == 2 ? AppendBulk(out, args[1]) : AppendSimple(out, "PONG");
  }
  if (cmd == "ECHO") {
    if (argc != 2) return arity_error();
    return AppendBulk(out, args[1]);
  }
  if (cmd == "QUIT") {
    conn->quit = true;
    return AppendSimple(out, "OK");
  }
  if (cmd == "GET") {
    if (argc != 2) return arity_error();
    auto v = engine_->Get(args[1]);
    if (!v.ok()) return AppendStatusError(v.status(), out);
    return v->has_value() ? AppendBulk(out, **v) : AppendNull(out);
  }
  if (cmd == "MGET") {
    if (argc < 2) return arity_error();
    // A key that cannot be read is an error for the whole reply, never a
    // null that would read as "no such key".
    std::string values;
    for (size_t i = 1; i < argc; ++i) {
      auto v = engine_->Get(args[i]);
      if (!v.ok()) return AppendStatusError(v.status(), out);
      if (v->has_value()) {
        AppendBulk(&values, **v);
      } else {
        AppendNull(&values);
      }
    }
    AppendArrayHeader(out, argc - 1);
    out->append(values);
    return;
  }
  // Well-formed writes (IsPlainSet, IsPlainDel) are gathered and written by
  // the client port; here only the malformed ones are answered.
  if (cmd == "SET") {
    if (argc < 3) return arity_error();
    if (argc > 3) return AppendError(out, "ERR syntax error (SET options are not supported)");
    return AppendError(out, "ERR internal error: a well-formed SET reached the command runner");
  }
  if (cmd == "MSET" || cmd == "DEL" || cmd == "UNLINK") {
    if (!IsPlainSet(args) && !IsPlainDel(args)) return arity_error();
    return AppendError(out, "ERR internal error: a well-formed " + cmd + " reached the command runner");
  }
  if (cmd == "EXISTS") {
    if (argc < 2) return arity_error();
    long long n = 0;
    for (size_t i = 1; i < argc; ++i) {
      auto v = engine_->Get(args[i]);
      if (!v.ok()) return AppendStatusError(v.status(), out);  // not a silent 0
      if (v->has_value()) ++n;
    }
    return AppendInteger(out, n);
  }
  if (cmd == "STRLEN") {
    if (argc != 2) return arity_error();
    auto v = engine_->Get(args[1]);
    if (!v.ok()) return AppendStatusError(v.status(), out);
    return AppendInteger(out, v->has_value() ? static_cast<long long>((*v)->size()) : 0);
  }
  if (cmd == "TYPE") {  // every value is a string here (tools such as redis-cli --bigkeys ask)
    if (argc != 2) return arity_error();
    auto v = engine_->Get(args[1]);
    if (!v.ok()) return AppendStatusError(v.status(), out);
    return AppendSimple(out, v->has_value() ? "string" : "none");
  }
  if (cmd == "DBSIZE") {
    if (argc != 1) return arity_error();
    long long n = 0;
    std::string from;
    for (;;) {
      auto page = engine_->ScanKeys(from, 10000);  // keys only: values can be large
      if (!page.ok()) return AppendStatusError(page.status(), out);
      n += static_cast<long long>(page->size());
      if (page->size() < 10000) break;
      from = page->back() + '\0';
    }
    return AppendInteger(out, n);
  }
  if (cmd == "SCAN") return Scan(args, out);
  if (cmd == "WAIT") {
    long long n = 0, timeout = 0;
    if (argc != 3) return arity_error();
    if (!ParseInt(args[1], &n) || !ParseInt(args[2], &timeout) || n < 0 || timeout < 0) {
      return AppendError(out, "ERR value is not an integer or out of range");
    }
    if (engine_->status().role != Role::kActive) {
      return AppendError(out, "ERR WAIT cannot be used with replica instances.");
    }
    // Redis: timeout 0 blocks forever; a day is forever enough here (the
    // engine bounds a huge one). More standbys than an int counts are never
    // there: wait the timeout out.
    auto ms = std::chrono::milliseconds(timeout == 0 ? 86400000 : timeout);
    const int want = n > INT_MAX ? INT_MAX : static_cast<int>(n);
    auto got = engine_->WaitForReplicas(conn->last_write_lsn, want, ms);
    if (!got.ok()) return AppendStatusError(got.status(), out);
    return AppendInteger(out, *got);
  }
  if (cmd == "ROLE") {
    if (argc != 1) return arity_error();
    return Role(out);
  }
  if (cmd == "INFO") return Info(std::vector<std::string>(args.begin() + 1, args.end()), out);
  if (cmd == "SELECT") {
    if (argc != 2) return arity_error();
    return args[1] == "0" ? AppendSimple(out, "OK") : AppendError(out, "ERR DB index is out of range");
  }
  // What client libraries and tools send when they connect gets an empty
  // answer, so their handshakes work; anything that would change or kill
  // something is refused, not answered as if done.
  if (cmd == "COMMAND") return AppendArrayHeader(out, 0);
  if (cmd == "CONFIG") {
    if (argc >= 2 && Upper(args[1]) == "GET") return AppendArrayHeader(out, 0);
    return AppendError(out, "ERR CONFIG " + (argc >= 2 ? Upper(args[1]).substr(0, 32) : std::string()) +
                                " is not supported");
  }
  if (cmd == "CLIENT") {
    const std::string sub = argc >= 2 ? Upper(args[1]) : std::string();
    if (sub == "ID") return AppendInteger(out, static_cast<long long>(conn->id));
    if (sub == "SETNAME" || sub == "SETINFO") return AppendSimple(out, "OK");
    return AppendError(out, "ERR CLIENT " + sub.substr(0, 32) + " is not supported");
  }
  std::string first = argc > 1 ? "'" + args[1].substr(0, 64) + "' " : "";
  AppendError(out, "ERR unknown command '" + args[0].substr(0, 64) + "', with args beginning with: " + first);
}

namespace {

// Whether the pattern element at *p (not a '*') matches byte c; moves *p
// past it.
bool MatchOne(std::string_view pat, size_t* p, char c) {
  size_t i = *p;
  switch (pat[i]) {
    case '?':
      *p = i + 1;
      return true;
    case '[': {
      ++i;
      const bool negate = i < pat.size() && pat[i] == '^';
      if (negate) ++i;
      bool match = false;
      for (; i < pat.size() && pat[i] != ']'; ++i) {
        if (pat[i] == '\\' && i + 1 < pat.size()) {
          if (pat[++i] == c) match = true;  // the escaped byte is consumed either way
        } else if (i + 2 < pat.size() && pat[i + 1] == '-' && pat[i + 2] != ']') {
          unsigned char lo = static_cast<unsigned char>(pat[i]), hi = static_cast<unsigned char>(pat[i + 2]);
          if (lo > hi) std::swap(lo, hi);
          match = match || (static_cast<unsigned char>(c) >= lo && static_cast<unsigned char>(c) <= hi);
          i += 2;
        } else {
          match = match || pat[i] == c;
        }
      }
      *p = std::min(i + 1, pat.size());  // past the ']' (an unclosed '[' ends the pattern)
      return match != negate;
    }
    case '\\':
      if (i + 1 < pat.size()) {
        *p = i + 2;
        return pat[i + 1] == c;
      }
      [[fallthrough]];
    default:
      *p = i + 1;
      return pat[i] == c;
  }
}

// Redis's glob (SCAN MATCH): * ? [abc] [^a-z] and \ to escape, over bytes
// (keys may hold NUL or any other byte). On a mismatch it goes back only to
// the last '*', so no pattern costs more than pattern length x key length.
bool GlobMatch(std::string_view pat, std::string_view str) {
  size_t p = 0, s = 0;
  size_t star = std::string_view::npos, star_s = 0;
  while (s < str.size()) {
    if (p < pat.size() && pat[p] == '*') {
      star = ++p;
      star_s = s;
      continue;
    }
    size_t next = p;
    if (p < pat.size() && MatchOne(pat, &next, str[s])) {
      p = next;
      ++s;
      continue;
    }
    if (star == std::string_view::npos) return false;
    p = star;
    s = ++star_s;
  }
  while (p < pat.size() && pat[p] == '*') ++p;
  return p == pat.size();
}

}  // namespace

void Commands::Scan(const std::vector<std::string>& args, std::string* out) {
  const size_t argc = args.size();
  if (argc < 2) return AppendError(out, "ERR wrong number of arguments for 'scan' command");
  long long cursor = 0, count = 10;
  std::string match;
  bool strings = true;  // TYPE filter: every value is a string
  if (argc < 2 || !ParseInt(args[1], &cursor) || cursor < 0) return AppendError(out, "ERR invalid cursor");
  for (size_t i = 2; i < argc; i += 2) {
    const std::string opt = Upper(args[i]);
    if (i + 1 >= argc) return AppendError(out, "ERR syntax error");
    if (opt == "COUNT") {
      if (!ParseInt(args[i + 1], &count) || count < 1) return AppendError(out, "ERR value is not an integer or out of range");
    } else if (opt == "MATCH") {
      match = args[i + 1];
    } else if (opt == "TYPE") {
      strings = Upper(args[i + 1]) == "STRING";
    } else {
      return AppendError(out, "ERR syntax error");
    }
  }
  count = std::min<long long>(count, 100000);
  std::string start;
  if (cursor != 0) {
    MutexLock l(&cursor_mu_);
    auto it = cursors_.find(static_cast<uint64_t>(cursor));
    if (it == cursors_.end()) return AppendError(out, "ERR invalid cursor");
    start = it->second + '\0';  // the first key after the last one returned
  }
  auto page = engine_->ScanKeys(start, static_cast<size_t>(count));  // keys only: values can be large
  if (!page.ok()) return AppendStatusError(page.status(), out);
  std::vector<std::string> keys;
  for (const auto& k : *page) {
    if (strings && (match.empty() || GlobMatch(match, k))) keys.push_back(k);
  }
  std::string next = "0";
  if (page->size() == static_cast<size_t>(count)) {
    MutexLock l(&cursor_mu_);
    const uint64_t id = next_cursor_++;
    cursors_[id] = page->back();
    cursor_bytes_ += page->back().size();
    while (cursors_.size() > kMaxCursors || (cursor_bytes_ > kMaxCursorBytes && cursors_.size() > 1)) {
      cursor_bytes_ -= cursors_.begin()->second.size();
      cursors_.erase(cursors_.begin());
    }
    next = std::to_string(id);
  }
  AppendArrayHeader(out, 2);
  AppendBulk(out, next);
  AppendArrayHeader(out, keys.size());
  for (const auto& k : keys) AppendBulk(out, k);
}

}  // namespace replica::resp
