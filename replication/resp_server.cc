#include "replication/resp_server.h"

#include <arpa/inet.h>
#include <fnmatch.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <list>
#include <map>
#include <thread>

#include "base/log.h"
#include "base/mutex.h"
#include "base/thread_name.h"
#include "replication/resp.h"

namespace replica {
namespace {

// Pipelined SETs merged into one write stop at this many key and value bytes.
constexpr size_t kMaxSetBatchBytes = 1 << 20;

using namespace std::chrono_literals;

// Where clients should go: the active's client port when it published one
// (high availability), else its replication address (static mode).
const std::string& MasterAddress(const EngineStatus& s) {
  return s.active_client_address.empty() ? s.active_address : s.active_client_address;
}

std::string Upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return s;
}

bool SendAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

bool ParseInt(const std::string& s, long long* v) {
  if (s.empty()) return false;
  try {
    size_t used = 0;
    *v = std::stoll(s, &used);
    return used == s.size();
  } catch (...) {
    return false;
  }
}

class RespServerImpl final : public RespServer {
 public:
  RespServerImpl(Engine* engine, RespServerOptions o) : engine_(engine), opts_(std::move(o)) {}
  ~RespServerImpl() override { Stop(); }

  Status Listen();
  uint16_t port() const override { return port_; }
  const RespStats& stats() const override { return stats_; }
  void Stop() override;

 private:
  struct Client {
    int fd;
    std::thread thread;
    std::atomic<bool> done{false};
  };
  // Per-connection state kept between commands.
  struct Conn {
    uint64_t last_write_lsn = 0;
    bool quit = false;
    uint64_t id = 0;
  };

  void AcceptLoop();
  void Serve(Client* c);
  void Execute(const std::vector<std::string>& args, Conn* conn, std::string* out);
  void WriteReplyForStatus(const Status& st, std::string* out);
  void Info(const std::vector<std::string>& sections, std::string* out);
  void Role(std::string* out);
  void ReapDone() EXCLUDES(mu_);

  Engine* const engine_;
  const RespServerOptions opts_;
  RespStats stats_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  Mutex mu_;
  std::list<std::unique_ptr<Client>> clients_ GUARDED_BY(mu_);
  // SCAN cursors: a number the client passes back, standing for the last key
  // returned, so the next page starts after it whatever was deleted since.
  // Shared by all connections; the oldest are forgotten past kMaxCursors.
  static constexpr size_t kMaxCursors = 100000;
  Mutex cursor_mu_;
  std::map<uint64_t, std::string> cursors_ GUARDED_BY(cursor_mu_);
  uint64_t next_cursor_ GUARDED_BY(cursor_mu_) = 1;
};

Status RespServerImpl::Listen() {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status::FromErrno("socket", errno);
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(opts_.port);
  if (::inet_pton(AF_INET, opts_.host.c_str(), &a.sin_addr) != 1) {
    return Status::InvalidArgument("client listen address '" + opts_.host + "' is not an IPv4 address");
  }
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_fd_, 512) != 0) {
    return Status::FromErrno("client port " + opts_.host + ":" + std::to_string(opts_.port), errno);
  }
  socklen_t len = sizeof a;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
  port_ = ntohs(a.sin_port);
  acceptor_ = std::thread([this] {
    NameThisThread("resp-accept");
    AcceptLoop();
  });
  return Status::OK();
}

void RespServerImpl::ReapDone() {
  MutexLock l(&mu_);
  for (auto it = clients_.begin(); it != clients_.end();) {
    if ((*it)->done.load()) {
      (*it)->thread.join();
      ::close((*it)->fd);
      it = clients_.erase(it);
    } else {
      ++it;
    }
  }
}

void RespServerImpl::AcceptLoop() {
  while (!stopping_.load()) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (stopping_.load()) return;
      if (errno == EMFILE || errno == ENFILE) {
        std::this_thread::sleep_for(10ms);  // out of descriptors: back off, do not spin
        continue;
      }
      return;
    }
    ReapDone();
    MutexLock l(&mu_);
    if (static_cast<int>(clients_.size()) >= opts_.max_clients) {
      ++stats_.rejected_clients;
      (void)SendAll(fd, "-ERR max number of clients reached\r\n");
      ::close(fd);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ++stats_.connections;
    auto c = std::make_unique<Client>();
    c->fd = fd;
    Client* raw = c.get();
    clients_.push_back(std::move(c));
    raw->thread = std::thread([this, raw] {
      NameThisThread("resp-client");
      Serve(raw);
    });
  }
}

