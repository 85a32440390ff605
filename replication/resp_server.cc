#include "replication/resp_server.h"

#include <algorithm>
#include <array>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <deque>
#include <map>
#include <thread>
#include <unordered_map>

#include "base/host_port.h"
#include "base/log.h"
#include "base/mutex.h"
#include "base/thread_name.h"
#include "replication/resp.h"
#include "replication/resp_commands.h"

namespace replica {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

// Writes merged into one stop at this many bytes: keys and values, and
// kOpBytes more per put or delete (so that a run of DELs of short keys is
// bounded too: each costs the applier a point read).
constexpr size_t kMaxSetBatchBytes = 1 << 20;
// Replies a connection holds before it stops running commands and sends
// them: a client that pipelines without reading cannot grow them without
// bound (one reply, an MGET of large values, can still be larger).
constexpr size_t kMaxPendingReplies = 4u << 20;
constexpr size_t kOpBytes = 16;
// The reply to DEL when the engine no longer knows how many keys existed.
constexpr char kDelCountLost[] =
    "ERR the keys were deleted, but how many existed is no longer known "
    "(the reply came too long after the delete was applied)";
// Each connection reads at most this much at a time; it reads again once the
// replies to what it read are sent (a client that sends and never reads
// stops being read from).
constexpr size_t kReadChunk = 16 << 10;
// Threads that hand merged SETs and DELs to the engine. Two: while one waits
// for its write's commit, the other gathers the next.
constexpr int kSetWriters = 2;
// Idle worker threads kept however long they idle.
constexpr int kKeptIdleWorkers = 2;
// How long Stop lets a connection send its last replies.
constexpr auto kStopGrace = 2s;

class RespServerImpl;
// A put or a delete of a SET, MSET, DEL or UNLINK read but not yet written.
struct WriteOp {
  std::string key;
  std::string value;
  bool is_delete = false;
};
using WriteOps = std::vector<WriteOp>;

// One client connection. Its handlers run on its strand, one at a time, and
// at most one of a read, a send, or a command handed to another thread is
// outstanding at once: the members need no lock. Commands run in the order
// they arrive; one that waits (a write, WAIT, a scan of the store) is handed
// to the server's threads, and the connection reads nothing more until its
// reply is back. Consecutive SETs, MSETs, DELs and UNLINKs are gathered and
// written as one, with those of other connections.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(RespServerImpl* server, tcp::socket socket, uint64_t id, size_t max_bulk)
      : server_(server), socket_(std::move(socket)), parser_(max_bulk) {
    state_.id = id;
  }

  void Start() {
    asio::post(socket_.get_executor(), [self = shared_from_this()] { self->Pump(); });
  }
  // The server's completions of handed-off work; each runs on the strand.
  // `dels`: per command written, how many keys it deletes (0: a SET or
  // MSET); `found`: per delete, in order, whether its key existed (nullopt:
  // not kept).
  void SetsWritten(const Result<uint64_t>& lsn, const std::vector<uint32_t>& dels,
                   const std::optional<std::vector<bool>>& found);
  void CommandDone(std::string reply);
  // Stop: read no more; close once the replies owed are sent.
  void Shutdown();
  // Closes the socket (idempotent); also Stop's, once its grace has run out.
  void Close();

  // Used by the thread that runs the command the connection handed off,
  // while the connection waits for it.
  resp::CommandState* state() { return &state_; }
  // The connection's strand: its completions are posted there.
  tcp::socket::executor_type executor() { return socket_.get_executor(); }

 private:
  void Pump();
  void Read();
  // Hands the gathered writes to the writers; false if there were none.
  bool WriteSets();
  // Runs or hands off one command; false if it was handed off.
  bool Run(std::vector<std::string> args);

