// Boost.Asio implementation of the transport (transport.h, docs/protocol.md).
#include "transport/transport.h"

#include <signal.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <algorithm>
#include <cerrno>
#include <deque>
#include <set>
#include <thread>
#include <vector>

#include "base/host_port.h"
#include "base/names.h"
#include "base/log.h"
#include "base/mutex.h"
#include "base/thread_name.h"
#include "transport/auth.h"
#include "transport/frame.h"

namespace replica::transport {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

uint64_t NowUnixMicros() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

// sendfile(2) to a socket, without SIGPIPE. sendfile has no MSG_NOSIGNAL:
// on a connection that can no longer send (reset by the peer) it fails with
// EPIPE and raises SIGPIPE, whose default action ends the process, and a
// program that embeds the engine need not ignore it. SIGPIPE is blocked in
// this thread for the call; one the call raised is taken while still
// blocked, so it is never delivered. It may have been raised by a later
// round of a call that still returns the bytes of the earlier ones: any call
// that did not send all it was asked is checked. Unless the caller blocked
// SIGPIPE itself: then what is pending is the caller's to take.
ssize_t SendfileWithoutSigpipe(int socket_fd, int file_fd, off_t* offset, size_t count) {
  sigset_t pipe_only, before;
  sigemptyset(&pipe_only);
  sigaddset(&pipe_only, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_only, &before);
  const ssize_t n = ::sendfile(socket_fd, file_fd, offset, count);
  const int err = errno;
  sigset_t pending;
  if (n != static_cast<ssize_t>(count) && !sigismember(&before, SIGPIPE) && sigpending(&pending) == 0 &&
      sigismember(&pending, SIGPIPE)) {
    const timespec now{0, 0};
    while (::sigtimedwait(&pipe_only, nullptr, &now) < 0 && errno == EINTR) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &before, nullptr);
  errno = err;
  return n;
}

class SessionImpl;
// The session whose strand this thread is running a handler for, if any: a
// send from inside one of its own handlers can skip the post to the strand.
thread_local SessionImpl* t_in_handler_of = nullptr;

struct InHandler {
  explicit InHandler(SessionImpl* s) : prev(t_in_handler_of) { t_in_handler_of = s; }
  ~InHandler() { t_in_handler_of = prev; }
  SessionImpl* prev;
};

// Text a peer sent before it authenticated (an Error message) goes into
// statuses and log lines cut to this many bytes.
constexpr size_t kMaxUnauthenticatedText = 200;

std::string Truncated(const std::string& text) {
  if (text.size() <= kMaxUnauthenticatedText) return text;
  return text.substr(0, kMaxUnauthenticatedText) + "... (" + std::to_string(text.size()) + " bytes)";
}

// Lines about what anyone who can connect causes as often as they like
// (connections closed or refused before authentication): at most one per
// interval, which says how many were left out since the one before.
class LogLimiter {
 public:
  static constexpr std::chrono::seconds kInterval{10};
  // True if a line may be written now; *unlogged is then the number not
  // written since the last one.
  bool Allow(uint64_t* unlogged) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    const auto now = Clock::now();
    if (now < next_) {
      ++skipped_;
      return false;
    }
    next_ = now + kInterval;
    *unlogged = skipped_;
    skipped_ = 0;
    return true;
  }

 private:
  Mutex mu_;
  Clock::time_point next_ GUARDED_BY(mu_);
  uint64_t skipped_ GUARDED_BY(mu_) = 0;
};

Status FromAsio(const boost::system::error_code& ec, const std::string& what) {
  if (ec == asio::error::eof) return Status::Aborted(what + ": the peer closed the connection");
  if (ec == asio::error::operation_aborted) return Status::Aborted(what + ": cancelled");
  return Status::IOError(what + ": " + ec.message());
}

class EndpointImpl;
class SessionImpl;

// What a user holds. It refers to the connection weakly, so that only the
// Endpoint and in-flight I/O handlers own the Asio objects, and they are
// always destroyed before the io_context, however long a user keeps this.
class SessionHandle final : public Session {
 public:
  explicit SessionHandle(std::weak_ptr<SessionImpl> impl) : impl_(std::move(impl)) {}
  std::string peer_id() const override {
    MutexLock l(&mu_);
    return peer_id_;
  }
  std::string remote_address() const override {
    MutexLock l(&mu_);
    return remote_;
  }
  bool established() const override;
  bool closed() const override;
  Status close_status() const override {
    MutexLock l(&mu_);
    return close_status_;
  }
  Status SendControl(const proto::Control& msg) override;
  Status SendData(std::shared_ptr<const void> keepalive, const char* data, size_t length) override;
  Status SendFile(std::shared_ptr<const void> keepalive, int fd, uint64_t offset, size_t length) override;
  size_t queued_bytes() const override;
  void Close(const Status& why) override;
  void Refuse(const Status& why) override;

  void set_peer_id(std::string id) {
    MutexLock l(&mu_);
    peer_id_ = std::move(id);
  }
  void set_remote(std::string r) {
    MutexLock l(&mu_);
    remote_ = std::move(r);
  }
  void set_close_status(const Status& why) {
    MutexLock l(&mu_);
    close_status_ = why.ok() ? Status::Aborted("closed") : why;
  }

 private:
  const std::weak_ptr<SessionImpl> impl_;
  mutable Mutex mu_;
  std::string peer_id_ GUARDED_BY(mu_);
  std::string remote_ GUARDED_BY(mu_);
  Status close_status_ GUARDED_BY(mu_);
};

// One connection. Every member below "strand-only" is touched only by
// handlers running on the socket's strand.
class SessionImpl final : public std::enable_shared_from_this<SessionImpl> {
 public:
  SessionImpl(EndpointImpl* ep, tcp::socket socket, bool is_client);
  // Called once, right after construction by make_shared.
  void Init() { handle_ = std::make_shared<SessionHandle>(weak_from_this()); }
  const std::shared_ptr<SessionHandle>& handle() const { return handle_; }

  void Start();
  // Tries each address in turn until one connects.
  // A client session whose peer was given by name: the name is looked up
  // here, on the resolver's own thread, not by the caller of Connect (a
  // DNS server that does not answer held a promotion's fences for seconds).
  void StartResolve(std::string host, uint16_t port);
  void StartConnect(std::vector<tcp::endpoint> targets, size_t next = 0);
  // After TCP (and TLS, if on) is up: the replica handshake begins.
  void BeginProtocol();

  std::string peer_id() const { return handle_->peer_id(); }
  std::string remote_address() const { return handle_->remote_address(); }
  bool established() const { return established_.load(); }
  bool closed() const { return closed_.load(); }
  Status SendControl(const proto::Control& msg);
  Status SendData(std::shared_ptr<const void> keepalive, const char* data, size_t length);
  Status SendFile(std::shared_ptr<const void> keepalive, int fd, uint64_t offset, size_t length);
  size_t queued_bytes() const { return queued_bytes_.load(); }
  void Close(const Status& why);
  void Refuse(const Status& why);
  tcp::socket::executor_type socket_executor() { return ex_; }

