// Client: RESP to the active's client port, the active found through etcd.
#include "replica/client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>

#include "base/host_port.h"
#include "base/mutex.h"
#include "replication/arbiter.h"
#include "replication/etcd.h"

namespace replica {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kReadRecheck = std::chrono::seconds(1);

struct Reply {
  char type = 0;  // '+', '-', ':', '$' (null: is_null), '*'
  std::string text;
  long long integer = 0;
  bool is_null = false;
};

class ClientImpl final : public Client {
 public:
  explicit ClientImpl(const ClientOptions& o) : opts_(o) {}
  ~ClientImpl() override {
    MutexLock l(&mu_);
    Disconnect();
  }

  Status Init() {
    if (opts_.etcd.empty()) return Status::InvalidArgument("ClientOptions::etcd is empty: the client finds the active through etcd");
    std::string joined;
    for (const auto& e : opts_.etcd) joined += (joined.empty() ? "" : ",") + e;
    REPLICA_ASSIGN_OR_RETURN(auto endpoints, etcd::ParseEndpoints(joined));
    EtcdArbiterOptions ao;
    ao.endpoints = endpoints;
    ao.cluster = opts_.cluster;
    ao.request_timeout = std::min<std::chrono::milliseconds>(opts_.io_timeout, std::chrono::milliseconds(1000));
    REPLICA_ASSIGN_OR_RETURN(arbiter_, NewEtcdArbiter(ao));
    return Status::OK();
  }

  Status Set(const std::string& key, const std::string& value) override {
    REPLICA_ASSIGN_OR_RETURN(Reply r, Call({"SET", key, value}));
    if (r.type == '+' && r.text == "OK") return Status::OK();
    return Status::Corruption("unexpected reply to SET from " + active());
  }

  Result<bool> Del(const std::string& key) override {
    REPLICA_ASSIGN_OR_RETURN(Reply r, Call({"DEL", key}));
    if (r.type == ':') return r.integer > 0;
    return Status::Corruption("unexpected reply to DEL from " + active());
  }

  Result<std::optional<std::string>> Get(const std::string& key) override {
    // To the active too, so that a client reads its own writes.
    REPLICA_ASSIGN_OR_RETURN(Reply r, Call({"GET", key}, /*read=*/true));
    if (r.type == '$') return r.is_null ? std::nullopt : std::optional<std::string>(r.text);
    return Status::Corruption("unexpected reply to GET from " + active());
  }

  std::string active() const override {
    MutexLock l(&mu_);
    return target_;
  }
  uint64_t moves() const override { return moves_.load(); }