  RespServerImpl* const server_;
  tcp::socket socket_;
  resp::Parser parser_;
  resp::CommandState state_;
  std::array<char, kReadChunk> in_;
  std::string out_;           // replies not yet sent, in command order
  std::string closing_reply_; // a protocol error: sent last, then the connection closes
  bool waiting_ = false;      // a command or gathered writes are with another thread
  bool closing_ = false;      // QUIT, a protocol error, or Stop: no more commands
  bool closed_ = false;
  WriteOps sets_;             // SETs, MSETs, DELs and UNLINKs read but not yet handed off
  std::vector<uint32_t> set_dels_;  // per command in sets_: the keys it deletes (0: a SET or MSET)
  size_t set_bytes_ = 0;
  std::vector<std::string> after_sets_;  // the command read after them, run once they are written
  std::vector<std::string> args_;
  std::string error_;
};

class RespServerImpl final : public RespServer {
 public:
  RespServerImpl(Engine* engine, RespServerOptions o)
      : engine_(engine),
        opts_(std::move(o)),
        commands_(engine, &stats_, &opts_),
        work_(asio::make_work_guard(io_)),
        acceptor_(io_),
        conns_cv_(&conns_mu_),
        sets_cv_(&queue_mu_),
        commands_cv_(&queue_mu_) {}
  ~RespServerImpl() override { Stop(); }

  Status Listen();
  uint16_t port() const override { return port_; }
  const RespStats& stats() const override { return stats_; }
  void Stop() override;

  // For connections.
  resp::Commands& commands() { return commands_; }
  RespStats& mutable_stats() { return stats_; }
  bool stopping() const { return stopping_.load(); }
  void QueueSets(std::shared_ptr<Connection> c, WriteOps sets, std::vector<uint32_t> dels, size_t bytes)
      EXCLUDES(queue_mu_);
  void QueueCommand(std::shared_ptr<Connection> c, std::vector<std::string> args) EXCLUDES(queue_mu_);
  void Forget(Connection* c) EXCLUDES(conns_mu_);

 private:
  struct PendingSets {
    std::shared_ptr<Connection> conn;
    WriteOps sets;
    std::vector<uint32_t> dels;  // per command, as Connection::set_dels_
    size_t bytes;  // of keys and values
  };
  struct PendingCommand {
    std::shared_ptr<Connection> conn;
    std::vector<std::string> args;
  };

  void Accept();
  void SetWriterLoop() EXCLUDES(queue_mu_);
  void WorkerLoop(uint64_t id) EXCLUDES(queue_mu_);

  Engine* const engine_;
  const RespServerOptions opts_;
  resp::Commands commands_;
  RespStats stats_;
  std::atomic<bool> stopping_{false};
  uint16_t port_ = 0;

  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  tcp::acceptor acceptor_;  // used on io_thread_ only, once listening
  std::thread io_thread_;

  Mutex conns_mu_;
  CondVar conns_cv_;  // a connection closed (Stop waits for all to close)
  std::unordered_map<Connection*, std::weak_ptr<Connection>> conns_ GUARDED_BY(conns_mu_);

  // Work handed off by connections. Lock order: conns_mu_ is never held
  // while taking queue_mu_, nor the other way round.
  Mutex queue_mu_;
  CondVar sets_cv_;
  CondVar commands_cv_;
  std::deque<PendingSets> sets_queue_ GUARDED_BY(queue_mu_);
  std::deque<PendingCommand> command_queue_ GUARDED_BY(queue_mu_);
  bool queue_closed_ GUARDED_BY(queue_mu_) = false;
  int idle_workers_ GUARDED_BY(queue_mu_) = 0;
  // Threads for waiting commands, started as needed (one per connection
  // at most, since a connection hands off one command at a time) and ended
  // after options.worker_idle_timeout idle; ended ones wait to be joined.
  std::map<uint64_t, std::thread> workers_ GUARDED_BY(queue_mu_);
  std::vector<std::thread> ended_workers_ GUARDED_BY(queue_mu_);
  uint64_t next_worker_ GUARDED_BY(queue_mu_) = 0;
  std::vector<std::thread> set_writers_;
};

