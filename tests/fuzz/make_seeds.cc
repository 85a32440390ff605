// Writes the seed corpus for frame_fuzz (run by hand when formats change):
//   make_seeds DIR
#include <fstream>
#include <string>

#include "proto/replication.pb.h"
#include "transport/frame.h"
#include "wal/frame.h"

using namespace replica;

static std::string Frame(transport::FrameType type, const std::string& payload) {
  char h[transport::kFrameHeaderSize];
  transport::EncodeFrameHeader(type, static_cast<uint32_t>(payload.size()), h);
  return std::string(h, sizeof h) + payload;
}

static void Write(const std::string& dir, const std::string& name, const std::string& bytes) {
  std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  proto::Control hello;
  hello.mutable_hello()->set_protocol_version(1);
  hello.mutable_hello()->set_cluster("c");
  hello.mutable_hello()->set_node_id("n1");
  hello.mutable_hello()->set_nonce(std::string(32, 'x'));
  proto::Control hb;
  hb.mutable_heartbeat()->set_sent_unix_us(1);
  hb.mutable_heartbeat()->set_last_lsn(99);
  std::string wal_frames;
  wal::EncodeRecordFrame(1, 1, wal::RecordType::kData, "hello", &wal_frames);
  wal::EncodeRecordFrame(2, 1, wal::RecordType::kData, "world", &wal_frames);
  std::string block;
  std::vector<std::string> ps(8, std::string(64, 'q'));
  std::vector<wal::RecordIn> recs;
  for (auto& p : ps) recs.push_back({wal::RecordType::kData, p});
  wal::EncodeRecords(3, 2, recs.data(), recs.size(), true, &block);
  Write(dir, "hello", Frame(transport::FrameType::kControl, hello.SerializeAsString()));
  Write(dir, "heartbeat", Frame(transport::FrameType::kControl, hb.SerializeAsString()));
  Write(dir, "data_records", Frame(transport::FrameType::kData, wal_frames));
  Write(dir, "data_block", Frame(transport::FrameType::kData, block));
  Write(dir, "wal_run", wal_frames + block);
  Write(dir, "stream", Frame(transport::FrameType::kControl, hello.SerializeAsString()) +
                           Frame(transport::FrameType::kData, wal_frames + block));
  return 0;
}