void RespServerImpl::Serve(Client* c) {
  resp::Parser parser(opts_.max_bulk);
  Conn conn;
  conn.id = stats_.connections.load();
  std::vector<std::string> args;
  std::string out, error;
  char buf[64 << 10];
  while (!conn.quit && !stopping_.load()) {
    ssize_t n = ::recv(c->fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    parser.Feed(std::string_view(buf, static_cast<size_t>(n)));
    bool broken = false;
    // Pipelined commands run in order; their replies go out together.
    // Consecutive SETs and MSETs of one pipeline share one write (one WAL
    // record, one commit) instead of waiting for a commit each: each command
    // stays atomic, as part of a larger atomic batch.
    WriteBatch sets;
    size_t set_count = 0, set_bytes = 0;
    auto flush_sets = [&] {
      if (set_count == 0) return;
      auto lsn = engine_->Write(sets);
      std::string reply;
      if (lsn.ok()) {
        resp::AppendSimple(&reply, "OK");
      } else {
        WriteReplyForStatus(lsn.status(), &reply);
      }
      for (size_t i = 0; i < set_count; ++i) out += reply;
      if (lsn.ok()) conn.last_write_lsn = *lsn;
      sets = WriteBatch();
      set_count = set_bytes = 0;
    };
    for (;;) {
      auto outcome = parser.Next(&args, &error);
      if (outcome == resp::Parser::Outcome::kNeedMore) break;
      if (outcome == resp::Parser::Outcome::kError) {
        flush_sets();
        ++stats_.protocol_errors;
        resp::AppendError(&out, "ERR " + error);
        broken = true;
        break;
      }
      ++stats_.commands;
      if (args.size() >= 3 && args.size() % 2 == 1) {
        const std::string name = Upper(args[0]);
        if ((name == "SET" && args.size() == 3) || name == "MSET") {
          for (size_t i = 1; i + 1 < args.size(); i += 2) {
            set_bytes += args[i].size() + args[i + 1].size();
            sets.Put(std::move(args[i]), std::move(args[i + 1]));
          }
          ++set_count;  // one +OK per command
          if (set_bytes >= kMaxSetBatchBytes) flush_sets();
          continue;
        }
      }
      flush_sets();
      Execute(args, &conn, &out);
      if (conn.quit) break;
    }
    flush_sets();
    if (!out.empty() && !SendAll(c->fd, out)) break;
    out.clear();
    if (broken) break;
  }
  ::shutdown(c->fd, SHUT_RDWR);
  c->done.store(true);  // the fd is closed by whoever joins this thread
}

void RespServerImpl::WriteReplyForStatus(const Status& st, std::string* out) {
  if (st.code() == StatusCode::kNotActive) {
    EngineStatus s = engine_->status();
    resp::AppendError(out, "READONLY You can't write against a read only replica. The active is at " +
                               (MasterAddress(s).empty() ? std::string("unknown") : MasterAddress(s)));
  } else {
    resp::AppendError(out, "ERR " + st.ToString());
  }
}

void RespServerImpl::Role(std::string* out) {
  EngineStatus s = engine_->status();
  if (s.role == Role::kActive) {
    resp::AppendArrayHeader(out, 3);
    resp::AppendBulk(out, "master");
    resp::AppendInteger(out, static_cast<long long>(s.last_lsn));
    resp::AppendArrayHeader(out, s.standbys.size());
    for (const auto& sb : s.standbys) {
      auto colon = sb.address.rfind(':');
      resp::AppendArrayHeader(out, 3);
      resp::AppendBulk(out, sb.address.substr(0, colon));
      resp::AppendBulk(out, colon == std::string::npos ? "0" : sb.address.substr(colon + 1));
      resp::AppendBulk(out, std::to_string(sb.flushed_lsn));
    }
  } else {
    const std::string& master = MasterAddress(s);
    auto colon = master.rfind(':');
    resp::AppendArrayHeader(out, 5);
    resp::AppendBulk(out, "slave");
    resp::AppendBulk(out, master.substr(0, colon));
    resp::AppendInteger(out, colon == std::string::npos ? 0 : std::atoi(master.c_str() + colon + 1));
    // As Redis names the link's states: connect (no link), sync (a snapshot
    // is being received), connected (streaming).
    resp::AppendBulk(out, !s.upstream_connected ? "connect" : s.receiving_snapshot ? "sync" : "connected");
    resp::AppendInteger(out, static_cast<long long>(s.applied_lsn));
  }
}

void RespServerImpl::Info(const std::vector<std::string>& sections, std::string* out) {
  EngineStatus s = engine_->status();
  std::string text = "# Replication\r\n";
  if (s.role == Role::kActive) {
    text += "role:master\r\nconnected_slaves:" + std::to_string(s.standbys.size()) + "\r\n";
    for (size_t i = 0; i < s.standbys.size(); ++i) {
      const auto& sb = s.standbys[i];
      auto colon = sb.address.rfind(':');
      text += "slave" + std::to_string(i) + ":ip=" + sb.address.substr(0, colon) +
              ",port=" + (colon == std::string::npos ? "0" : sb.address.substr(colon + 1)) +
              // Redis's states and lag (whole seconds): send_bulk while a
              // snapshot is sent; lag since the standby last held everything.
              ",state=" + (sb.resyncing ? "send_bulk" : "online") + ",offset=" + std::to_string(sb.flushed_lsn) +
              ",lag=" + std::to_string(sb.lag_ms / 1000) + ",name=" + sb.id +
              ",applied=" + std::to_string(sb.applied_lsn) + "\r\n";
    }
    text += "master_repl_offset:" + std::to_string(s.last_lsn) + "\r\n";
  } else {
    const std::string& master = MasterAddress(s);
    auto colon = master.rfind(':');
    text += "role:slave\r\nmaster_host:" + master.substr(0, colon) + "\r\nmaster_port:" +
            (colon == std::string::npos ? "0" : master.substr(colon + 1)) +
            "\r\nmaster_link_status:" + (s.upstream_streaming() ? "up" : "down") +
            "\r\nmaster_sync_in_progress:" + (s.receiving_snapshot ? "1" : "0") +
            "\r\nslave_repl_offset:" + std::to_string(s.applied_lsn) + "\r\nslave_read_only:1\r\n";
  }
  text += "replica_epoch:" + std::to_string(s.epoch) + "\r\nreplica_last_lsn:" + std::to_string(s.last_lsn) +
          "\r\nreplica_durable_lsn:" + std::to_string(s.durable_lsn) + "\r\nreplica_applied_lsn:" +
          std::to_string(s.applied_lsn) + "\r\n";
  // Sections are matched as Redis does, ignoring case; several may be named
  // (Redis 7). Only the replication section exists here.
  bool wanted = sections.empty();
  for (const std::string& section : sections) {
    const std::string name = Upper(section);
    wanted = wanted || name == "REPLICATION" || name == "ALL" || name == "DEFAULT" || name == "EVERYTHING";
  }
  if (!wanted) text.clear();
  resp::AppendBulk(out, text);
}

void RespServerImpl::Execute(const std::vector<std::string>& args, Conn* conn, std::string* out) {
  const std::string cmd = Upper(args[0]);
  const size_t argc = args.size();
  auto arity_error = [&] {
    std::string lower = args[0];
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
    resp::AppendError(out, "ERR wrong number of arguments for '" + lower + "' command");
  };
  auto write = [&](const WriteBatch& b) -> bool {
    auto lsn = engine_->Write(b);
    if (!lsn.ok()) {
      WriteReplyForStatus(lsn.status(), out);
      return false;
    }
    conn->last_write_lsn = *lsn;
    return true;
  };
  if (cmd == "PING") {
    if (argc > 2) return arity_error();
    return argc == 2 ? resp::AppendBulk(out, args[1]) : resp::AppendSimple(out, "PONG");
  }
  if (cmd == "ECHO") {
    if (argc != 2) return arity_error();
    return resp::AppendBulk(out, args[1]);
  }
  if (cmd == "QUIT") {
    conn->quit = true;
    return resp::AppendSimple(out, "OK");
  }
  if (cmd == "GET") {
    if (argc != 2) return arity_error();
    auto v = engine_->Get(args[1]);
    if (!v.ok()) return WriteReplyForStatus(v.status(), out);
    return v->has_value() ? resp::AppendBulk(out, **v) : resp::AppendNull(out);
  }
  if (cmd == "MGET") {
    if (argc < 2) return arity_error();
    // A key that cannot be read is an error for the whole reply, never a
    // null that would read as "no such key".
    std::string values;
    for (size_t i = 1; i < argc; ++i) {
      auto v = engine_->Get(args[i]);
      if (!v.ok()) return WriteReplyForStatus(v.status(), out);
      if (v->has_value()) {
        resp::AppendBulk(&values, **v);
      } else {
        resp::AppendNull(&values);
      }
    }
    resp::AppendArrayHeader(out, argc - 1);
    out->append(values);
    return;
  }
  if (cmd == "SET") {
    if (argc < 3) return arity_error();
    if (argc > 3) return resp::AppendError(out, "ERR syntax error (SET options are not supported)");
    WriteBatch b;
    b.Put(args[1], args[2]);
    if (write(b)) resp::AppendSimple(out, "OK");
    return;
  }
  if (cmd == "MSET") {
    if (argc < 3 || argc % 2 == 0) return arity_error();
    WriteBatch b;
    for (size_t i = 1; i + 1 < argc; i += 2) b.Put(args[i], args[i + 1]);
    if (write(b)) resp::AppendSimple(out, "OK");
    return;
  }
  if (cmd == "DEL" || cmd == "UNLINK") {
    if (argc < 2) return arity_error();
    // The reply counts the keys that existed when the delete was applied,
    // each once, in log order (as Redis counts): of two clients deleting one
    // key at once, exactly one is told 1.
    WriteBatch b;
    for (size_t i = 1; i < argc; ++i) b.Delete(args[i]);
    std::optional<uint64_t> existed;
    auto lsn = engine_->WriteCountingDeletes(b, &existed);
    if (!lsn.ok()) return WriteReplyForStatus(lsn.status(), out);
    conn->last_write_lsn = *lsn;
    if (!existed) {
      return resp::AppendError(out, "ERR the keys were deleted, but how many existed is no longer known "
                                    "(the reply came too long after the delete was applied)");
    }
    resp::AppendInteger(out, static_cast<long long>(*existed));
    return;
  }
  if (cmd == "EXISTS") {
    if (argc < 2) return arity_error();
    long long n = 0;
    for (size_t i = 1; i < argc; ++i) {
      auto v = engine_->Get(args[i]);
      if (!v.ok()) return WriteReplyForStatus(v.status(), out);  // not a silent 0
      if (v->has_value()) ++n;
    }
    return resp::AppendInteger(out, n);
  }
  if (cmd == "STRLEN") {
    if (argc != 2) return arity_error();
    auto v = engine_->Get(args[1]);
    if (!v.ok()) return WriteReplyForStatus(v.status(), out);
    return resp::AppendInteger(out, v->has_value() ? static_cast<long long>((*v)->size()) : 0);
  }
  if (cmd == "TYPE") {  // every value is a string here (tools such as redis-cli --bigkeys ask)
    if (argc != 2) return arity_error();
    auto v = engine_->Get(args[1]);
    if (!v.ok()) return WriteReplyForStatus(v.status(), out);
    return resp::AppendSimple(out, v->has_value() ? "string" : "none");
  }
  if (cmd == "DBSIZE") {
    if (argc != 1) return arity_error();
    long long n = 0;
    std::string from;
    for (;;) {
      auto page = engine_->Scan(from, 10000);
      if (!page.ok()) return WriteReplyForStatus(page.status(), out);
      n += static_cast<long long>(page->size());
      if (page->size() < 10000) break;
      from = page->back().first + '\0';
    }
    return resp::AppendInteger(out, n);
  }
  if (cmd == "SCAN") {
    long long cursor = 0, count = 10;
    std::string match;
    bool strings = true;  // TYPE filter: every value is a string
    if (argc < 2 || !ParseInt(args[1], &cursor) || cursor < 0) return resp::AppendError(out, "ERR invalid cursor");
    for (size_t i = 2; i < argc; i += 2) {
      const std::string opt = Upper(args[i]);
      if (i + 1 >= argc) return resp::AppendError(out, "ERR syntax error");
      if (opt == "COUNT") {
        if (!ParseInt(args[i + 1], &count) || count < 1) return resp::AppendError(out, "ERR value is not an integer or out of range");
      } else if (opt == "MATCH") {
        match = args[i + 1];
      } else if (opt == "TYPE") {
        strings = Upper(args[i + 1]) == "STRING";
      } else {
        return resp::AppendError(out, "ERR syntax error");
      }
    }
    count = std::min<long long>(count, 100000);
    std::string start;
    if (cursor != 0) {
      MutexLock l(&cursor_mu_);
      auto it = cursors_.find(static_cast<uint64_t>(cursor));
      if (it == cursors_.end()) return resp::AppendError(out, "ERR invalid cursor");
      start = it->second + '\0';  // the first key after the last one returned
    }
    auto page = engine_->Scan(start, static_cast<size_t>(count));
    if (!page.ok()) return WriteReplyForStatus(page.status(), out);
    std::vector<std::string> keys;
    for (const auto& kv : *page) {
      if (strings && (match.empty() || ::fnmatch(match.c_str(), kv.first.c_str(), 0) == 0)) keys.push_back(kv.first);
    }
    std::string next = "0";
    if (page->size() == static_cast<size_t>(count)) {
      MutexLock l(&cursor_mu_);
      const uint64_t id = next_cursor_++;
      cursors_[id] = page->back().first;
      while (cursors_.size() > kMaxCursors) cursors_.erase(cursors_.begin());
      next = std::to_string(id);
    }
    resp::AppendArrayHeader(out, 2);
    resp::AppendBulk(out, next);
    resp::AppendArrayHeader(out, keys.size());
    for (const auto& k : keys) resp::AppendBulk(out, k);
    return;
  }
  if (cmd == "WAIT") {
    long long n = 0, timeout = 0;
    if (argc != 3) return arity_error();
    if (!ParseInt(args[1], &n) || !ParseInt(args[2], &timeout) || n < 0 || timeout < 0) {
      return resp::AppendError(out, "ERR value is not an integer or out of range");
    }
    if (engine_->status().role != Role::kActive) {
      return resp::AppendError(out, "ERR WAIT cannot be used with replica instances.");
    }
    // Redis: timeout 0 blocks forever; a day is forever enough here.
    auto ms = std::chrono::milliseconds(timeout == 0 ? 86400000 : timeout);
    auto got = engine_->WaitForReplicas(conn->last_write_lsn, static_cast<int>(n), ms);
    if (!got.ok()) return WriteReplyForStatus(got.status(), out);
    return resp::AppendInteger(out, *got);
  }
  if (cmd == "ROLE") {
    if (argc != 1) return arity_error();
    return Role(out);
  }
  if (cmd == "INFO") return Info(std::vector<std::string>(args.begin() + 1, args.end()), out);
  if (cmd == "SELECT") {
    if (argc != 2) return arity_error();
    return args[1] == "0" ? resp::AppendSimple(out, "OK") : resp::AppendError(out, "ERR DB index is out of range");
  }
  if (cmd == "COMMAND" || cmd == "CONFIG") return resp::AppendArrayHeader(out, 0);
  if (cmd == "CLIENT") {
    if (argc >= 2 && Upper(args[1]) == "ID") return resp::AppendInteger(out, static_cast<long long>(conn->id));
    return resp::AppendSimple(out, "OK");
  }
  std::string first = argc > 1 ? "'" + args[1].substr(0, 64) + "' " : "";
  resp::AppendError(out, "ERR unknown command '" + args[0].substr(0, 64) + "', with args beginning with: " + first);
}

void RespServerImpl::Stop() {
  if (stopping_.exchange(true)) return;
  if (listen_fd_ >= 0) {
    ::shutdown(listen_fd_, SHUT_RDWR);  // wakes accept()
  }
  if (acceptor_.joinable()) acceptor_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  std::list<std::unique_ptr<Client>> clients;
  {
    MutexLock l(&mu_);
    // Only the read side: recv() wakes, while a reply still being sent (say the
    // error of a write the engine aborted) gets out before the thread ends.
    for (auto& c : clients_) ::shutdown(c->fd, SHUT_RD);
    clients = std::move(clients_);
  }
  for (auto& c : clients) {
    c->thread.join();
    ::close(c->fd);
  }
}

}  // namespace

Result<std::unique_ptr<RespServer>> RespServer::Start(Engine* engine, const RespServerOptions& options) {
  auto server = std::make_unique<RespServerImpl>(engine, options);
  REPLICA_RETURN_IF_ERROR(server->Listen());
  return std::unique_ptr<RespServer>(std::move(server));
}

}  // namespace replica