 private:
  // Sends one command to the active, moving to another node and retrying as
  // the header describes.
  Result<Reply> Call(const std::vector<std::string>& args, bool read = false) {
    std::string req = "*" + std::to_string(args.size()) + "\r\n";
    for (const auto& a : args) req += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
    MutexLock l(&mu_);
    const auto deadline = Clock::now() + opts_.timeout;
    std::string last_error = "no attempt made";
    auto backoff = std::chrono::milliseconds(20);
    // A standby serves reads too: a client that only reads would not notice
    // that its node was demoted, so reads check etcd once a second.
    if (read && Clock::now() - looked_up_ > kReadRecheck) needs_lookup_ = true;
    bool redirected = false;
    for (;;) {
      if (target_.empty() || needs_lookup_) {
        auto found = LookUp();
        looked_up_ = Clock::now();  // asked, answered or not: reads do not queue up behind a dead etcd
        if (found.ok()) {
          Retarget(*found);
        } else {
          last_error = found.status().ToString();
        }
        needs_lookup_ = false;
      }
      if (!target_.empty()) {
        auto reply = Exchange(req, deadline);
        if (reply.ok() && reply->type == '-' && reply->text.rfind("READONLY", 0) == 0) {
          // A standby, or an active that stopped accepting writes: it names
          // the active it knows; otherwise ask etcd.
          last_error = target_ + ": " + reply->text;
          const auto at = reply->text.rfind("The active is at ");
          const std::string hint = at == std::string::npos ? "" : reply->text.substr(at + 17);
          if (!hint.empty() && hint != "unknown" && hint != target_ && !redirected) {
            Retarget(hint);
            redirected = true;  // once at once; after that with a pause (two nodes may name each other)
            continue;
          }
          needs_lookup_ = true;
        } else if (reply.ok() && reply->type == '-') {
          Status err = ServerError(target_, reply->text);
          if (!err.IsAborted()) return err;
          // The node is shutting down (a planned restart, or a demotion
          // under way): ask etcd again, like for a standby's READONLY.
          last_error = err.ToString();
          Disconnect();
          needs_lookup_ = true;
        } else if (reply.ok()) {
          return std::move(reply).value();
        } else {
          last_error = reply.status().ToString();
          Disconnect();
          needs_lookup_ = true;
        }
      }
      const auto now = Clock::now();
      if (now >= deadline) {
        return Status::TimedOut("no active accepted the request within " + std::to_string(opts_.timeout.count()) +
                                " ms; last: " + last_error);
      }
      // Roles change in other processes; etcd is asked again after a pause.
      mu_.Unlock();
      std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - now));
      mu_.Lock();
      backoff = std::min(backoff * 2, std::chrono::milliseconds(200));
    }
  }

  // A server's error reply as a Status: replicad answers an engine error as
  // "ERR Code: message" (IOError for a full disk, Aborted for a node shutting
  // down, ...), whose code is kept; any other error (arity, syntax, an
  // unknown command) is the request's own: InvalidArgument.
  static Status ServerError(const std::string& target, const std::string& text) {
    std::string_view rest = text;
    if (rest.rfind("ERR ", 0) == 0) rest.remove_prefix(4);
    for (int c = 1; c <= static_cast<int>(StatusCode::kTooStale); ++c) {
      const auto code = static_cast<StatusCode>(c);
      const std::string_view name = StatusCodeName(code);
      if (rest.substr(0, name.size()) == name && rest.substr(name.size(), 2) == ": ") {
        return Status::FromCode(code, target + ": " + text);
      }
    }
    return Status::InvalidArgument(target + ": " + text);
  }

  // The active's client address, from etcd.
  Result<std::string> LookUp() REQUIRES(mu_) {
    REPLICA_ASSIGN_OR_RETURN(auto active, arbiter_->GetActive());
    if (!active) return Status::NotActive("cluster '" + opts_.cluster + "' has no active now (an election may be under way)");
    REPLICA_ASSIGN_OR_RETURN(auto nodes, arbiter_->GetNodes());
    for (const auto& n : nodes) {
      if (n.id != active->id) continue;
      if (n.client_address.empty()) return Status::NotFound("the active " + n.id + " has published no client address");
      return n.client_address;
    }
    return Status::NotFound("the active " + active->id + " has no session (it may just have died)");
  }

  void Retarget(const std::string& address) REQUIRES(mu_) {
    if (address == target_) return;
    if (!target_.empty()) moves_++;
    Disconnect();
    target_ = address;
  }

  void Disconnect() REQUIRES(mu_) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    in_.clear();
  }

  // Sends req and reads one reply, connecting first if needed.
  Result<Reply> Exchange(const std::string& req, Clock::time_point deadline) REQUIRES(mu_) {
    const auto io_deadline = std::min(deadline, Clock::now() + opts_.io_timeout);
    if (fd_ < 0) REPLICA_RETURN_IF_ERROR(Connect(io_deadline));
    size_t sent = 0;
    while (sent < req.size()) {
      REPLICA_RETURN_IF_ERROR(WaitFd(POLLOUT, io_deadline));
      ssize_t n = ::send(fd_, req.data() + sent, req.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) return Status::FromErrno(target_ + ": send", errno);
      sent += static_cast<size_t>(n);
    }
    Reply r;
    auto line = ReadLine(io_deadline);
    if (!line.ok()) return line.status();
    if (line->empty()) return Status::Corruption(target_ + ": an empty reply line");
    r.type = line->front();
    r.text = line->substr(1);
    switch (r.type) {
      case '+':
      case '-':
        return r;
      case ':':
        r.integer = std::strtoll(r.text.c_str(), nullptr, 10);
        return r;
      case '$': {
        const long long len = std::strtoll(r.text.c_str(), nullptr, 10);
        if (len < 0) {
          r.is_null = true;
          r.text.clear();
          return r;
        }
        if (len > (512ll << 20)) return Status::Corruption(target_ + ": a bulk reply of " + r.text + " bytes");
        REPLICA_ASSIGN_OR_RETURN(r.text, ReadBytes(static_cast<size_t>(len) + 2, io_deadline));
        r.text.resize(static_cast<size_t>(len));
        return r;
      }
      default:
        return Status::Corruption(target_ + ": a reply of unexpected type '" + std::string(1, r.type) + "'");
    }
  }

  Status Connect(Clock::time_point deadline) REQUIRES(mu_) {
    auto hp = ParseHostPort(target_);
    if (!hp.ok()) return hp.status().WithContext("client address");
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    const std::string host = hp->host, port = std::to_string(hp->port);
    if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0) {
      return Status::IOError("resolve " + target_ + ": " + ::gai_strerror(rc));
    }
    std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, &::freeaddrinfo);
    // Each address of the name in turn (localhost is ::1, then 127.0.0.1,
    // where a node may listen on the second only), within the one deadline.
    Status st;
    for (const addrinfo* a = res; a != nullptr; a = a->ai_next) {
      st = ConnectTo(a, deadline);
      if (st.ok() || st.code() == StatusCode::kTimedOut) return st;
    }
    return st;
  }

  Status ConnectTo(const addrinfo* a, Clock::time_point deadline) REQUIRES(mu_) {
    fd_ = ::socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd_ < 0) return Status::FromErrno("socket", errno);
    int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (::connect(fd_, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      Status st = Status::FromErrno("connect to " + target_, errno);
      Disconnect();
      return st;
    }
    Status st = WaitFd(POLLOUT, deadline);
    int err = 0;
    socklen_t len = sizeof err;
    if (st.ok() && ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0) {
      st = Status::FromErrno("connect to " + target_, err);
    }
    if (!st.ok()) Disconnect();
    return st;
  }

  Status WaitFd(short events, Clock::time_point deadline) REQUIRES(mu_) {
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return Status::TimedOut(target_ + ": no answer within " + std::to_string(opts_.io_timeout.count()) + " ms");
      pollfd p{fd_, events, 0};
      int rc = ::poll(&p, 1, static_cast<int>(left));
      if (rc > 0) return Status::OK();
      if (rc < 0 && errno != EINTR) return Status::FromErrno("poll", errno);
    }
  }

  Status Fill(Clock::time_point deadline) REQUIRES(mu_) {
    REPLICA_RETURN_IF_ERROR(WaitFd(POLLIN, deadline));
    char buf[16384];
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return Status::OK();
    if (n < 0) return Status::FromErrno(target_ + ": receive", errno);
    if (n == 0) return Status::Aborted(target_ + ": the node closed the connection");
    in_.append(buf, static_cast<size_t>(n));
    return Status::OK();
  }

  Result<std::string> ReadLine(Clock::time_point deadline) REQUIRES(mu_) {
    for (;;) {
      const auto end = in_.find("\r\n");
      if (end != std::string::npos) {
        std::string line = in_.substr(0, end);
        in_.erase(0, end + 2);
        return line;
      }
      if (in_.size() > (64u << 10)) return Status::Corruption(target_ + ": a reply line over 64 KiB");
      REPLICA_RETURN_IF_ERROR(Fill(deadline));
    }
  }

  Result<std::string> ReadBytes(size_t n, Clock::time_point deadline) REQUIRES(mu_) {
    while (in_.size() < n) REPLICA_RETURN_IF_ERROR(Fill(deadline));
    std::string out = in_.substr(0, n);
    in_.erase(0, n);
    return out;
  }

  const ClientOptions opts_;
  std::unique_ptr<Arbiter> arbiter_;
  mutable Mutex mu_;
  std::string target_ GUARDED_BY(mu_);  // the active's client address, as last known
  bool needs_lookup_ GUARDED_BY(mu_) = false;
  Clock::time_point looked_up_ GUARDED_BY(mu_);  // the last answer from etcd
  int fd_ GUARDED_BY(mu_) = -1;
  std::string in_ GUARDED_BY(mu_);  // received, not yet parsed
  std::atomic<uint64_t> moves_{0};
};

}  // namespace

Result<std::unique_ptr<Client>> Client::Open(const ClientOptions& options) {
  auto c = std::make_unique<ClientImpl>(options);
  REPLICA_RETURN_IF_ERROR(c->Init());
  return std::unique_ptr<Client>(std::move(c));
}

}  // namespace replica
