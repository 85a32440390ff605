#include "tests/support/test_util.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

namespace replica::test {

namespace fs = std::filesystem;

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base && *base ? base : "/tmp") + "/replica-test.XXXXXX";
  char* made = ::mkdtemp(templ.data());
  EXPECT_NE(made, nullptr) << "mkdtemp " << templ;
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

bool MakeCertificateAuthority(const std::string& dir, const std::string& ca_name) {
  return std::system(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout " + dir +
                      "/ca.key -out " + dir + "/ca.crt -subj /CN=" + ca_name + " -days 2 >/dev/null 2>&1")
                         .c_str()) == 0;
}

bool MakeNodeCertificate(const std::string& dir, const std::string& name) {
  const std::string p = dir + "/" + name;
  return std::system(("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout " + p +
                      ".key -out " + p + ".csr -subj /CN=" + name + " >/dev/null 2>&1")
                         .c_str()) == 0 &&
         std::system(("openssl x509 -req -in " + p + ".csr -CA " + dir + "/ca.crt -CAkey " + dir +
                      "/ca.key -CAcreateserial -out " + p + ".crt -days 2 >/dev/null 2>&1")
                         .c_str()) == 0;
}

std::string Payload(uint64_t seed, size_t size) {
  std::string out(size, '\0');
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    // Mostly letters, so LZ4 finds some redundancy but not all.
    out[i] = static_cast<char>('a' + (x % 8));
  }
  return out;
}

std::string ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "open " << path;
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteFileBytes(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  EXPECT_TRUE(out.good()) << "write " << path;
}

uint64_t FileSize(const std::string& path) { return fs::file_size(path); }

void FlipBit(const std::string& path, uint64_t offset, int bit) {
  std::string data = ReadFileBytes(path);
  ASSERT_LT(offset, data.size());
  data[offset] = static_cast<char>(data[offset] ^ (1 << bit));
  WriteFileBytes(path, data);
}

void TruncateFileTo(const std::string& path, uint64_t size) { fs::resize_file(path, size); }

void CopyDir(const std::string& from, const std::string& to) {
  fs::copy(from, to, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
}

std::vector<std::string> SegmentPaths(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (wal::ParseSegmentFileName(e.path().filename().string())) out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status TryReadAll(wal::Wal* wal, wal::Lsn from, std::vector<ReadRecord>* out) {
  auto reader = wal->NewReader(from);
  if (!reader.ok()) return reader.status();
  for (;;) {
    wal::RecordView r;
    auto got = (*reader)->Next(&r);
    if (!got.ok()) return got.status();
    if (!*got) return Status::OK();
    out->push_back(ReadRecord{r.lsn, r.epoch, r.type, std::string(r.payload)});
  }
}

std::vector<ReadRecord> ReadAll(wal::Wal* wal, wal::Lsn from) {
  std::vector<ReadRecord> out;
  Status st = TryReadAll(wal, from, &out);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

std::unique_ptr<wal::Wal> OpenOrDie(const std::string& dir, const wal::Options& options) {
  auto wal = wal::Wal::Open(dir, options);
  EXPECT_TRUE(wal.ok()) << wal.status().ToString();
  if (!wal.ok()) return nullptr;
  return std::move(wal).value();
}

void AppendN(wal::Wal* wal, uint64_t n, size_t size, wal::Epoch epoch) {
  for (uint64_t i = 0; i < n; ++i) {
    wal::Lsn expect = wal->last_lsn() + 1;
    auto lsn = wal->Append(epoch, wal::RecordType::kData, Payload(expect, size));
    ASSERT_TRUE(lsn.ok()) << lsn.status().ToString();
    ASSERT_EQ(*lsn, expect);
  }
}

bool SoakMode() {
  const char* v = std::getenv("REPLICA_SOAK");
  return v != nullptr && std::string(v) == "1";
}

}  // namespace replica::test
