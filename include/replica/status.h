// Status and Result<T>: errors as values, never exceptions across modules.
//
// A Status is cheap when OK (one null pointer) and carries a code plus a
// human-readable message otherwise. Context is prepended on the way up with
// WithContext(), so a failure reads like "open wal /d: segment 3.wal: ...".
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace replica {

enum class StatusCode : uint8_t {
  kOk = 0,
  kNotFound = 1,
  kCorruption = 2,       // damaged data on disk or wire
  kInvalidArgument = 3,  // caller error: bad option, bad LSN, bad input
  kIOError = 4,          // the OS said no (errno in the message)
  kPurged = 5,           // the requested LSN is no longer retained
  kStaleEpoch = 6,       // input from an epoch lower than one already known
  kAborted = 7,          // the object was closed or its state changed under us
  kTimedOut = 8,
  kBusy = 9,             // held by someone else (a lock, a running operation)
  kNotSupported = 10,    // a format feature or version we do not understand
  kNotActive = 11,       // a write reached a node that is not the active
  kTooStale = 12,        // a read's staleness bound cannot be met on this node
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(const Status& other)
      : rep_(other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr) {}
  Status& operator=(const Status& other) {
    if (this != &other) rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status OK() { return Status(); }
  static Status NotFound(std::string msg) { return Status(StatusCode::kNotFound, std::move(msg)); }
  static Status Corruption(std::string msg) { return Status(StatusCode::kCorruption, std::move(msg)); }
  static Status InvalidArgument(std::string msg) { return Status(StatusCode::kInvalidArgument, std::move(msg)); }
  static Status IOError(std::string msg) { return Status(StatusCode::kIOError, std::move(msg)); }
  // An IOError whose message ends with strerror(err); err is kept for callers
  // that must tell ENOSPC from EIO.
  static Status FromErrno(std::string context, int err);
  static Status Purged(std::string msg) { return Status(StatusCode::kPurged, std::move(msg)); }
  static Status StaleEpoch(std::string msg) { return Status(StatusCode::kStaleEpoch, std::move(msg)); }
  static Status Aborted(std::string msg) { return Status(StatusCode::kAborted, std::move(msg)); }
  static Status TimedOut(std::string msg) { return Status(StatusCode::kTimedOut, std::move(msg)); }
  static Status Busy(std::string msg) { return Status(StatusCode::kBusy, std::move(msg)); }
  static Status NotSupported(std::string msg) { return Status(StatusCode::kNotSupported, std::move(msg)); }
  static Status NotActive(std::string msg) { return Status(StatusCode::kNotActive, std::move(msg)); }
  static Status TooStale(std::string msg) { return Status(StatusCode::kTooStale, std::move(msg)); }
  // A status of a code known only at run time (a peer's reply, a server's
  // error text). kOk, or a value that is no code, gives IOError: a failure
  // never reads as success.
  static Status FromCode(StatusCode code, std::string msg);

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  const std::string& message() const;
  // errno captured by FromErrno, else 0.
  int sys_errno() const { return rep_ ? rep_->sys_errno : 0; }

  bool IsNotFound() const { return code() == StatusCode::kNotFound; }
  bool IsCorruption() const { return code() == StatusCode::kCorruption; }
  bool IsIOError() const { return code() == StatusCode::kIOError; }
  bool IsPurged() const { return code() == StatusCode::kPurged; }
  bool IsStaleEpoch() const { return code() == StatusCode::kStaleEpoch; }
  bool IsAborted() const { return code() == StatusCode::kAborted; }
  bool IsTimedOut() const { return code() == StatusCode::kTimedOut; }
  bool IsTooStale() const { return code() == StatusCode::kTooStale; }

  // Returns a copy whose message is "context: message". OK stays OK.
  Status WithContext(std::string_view context) const;
  // "Corruption: segment ...: bad checksum"
  std::string ToString() const;

 private:
  struct Rep {
    StatusCode code;
    int sys_errno;
    std::string msg;
  };
  Status(StatusCode code, std::string msg, int err = 0)
      : rep_(std::make_unique<Rep>(Rep{code, err, std::move(msg)})) {}
  std::unique_ptr<Rep> rep_;
};

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT
    if (status_.ok()) status_ = Status::InvalidArgument("Result built from an OK status without a value");
  }

  bool ok() const { return status_.ok(); }
  const Status& status() const& { return status_; }
  Status status() && { return std::move(status_); }

  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace replica

// Propagate a non-OK Status, optionally with context.
#define REPLICA_RETURN_IF_ERROR(expr)          \
  do {                                         \
    ::replica::Status _st = (expr);            \
    if (!_st.ok()) return _st;                 \
  } while (0)

#define REPLICA_RETURN_IF_ERROR_CTX(expr, ctx) \
  do {                                         \
    ::replica::Status _st = (expr);            \
    if (!_st.ok()) return _st.WithContext(ctx); \
  } while (0)

#define REPLICA_CONCAT_INNER(a, b) a##b
#define REPLICA_CONCAT(a, b) REPLICA_CONCAT_INNER(a, b)
// ASSIGN_OR_RETURN(auto x, SomethingReturningResult());
#define REPLICA_ASSIGN_OR_RETURN(lhs, expr) \
  REPLICA_ASSIGN_OR_RETURN_IMPL(REPLICA_CONCAT(_res_, __LINE__), lhs, expr)
#define REPLICA_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return std::move(tmp).status();      \
  lhs = std::move(tmp).value()