// --- Connection ---

void Connection::Pump() {
  if (closed_ || waiting_) return;
  for (;;) {
    if (!after_sets_.empty()) {
      std::vector<std::string> next = std::move(after_sets_);
      after_sets_.clear();
      if (!Run(std::move(next))) return;
      continue;
    }
    if (closing_ || server_->stopping()) {
      if (WriteSets()) return;  // writes read before Stop are written (or refused), and answered
      break;
    }
    if (out_.size() >= kMaxPendingReplies) {
      if (WriteSets()) return;  // their replies come before anything is sent
      break;                    // send what is pending; Pump runs again once it is sent
    }
    auto outcome = parser_.Next(&args_, &error_);
    if (outcome == resp::Parser::Outcome::kNeedMore) {
      if (WriteSets()) return;  // their replies come before anything is sent
      break;
    }
    if (outcome == resp::Parser::Outcome::kError) {
      ++server_->mutable_stats().protocol_errors;
      resp::AppendError(&closing_reply_, "ERR " + error_);
      closing_ = true;
      if (WriteSets()) return;
      break;
    }
    ++server_->mutable_stats().commands;
    if (resp::Commands::IsPlainSet(args_)) {
      for (size_t i = 1; i + 1 < args_.size(); i += 2) {
        set_bytes_ += kOpBytes + args_[i].size() + args_[i + 1].size();
        sets_.push_back({std::move(args_[i]), std::move(args_[i + 1]), false});
      }
      set_dels_.push_back(0);  // one +OK per command
      if (set_bytes_ >= kMaxSetBatchBytes && WriteSets()) return;
      continue;
    }
    if (resp::Commands::IsPlainDel(args_)) {
      for (size_t i = 1; i < args_.size(); ++i) {
        set_bytes_ += kOpBytes + args_[i].size();
        sets_.push_back({std::move(args_[i]), std::string(), true});
      }
      set_dels_.push_back(static_cast<uint32_t>(args_.size() - 1));  // one count per command
      if (set_bytes_ >= kMaxSetBatchBytes && WriteSets()) return;
      continue;
    }
    if (!set_dels_.empty()) {  // any other command ends the run of writes
      after_sets_ = std::move(args_);
      WriteSets();
      return;
    }
    if (!Run(std::move(args_))) return;
  }
  out_ += closing_reply_;
  closing_reply_.clear();
  if (!out_.empty()) {
    asio::async_write(socket_, asio::buffer(out_), [self = shared_from_this()](boost::system::error_code ec, size_t) {
      self->out_.clear();
      if (self->out_.capacity() > kMaxPendingReplies) std::string().swap(self->out_);  // after a large reply
      if (ec) return self->Close();
      self->Pump();
    });
    return;
  }
  if (closing_ || server_->stopping()) return Close();
  Read();
}

void Connection::Read() {
  socket_.async_read_some(asio::buffer(in_), [self = shared_from_this()](boost::system::error_code ec, size_t n) {
    if (ec) return self->Close();  // the client left, or Stop
    self->parser_.Feed(std::string_view(self->in_.data(), n));
    self->Pump();
  });
}

bool Connection::WriteSets() {
  if (set_dels_.empty()) return false;
  waiting_ = true;
  server_->QueueSets(shared_from_this(), std::move(sets_), std::move(set_dels_), set_bytes_);
  sets_.clear();
  set_dels_.clear();
  set_bytes_ = 0;
  return true;
}

bool Connection::Run(std::vector<std::string> args) {
  const std::string name = resp::Upper(args[0]);
  if (resp::Commands::MayBlock(name)) {
    waiting_ = true;
    server_->QueueCommand(shared_from_this(), std::move(args));
    return false;
  }
  server_->commands().Execute(args, &state_, &out_);
  if (state_.quit) closing_ = true;
  return true;
}