 private:
  struct OutItem {
    char header[kFrameHeaderSize];
    std::string owned;  // control payload, or a file span read into memory
    std::shared_ptr<const void> keepalive;
    const char* data = nullptr;
    size_t data_len = 0;
    int fd = -1;
    uint64_t file_offset = 0;
    size_t file_len = 0;
    size_t accounted = 0;     // bytes counted in queued_bytes_
    // Bytes a caller's thread already sent (TryInline): header + payload of
    // an in-memory frame; of a file span, the header's (its payload sent is
    // taken off file_offset and file_len).
    size_t sent_inline = 0;
    bool is_data = false;
    bool close_after = false; // an Error frame: close once it is out
    Status close_status;
  };

  Status Enqueue(std::shared_ptr<OutItem> item, bool data);
  // Takes a sent (or dropped) item off the queued byte counts.
  void Unaccount(const OutItem& item) {
    queued_bytes_ -= item.accounted;
    if (!item.is_data) queued_control_bytes_ -= item.accounted;
  }
  // A send from a thread other than the session's: when nothing else is
  // queued or being written, write the frame right here (one non-blocking
  // sendmsg, or a send of the header and sendfile for a file span) instead
  // of handing it to an I/O thread; what the socket does not take goes to
  // the strand, first in line. Saves a thread hand-off per frame (two on a
  // round trip). Plain TCP, established sessions. True if the item is taken
  // care of.
  bool TryInline(const std::shared_ptr<OutItem>& item);
  // TryInline's one attempt for an in-memory frame, or a file span (the
  // header, then sendfile until the socket is full); true if all of it went.
  // What went is recorded in the item for the strand to go on from.
  bool InlineMemory(OutItem& item) REQUIRES(inline_mu_);
  bool InlineFile(OutItem& item) REQUIRES(inline_mu_);
  void SendError(const Status& st);
  void DoWrite();
  void SendFileChunk();
  void FinishItem();
  void ReadHeader();
  void ReadPayload(FrameHeader h);
  void OnFrame(FrameHeader h);
  // After a frame: tells the handler once nothing more waits to be read.
  void MaybeReadIdle();
  void DoRefuse(const Status& why);
  void OnHandshake(const proto::Control& msg);
  void Established();
  void HeartbeatTick();
  void Fail(const Status& st, std::atomic<uint64_t>* counter);
  void DoClose(const Status& why);
  proto::Control MakeHello();

  // The socket (plain or TLS) and timers. They live as long as this object,
  // which only the Endpoint and in-flight handlers own (users hold a weak
  // SessionHandle), so they are always destroyed on an I/O thread after the
  // last handler that could touch them, while the io_context runs.
  struct Io {
    Io(tcp::socket s, asio::ssl::context* tls_context)
        : handshake_timer(s.get_executor()), heartbeat_timer(s.get_executor()) {
      if (tls_context != nullptr) {
        tls = std::make_unique<asio::ssl::stream<tcp::socket>>(std::move(s), *tls_context);
      } else {
        plain = std::make_unique<tcp::socket>(std::move(s));
      }
    }
    tcp::socket& socket() { return tls ? tls->next_layer() : *plain; }
    std::unique_ptr<tcp::socket> plain;                     // exactly one of these
    std::unique_ptr<asio::ssl::stream<tcp::socket>> tls;
    asio::steady_timer handshake_timer;
    asio::steady_timer heartbeat_timer;
    std::unique_ptr<tcp::resolver> resolver;  // while a peer's name is looked up
  };
  // Asio's transfer_all() caps every read_some/write_some at 64 KiB, which
  // splits a 64 KiB frame plus its header into two sendmsg calls (and two
  // packets) and a 1 MiB frame into sixteen. Whole buffers per call instead.
  struct TransferAllAtOnce {
    size_t operator()(const boost::system::error_code& ec, size_t) const { return ec ? 0 : (64u << 20); }
  };
  template <typename Buffers, typename Handler>
  void AsyncWrite(const Buffers& buffers, Handler&& handler) {
    if (io_->tls) {
      asio::async_write(*io_->tls, buffers, TransferAllAtOnce(), std::forward<Handler>(handler));
    } else {
      asio::async_write(*io_->plain, buffers, TransferAllAtOnce(), std::forward<Handler>(handler));
    }
  }
  template <typename Buffers, typename Handler>
  void AsyncRead(const Buffers& buffers, Handler&& handler) {
    if (io_->tls) {
      asio::async_read(*io_->tls, buffers, TransferAllAtOnce(), std::forward<Handler>(handler));
    } else {
      asio::async_read(*io_->plain, buffers, TransferAllAtOnce(), std::forward<Handler>(handler));
    }
  }

  EndpointImpl* const ep_;
  std::unique_ptr<Io> io_;  // strand-only
  const tcp::socket::executor_type ex_;
  const bool is_client_;
  std::atomic<bool> established_{false};
  std::atomic<bool> closed_{false};
  std::atomic<size_t> queued_bytes_{0};
  std::atomic<size_t> queued_control_bytes_{0};  // the control frames' part of queued_bytes_
  std::atomic<bool> refused_{false};  // a Send was refused for a full queue
  std::atomic<bool> not_reading_{false};  // closing past max_control_queue_bytes
  // Inline sends (TryInline). pending_ counts items from Enqueue until they
  // are written (or dropped by a close), plus kInline while an inline send
  // owns the socket: it is claimed by one compare-and-swap from 0 to
  // kInline + 1, and the strand starts no write while the bit is set (every
  // strand path counts its item before it calls DoWrite, so either the claim
  // fails or DoWrite sees the bit). inline_fd_ is the socket's descriptor
  // once established (plain TCP), -1 before and after: DoClose (and an Error
  // frame) clear it under inline_mu_ before the socket closes, so no inline
  // send ever writes to a closed or reused descriptor, or after an Error.
  static constexpr int kInline = 1 << 30;
  Mutex inline_mu_;
  int inline_fd_ GUARDED_BY(inline_mu_) = -1;
  std::atomic<int> pending_{0};
  // A sender refused for a full queue is told once the queue has drained.
  void NotifyWritableIfDrained();

  std::shared_ptr<SessionHandle> handle_;

  // strand-only
  bool closing_ = false;
  bool refusing_ = false;  // Refuse sent an Error: the peer's frames are dropped until the close
  bool stream_ready_ = false;  // TLS handshake done (or no TLS): writes may start
  std::string client_nonce_, server_nonce_;
  char in_header_[kFrameHeaderSize];
  std::string in_payload_;
  std::deque<std::shared_ptr<OutItem>> out_;
  bool writing_ = false;
  bool data_since_idle_ = false;  // a data frame was handed over since the last OnReadIdle
  Clock::time_point last_rx_;
  uint64_t last_peer_heartbeat_us_ = 0;
};

class EndpointImpl final : public Endpoint {
 public:
  EndpointImpl(const Options& options, Handler* handler, std::unique_ptr<asio::ssl::context> tls)
      : options_(options), handler_(handler), tls_(std::move(tls)), work_(asio::make_work_guard(ioc_)) {
    for (int i = 0; i < options_.io_threads; ++i) threads_.push_back(NamedThread("transport-io", [this] { ioc_.run(); }));
  }
  ~EndpointImpl() override { Stop(); }

  Result<uint16_t> Listen(const std::string& host, uint16_t port) override;
  Result<std::shared_ptr<Session>> Connect(const std::string& host, uint16_t port) override;
  void Stop() override;
  const Stats& stats() const override { return stats_; }

