// GatherPolicy: how long the leader of a commit group waits for the
// appenders it expects (Wal::Gather) before it runs what has arrived.
//
// The leader sleeps with a deadline. When the group fills first, the
// appender that completes it runs it, and the leader, still asleep, is only
// a follower; if its deadline then expires while the group's fdatasync runs,
// it wakes for nothing, in the middle of the one wait that sets the group's
// pace. On the 2-vCPU machine of docs/performance.md that wake-up made a
// group's fdatasync 30-55 µs (about a quarter) longer.
//
// So the deadline depends on how gathers have been ending:
// - impatient (the start, and whenever gathers time out): a quarter of the
//   last fdatasync, at most 100 µs. A group that does not fill costs its
//   appenders little extra wait.
// - patient (gathers have been filling their groups): four times the last
//   fdatasync, at most 2 ms, longer than gathering, writing and syncing the
//   group takes, so that the leader sleeps until the group's end wakes it.
//   A group that does not fill then costs its appenders up to that long,
//   which is why one time-out returns the policy to impatient until gathers
//   have filled their groups 29 times in a row again (70 from the start).
//   (A gather that the Wal cuts short because its group cannot fill, a
//   maintenance op queued, an append past max_group_bytes or the log
//   closing, counts neither way.)
//
// "How gathers have been ending" is a moving average of time-outs (weight
// 1/16 per gather, in 1/1024ths, rounded down, so that it settles at 15
// while every gather fills); patient below 20, about 2%.
//
// Not thread-safe: the Wal calls it under its mutex.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace replica::wal {

class GatherPolicy {
 public:
  static constexpr std::chrono::microseconds kImpatientCap{100};
  static constexpr std::chrono::microseconds kPatientCap{2000};

  // Whether the next gather may wait patiently.
  bool patient() const { return misses_ < kPatientBelow; }

  // How long a gather that starts now may wait, given the duration of the
  // last fdatasync.
  std::chrono::microseconds Wait(std::chrono::microseconds last_sync) const {
    if (patient()) return std::min(last_sync * 4, kPatientCap);
    return std::min(last_sync / 4, kImpatientCap);
  }

  // A gather's group filled and was run by the appender that completed it.
  void Filled() { misses_ -= misses_ / kWeight; }
  // A gather's deadline passed first: its leader runs what has arrived.
  void TimedOut() { misses_ += (kOne - misses_) / kWeight; }

 private:
  static constexpr uint32_t kOne = 1024;
  static constexpr uint32_t kWeight = 16;
  static constexpr uint32_t kPatientBelow = 20;  // about 2%
  uint32_t misses_ = kOne;                       // unknown counts as missing
};

}  // namespace replica::wal
