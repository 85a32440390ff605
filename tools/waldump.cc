// waldump: print the records of a WAL directory and a summary.
// Read-only: never repairs, never takes the directory lock, so it is safe on a
// log that a live node is writing.
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>

#include "base/log.h"
#include "tools/cli.h"
#include "wal/wal.h"

using namespace replica;
using namespace replica::wal;

namespace {

constexpr const char* kHelp = R"(Usage: waldump [OPTIONS] WAL_DIR

Print every record of a write-ahead log (LSN, epoch, type, payload size,
checksum) and a summary. The log is opened read-only: a torn tail is reported,
not repaired, and a live writer is not disturbed.

Options:
  --from LSN     start at LSN (default: the first retained record)
  --json         one JSON object per line: each record, then {"summary": ...};
                 a torn tail adds "torn": {segment, offset, bytes, lost_page,
                 why} to the summary, a damaged epochs file
                 "history_damage": why; the summary ends in "ok" and, when
                 not ok, "error". If the log cannot be opened, the only line
                 is {"summary":{"dir":...,"ok":false,"error":...}}
  --summary      print only the summary
  -h, --help     show this help

The summary's size is twice: the log's bytes up to the end of its last
readable record (log_bytes: segment headers included; a torn tail, damage and
the reserved space of a preallocated segment are not), and the segment files'
sizes (file_bytes: all of it). JSON strings are UTF-8; a byte of a name that
is not valid UTF-8 is written as \u00XX, XX the byte in hex.

The epoch history is read from the epochs file. If that file is damaged, or
missing and not rebuildable from the segments (they no longer start at LSN
1), the records are shown all the same, the summary's epochs are those the
segments show, and the damage is reported (exit status 1).

Exit status: 0 the log is readable (a torn tail is reported on stderr and is
not an error: recovery cuts it), 1 the log or its epochs file is corrupt (the
message names the segment, offset and LSN, or the file), 2 bad usage or the
log could not be opened.
)";

// Length of the valid UTF-8 sequence at s[i] (RFC 3629: no overlong form, no
// surrogate, nothing above U+10FFFF), or 0 if there is none.
size_t Utf8Length(const std::string& s, size_t i) {
  const auto byte = [&](size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
  const auto cont = [&](size_t k) { return (byte(k) & 0xC0) == 0x80; };
  const unsigned b = byte(0);
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) return cont(1) ? 2 : 0;
  if (b >= 0xE0 && b <= 0xEF) {
    const unsigned lo = b == 0xE0 ? 0xA0 : 0x80, hi = b == 0xED ? 0x9F : 0xBF;
    return byte(1) >= lo && byte(1) <= hi && cont(2) ? 3 : 0;
  }
  if (b >= 0xF0 && b <= 0xF4) {
    const unsigned lo = b == 0xF0 ? 0x90 : 0x80, hi = b == 0xF4 ? 0x8F : 0xBF;
    return byte(1) >= lo && byte(1) <= hi && cont(2) && cont(3) ? 4 : 0;
  }
  return 0;
}

// s as a JSON string literal. Paths are bytes, JSON text is UTF-8: a byte
// that is not part of a valid UTF-8 sequence is written as \u00XX (the code
// point of the same number), so that the output always parses.
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  char hex[8];
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = Utf8Length(s, i);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || n == 0) {
      std::snprintf(hex, sizeof hex, "\\u%04x", c);
      out += hex;
    } else {
      out.append(s, i, n);
      i += n;
      continue;
    }
    ++i;
  }
  return out + "\"";
}

