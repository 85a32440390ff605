#include "replication/etcd.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>
#include <future>

#include "base/host_port.h"
#include "base/log.h"

namespace replica::etcd {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;

constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string Base64(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += kB64[v & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

Result<std::string> Unbase64(std::string_view in) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=') break;
    int v = val(c);
    if (v < 0) return Status::Corruption("etcd: bad base64 in a response");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  return out;
}

// 64-bit integers come as strings (or, rarely, numbers); absent means 0.
int64_t Int(const json::object& o, const char* field) {
  auto it = o.find(field);
  if (it == o.end()) return 0;
  if (it->value().is_string()) {
    try {
      return std::stoll(std::string(it->value().as_string()));
    } catch (...) {
      return 0;
    }
  }
  if (it->value().is_int64()) return it->value().as_int64();
  if (it->value().is_uint64()) return static_cast<int64_t>(it->value().as_uint64());
  return 0;
}

std::string Str(const json::object& o, const char* field) {
  auto it = o.find(field);
  if (it == o.end() || !it->value().is_string()) return {};
  return std::string(it->value().as_string());
}

Result<json::object> ParseObject(std::string_view text) {
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) return Status::Corruption("etcd: response is not a JSON object: " + std::string(text.substr(0, 200)));
  return std::move(v.as_object());
}

Result<KeyValue> ParseKv(const json::object& o) {
  KeyValue kv;
  REPLICA_ASSIGN_OR_RETURN(kv.key, Unbase64(Str(o, "key")));
  REPLICA_ASSIGN_OR_RETURN(kv.value, Unbase64(Str(o, "value")));
  kv.create_revision = Int(o, "create_revision");
  kv.mod_revision = Int(o, "mod_revision");
  kv.version = Int(o, "version");
  kv.lease = Int(o, "lease");
  return kv;
}

Result<std::vector<KeyValue>> ParseKvs(const json::object& o) {
  std::vector<KeyValue> out;
  auto it = o.find("kvs");
  if (it == o.end()) return out;
  if (!it->value().is_array()) return Status::Corruption("etcd: kvs is not an array");
  for (const auto& e : it->value().as_array()) {
    if (!e.is_object()) return Status::Corruption("etcd: a kv is not an object");
    REPLICA_ASSIGN_OR_RETURN(KeyValue kv, ParseKv(e.as_object()));
    out.push_back(std::move(kv));
  }
  return out;
}

int64_t HeaderRevision(const json::object& o) {
  auto it = o.find("header");
  if (it == o.end() || !it->value().is_object()) return 0;
  return Int(it->value().as_object(), "revision");
}


json::object OpJson(const Op& op) {
  json::object o;
  if (op.kind == Op::Kind::kPut) {
    json::object p{{"key", Base64(op.key)}, {"value", Base64(op.value)}};
    if (op.lease != 0) p["lease"] = std::to_string(op.lease);
    o["request_put"] = std::move(p);
  } else if (op.kind == Op::Kind::kDelete) {
    o["request_delete_range"] = json::object{{"key", Base64(op.key)}};
  } else {
    o["request_range"] = json::object{{"key", Base64(op.key)}};
  }
  return o;
}

}  // namespace