void Connection::SetsWritten(const Result<uint64_t>& lsn, const std::vector<uint32_t>& dels,
                             const std::optional<std::vector<bool>>& found) {
  waiting_ = false;
  if (!lsn.ok()) {
    std::string reply;
    server_->commands().AppendStatusError(lsn.status(), &reply);
    for (size_t i = 0; i < dels.size(); ++i) out_ += reply;
    return Pump();
  }
  state_.last_write_lsn = *lsn;
  size_t next = 0;  // in *found
  for (const uint32_t n : dels) {
    if (n == 0) {
      resp::AppendSimple(&out_, "OK");
    } else if (!found || found->size() < next + n) {
      resp::AppendError(&out_, kDelCountLost);
    } else {
      // A key named twice is found once: the second delete finds it gone.
      resp::AppendInteger(&out_, std::count(found->begin() + next, found->begin() + next + n, true));
    }
    next += n;
  }
  Pump();
}

void Connection::CommandDone(std::string reply) {
  waiting_ = false;
  out_ += reply;
  if (state_.quit) closing_ = true;
  Pump();
}

void Connection::Shutdown() {
  // Wakes a pending read (it ends with an error and closes); a connection
  // that is sending or waiting closes when that is done (Pump sees stopping).
  boost::system::error_code ignored;
  socket_.shutdown(tcp::socket::shutdown_receive, ignored);
}

void Connection::Close() {
  if (closed_) return;
  closed_ = true;
  boost::system::error_code ignored;
  socket_.shutdown(tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
  server_->Forget(this);
}

// --- RespServerImpl ---

Status RespServerImpl::Listen() {
  boost::system::error_code ec;
  auto resolved = ResolveHost(opts_.host, /*passive=*/true);
  if (!resolved.ok()) return resolved.status().WithContext("client listen address");
  auto address = asio::ip::make_address(resolved->front(), ec);
  if (ec) return Status::InvalidArgument("client listen address '" + opts_.host + "': " + ec.message());
  const tcp::endpoint endpoint(address, opts_.port);
  const std::string where = "client port " + opts_.host + ":" + std::to_string(opts_.port);
  if (acceptor_.open(endpoint.protocol(), ec); ec) return Status::IOError(where + ": " + ec.message());
  acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (acceptor_.bind(endpoint, ec); ec) return Status::IOError(where + ": " + ec.message());
  if (acceptor_.listen(512, ec); ec) return Status::IOError(where + ": " + ec.message());
  port_ = acceptor_.local_endpoint(ec).port();
  commands_.set_port(port_);
  for (int i = 0; i < kSetWriters; ++i) {
    set_writers_.push_back(NamedThread("resp-writer", [this] { SetWriterLoop(); }));
  }
  Accept();
  io_thread_ = NamedThread("resp-io", [this] { io_.run(); });
  return Status::OK();
}

void RespServerImpl::Accept() {
  acceptor_.async_accept(asio::make_strand(io_), [this](boost::system::error_code ec, tcp::socket socket) {
    if (stopping_.load() || !acceptor_.is_open()) return;
    if (ec) {
      // Out of descriptors and the like: try again shortly, do not spin.
      auto timer = std::make_shared<asio::steady_timer>(io_, 10ms);
      timer->async_wait([this, timer](boost::system::error_code) {
        if (!stopping_.load()) Accept();
      });
      return;
    }
    boost::system::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);  // replies go out at once, not after the client's ACK
    std::shared_ptr<Connection> conn;
    {
      MutexLock l(&conns_mu_);
      if (static_cast<int>(conns_.size()) < opts_.max_clients) {
        const uint64_t id = ++stats_.connections;
        ++stats_.connected;
        conn = std::make_shared<Connection>(this, std::move(socket), id, opts_.max_bulk);
        conns_.emplace(conn.get(), conn);
      }
    }
    if (conn) {
      conn->Start();
    } else {
      ++stats_.rejected_clients;
      socket.non_blocking(true, ignored);  // the error is small; never wait on this client
      asio::write(socket, asio::buffer(std::string_view("-ERR max number of clients reached\r\n")), ignored);
      socket.close(ignored);
    }
    Accept();
  });
}

