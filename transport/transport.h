// Transport: authenticated, framed TCP sessions between nodes, on a small
// fixed pool of I/O threads (Boost.Asio, kept out of this header).
//
// It carries control messages (proto::Control) and data frames (raw WAL
// bytes) and knows nothing of what the bytes mean. Data is sent without being
// copied in user space: from a caller's buffer (gather write) or straight
// from a file (sendfile). Stats::payload_bytes_copied counts any byte that
// had to be copied on the send path and stays 0 unless sendfile is disabled.
//
// Thread-safety: Endpoint and Session methods may be called from any thread.
// Handler callbacks run on an I/O thread, one at a time per session (each
// session has its own strand). While one runs, that session reads nothing,
// and with one I/O thread no other session is served either: a callback may
// block only as long as a standby's disk write (OnData, OnReadIdle), never
// on another session or on anything that waits for an I/O thread.
//
// Lifetime: the Handler must outlive the Endpoint. Endpoint::Stop() (also run
// by the destructor) closes every session, waits for their OnClosed, and
// joins the I/O threads; it must not be called from a handler. A Session is a
// handle: it may be kept after its connection closed or its Endpoint was
// destroyed (calls then return Aborted), but not used while the Endpoint is
// being destroyed.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>

#include "proto/replication.pb.h"
#include "replica/status.h"