const char* TypeName(uint8_t type) {
  switch (static_cast<RecordType>(type)) {
    case RecordType::kData: return "data";
    case RecordType::kEpochStart: return "epoch-start";
  }
  return "unknown";
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  uint64_t from = 0;
  bool json = false;
  bool summary_only = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kHelp, stdout);
      return 0;
    } else if (a == "--json") {
      json = true;
    } else if (a == "--summary") {
      summary_only = true;
    } else if (a == "--from") {
      if (i + 1 >= argc) cli::UsageError("waldump", "%.*s needs a value", a);
      if (!cli::ParseU64(argv[++i], &from) || from == 0) cli::UsageError("waldump", "bad LSN '%.*s'", argv[i]);
    } else if (!a.empty() && a[0] == '-') {
      cli::UsageError("waldump", "unknown option '%.*s'", a);
    } else if (dir.empty()) {
      dir = a;
    } else {
      cli::UsageError("waldump", "unexpected argument '%.*s'", a);
    }
  }
  if (dir.empty()) cli::UsageError("waldump", "missing WAL_DIR%.*s", "");

  SetLogLevel(LogLevel::kError);  // recovery findings are reported below instead
  Options options;
  options.read_only = true;
  options.salvage = true;  // damage in the last segment: show the records before it, then fail
  auto opened = Wal::Open(dir, options);
  if (!opened.ok()) {
    std::fprintf(stderr, "waldump: %s\n", opened.status().ToString().c_str());
    if (json) {
      std::printf("{\"summary\":{\"dir\":%s,\"ok\":false,\"error\":%s}}\n", JsonString(dir).c_str(),
                  JsonString(opened.status().ToString()).c_str());
    }
    return opened.status().IsCorruption() ? 1 : 2;
  }
  auto wal = std::move(opened).value();
  const RecoveryReport& rec = wal->recovery();
  if (rec.torn_tail) {
    std::fprintf(stderr,
                 "waldump: torn tail in %s at offset %llu: %llu bytes after the last whole record (%s); "
                 "opening the log for writing cuts them\n",
                 rec.torn_segment.c_str(), static_cast<unsigned long long>(rec.torn_offset),
                 static_cast<unsigned long long>(rec.torn_bytes), rec.torn_why.c_str());
  }
  if (from == 0) from = wal->first_lsn();
  auto reader_or = wal->NewReader(from);
  if (!reader_or.ok()) {
    std::fprintf(stderr, "waldump: %s\n", reader_or.status().ToString().c_str());
    return 2;
  }
  auto reader = std::move(reader_or).value();

  if (!rec.history_damage.empty()) std::fprintf(stderr, "waldump: epoch history: %s\n", rec.history_damage.c_str());
  uint64_t records = 0, payload_bytes = 0;
  Lsn first = 0, last = 0;
  std::map<uint8_t, uint64_t> by_type;
  Status error;
  for (;;) {
    RecordView r;
    auto got = reader->Next(&r);
    if (!got.ok()) {
      error = got.status();
      break;
    }
    if (!*got) break;
    if (records == 0) first = r.lsn;
    last = r.lsn;
    ++records;
    payload_bytes += r.payload.size();
    ++by_type[r.type];
    if (summary_only) continue;
    if (json) {
      std::printf("{\"lsn\":%llu,\"epoch\":%llu,\"type\":\"%s\",\"type_code\":%u,\"size\":%zu,\"checksum_ok\":true}\n",
                  static_cast<unsigned long long>(r.lsn), static_cast<unsigned long long>(r.epoch), TypeName(r.type),
                  r.type, r.payload.size());
    } else {
      std::printf("lsn=%llu epoch=%llu type=%s size=%zu checksum=ok\n", static_cast<unsigned long long>(r.lsn),
                  static_cast<unsigned long long>(r.epoch), TypeName(r.type), r.payload.size());
    }
  }
  // The log's size ends at its last readable record: where reading stopped
  // at damage, else the end of what Open found readable.
  const uint64_t log_bytes = error.ok() ? wal->size_bytes() : reader->bytes_before();
  reader.reset();
  if (error.ok() && !rec.corruption.empty()) error = Status::Corruption(rec.corruption);
  if (error.ok() && !rec.history_damage.empty()) error = Status::Corruption(rec.history_damage);

  auto segs = wal->segments();
  auto history = wal->epoch_history();
  // The files may hold more than the log (a torn tail, damage, reserved space).
  uint64_t file_bytes = 0;
  for (const auto& seg : segs) {
    struct stat st {};
    if (::stat(seg.path.c_str(), &st) == 0) file_bytes += static_cast<uint64_t>(st.st_size);
  }
  if (json) {
    std::printf("{\"summary\":{\"dir\":%s,\"records\":%llu,\"first_lsn\":%llu,\"last_lsn\":%llu,"
                "\"payload_bytes\":%llu,\"segments\":%zu,\"log_bytes\":%llu,\"file_bytes\":%llu,\"torn_tail\":%s,",
                JsonString(dir).c_str(), static_cast<unsigned long long>(records),
                static_cast<unsigned long long>(first), static_cast<unsigned long long>(last),
                static_cast<unsigned long long>(payload_bytes), segs.size(),
                static_cast<unsigned long long>(log_bytes), static_cast<unsigned long long>(file_bytes),
                rec.torn_tail ? "true" : "false");
    if (rec.torn_tail) {
      std::printf("\"torn\":{\"segment\":%s,\"offset\":%llu,\"bytes\":%llu,\"lost_page\":%s,\"why\":%s},",
                  JsonString(rec.torn_segment).c_str(), static_cast<unsigned long long>(rec.torn_offset),
                  static_cast<unsigned long long>(rec.torn_bytes), rec.torn_lost_page ? "true" : "false",
                  JsonString(rec.torn_why).c_str());
    }
    if (!rec.history_damage.empty()) std::printf("\"history_damage\":%s,", JsonString(rec.history_damage).c_str());
    std::printf("\"epochs\":[");
    for (size_t i = 0; i < history.entries().size(); ++i) {
      std::printf("%s{\"epoch\":%llu,\"first_lsn\":%llu}", i ? "," : "",
                  static_cast<unsigned long long>(history.entries()[i].epoch),
                  static_cast<unsigned long long>(history.entries()[i].first_lsn));
    }
    std::printf("],\"ok\":%s", error.ok() ? "true" : "false");
    if (!error.ok()) std::printf(",\"error\":%s", JsonString(error.ToString()).c_str());
    std::printf("}}\n");
  } else {
    std::printf("summary: %llu records, LSN %llu..%llu, %llu payload bytes, %zu segments, %llu log bytes "
                "(to the last readable record) of %llu bytes in the files\n",
                static_cast<unsigned long long>(records), static_cast<unsigned long long>(first),
                static_cast<unsigned long long>(last), static_cast<unsigned long long>(payload_bytes), segs.size(),
                static_cast<unsigned long long>(log_bytes), static_cast<unsigned long long>(file_bytes));
    for (const auto& [type, n] : by_type) {
      std::printf("  type %s: %llu\n", TypeName(type), static_cast<unsigned long long>(n));
    }
    for (const auto& e : history.entries()) {
      std::printf("  epoch %llu starts at LSN %llu\n", static_cast<unsigned long long>(e.epoch),
                  static_cast<unsigned long long>(e.first_lsn));
    }
  }
  if (!error.ok()) {
    std::fprintf(stderr, "waldump: %s\n", error.ToString().c_str());
    return error.IsCorruption() ? 1 : 2;
  }
  return 0;
}