void RespServerImpl::Forget(Connection* c) {
  MutexLock l(&conns_mu_);
  if (conns_.erase(c) > 0) --stats_.connected;
  if (conns_.empty()) conns_cv_.SignalAll();
}

void RespServerImpl::QueueSets(std::shared_ptr<Connection> c, WriteOps sets, std::vector<uint32_t> dels,
                               size_t bytes) {
  {
    MutexLock l(&queue_mu_);
    if (!queue_closed_) {
      sets_queue_.push_back({std::move(c), std::move(sets), std::move(dels), bytes});
      sets_cv_.Signal();
      return;
    }
  }
  asio::post(c->executor(), [c, dels = std::move(dels)] {
    c->SetsWritten(Status::Aborted("the server is stopping"), dels, std::nullopt);
  });
}

void RespServerImpl::QueueCommand(std::shared_ptr<Connection> c, std::vector<std::string> args) {
  {
    MutexLock l(&queue_mu_);
    if (!queue_closed_) {
      command_queue_.push_back({std::move(c), std::move(args)});
      // Every queued command needs a worker of its own: one that waits (a
      // WAIT for a day) must not hold up another connection's command.
      if (command_queue_.size() > static_cast<size_t>(idle_workers_)) {
        for (auto& t : ended_workers_) t.join();  // they hold no lock: they are returning
        ended_workers_.clear();
        const uint64_t id = next_worker_++;
        workers_.emplace(id, NamedThread("resp-worker", [this, id] { WorkerLoop(id); }));
      } else {
        commands_cv_.Signal();
      }
      return;
    }
  }
  std::string reply;
  resp::AppendError(&reply, "ERR the server is stopping");
  asio::post(c->executor(), [c, reply] { c->CommandDone(reply); });
}

void RespServerImpl::SetWriterLoop() {
  for (;;) {
    std::vector<PendingSets> taken;
    {
      MutexLock l(&queue_mu_);
      while (sets_queue_.empty() && !queue_closed_) sets_cv_.Wait();
      if (sets_queue_.empty()) return;  // closed and drained
      // Everything queued, up to the batch limit: one write, one commit. A
      // SET past the limit goes alone, so that one too large for the log
      // fails alone, not the others' SETs that would share its record.
      size_t bytes = 0;
      while (!sets_queue_.empty() && (taken.empty() || bytes + sets_queue_.front().bytes <= kMaxSetBatchBytes)) {
        bytes += sets_queue_.front().bytes;
        taken.push_back(std::move(sets_queue_.front()));
        sets_queue_.pop_front();
      }
    }
    WriteBatch batch;
    bool deletes = false;
    for (auto& p : taken) {
      for (auto& op : p.sets) {
        if (op.is_delete) {
          batch.Delete(std::move(op.key));
          deletes = true;
        } else {
          batch.Put(std::move(op.key), std::move(op.value));
        }
      }
    }
    std::optional<std::vector<bool>> found;
    const Result<uint64_t> lsn = deletes ? engine_->WriteReportingDeletes(batch, &found) : engine_->Write(batch);
    size_t next = 0;  // each connection's deletes, in batch order
    for (auto& p : taken) {
      size_t n = 0;
      for (const uint32_t d : p.dels) n += d;
      std::optional<std::vector<bool>> mine;
      if (n == 0) {
        mine.emplace();
      } else if (found && found->size() >= next + n) {
        mine.emplace(found->begin() + next, found->begin() + next + n);
      }
      next += n;
      Connection* conn = p.conn.get();
      asio::post(conn->executor(), [c = std::move(p.conn), lsn, dels = std::move(p.dels), mine = std::move(mine)] {
        c->SetsWritten(lsn, dels, mine);
      });
    }
  }
}