  const Options& options() const { return options_; }
  Handler* handler() const { return handler_; }
  asio::ssl::context* tls_context() const { return tls_.get(); }
  Stats& mutable_stats() { return stats_; }
  asio::io_context& ioc() { return ioc_; }
  void Unregister(const std::shared_ptr<SessionImpl>& s) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    sessions_.erase(s);
    counted_.erase(s.get());
    auto it = std::find(handshaking_.begin(), handshaking_.end(), s);
    if (it != handshaking_.end()) handshaking_.erase(it);
    if (sessions_.empty()) drained_.SignalAll();
  }
  // An accepted session whose peer has proved it knows the secret, before
  // it is told AuthOk: it leaves the handshakes and counts against
  // max_connections. Aborted if it was evicted meanwhile (its close is on
  // its way); Busy if max_connections sessions are held.
  Status Admit(const SessionImpl* s) EXCLUDES(mu_);
  // Lines about accepted connections closed, or refused, before they
  // authenticated.
  LogLimiter& unauthenticated_close_log() { return unauthenticated_close_log_; }
  LogLimiter& refusal_log() { return refusal_log_; }

 private:
  void DoAccept();

  const Options options_;
  Handler* const handler_;
  const std::unique_ptr<asio::ssl::context> tls_;  // null without TLS
  Stats stats_;
  asio::io_context ioc_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::vector<std::thread> threads_;
  std::unique_ptr<tcp::acceptor> acceptor_;  // set once by Listen, used on its strand
  std::unique_ptr<asio::steady_timer> accept_retry_;  // on the acceptor's strand
  Mutex mu_;
  CondVar drained_{&mu_};
  std::set<std::shared_ptr<SessionImpl>> sessions_ GUARDED_BY(mu_);  // every one, until closed
  // Accepted sessions in their handshake, oldest first, and the sessions
  // counted against max_connections (opened, or accepted and admitted). An
  // evicted session is in neither while its close is on its way.
  std::deque<std::shared_ptr<SessionImpl>> handshaking_ GUARDED_BY(mu_);
  std::set<const SessionImpl*> counted_ GUARDED_BY(mu_);
  bool stopped_ GUARDED_BY(mu_) = false;
  LogLimiter unauthenticated_close_log_, refusal_log_;
};

// ---------------------------------------------------------------- Session

SessionImpl::SessionImpl(EndpointImpl* ep, tcp::socket socket, bool is_client)
    : ep_(ep),
      io_(std::make_unique<Io>(std::move(socket), ep->tls_context())),
      ex_(io_->socket().get_executor()),
      is_client_(is_client) {}

void SessionImpl::StartResolve(std::string host, uint16_t port) {
  auto self = shared_from_this();
  handle_->set_remote(HostPort{host, port}.ToString());
  if (closing_) return;
  io_->resolver = std::make_unique<tcp::resolver>(ex_);
  // The lookup counts against the handshake timeout, as a connect does:
  // past it the session closes at once. (Asio cannot stop a getaddrinfo
  // call that has started; its late answer finds the session closed.)
  io_->handshake_timer.expires_after(ep_->options().handshake_timeout);
  io_->handshake_timer.async_wait([self, host](const boost::system::error_code& ec) {
    if (ec || self->closing_ || !self->io_->resolver) return;
    self->DoClose(Status::TimedOut("cannot resolve host '" + host + "': no answer within " +
                                   std::to_string(self->ep_->options().handshake_timeout.count()) + " ms"));
  });
  io_->resolver->async_resolve(
      host, std::to_string(port), tcp::resolver::numeric_service,
      [self, host, port](const boost::system::error_code& ec, const tcp::resolver::results_type& results) {
        if (self->closing_) return;
        self->io_->resolver.reset();
        self->io_->handshake_timer.cancel();
        if (ec) {
          self->DoClose(Status::NotFound("cannot resolve host '" + host + "': " + ec.message()));
          return;
        }
        std::vector<tcp::endpoint> targets;
        for (const auto& entry : results) {
          tcp::endpoint e = entry.endpoint();
          e.port(port);
          if (std::find(targets.begin(), targets.end(), e) == targets.end()) targets.push_back(e);
        }
        if (targets.empty()) {
          self->DoClose(Status::NotFound("host '" + host + "' has no IPv4 or IPv6 address"));
          return;
        }
        self->StartConnect(std::move(targets));
      });
}

void SessionImpl::StartConnect(std::vector<tcp::endpoint> targets, size_t next) {
  auto self = shared_from_this();
  const tcp::endpoint target = targets[next];
  handle_->set_remote(HostPort{target.address().to_string(), target.port()}.ToString());
  if (closing_) return;
  boost::system::error_code ignored;
  if (next > 0) io_->socket().close(ignored);  // the failed attempt's socket
  // An address that drops the SYN is given up after the handshake timeout,
  // not the kernel's (about two minutes), so the next one is tried in time.
  // Per attempt: a timer handler already queued when its attempt ended
  // (cancel() cannot recall it) must not cancel the next attempt or the
  // session that follows.
  struct Attempt {
    bool done = false;
    bool timed_out = false;
  };
  auto attempt = std::make_shared<Attempt>();
  io_->handshake_timer.expires_after(ep_->options().handshake_timeout);
  io_->handshake_timer.async_wait([self, attempt](const boost::system::error_code& ec) {
    if (ec || self->closing_ || attempt->done) return;
    attempt->timed_out = true;
    boost::system::error_code ignored;
    self->io_->socket().cancel(ignored);
  });
  io_->socket().async_connect(target, [self, targets = std::move(targets), next,
                                       attempt](const boost::system::error_code& ec) {
    attempt->done = true;  // both handlers run on the session's strand
    if (self->closing_) return;
    self->io_->handshake_timer.cancel();
    if (ec && next + 1 < targets.size()) return self->StartConnect(std::move(targets), next + 1);
    if (ec) {
      self->DoClose(attempt->timed_out ? Status::TimedOut("connect to " + self->remote_address() + ": no answer within " +
                                                  std::to_string(self->ep_->options().handshake_timeout.count()) +
                                                  " ms")
                               : FromAsio(ec, "connect to " + self->remote_address()));
      return;
    }
    self->Start();
  });
}

void SessionImpl::Start() {
  if (closing_) return;
  tcp::socket& socket_ = io_->socket();
  boost::system::error_code ec;
  socket_.set_option(tcp::no_delay(true), ec);
  socket_.native_non_blocking(true, ec);
  if (!is_client_) {
    auto ep = socket_.remote_endpoint(ec);
    handle_->set_remote(ec ? "?" : HostPort{ep.address().to_string(), ep.port()}.ToString());
  }
  last_rx_ = Clock::now();
  auto self = shared_from_this();
  io_->handshake_timer.expires_after(ep_->options().handshake_timeout);
  io_->handshake_timer.async_wait([self](const boost::system::error_code& ec) {
    if (ec || self->established_.load() || self->closing_) return;
    self->Fail(Status::TimedOut("handshake not completed within " +
                                std::to_string(self->ep_->options().handshake_timeout.count()) + " ms"),
               &self->ep_->mutable_stats().handshake_timeouts);
  });
  if (io_->tls) {
    io_->tls->async_handshake(is_client_ ? asio::ssl::stream_base::client : asio::ssl::stream_base::server,
                              [self](const boost::system::error_code& ec) {
                                if (self->closing_) return;
                                if (ec) {
                                  return self->Fail(Status::InvalidArgument("TLS handshake failed: " + ec.message()),
                                                    &self->ep_->mutable_stats().tls_failures);
                                }
                                self->BeginProtocol();
                              });
    return;
  }
  BeginProtocol();
}

