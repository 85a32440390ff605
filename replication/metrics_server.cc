#include "replication/metrics_server.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <thread>

#include "base/host_port.h"
#include "base/thread_name.h"

namespace replica {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

// Scrapes served at once; a connection past it is closed at once, so that
// idle connections cannot take every descriptor of the process.
constexpr int kMaxConnections = 32;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket s, const std::function<std::string()>* render, std::atomic<int>* open)
      : stream_(std::move(s)), render_(render), open_(open) {
    open_->fetch_add(1);
  }
  ~Connection() { open_->fetch_sub(1); }
  void Start() {
    stream_.expires_after(std::chrono::seconds(5));
    http::async_read(stream_, buf_, req_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (!ec) self->Respond();
    });
  }

 private:
  void Respond() {
    res_.version(req_.version());
    res_.keep_alive(false);
    // The query string is ignored: Prometheus sends a scrape config's
    // params: there, and the page has no parameters.
    const beast::string_view target = req_.target();
    const beast::string_view path = target.substr(0, target.find('?'));
    const bool head = req_.method() == http::verb::head;
    if (req_.method() != http::verb::get && !head) {
      res_.result(http::status::method_not_allowed);
      res_.set(http::field::allow, "GET, HEAD");
      res_.body() = "only GET and HEAD\n";
    } else if (path != "/metrics") {
      res_.result(http::status::not_found);
      res_.body() = "try /metrics\n";
    } else {
      res_.result(http::status::ok);
      res_.set(http::field::content_type, "text/plain; version=0.0.4");
      res_.body() = (*render_)();
    }
    res_.prepare_payload();
    // HEAD: the headers GET would send (Content-Length included), no body.
    if (head) res_.body().clear();
    http::async_write(stream_, res_, [self = shared_from_this()](beast::error_code, size_t) {
      beast::error_code ec;
      self->stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    });
  }
  beast::tcp_stream stream_;
  const std::function<std::string()>* render_;
  std::atomic<int>* const open_;
  beast::flat_buffer buf_;
  http::request<http::string_body> req_;
  http::response<http::string_body> res_;
};

class MetricsServerImpl final : public MetricsServer {
 public:
  explicit MetricsServerImpl(std::function<std::string()> render) : render_(std::move(render)), acceptor_(ioc_) {}
  ~MetricsServerImpl() override { Stop(); }

  Status Listen(const std::string& host, uint16_t port) {
    beast::error_code ec;
    auto resolved = ResolveHost(host, /*passive=*/true);
    if (!resolved.ok()) return resolved.status().WithContext("metrics address");
    auto addr = asio::ip::make_address(resolved->front(), ec);
    if (ec) return Status::InvalidArgument("metrics address '" + host + "': " + ec.message());
    tcp::endpoint ep(addr, port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return Status::IOError("metrics port " + host + ":" + std::to_string(port) + ": " + ec.message());
    port_ = acceptor_.local_endpoint().port();
    Accept();
    thread_ = NamedThread("metrics", [this] { ioc_.run(); });
    return Status::OK();
  }
  uint16_t port() const override { return port_; }
  void Stop() override {
    if (!thread_.joinable()) return;
    asio::post(ioc_, [this] {
      beast::error_code ec;
      acceptor_.close(ec);  // frees the port before the loop stops
      retry_.cancel();
      ioc_.stop();
    });
    thread_.join();
  }

 private:
  void Accept() {
    acceptor_.async_accept([this](beast::error_code ec, tcp::socket s) {
      if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;  // closed
      if (ec) {
        // E.g. out of descriptors: keep serving, but retry in 100 ms, not
        // in a busy loop while the condition lasts.
        retry_.expires_after(std::chrono::milliseconds(100));
        retry_.async_wait([this](beast::error_code wec) {
          if (!wec && acceptor_.is_open()) Accept();
        });
        return;
      }
      if (open_.load() >= kMaxConnections) {
        beast::error_code ignored;
        s.close(ignored);
      } else {
        std::make_shared<Connection>(std::move(s), &render_, &open_)->Start();
      }
      Accept();
      (void)ec;
    });
  }
  std::function<std::string()> render_;
  std::atomic<int> open_{0};  // Connection objects alive
  asio::io_context ioc_;
  tcp::acceptor acceptor_;
  asio::steady_timer retry_{ioc_};
  std::thread thread_;
  uint16_t port_ = 0;
};

}  // namespace

Result<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& host, uint16_t port,
                                                            std::function<std::string()> render) {
  auto s = std::make_unique<MetricsServerImpl>(std::move(render));
  REPLICA_RETURN_IF_ERROR(s->Listen(host, port));
  return std::unique_ptr<MetricsServer>(std::move(s));
}

}  // namespace replica