namespace replica::transport {

// TLS for the whole stream (OpenSSL through asio::ssl). Both sides present a
// certificate signed by ca_file and verify the other's (mutual TLS); the
// shared-secret handshake still runs inside it. With TLS on, file spans are
// read into memory to be encrypted (counted in payload_bytes_copied).
struct TlsOptions {
  bool enabled = false;
  std::string cert_file;  // PEM certificate chain of this node
  std::string key_file;   // PEM private key
  std::string ca_file;    // PEM CA certificate(s) that sign the cluster's nodes
};

struct Options {
  std::string node_id;            // this node's name, told to peers
  std::string cluster = "default";
  std::string secret;             // the cluster's shared secret; required
  int io_threads = 2;  // the engine sets its own (EngineOptions::transport_io_threads)
  // Memory a session may hold: one incoming frame of at most
  // max_frame_payload bytes, queued outgoing data up to
  // max_send_queue_bytes (SendData and SendFile return Busy beyond it), and
  // queued control messages up to max_control_queue_bytes. Control messages
  // are not refused for a full queue (their senders do not wait for
  // OnWritable), but a peer that does not read must not grow this node's
  // memory for ever: a control message that would take the session past
  // max_control_queue_bytes closes it (Stats::sessions_not_reading). One
  // message is always let through an empty queue.
  uint32_t max_frame_payload = 64u << 20;
  size_t max_send_queue_bytes = 16u << 20;
  size_t max_control_queue_bytes = 64u << 20;
  std::chrono::milliseconds heartbeat_interval{500};
  // A peer from which no whole frame arrives for this long is closed.
  std::chrono::milliseconds peer_timeout{5000};
  // The handshake must complete within this.
  std::chrono::milliseconds handshake_timeout{3000};
  // Sessions this endpoint holds at once: those it opened, and accepted ones
  // once authenticated. A connection accepted while this many are held is
  // closed at once, and so is a peer that authenticates then
  // (Stats::connections_refused).
  size_t max_connections = 256;
  // Accepted connections still in their handshake (TLS and the secret's
  // proofs). One that arrives while this many wait closes the oldest of
  // them (Stats::handshakes_evicted), so that connections which never
  // authenticate cannot keep a real peer out, and connecting cannot take
  // more than max_connections + max_pending_handshakes descriptors.
  size_t max_pending_handshakes = 64;
  // Send file spans with sendfile(2). Off: read them into memory first (a
  // copy, counted in payload_bytes_copied).
  bool use_sendfile = true;
  TlsOptions tls;
};

// Frames before authentication may be at most this large.
inline constexpr uint32_t kMaxHandshakeFrame = 4096;

struct Stats {
  std::atomic<uint64_t> connections_accepted{0};
  std::atomic<uint64_t> connections_refused{0};  // past max_connections
  std::atomic<uint64_t> handshakes_evicted{0};   // closed for a newer one past max_pending_handshakes
  std::atomic<uint64_t> connections_opened{0};
  std::atomic<uint64_t> sessions_established{0};
  std::atomic<uint64_t> sessions_closed{0};
  std::atomic<uint64_t> auth_failures{0};
  std::atomic<uint64_t> tls_failures{0};
  std::atomic<uint64_t> version_mismatches{0};
  std::atomic<uint64_t> protocol_errors{0};
  std::atomic<uint64_t> handshake_timeouts{0};
  std::atomic<uint64_t> peer_timeouts{0};
  std::atomic<uint64_t> frames_sent{0};
  std::atomic<uint64_t> frames_received{0};
  std::atomic<uint64_t> data_bytes_sent{0};
  std::atomic<uint64_t> data_bytes_received{0};
  std::atomic<uint64_t> payload_bytes_copied{0};
  std::atomic<uint64_t> send_queue_full{0};
  std::atomic<uint64_t> sessions_not_reading{0};  // closed past max_control_queue_bytes
};

class Session {
 public:
  virtual ~Session() = default;
  // The peer's node id (known once established).
  virtual std::string peer_id() const = 0;
  virtual std::string remote_address() const = 0;
  virtual bool established() const = 0;
  // True once the connection has closed (OnClosed has been or is being called).
  virtual bool closed() const = 0;
  // Why it closed (what OnClosed is given), once closed() is true; OK before.
  virtual Status close_status() const = 0;
  // Queue a control message. Aborted once the session is closed;
  // InvalidArgument (and nothing sent) for a message larger than
  // max_frame_payload, which the peer would refuse; Busy when the message
  // would take the queued control bytes past max_control_queue_bytes: the
  // session is then closed, as its peer does not read.
  virtual Status SendControl(const proto::Control& msg) = 0;
  // Queue a data frame whose payload is [data, data + length), kept alive by
  // keepalive until sent. Busy if the send queue is full: wait for
  // Handler::OnWritable. InvalidArgument if not yet established.
  virtual Status SendData(std::shared_ptr<const void> keepalive, const char* data, size_t length) = 0;
  // Queue a data frame whose payload is length bytes of fd at offset, sent
  // with sendfile; keepalive keeps fd open until then.
  virtual Status SendFile(std::shared_ptr<const void> keepalive, int fd, uint64_t offset, size_t length) = 0;
  virtual size_t queued_bytes() const = 0;
  // Closes the connection; Handler::OnClosed gets `why`. Idempotent.
  virtual void Close(const Status& why) = 0;
  // Closes the connection after telling the peer why: an Error frame, sent
  // after what is already queued (the peer's OnClosed then gets "peer ID
  // closed the session: <why>"), and closed anyway after a second if the
  // peer does not take it. Nothing more from the peer reaches the handler.
  // Before the handshake has completed, the same as Close.
  virtual void Refuse(const Status& why) = 0;
};

class Handler {
 public:
  virtual ~Handler() = default;
  virtual void OnEstablished(const std::shared_ptr<Session>& session) {}
  // Every control message after the handshake, heartbeats included.
  virtual void OnControl(const std::shared_ptr<Session>& session, const proto::Control& msg) {}
  // A data frame's payload; valid only during the call.
  virtual void OnData(const std::shared_ptr<Session>& session, std::string_view payload) {}
  // After one or more OnData calls, once no whole frame waits to be read
  // (plain TCP: in the socket; under TLS: no byte in the socket or in
  // OpenSSL's buffers), and before OnClosed if the connection ends first. A
  // receiver that queues what OnData gave it can act on the whole burst
  // here. Time spent in OnData and OnReadIdle does not count as the peer's
  // silence (Options::peer_timeout).
  virtual void OnReadIdle(const std::shared_ptr<Session>& session) {}
  // The send queue, once full, has drained below half.
  virtual void OnWritable(const std::shared_ptr<Session>& session) {}
  // Exactly once per session, established or not.
  virtual void OnClosed(const std::shared_ptr<Session>& session, const Status& why) {}
  // Fill LSNs and epoch of an outgoing heartbeat (times are set by the transport).
  virtual void FillHeartbeat(proto::Heartbeat* heartbeat) {}
};

class Endpoint {
 public:
  static Result<std::unique_ptr<Endpoint>> Create(const Options& options, Handler* handler);
  virtual ~Endpoint() = default;
  // Listens on host:port (port 0: any free port); returns the bound port.
  virtual Result<uint16_t> Listen(const std::string& host, uint16_t port) = 0;
  // Starts connecting; the session reports OnEstablished or OnClosed. A
  // host name is looked up by the session, never by this call (which fails
  // only for an empty host or a stopped endpoint); a name that cannot be
  // resolved within the handshake timeout closes the session with NotFound
  // or TimedOut.
  virtual Result<std::shared_ptr<Session>> Connect(const std::string& host, uint16_t port) = 0;
  virtual void Stop() = 0;
  virtual const Stats& stats() const = 0;
};

}  // namespace replica::transport