void SessionImpl::BeginProtocol() {
  stream_ready_ = true;
  if (is_client_) {
    client_nonce_ = RandomNonce();
    proto::Control hello;
    auto* h = hello.mutable_hello();
    h->set_protocol_version(kProtocolVersion);
    h->set_cluster(ep_->options().cluster);
    h->set_node_id(ep_->options().node_id);
    h->set_nonce(client_nonce_);
    (void)SendControl(hello);
  }
  DoWrite();  // anything queued while TLS was being set up
  ReadHeader();
}

Status SessionImpl::Enqueue(std::shared_ptr<OutItem> item, bool data) {
  if (closed_.load()) return Status::Aborted("session to " + remote_address() + " is closed");
  const size_t bytes = kFrameHeaderSize + item->owned.size() + item->data_len + item->file_len;
  const size_t cap = ep_->options().max_send_queue_bytes;
  if (data) {
    size_t cur = queued_bytes_.load();
    // One item may exceed the cap when the queue is empty, so nothing is stuck.
    if (cur > 0 && cur + bytes > cap) {
      refused_.store(true);
      ++ep_->mutable_stats().send_queue_full;
      // The strand may have drained the queue between the check above and
      // the flag: no later write completion would then tell the sender, so
      // look again (on the strand) once the flag is set.
      if (queued_bytes_.load() < cap / 2) {
        auto self = shared_from_this();
        asio::post(ex_, [self] { self->NotifyWritableIfDrained(); });
      }
      return Status::Busy("send queue full (" + std::to_string(cur) + " bytes queued)");
    }
  } else {
    const size_t cur = queued_control_bytes_.load();
    const size_t control_cap = ep_->options().max_control_queue_bytes;
    if (cur > 0 && cur + bytes > control_cap) {
      Status st = Status::Busy("peer " + peer_id() + " at " + remote_address() + " does not read: " +
                               std::to_string(cur) + " bytes of control messages wait for it (max_control_queue_bytes=" +
                               std::to_string(control_cap) + "); closing the session");
      if (!not_reading_.exchange(true)) {
        ++ep_->mutable_stats().sessions_not_reading;
        Close(st);  // its transport.closed line says why, once
      }
      return st;
    }
  }
  item->accounted = bytes;
  item->is_data = data;
  queued_bytes_ += bytes;
  if (!data) queued_control_bytes_ += bytes;
  if (t_in_handler_of == this) {
    // Already on this session's strand: queue and write now.
    if (!closing_) {
      ++pending_;
      out_.push_back(std::move(item));
      DoWrite();
    }
    return Status::OK();
  }
  if (TryInline(item)) return Status::OK();
  ++pending_;
  auto self = shared_from_this();
  asio::post(ex_, [self, item] {
    if (self->closing_) {
      --self->pending_;
      return;
    }
    self->out_.push_back(item);
    self->DoWrite();
  });
  return Status::OK();
}

bool SessionImpl::TryInline(const std::shared_ptr<OutItem>& item) {
  MutexLock l(&inline_mu_);
  if (inline_fd_ < 0) return false;
  if (item->fd >= 0 && !ep_->options().use_sendfile) return false;
  int idle = 0;
  if (!pending_.compare_exchange_strong(idle, kInline + 1)) return false;  // others first: keep the order
  const bool whole = item->fd >= 0 ? InlineFile(*item) : InlineMemory(*item);
  auto self = shared_from_this();
  if (whole) {
    Unaccount(*item);
    auto& stats = ep_->mutable_stats();
    ++stats.frames_sent;
    if (item->is_data) stats.data_bytes_sent += item->accounted - kFrameHeaderSize;
    // Items queued meanwhile wait for the strand; so may a writer refused
    // for a full queue.
    const int left = pending_.fetch_sub(kInline + 1) - (kInline + 1);
    if (left > 0 || refused_.load()) {
      asio::post(ex_, [self] {
        self->NotifyWritableIfDrained();
        self->DoWrite();
      });
    }
    return true;
  }
  // The socket took part of it (or nothing, or failed): the rest goes first
  // on the strand, whose write reports any error and closes.
  asio::post(ex_, [self, item] {
    if (self->closing_) {
      self->pending_ -= kInline + 1;
      return;
    }
    self->out_.push_front(item);
    self->pending_ -= kInline;  // the item stays counted until it is written
    self->DoWrite();
  });
  return true;
}