void RespServerImpl::WorkerLoop(uint64_t id) {
  for (;;) {
    PendingCommand job;
    {
      MutexLock l(&queue_mu_);
      ++idle_workers_;
      auto idle_until = std::chrono::steady_clock::now() + opts_.worker_idle_timeout;
      while (command_queue_.empty() && !queue_closed_) {
        if (commands_cv_.WaitUntil(idle_until) || std::chrono::steady_clock::now() < idle_until) continue;
        if (idle_workers_ > kKeptIdleWorkers) {
          // Idle too long, and others are left: end, to be joined by the
          // next worker started or by Stop.
          --idle_workers_;
          auto self = workers_.find(id);
          ended_workers_.push_back(std::move(self->second));
          workers_.erase(self);
          return;
        }
        idle_until = std::chrono::steady_clock::now() + opts_.worker_idle_timeout;
      }
      --idle_workers_;
      if (command_queue_.empty()) return;
      job = std::move(command_queue_.front());
      command_queue_.pop_front();
    }
    std::string reply;
    commands_.Execute(job.args, job.conn->state(), &reply);
    Connection* conn = job.conn.get();
    asio::post(conn->executor(), [c = std::move(job.conn), r = std::move(reply)]() mutable {
      c->CommandDone(std::move(r));
    });
  }
}

void RespServerImpl::Stop() {
  if (stopping_.exchange(true)) return;
  if (!io_thread_.joinable()) return;  // never listened (nor started a thread)
  asio::post(io_, [this] {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
  });
  std::vector<std::shared_ptr<Connection>> conns;
  {
    MutexLock l(&conns_mu_);
    for (auto& [_, weak] : conns_) {
      if (auto c = weak.lock()) conns.push_back(std::move(c));
    }
  }
  for (auto& c : conns) asio::post(c->executor(), [c] { c->Shutdown(); });
  // Writes and waiting commands under way finish (the engine's Interrupt
  // makes them quick); their replies are sent, then the connections close.
  std::vector<std::thread> workers;
  {
    MutexLock l(&queue_mu_);
    queue_closed_ = true;
    sets_cv_.SignalAll();
    commands_cv_.SignalAll();
    for (auto& [_, t] : workers_) workers.push_back(std::move(t));
    for (auto& t : ended_workers_) workers.push_back(std::move(t));
    workers_.clear();
    ended_workers_.clear();
  }
  for (auto& t : set_writers_) t.join();
  for (auto& t : workers) t.join();
  // The connections close once their last replies are sent; a client that
  // reads none of them is cut off after the grace.
  auto all_closed = [this](std::chrono::steady_clock::time_point deadline) {
    MutexLock l(&conns_mu_);
    while (!conns_.empty()) {
      if (!conns_cv_.WaitUntil(deadline) && std::chrono::steady_clock::now() >= deadline) return false;
    }
    return true;
  };
  if (!all_closed(std::chrono::steady_clock::now() + kStopGrace)) {
    for (auto& c : conns) asio::post(c->executor(), [c] { c->Close(); });
    if (!all_closed(std::chrono::steady_clock::now() + kStopGrace)) {
      RLOG(kWarn, "resp.stop") << "client connections still open after the grace; dropping them";
    }
  }
  conns.clear();
  work_.reset();
  io_.stop();
  io_thread_.join();
}

}  // namespace

Result<std::unique_ptr<RespServer>> RespServer::Start(Engine* engine, const RespServerOptions& options) {
  auto server = std::make_unique<RespServerImpl>(engine, options);
  REPLICA_RETURN_IF_ERROR(server->Listen());
  return std::unique_ptr<RespServer>(std::move(server));
}

}  // namespace replica
