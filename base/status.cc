#include "replica/status.h"

#include <cstring>

namespace replica {

std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kNotFound: return "NotFound";
    case StatusCode::kCorruption: return "Corruption";
    case StatusCode::kInvalidArgument: return "InvalidArgument";
    case StatusCode::kIOError: return "IOError";
    case StatusCode::kPurged: return "Purged";
    case StatusCode::kStaleEpoch: return "StaleEpoch";
    case StatusCode::kAborted: return "Aborted";
    case StatusCode::kTimedOut: return "TimedOut";
    case StatusCode::kBusy: return "Busy";
    case StatusCode::kNotSupported: return "NotSupported";
    case StatusCode::kNotActive: return "NotActive";
    case StatusCode::kTooStale: return "TooStale";
  }
  return "Unknown";
}

Status Status::FromCode(StatusCode code, std::string msg) {
  if (code == StatusCode::kOk || code > StatusCode::kTooStale) code = StatusCode::kIOError;
  return Status(code, std::move(msg));
}

Status Status::FromErrno(std::string context, int err) {
  context += ": ";
  context += std::strerror(err);
  return Status(StatusCode::kIOError, std::move(context), err);
}

const std::string& Status::message() const {
  static const std::string kEmpty;
  return rep_ ? rep_->msg : kEmpty;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return Status();
  std::string msg(context);
  msg += ": ";
  msg += rep_->msg;
  return Status(rep_->code, std::move(msg), rep_->sys_errno);
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out(StatusCodeName(rep_->code));
  out += ": ";
  out += rep_->msg;
  return out;
}

}  // namespace replica