bool SessionImpl::InlineMemory(OutItem& item) {
  const char* payload = item.data != nullptr ? item.data : item.owned.data();
  const size_t payload_len = item.data != nullptr ? item.data_len : item.owned.size();
  iovec iov[2] = {{item.header, kFrameHeaderSize}, {const_cast<char*>(payload), payload_len}};
  msghdr mh{};
  mh.msg_iov = iov;
  mh.msg_iovlen = payload_len > 0 ? 2 : 1;
  ssize_t n;
  do {
    n = ::sendmsg(inline_fd_, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  item.sent_inline = n > 0 ? static_cast<size_t>(n) : 0;
  return item.sent_inline == kFrameHeaderSize + payload_len;
}

bool SessionImpl::InlineFile(OutItem& item) {
  // As DoWrite does: the header with MSG_MORE, packed with the payload's start.
  ssize_t n;
  do {
    n = ::send(inline_fd_, item.header, kFrameHeaderSize, MSG_MORE | MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  item.sent_inline = n > 0 ? static_cast<size_t>(n) : 0;
  if (item.sent_inline < kFrameHeaderSize) return false;
  while (item.file_len > 0) {
    off_t off = static_cast<off_t>(item.file_offset);
    // The socket is non-blocking (Asio made it so before the handshake):
    // this sends what fits and returns.
    const ssize_t m = SendfileWithoutSigpipe(inline_fd_, item.fd, &off, std::min<size_t>(item.file_len, 4u << 20));
    if (m > 0) {
      item.file_offset += static_cast<uint64_t>(m);
      item.file_len -= static_cast<size_t>(m);
    } else if (m < 0 && errno == EINTR) {
      continue;
    } else {
      return false;  // full (the strand waits until writable), or an error the strand reports
    }
  }
  return true;
}

Status SessionImpl::SendControl(const proto::Control& msg) {
  // Checked before the length is cast to the header's u32: the peer would
  // refuse the frame and close, or read a wrapped length as the start of a
  // stream it cannot follow.
  const size_t size = msg.ByteSizeLong();
  if (size > ep_->options().max_frame_payload) {
    return Status::InvalidArgument("control message of " + std::to_string(size) +
                                   " bytes is larger than max_frame_payload (" +
                                   std::to_string(ep_->options().max_frame_payload) + "); not sent");
  }
  auto item = std::make_shared<OutItem>();
  if (!msg.SerializeToString(&item->owned)) return Status::InvalidArgument("control message does not serialize");
  EncodeFrameHeader(FrameType::kControl, static_cast<uint32_t>(item->owned.size()), item->header);
  return Enqueue(std::move(item), false);
}

Status SessionImpl::SendData(std::shared_ptr<const void> keepalive, const char* data, size_t length) {
  if (!established_.load()) return Status::InvalidArgument("data before the session is established");
  if (length > ep_->options().max_frame_payload) return Status::InvalidArgument("data frame larger than max_frame_payload");
  auto item = std::make_shared<OutItem>();
  item->keepalive = std::move(keepalive);
  item->data = data;
  item->data_len = length;
  EncodeFrameHeader(FrameType::kData, static_cast<uint32_t>(length), item->header);
  return Enqueue(std::move(item), true);
}

Status SessionImpl::SendFile(std::shared_ptr<const void> keepalive, int fd, uint64_t offset, size_t length) {
  if (!established_.load()) return Status::InvalidArgument("data before the session is established");
  if (length > ep_->options().max_frame_payload) return Status::InvalidArgument("data frame larger than max_frame_payload");
  if (fd < 0) return Status::InvalidArgument("SendFile without a file descriptor");
  auto item = std::make_shared<OutItem>();
  item->keepalive = std::move(keepalive);
  item->fd = fd;
  item->file_offset = offset;
  item->file_len = length;
  EncodeFrameHeader(FrameType::kData, static_cast<uint32_t>(length), item->header);
  return Enqueue(std::move(item), true);
}

void SessionImpl::SendError(const Status& st) {
  proto::Control msg;
  msg.mutable_error()->set_code(static_cast<uint32_t>(st.code()));
  msg.mutable_error()->set_message(st.message());
  auto item = std::make_shared<OutItem>();
  msg.SerializeToString(&item->owned);
  EncodeFrameHeader(FrameType::kControl, static_cast<uint32_t>(item->owned.size()), item->header);
  item->close_after = true;
  item->close_status = st;
  {
    MutexLock l(&inline_mu_);  // nothing may go out inline after the Error frame
    inline_fd_ = -1;
  }
  item->accounted = kFrameHeaderSize + item->owned.size();
  queued_bytes_ += item->accounted;
  queued_control_bytes_ += item->accounted;
  ++pending_;
  out_.push_back(item);
  DoWrite();
}

void SessionImpl::DoWrite() {
  if (writing_ || out_.empty() || closing_ || !stream_ready_ || (pending_.load() & kInline) != 0) return;
  writing_ = true;
  auto self = shared_from_this();
  OutItem& it = *out_.front();
  if (it.fd >= 0 && (!ep_->options().use_sendfile || io_->tls)) {
    // Fallback (sendfile off, or TLS, which must encrypt in user space): read
    // the span into memory. This is a copy, and is counted.
    it.owned.resize(it.file_len);
    ssize_t n = ::pread(it.fd, it.owned.data(), it.file_len, static_cast<off_t>(it.file_offset));
    if (n != static_cast<ssize_t>(it.file_len)) {
      DoClose(Status::IOError("read of a file span for sending failed"));
      return;
    }
    ep_->mutable_stats().payload_bytes_copied += it.file_len;
    it.fd = -1;
  }
  if (it.fd >= 0) {
    // The header goes first with MSG_MORE, so that the kernel packs it with
    // the start of the sendfile payload instead of sending 16 bytes alone.
    const size_t before = std::min(it.sent_inline, kFrameHeaderSize);  // sent inline already
    if (before == kFrameHeaderSize) return SendFileChunk();
    ssize_t n = ::send(io_->socket().native_handle(), it.header + before, kFrameHeaderSize - before,
                       MSG_MORE | MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(kFrameHeaderSize - before)) return SendFileChunk();
    const size_t sent = before + (n > 0 ? static_cast<size_t>(n) : 0);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return DoClose(Status::FromErrno("send", errno));
    }
    AsyncWrite(asio::buffer(it.header + sent, kFrameHeaderSize - sent),
                      [self](const boost::system::error_code& ec, size_t) {
                        if (ec) return self->DoClose(FromAsio(ec, "send"));
                        self->SendFileChunk();
                      });
    return;
  }
  std::array<asio::const_buffer, 2> bufs = {
      asio::buffer(it.header, kFrameHeaderSize),
      it.data != nullptr ? asio::const_buffer(it.data, it.data_len) : asio::const_buffer(it.owned.data(), it.owned.size())};
  if (it.sent_inline > 0) {
    // The start of the frame went out inline (TryInline): send the rest.
    const size_t h = std::min(it.sent_inline, kFrameHeaderSize);
    bufs[0] = asio::buffer(it.header + h, kFrameHeaderSize - h);
    bufs[1] += it.sent_inline - h;
  }
  AsyncWrite(bufs, [self](const boost::system::error_code& ec, size_t) {
    if (ec) return self->DoClose(FromAsio(ec, "send"));
    self->FinishItem();
  });
}

void SessionImpl::SendFileChunk() {
  if (closing_) return;
  OutItem& it = *out_.front();
  while (it.file_len > 0) {
    off_t off = static_cast<off_t>(it.file_offset);
    size_t want = std::min<size_t>(it.file_len, 4u << 20);
    ssize_t n = SendfileWithoutSigpipe(io_->socket().native_handle(), it.fd, &off, want);
    if (n > 0) {
      it.file_offset += static_cast<uint64_t>(n);
      it.file_len -= static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      auto self = shared_from_this();
      io_->socket().async_wait(tcp::socket::wait_write, [self](const boost::system::error_code& ec) {
        if (self->closing_) return;
        if (ec) return self->DoClose(FromAsio(ec, "send"));
        self->SendFileChunk();
      });
      return;
    }
    DoClose(n == 0 ? Status::IOError("sendfile: the file ended before the span did")
                   : Status::FromErrno("sendfile", errno));
    return;
  }
  FinishItem();
}

void SessionImpl::FinishItem() {
  if (closing_) return;  // a write that completed just before the close
  std::shared_ptr<OutItem> done = std::move(out_.front());
  out_.pop_front();
  writing_ = false;
  --pending_;
  Unaccount(*done);
  auto& stats = ep_->mutable_stats();
  ++stats.frames_sent;
  if (done->is_data) stats.data_bytes_sent += done->accounted - kFrameHeaderSize;
  if (done->close_after) return DoClose(done->close_status);
  NotifyWritableIfDrained();
  DoWrite();
}

void SessionImpl::NotifyWritableIfDrained() {
  if (closing_ || queued_bytes_.load() >= ep_->options().max_send_queue_bytes / 2) return;
  if (!refused_.exchange(false)) return;
  InHandler in(this);
  ep_->handler()->OnWritable(handle_);
}

void SessionImpl::ReadHeader() {
  if (closing_) return;
  auto self = shared_from_this();
  AsyncRead(asio::buffer(in_header_, kFrameHeaderSize),
                   [self](const boost::system::error_code& ec, size_t) {
                     if (self->closing_) return;
                     if (ec) return self->DoClose(FromAsio(ec, "receive"));
                     FrameHeader h;
                     const uint32_t limit =
                         self->established_.load() ? self->ep_->options().max_frame_payload : kMaxHandshakeFrame;
                     Status st = DecodeFrameHeader(self->in_header_, limit, &h);
                     if (!st.ok()) return self->Fail(st, &self->ep_->mutable_stats().protocol_errors);
                     if (h.type == FrameType::kData && !self->established_.load()) {
                       return self->Fail(Status::InvalidArgument("data frame before the handshake"),
                                         &self->ep_->mutable_stats().protocol_errors);
                     }
                     self->ReadPayload(h);
                   });
}

void SessionImpl::ReadPayload(FrameHeader h) {
  if (closing_) return;
  in_payload_.resize(h.payload_len);
  auto self = shared_from_this();
  AsyncRead(asio::buffer(in_payload_), [self, h](const boost::system::error_code& ec, size_t) {
    if (self->closing_) return;
    if (ec) return self->DoClose(FromAsio(ec, "receive"));
    self->OnFrame(h);
  });
}

void SessionImpl::OnFrame(FrameHeader h) {
  if (closing_) return;
  auto& stats = ep_->mutable_stats();
  ++stats.frames_received;
  auto self = shared_from_this();
  if (h.type == FrameType::kData) {
    stats.data_bytes_received += h.payload_len;
    if (!refusing_) {
      data_since_idle_ = true;
      InHandler in(this);
      ep_->handler()->OnData(handle_, in_payload_);
    }
  } else {
    proto::Control msg;
    if (!msg.ParseFromString(in_payload_)) {
      return Fail(Status::Corruption("control frame does not parse"), &stats.protocol_errors);
    }
    if (msg.has_error()) {
      // Before authentication the text is anyone's: cut short.
      const std::string& text = msg.error().message();
      return DoClose(Status::Aborted("peer " + peer_id() + " closed the session: " +
                                     (established_.load() ? text : Truncated(text))));
    }
    if (!established_.load()) {
      OnHandshake(msg);
    } else if (msg.has_hello() || msg.has_challenge() || msg.has_auth() || msg.has_auth_ok()) {
      return Fail(Status::InvalidArgument("handshake message after the handshake"), &stats.protocol_errors);
    } else {
      if (msg.has_heartbeat()) last_peer_heartbeat_us_ = msg.heartbeat().sent_unix_us();
      if (!refusing_) {
        InHandler in(this);
        ep_->handler()->OnControl(handle_, msg);
      }
    }
  }
  MaybeReadIdle();
  // A whole frame arrived; the time its handlers took (a standby's disk
  // write) is not the peer's silence either.
  last_rx_ = Clock::now();
  if (!closing_) ReadHeader();
}

void SessionImpl::MaybeReadIdle() {
  if (closing_ || !data_since_idle_) return;
  boost::system::error_code ec;
  const size_t waiting = io_->socket().available(ec);
  if (!ec && waiting > 0) {
    if (io_->tls) return;  // TLS records on their way
    // Plain TCP: the burst goes on while a whole frame waits. Part of one
    // (still arriving) ends it, so that what came whole is not held back
    // behind a large frame, nor lost with a connection that drops.
    char header[kFrameHeaderSize];
    FrameHeader h;
    const ssize_t n = ::recv(io_->plain->native_handle(), header, sizeof header, MSG_PEEK | MSG_DONTWAIT);
    if (n == static_cast<ssize_t>(kFrameHeaderSize) &&
        DecodeFrameHeader(header, ep_->options().max_frame_payload, &h).ok() &&
        waiting >= kFrameHeaderSize + static_cast<size_t>(h.payload_len)) {
      return;
    }
  }
  if (io_->tls) {
    // Under TLS, bytes already read from the socket may wait in OpenSSL: in
    // the record being decrypted (SSL_pending) or in the BIO it reads from.
    // (Asio may also hold some in its own buffer, which it hands to the BIO
    // only when OpenSSL asks for more: then the burst ends early, and the
    // handler acts on it in two parts.)
    SSL* ssl = io_->tls->native_handle();
    if (SSL_pending(ssl) > 0 || BIO_pending(SSL_get_rbio(ssl)) > 0) return;
  }
  data_since_idle_ = false;
  InHandler in(this);
  ep_->handler()->OnReadIdle(handle_);
}

void SessionImpl::OnHandshake(const proto::Control& msg) {
  const Options& o = ep_->options();
  auto& stats = ep_->mutable_stats();
  // A refusal of a peer that connected to us: anyone can cause one, as often
  // as they like, so the lines are limited.
  auto refuse = [this](const char* event, const Status& st) {
    uint64_t unlogged;
    if (ep_->refusal_log().Allow(&unlogged)) {
      RLOG(kWarn, event) << "peer=" << remote_address() << " reason=\"" << st.message() << "\" unlogged=" << unlogged;
    }
    SendError(st);
  };
  if (!is_client_ && msg.has_hello() && server_nonce_.empty()) {
    const auto& hello = msg.hello();
    if (hello.protocol_version() != kProtocolVersion) {
      ++stats.version_mismatches;
      return refuse("transport.refused",
                    Status::NotSupported("peer speaks protocol version " + std::to_string(hello.protocol_version()) +
                                         "; this node speaks version " + std::to_string(kProtocolVersion)));
    }
    if (hello.nonce().size() != kNonceSize) {
      return Fail(Status::InvalidArgument("hello with a bad nonce"), &stats.protocol_errors);
    }
    // The id becomes file names and log fields on this node (a standby's
    // checkpoint and slot): a peer whose id is not a plain name is refused.
    if (Status st = CheckName("peer node id", hello.node_id()); !st.ok()) {
      ++stats.protocol_errors;
      return refuse("transport.refused", st);
    }
    handle_->set_peer_id(hello.node_id());
    client_nonce_ = hello.nonce();
    server_nonce_ = RandomNonce();
    proto::Control challenge;
    auto* c = challenge.mutable_challenge();
    c->set_nonce(server_nonce_);
    c->set_node_id(o.node_id);
    // A peer of another cluster gets a proof it cannot verify and gives up.
    c->set_proof(AuthProof(o.secret, "replica/server", o.cluster, client_nonce_, server_nonce_));
    (void)SendControl(challenge);
    return;
  }
  if (is_client_ && msg.has_challenge() && server_nonce_.empty()) {
    const auto& ch = msg.challenge();
    // Checked before it is used or logged, as the server checks ours: the
    // id is not yet proved to come from a node of the cluster.
    if (Status st = CheckName("peer node id", ch.node_id()); !st.ok()) {
      ++stats.protocol_errors;
      RLOG(kWarn, "transport.refused") << "peer=" << remote_address() << " reason=\"" << st.message() << "\"";
      return SendError(st);
    }
    server_nonce_ = ch.nonce();
    handle_->set_peer_id(ch.node_id());
    if (server_nonce_.size() != kNonceSize ||
        !ProofEquals(ch.proof(), AuthProof(o.secret, "replica/server", o.cluster, client_nonce_, server_nonce_))) {
      ++stats.auth_failures;
      Status st = Status::InvalidArgument("peer " + ch.node_id() +
                                          " could not prove it knows the cluster secret (wrong secret or cluster)");
      RLOG(kWarn, "transport.auth_failed") << "peer=" << remote_address() << " reason=\"" << st.message() << "\"";
      return SendError(st);
    }
    proto::Control auth;
    auth.mutable_auth()->set_proof(AuthProof(o.secret, "replica/client", o.cluster, client_nonce_, server_nonce_));
    (void)SendControl(auth);
    return;
  }
  if (!is_client_ && msg.has_auth() && !server_nonce_.empty()) {
    if (!ProofEquals(msg.auth().proof(),
                     AuthProof(o.secret, "replica/client", o.cluster, client_nonce_, server_nonce_))) {
      ++stats.auth_failures;
      return refuse("transport.auth_failed",
                    Status::InvalidArgument("peer " + peer_id() + " at " + remote_address() +
                                            " failed authentication (wrong cluster secret or cluster name)"));
    }
    if (Status st = ep_->Admit(this); !st.ok()) {
      if (st.IsAborted()) return;  // evicted for a newer connection: closing
      ++stats.connections_refused;
      RLOG(kWarn, "transport.refused") << "peer=" << peer_id() << " address=" << remote_address() << " reason=\""
                                       << st.message() << "\"";
      return SendError(st);
    }
    proto::Control ok;
    ok.mutable_auth_ok();
    (void)SendControl(ok);
    return Established();
  }
  if (is_client_ && msg.has_auth_ok() && !server_nonce_.empty()) return Established();
  Fail(Status::InvalidArgument("unexpected message during the handshake"), &stats.protocol_errors);
}

void SessionImpl::Established() {
  established_.store(true);
  if (!io_->tls) {
    MutexLock l(&inline_mu_);
    inline_fd_ = io_->socket().native_handle();
  }
  io_->handshake_timer.cancel();
  ++ep_->mutable_stats().sessions_established;
  RLOG(kInfo, "transport.established") << "peer=" << peer_id() << " address=" << remote_address()
                                       << " role=" << (is_client_ ? "client" : "server");
  {
    InHandler in(this);
    ep_->handler()->OnEstablished(handle_);
  }
  HeartbeatTick();
}

void SessionImpl::HeartbeatTick() {
  if (closing_) return;
  const Options& o = ep_->options();
  auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - last_rx_);
  if (silent > o.peer_timeout) {
    return Fail(Status::TimedOut("peer " + peer_id() + " silent for " + std::to_string(silent.count()) + " ms"),
                &ep_->mutable_stats().peer_timeouts);
  }
  proto::Control msg;
  auto* hb = msg.mutable_heartbeat();
  ep_->handler()->FillHeartbeat(hb);
  hb->set_sent_unix_us(NowUnixMicros());
  hb->set_echo_unix_us(last_peer_heartbeat_us_);
  (void)SendControl(msg);
  auto self = shared_from_this();
  io_->heartbeat_timer.expires_after(o.heartbeat_interval);
  io_->heartbeat_timer.async_wait([self](const boost::system::error_code& ec) {
    if (!ec) self->HeartbeatTick();
  });
}

void SessionImpl::Fail(const Status& st, std::atomic<uint64_t>* counter) {
  if (counter != nullptr) ++*counter;
  DoClose(st);
}

void SessionImpl::Close(const Status& why) {
  if (closed_.load()) return;  // also keeps us off an executor that may be gone
  auto self = shared_from_this();
  asio::post(ex_, [self, why] { self->DoClose(why); });
}

void SessionImpl::Refuse(const Status& why) {
  if (closed_.load()) return;
  auto self = shared_from_this();
  asio::post(ex_, [self, why] { self->DoRefuse(why); });
}

void SessionImpl::DoRefuse(const Status& why) {
  if (closing_ || refusing_) return;
  if (!established_.load()) return DoClose(why);
  refusing_ = true;
  SendError(why);  // closes the session once it is sent
  // A peer that reads nothing would keep it queued: closed anyway. (No more
  // heartbeats are due: the timer is the heartbeat's.)
  auto self = shared_from_this();
  io_->heartbeat_timer.expires_after(std::chrono::seconds(1));
  io_->heartbeat_timer.async_wait([self, why](const boost::system::error_code& ec) {
    if (!ec) self->DoClose(why);
  });
}

void SessionImpl::DoClose(const Status& why) {
  if (closing_) return;
  closing_ = true;
  handle_->set_close_status(why);  // before closed_: whoever sees closed() can read why
  closed_.store(true);
  {
    MutexLock l(&inline_mu_);  // waits out an inline send in progress
    inline_fd_ = -1;
  }
  boost::system::error_code ec;
  io_->handshake_timer.cancel();
  io_->heartbeat_timer.cancel();
  if (io_->resolver) io_->resolver->cancel();
  io_->socket().shutdown(tcp::socket::shutdown_both, ec);
  io_->socket().close(ec);
  out_.clear();
  queued_bytes_.store(0);
  queued_control_bytes_.store(0);
  ++ep_->mutable_stats().sessions_closed;
  uint64_t unlogged = 0;
  if (!established_.load() && is_client_ && !why.IsAborted()) {
    // A connection that never came up (peer down): its owner decides how
    // loudly to say so, rather than one warning per retry.
    RLOG(kDebug, "transport.closed") << "peer=" << peer_id() << " address=" << remote_address() << " reason=\""
                                     << why.ToString() << "\"";
  } else if (!established_.load() && !is_client_) {
    // Anyone who can connect causes these, as often as they like.
    if (ep_->unauthenticated_close_log().Allow(&unlogged)) {
      RLOG(kWarn, "transport.closed") << "peer=" << peer_id() << " address=" << remote_address() << " reason=\""
                                      << why.ToString() << "\" unauthenticated=1 unlogged=" << unlogged;
    }
  } else if (why.ok() || why.IsAborted()) {
    RLOG(kInfo, "transport.closed") << "peer=" << peer_id() << " address=" << remote_address() << " reason=\""
                                    << why.ToString() << "\"";
  } else {
    RLOG(kWarn, "transport.closed") << "peer=" << peer_id() << " address=" << remote_address() << " reason=\""
                                    << why.ToString() << "\"";
  }
  auto self = shared_from_this();
  {
    InHandler in(this);
    if (data_since_idle_) {
      // Whole data frames the handler was given with the next one arriving
      // when the connection ended: they are the last of their burst.
      data_since_idle_ = false;
      ep_->handler()->OnReadIdle(handle_);
    }
    ep_->handler()->OnClosed(handle_, why);
  }
  ep_->Unregister(self);
}

// ---------------------------------------------------------------- Handle

Status Closed() { return Status::Aborted("the session is closed"); }

bool SessionHandle::established() const {
  auto s = impl_.lock();
  return s && s->established();
}
bool SessionHandle::closed() const {
  auto s = impl_.lock();
  return !s || s->closed();
}
Status SessionHandle::SendControl(const proto::Control& msg) {
  auto s = impl_.lock();
  return s ? s->SendControl(msg) : Closed();
}
Status SessionHandle::SendData(std::shared_ptr<const void> keepalive, const char* data, size_t length) {
  auto s = impl_.lock();
  return s ? s->SendData(std::move(keepalive), data, length) : Closed();
}
Status SessionHandle::SendFile(std::shared_ptr<const void> keepalive, int fd, uint64_t offset, size_t length) {
  auto s = impl_.lock();
  return s ? s->SendFile(std::move(keepalive), fd, offset, length) : Closed();
}
size_t SessionHandle::queued_bytes() const {
  auto s = impl_.lock();
  return s ? s->queued_bytes() : 0;
}
void SessionHandle::Close(const Status& why) {
  if (auto s = impl_.lock()) s->Close(why);
}
void SessionHandle::Refuse(const Status& why) {
  if (auto s = impl_.lock()) s->Refuse(why);
}

// ---------------------------------------------------------------- Endpoint

Result<uint16_t> EndpointImpl::Listen(const std::string& host, uint16_t port) {
  boost::system::error_code ec;
  auto resolved = ResolveHost(host, /*passive=*/true);
  if (!resolved.ok()) return resolved.status().WithContext("listen address");
  auto addr = asio::ip::make_address(resolved->front(), ec);
  if (ec) return Status::InvalidArgument("listen address '" + host + "': " + ec.message());
  auto acceptor = std::make_unique<tcp::acceptor>(asio::make_strand(ioc_));
  tcp::endpoint ep(addr, port);
  acceptor->open(ep.protocol(), ec);
  if (!ec) acceptor->set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor->bind(ep, ec);
  if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Status::IOError("listen on " + host + ":" + std::to_string(port) + ": " + ec.message());
  uint16_t bound = acceptor->local_endpoint().port();
  {
    MutexLock l(&mu_);
    if (stopped_) return Status::Aborted("endpoint stopped");
    if (acceptor_) return Status::InvalidArgument("already listening");
    acceptor_ = std::move(acceptor);
  }
  asio::post(acceptor_->get_executor(), [this] { DoAccept(); });
  return bound;
}

Status EndpointImpl::Admit(const SessionImpl* s) {
  MutexLock l(&mu_);
  auto it = std::find_if(handshaking_.begin(), handshaking_.end(), [s](const auto& h) { return h.get() == s; });
  if (it == handshaking_.end()) return Status::Aborted("evicted during the handshake");
  handshaking_.erase(it);
  if (counted_.size() >= options_.max_connections) {
    return Status::Busy("this node holds as many sessions as it takes (max_connections=" +
                        std::to_string(options_.max_connections) + ")");
  }
  counted_.insert(s);
  return Status::OK();
}

void EndpointImpl::DoAccept() {
  acceptor_->async_accept(asio::make_strand(ioc_), [this](const boost::system::error_code& ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted || !acceptor_->is_open()) return;
    if (ec) {
      // E.g. out of descriptors: retry in 100 ms, not in a busy loop (and
      // a log line each time) while the condition lasts.
      RLOG(kWarn, "transport.accept_failed") << "error=\"" << ec.message() << "\" (retrying in 100 ms)";
      if (!accept_retry_) accept_retry_ = std::make_unique<asio::steady_timer>(acceptor_->get_executor());
      accept_retry_->expires_after(std::chrono::milliseconds(100));
      accept_retry_->async_wait([this](const boost::system::error_code& wec) {
        if (!wec && acceptor_->is_open()) DoAccept();
      });
      return;
    }
    bool stopped, full;
    std::shared_ptr<SessionImpl> session, evicted;
    {
      MutexLock l(&mu_);
      stopped = stopped_;
      full = counted_.size() >= options_.max_connections;
      if (!stopped && !full) {
        // The oldest handshake makes room: a connection that never
        // authenticates holds its place only until enough newer ones came,
        // so a real peer's handshake, which takes a few round trips, always
        // finds one.
        if (handshaking_.size() >= options_.max_pending_handshakes) {
          evicted = std::move(handshaking_.front());
          handshaking_.pop_front();
        }
        session = std::make_shared<SessionImpl>(this, std::move(socket), false);
        session->Init();
        sessions_.insert(session);
        handshaking_.push_back(session);
      }
    }
    if (full && !stopped) {
      if (++stats_.connections_refused == 1 || stats_.connections_refused % 1000 == 0) {
        RLOG(kWarn, "transport.connection_refused") << "refused=" << stats_.connections_refused.load()
                                                     << " (max_connections=" << options_.max_connections << ")";
      }
      boost::system::error_code ignored;
      socket.close(ignored);
    }
    if (evicted) {
      ++stats_.handshakes_evicted;
      evicted->Close(Status::Aborted("handshake not completed before " + std::to_string(options_.max_pending_handshakes) +
                                     " newer connections came (max_pending_handshakes)"));
    }
    if (session) {
      ++stats_.connections_accepted;
      asio::post(session->socket_executor(), [session] { session->Start(); });
    }
    DoAccept();
  });
}

Result<std::shared_ptr<Session>> EndpointImpl::Connect(const std::string& host, uint16_t port) {
  // An address is used as it is; a name is looked up by the session
  // (StartResolve), so that this call never waits for a DNS server.
  if (host.empty()) return Status::InvalidArgument("peer address: the host is empty");
  boost::system::error_code literal_ec;
  const auto literal = asio::ip::make_address(host, literal_ec);
  auto session = std::make_shared<SessionImpl>(this, tcp::socket(asio::make_strand(ioc_)), true);
  session->Init();
  {
    MutexLock l(&mu_);
    if (stopped_) return Status::Aborted("endpoint stopped");
    sessions_.insert(session);
    counted_.insert(session.get());
  }
  ++stats_.connections_opened;
  if (!literal_ec) {
    asio::post(session->socket_executor(), [session, target = tcp::endpoint(literal, port)] {
      session->StartConnect(std::vector<tcp::endpoint>{target});
    });
  } else {
    asio::post(session->socket_executor(), [session, host, port] { session->StartResolve(host, port); });
  }
  return std::shared_ptr<Session>(session->handle());
}

void EndpointImpl::Stop() {
  std::set<std::shared_ptr<SessionImpl>> sessions;
  {
    MutexLock l(&mu_);
    if (stopped_) return;
    stopped_ = true;
    sessions = sessions_;
  }
  if (acceptor_) {
    asio::post(acceptor_->get_executor(), [this] {
      boost::system::error_code ec;
      acceptor_->close(ec);
      if (accept_retry_) accept_retry_->cancel();
    });
  }
  for (const auto& s : sessions) s->Close(Status::Aborted("endpoint stopping"));
  {
    MutexLock l(&mu_);
    while (!sessions_.empty()) drained_.Wait();
  }
  work_.reset();
  for (auto& t : threads_) t.join();
}

}  // namespace

