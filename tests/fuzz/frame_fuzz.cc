// libFuzzer target for everything that parses bytes from the network: the
// transport frame decoder, the protobuf control messages, the WAL frame
// verifier that a standby runs over every data frame before storing it, and
// the Redis-protocol parser of the client port.
// Built with -DREPLICA_FUZZ=ON under clang (the sanitizer build); CI runs it
// briefly over the seed corpus in tests/fuzz/corpus.
#include <cstddef>
#include <cstdint>
#include <string>

#include "proto/replication.pb.h"
#include "replication/resp.h"
#include "transport/frame.h"
#include "wal/frame.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace replica;
  std::string_view input(reinterpret_cast<const char*>(data), size);
  // The stream arrives in arbitrary pieces: split it at the first byte's value.
  const size_t cut = size > 0 ? data[0] % (size + 1) : 0;
  transport::FrameDecoder decoder(1 << 20);
  if (decoder.Feed(input.substr(0, cut)).ok() && decoder.Feed(input.substr(cut)).ok()) {
    transport::FrameHeader h;
    std::string payload;
    while (decoder.Next(&h, &payload)) {
      if (h.type == transport::FrameType::kControl) {
        proto::Control msg;
        (void)msg.ParseFromString(payload);
      } else {
        (void)wal::VerifyFrameRun(payload, 0, 0);
      }
    }
  }
  // The same bytes as a bare run of WAL frames, and as one LZ4 block.
  auto run = wal::VerifyFrameRun(input, 0, 0);
  if (size >= wal::kFrameHeaderSize) {
    wal::FrameHeader fh;
    if (wal::DecodeFrameHeader(input.data(), &fh).ok() && fh.frame_type == wal::FrameType::kLz4Block &&
        fh.payload_len <= size - wal::kFrameHeaderSize) {
      std::string raw;
      std::vector<wal::RecordView> recs;
      (void)wal::DecodeBlock(fh, input.substr(wal::kFrameHeaderSize, fh.payload_len), &raw, &recs);
    }
  }
  // The same bytes as a Redis-protocol stream, arriving in three pieces.
  resp::Parser parser(1 << 16, 1 << 12);
  std::vector<std::string> args;
  std::string error;
  for (std::string_view piece : {input.substr(0, cut / 2), input.substr(cut / 2, cut - cut / 2), input.substr(cut)}) {
    parser.Feed(piece);
    resp::Parser::Outcome o;
    while ((o = parser.Next(&args, &error)) == resp::Parser::Outcome::kCommand) {
    }
    if (o == resp::Parser::Outcome::kError) break;
  }
  return 0;
}