std::string PrefixEnd(const std::string& prefix) {
  std::string end = prefix;
  while (!end.empty()) {
    if (static_cast<uint8_t>(end.back()) < 0xff) {
      end.back() = static_cast<char>(static_cast<uint8_t>(end.back()) + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key
}

Result<std::vector<std::string>> ParseEndpoints(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= list.size()) {
    size_t comma = list.find(',', start);
    std::string ep = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (ep.rfind("http://", 0) == 0) ep = ep.substr(7);
    if (ep.rfind("https://", 0) == 0) return Status::InvalidArgument("etcd endpoint '" + ep + "': https is not supported");
    while (!ep.empty() && ep.back() == '/') ep.pop_back();
    auto hp = ParseHostPort(ep);
    if (!hp.ok() || hp->port == 0) {
      return Status::InvalidArgument("etcd endpoint '" + ep + "': expected HOST:PORT or http://HOST:PORT" +
                                     (hp.ok() ? ", port 1..65535" : ", " + hp.status().message()));
    }
    out.push_back(ep);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (out.empty()) return Status::InvalidArgument("no etcd endpoint given");
  return out;
}

struct Client::Conn {
  asio::io_context ioc;
  beast::tcp_stream stream{ioc};
  beast::flat_buffer buffer;
  std::string endpoint;
  bool open = false;
  void Close() {
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream.close();
    buffer.clear();
    open = false;
  }
};

namespace {

// Runs one asynchronous operation to completion on ioc. Beast's stream
// timeouts apply to asynchronous operations only, so every blocking step of
// this client is an async one run here: a member that accepts the connection
// and then says nothing (a paused etcd) fails the request after `timeout`.
template <typename Start>
beast::error_code RunOp(asio::io_context& ioc, beast::tcp_stream& stream, std::chrono::milliseconds timeout,
                        Start start) {
  beast::error_code result = asio::error::would_block;
  if (timeout.count() > 0) {
    stream.expires_after(timeout);
  } else {
    stream.expires_never();
  }
  start([&result](beast::error_code ec, auto&&...) { result = ec; });
  ioc.restart();
  ioc.run();
  return result;
}

// Connects (resolving the host) within the timeout.
beast::error_code ConnectTo(asio::io_context& ioc, beast::tcp_stream& stream, const std::string& endpoint,
                            std::chrono::milliseconds timeout) {
  auto hp = ParseHostPort(endpoint);  // checked by ParseEndpoints
  tcp::resolver resolver(ioc);
  beast::error_code ec;
  auto results = resolver.resolve(hp.ok() ? hp->host : endpoint, hp.ok() ? std::to_string(hp->port) : "0", ec);
  if (ec) return ec;
  return RunOp(ioc, stream, timeout, [&](auto handler) { stream.async_connect(results, std::move(handler)); });
}

}  // namespace

Client::Client(const Options& options) : options_(options) {}
Client::~Client() = default;

Result<std::unique_ptr<Client>> Client::Create(const Options& options) {
  if (options.endpoints.empty()) return Status::InvalidArgument("no etcd endpoint given");
  std::unique_ptr<Client> c(new Client(options));
  for (const auto& ep : options.endpoints) {
    REPLICA_ASSIGN_OR_RETURN(auto parsed, ParseEndpoints(ep));
    c->endpoints_.insert(c->endpoints_.end(), parsed.begin(), parsed.end());
  }
  return c;
}

Result<std::string> Client::Post(const std::string& path, const std::string& body) {
  MutexLock l(&mu_);
  std::string errors;
  for (size_t attempt = 0; attempt < endpoints_.size(); ++attempt) {
    const size_t idx = (current_ + attempt) % endpoints_.size();
    const std::string& ep = endpoints_[idx];
    if (!conn_ || conn_->endpoint != ep) {
      conn_ = std::make_unique<Conn>();
      conn_->endpoint = ep;
    }
    Conn& c = *conn_;
    beast::error_code ec;
    if (!c.open) {
      ec = ConnectTo(c.ioc, c.stream, ep, options_.timeout);
      if (!ec) c.open = true;
    }
    http::response<http::string_body> res;
    if (!ec) {
      http::request<http::string_body> req{http::verb::post, path, 11};
      req.set(http::field::host, ep);
      req.set(http::field::content_type, "application/json");
      req.keep_alive(true);
      req.body() = body;
      req.prepare_payload();
      ec = RunOp(c.ioc, c.stream, options_.timeout,
                 [&](auto handler) { http::async_write(c.stream, req, std::move(handler)); });
      if (!ec) {
        ec = RunOp(c.ioc, c.stream, options_.timeout,
                   [&](auto handler) { http::async_read(c.stream, c.buffer, res, std::move(handler)); });
      }
    }
    if (ec) {
      c.Close();
      errors += (errors.empty() ? "" : "; ") + ep + ": " + ec.message();
      continue;  // try the next member
    }
    if (!res.keep_alive()) c.Close();
    if (res.result() != http::status::ok) {
      std::string msg = ep + path + ": HTTP " + std::to_string(res.result_int());
      auto parsed = ParseObject(res.body());
      if (parsed.ok()) {
        std::string e = Str(*parsed, "error");
        if (e.empty()) e = Str(*parsed, "message");
        if (!e.empty()) msg += ": " + e;
      }
      if (res.result_int() >= 500) {  // that member is in trouble (no leader, stopping): try another
        errors += (errors.empty() ? "" : "; ") + msg;
        c.Close();
        continue;
      }
      return Status::IOError("etcd " + msg);
    }
    current_ = idx;
    return std::move(res.body());
  }
  return Status::IOError("etcd unreachable (" + errors + ")");
}

Result<std::optional<KeyValue>> Client::Get(const std::string& key) {
  json::object req{{"key", Base64(key)}};
  REPLICA_ASSIGN_OR_RETURN(std::string body, Post("/v3/kv/range", json::serialize(req)));
  REPLICA_ASSIGN_OR_RETURN(json::object o, ParseObject(body));
  REPLICA_ASSIGN_OR_RETURN(auto kvs, ParseKvs(o));
  if (kvs.empty()) return std::optional<KeyValue>();
  return std::optional<KeyValue>(std::move(kvs.front()));
}

Result<std::vector<KeyValue>> Client::GetPrefix(const std::string& prefix) {
  json::object req{{"key", Base64(prefix)}, {"range_end", Base64(PrefixEnd(prefix))}};
  REPLICA_ASSIGN_OR_RETURN(std::string body, Post("/v3/kv/range", json::serialize(req)));
  REPLICA_ASSIGN_OR_RETURN(json::object o, ParseObject(body));
  return ParseKvs(o);
}

Result<int64_t> Client::Put(const std::string& key, const std::string& value, int64_t lease) {
  json::object req{{"key", Base64(key)}, {"value", Base64(value)}};
  if (lease != 0) req["lease"] = std::to_string(lease);
  REPLICA_ASSIGN_OR_RETURN(std::string body, Post("/v3/kv/put", json::serialize(req)));
  REPLICA_ASSIGN_OR_RETURN(json::object o, ParseObject(body));
  return HeaderRevision(o);
}

Status Client::Delete(const std::string& key) {
  json::object req{{"key", Base64(key)}};
  return Post("/v3/kv/deleterange", json::serialize(req)).status();
}

Result<TxnResult> Client::Txn(const std::vector<Compare>& compares, const std::vector<Op>& success,
                              const std::vector<Op>& failure) {
  json::array cmp;
  for (const auto& c : compares) {
    json::object o{{"key", Base64(c.key)}};
    static const char* kTargets[] = {"VERSION", "MOD", "VALUE"};
    static const char* kResults[] = {"EQUAL", "NOT_EQUAL", "GREATER", "LESS"};
    o["target"] = kTargets[static_cast<int>(c.target)];
    o["result"] = kResults[static_cast<int>(c.result)];
    if (c.target == Compare::Target::kVersion) o["version"] = std::to_string(c.number);
    if (c.target == Compare::Target::kModRevision) o["mod_revision"] = std::to_string(c.number);
    if (c.target == Compare::Target::kValue) o["value"] = Base64(c.value);
    cmp.push_back(std::move(o));
  }
  json::array ok, fail;
  for (const auto& op : success) ok.push_back(OpJson(op));
  for (const auto& op : failure) fail.push_back(OpJson(op));
  json::object req{{"compare", std::move(cmp)}, {"success", std::move(ok)}, {"failure", std::move(fail)}};
  REPLICA_ASSIGN_OR_RETURN(std::string body, Post("/v3/kv/txn", json::serialize(req)));
  REPLICA_ASSIGN_OR_RETURN(json::object o, ParseObject(body));
  TxnResult r;
  auto s = o.find("succeeded");
  r.succeeded = s != o.end() && s->value().is_bool() && s->value().as_bool();
  r.revision = HeaderRevision(o);
  auto responses = o.find("responses");
  if (responses != o.end() && responses->value().is_array()) {
    for (const auto& e : responses->value().as_array()) {
      if (!e.is_object()) continue;
      auto range = e.as_object().find("response_range");
      if (range == e.as_object().end() || !range->value().is_object()) continue;
      REPLICA_ASSIGN_OR_RETURN(auto kvs, ParseKvs(range->value().as_object()));
      r.gets.push_back(kvs.empty() ? std::nullopt : std::optional<KeyValue>(std::move(kvs.front())));
    }
  }
  return r;
}

Result<int64_t> Client::LeaseGrant(int64_t ttl_seconds) {
  json::object req{{"TTL", std::to_string(ttl_seconds)}};
  REPLICA_ASSIGN_OR_RETURN(std::string body, Post("/v3/lease/grant", json::serialize(req)));
  REPLICA_ASSIGN_OR_RETURN(json::object o, ParseObject(body));
  const int64_t id = Int(o, "ID");
  if (id == 0) return Status::IOError("etcd granted no lease: " + Str(o, "error"));
  return id;
}

Result<int64_t> Client::LeaseKeepAlive(int64_t lease) {
  json::object req{{"ID", std::to_string(lease)}};
  REPLICA_ASSIGN_OR_RETURN(std::string body, Post("/v3/lease/keepalive", json::serialize(req)));
  REPLICA_ASSIGN_OR_RETURN(json::object o, ParseObject(body));
  auto it = o.find("result");
  // Only etcd's own answer says the lease is gone; an answer without a
  // result (a proxy's or a gateway's error) says nothing of it.
  if (it == o.end() || !it->value().is_object()) {
    return Status::IOError("etcd answered the keepalive of lease " + std::to_string(lease) + " without a result: " +
                           body.substr(0, 200));
  }
  const int64_t ttl = Int(it->value().as_object(), "TTL");
  if (ttl <= 0) return Status::NotFound("etcd lease " + std::to_string(lease) + " has expired or was revoked");
  return ttl;
}

Status Client::LeaseRevoke(int64_t lease) {
  json::object req{{"ID", std::to_string(lease)}};
  return Post("/v3/lease/revoke", json::serialize(req)).status();
}

struct Watch::State {
  asio::io_context ioc;
  beast::tcp_stream stream{ioc};
  std::atomic<bool> stopped{false};
  Mutex mu;
  bool connected GUARDED_BY(mu) = false;
};

Result<std::unique_ptr<Watch>> Client::StartWatch(const std::string& key, bool prefix, int64_t start_revision,
                                                  std::function<void(const WatchEvent&, int64_t)> on_event,
                                                  std::function<void(const Status&)> on_error) {
  std::unique_ptr<Watch> w(new Watch());
  w->state_ = std::make_shared<Watch::State>();
  auto state = w->state_;
  // Connect here, trying each member, so that the caller learns at once.
  std::string endpoint;
  std::string errors;
  {
    MutexLock l(&mu_);
    for (size_t attempt = 0; attempt < endpoints_.size(); ++attempt) {
      const std::string& ep = endpoints_[(current_ + attempt) % endpoints_.size()];
      auto ec = ConnectTo(state->ioc, state->stream, ep, options_.timeout);
      if (!ec) {
        endpoint = ep;
        break;
      }
      errors += (errors.empty() ? "" : "; ") + ep + ": " + ec.message();
      beast::error_code ignored;
      state->stream.socket().close(ignored);
    }
  }
  if (endpoint.empty()) return Status::IOError("etcd unreachable for a watch (" + errors + ")");
  json::object create{{"key", Base64(key)}};
  if (prefix) create["range_end"] = Base64(PrefixEnd(key));
  if (start_revision > 0) create["start_revision"] = std::to_string(start_revision);
  json::object body{{"create_request", std::move(create)}};
  http::request<http::string_body> req{http::verb::post, "/v3/watch", 11};
  req.set(http::field::host, endpoint);
  req.set(http::field::content_type, "application/json");
  req.body() = json::serialize(body);
  req.prepare_payload();
  beast::error_code ec = RunOp(state->ioc, state->stream, options_.timeout,
                               [&](auto handler) { http::async_write(state->stream, req, std::move(handler)); });
  if (ec) return Status::IOError("etcd watch on " + endpoint + ": " + ec.message());
  {
    MutexLock l(&state->mu);
    state->connected = true;
  }
  // "From now" holds only once etcd has registered the watch: until its
  // created message, a put would not be reported. So return only then.
  auto created = std::make_shared<std::promise<Status>>();
  std::future<Status> created_future = created->get_future();
  w->thread_ = std::thread([state, created, on_event = std::move(on_event), on_error = std::move(on_error),
                            endpoint] {
    bool confirmed = false;
    beast::flat_buffer buffer;
    http::response_parser<http::empty_body> parser;
    parser.body_limit(boost::none);
    std::string pending;
    Status error;
    auto on_chunk = [&](std::uint64_t, beast::string_view data, beast::error_code&) -> std::size_t {
      pending.append(data.data(), data.size());
      size_t nl;
      while (error.ok() && (nl = pending.find('\n')) != std::string::npos) {
        std::string line = pending.substr(0, nl);
        pending.erase(0, nl + 1);
        if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
        auto o = ParseObject(line);
        if (!o.ok()) {
          error = o.status();
          break;
        }
        auto res = o->find("result");
        if (res == o->end() || !res->value().is_object()) {
          error = Status::IOError("etcd watch: " + Str(*o, "error"));
          break;
        }
        const json::object& r = res->value().as_object();
        if (r.find("canceled") != r.end()) {
          error = Status::Aborted("etcd canceled the watch: " + Str(r, "cancel_reason"));
          break;
        }
        if (!confirmed) {
          auto c = r.find("created");
          if (c == r.end() || !c->value().is_bool() || !c->value().as_bool()) {
            error = Status::IOError("etcd watch: the first message did not confirm the watch: " + line);
            break;
          }
          confirmed = true;
          created->set_value(Status::OK());
        }
        const int64_t revision = HeaderRevision(r);
        auto evs = r.find("events");
        if (evs == r.end() || !evs->value().is_array()) continue;
        for (const auto& e : evs->value().as_array()) {
          if (!e.is_object()) continue;
          WatchEvent ev;
          ev.type = Str(e.as_object(), "type") == "DELETE" ? WatchEvent::Type::kDelete : WatchEvent::Type::kPut;
          auto kv = e.as_object().find("kv");
          if (kv != e.as_object().end() && kv->value().is_object()) {
            auto parsed = ParseKv(kv->value().as_object());
            if (!parsed.ok()) {
              error = parsed.status();
              break;
            }
            ev.kv = std::move(parsed).value();
          }
          if (!state->stopped.load()) on_event(ev, revision);
        }
      }
      return data.size();
    };
    parser.on_chunk_body(on_chunk);
    // No timeout while streaming: a quiet key sends nothing. Stop() closes
    // the stream from the caller's thread, through the io_context.
    beast::error_code ec = RunOp(state->ioc, state->stream, std::chrono::milliseconds(0), [&](auto handler) {
      http::async_read_header(state->stream, buffer, parser, std::move(handler));
    });
    if (!ec && parser.get().result() != http::status::ok) {
      error = Status::IOError("etcd watch on " + endpoint + ": HTTP " + std::to_string(parser.get().result_int()));
    }
    while (!ec && error.ok() && !parser.is_done() && !state->stopped.load()) {
      ec = RunOp(state->ioc, state->stream, std::chrono::milliseconds(0), [&](auto handler) {
        http::async_read_some(state->stream, buffer, parser, std::move(handler));
      });
    }
    if (error.ok()) {
      error = ec ? Status::IOError("etcd watch on " + endpoint + ": " + ec.message())
                 : Status::Aborted("etcd watch on " + endpoint + " ended");
    }
    if (!confirmed) {
      created->set_value(error);  // StartWatch returns it; on_error is for a confirmed watch
      return;
    }
    if (!state->stopped.load()) on_error(error);
  });
  Status confirmed = created_future.wait_for(options_.timeout) == std::future_status::ready
                         ? created_future.get()
                         : Status::IOError("etcd watch on " + endpoint + ": not confirmed within " +
                                           std::to_string(options_.timeout.count()) + " ms");
  if (!confirmed.ok()) {
    w->Stop();
    // A member that accepts connections but does not answer: the next
    // attempt starts with the next one.
    MutexLock l(&mu_);
    if (endpoints_[current_] == endpoint) current_ = (current_ + 1) % endpoints_.size();
    return confirmed;
  }
  return w;
}

void Watch::Stop() {
  if (!state_) return;
  state_->stopped.store(true);
  {
    MutexLock l(&state_->mu);
    if (state_->connected) {
      // A raw pointer: a handler left queued (the thread already out of run())
      // is destroyed with the io_context, and must not keep the state alive.
      State* state = state_.get();
      asio::post(state->ioc, [state] { state->stream.cancel(); });
    }
  }
  if (thread_.joinable()) thread_.join();
  state_.reset();
}

Watch::~Watch() { Stop(); }

}  // namespace replica::etcd