Result<std::unique_ptr<Endpoint>> Endpoint::Create(const Options& options, Handler* handler) {
  if (options.secret.empty()) return Status::InvalidArgument("the cluster secret must not be empty");
  if (options.io_threads < 1 || options.io_threads > 64) return Status::InvalidArgument("io_threads must be 1..64");
  if (handler == nullptr) return Status::InvalidArgument("a handler is required");
  if (options.max_frame_payload < kMaxHandshakeFrame) return Status::InvalidArgument("max_frame_payload too small");
  if (options.max_connections < 1) return Status::InvalidArgument("max_connections must be at least 1");
  if (options.max_pending_handshakes < 1) return Status::InvalidArgument("max_pending_handshakes must be at least 1");
  std::unique_ptr<asio::ssl::context> tls;
  if (options.tls.enabled) {
    tls = std::make_unique<asio::ssl::context>(asio::ssl::context::tls);
    boost::system::error_code ec;
    tls->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                         asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 | asio::ssl::context::no_tlsv1_1,
                     ec);
    auto check = [&](const char* what, const std::string& file) -> Status {
      if (!ec) return Status::OK();
      return Status::InvalidArgument(std::string("TLS ") + what + " '" + file + "': " + ec.message());
    };
    tls->use_certificate_chain_file(options.tls.cert_file, ec);
    REPLICA_RETURN_IF_ERROR(check("certificate", options.tls.cert_file));
    tls->use_private_key_file(options.tls.key_file, asio::ssl::context::pem, ec);
    REPLICA_RETURN_IF_ERROR(check("private key", options.tls.key_file));
    tls->load_verify_file(options.tls.ca_file, ec);
    REPLICA_RETURN_IF_ERROR(check("CA file", options.tls.ca_file));
    tls->set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert, ec);
    REPLICA_RETURN_IF_ERROR(check("verify mode", ""));
  }
  return std::unique_ptr<Endpoint>(new EndpointImpl(options, handler, std::move(tls)));
}

}  // namespace replica::transport
