// A tiny HTTP server (Boost.Beast) for Prometheus: GET /metrics returns what
// `render` produces; anything else is 404 or 405. One I/O thread; each
// request must arrive within 5 s, so a slow client cannot hold it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "replica/status.h"

namespace replica {

class MetricsServer {
 public:
  // `render` is called on the server's thread for every scrape.
  static Result<std::unique_ptr<MetricsServer>> Start(const std::string& host, uint16_t port,
                                                      std::function<std::string()> render);
  virtual ~MetricsServer() = default;
  virtual uint16_t port() const = 0;
  virtual void Stop() = 0;
};

}  // namespace replica
