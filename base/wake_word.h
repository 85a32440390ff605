// A one-word wake-up slot (Linux futex): one thread waits until the word
// leaves a value, another stores a new value and wakes it.
//
// Unlike a condition variable, the waiter needs no mutex to wake: a thread
// handed a result by another can return at once, without queueing for the
// lock its waker still holds (each such hand-off costs two context switches
// instead of one, which on a small virtual machine is most of a group
// commit's overhead).
//
// Lifetime: Set() touches the word's memory only in its store; the wake that
// follows passes the address to the kernel, which keys on the address alone.
// So a waiter that sees the store early may return and reuse the memory
// before Set() has finished (as with glibc's sem_post).
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <cstdint>

namespace replica {

class WakeWord {
 public:
  explicit WakeWord(uint32_t v = 0) : word_(v) {}
  WakeWord(const WakeWord&) = delete;
  WakeWord& operator=(const WakeWord&) = delete;

  uint32_t Load() const { return word_.load(std::memory_order_acquire); }
  // Stores without waking (for the waiter itself, before it waits).
  void Reset(uint32_t v) { word_.store(v, std::memory_order_relaxed); }
  // Waits while the word holds `v`; returns the value that ended the wait.
  uint32_t WaitWhile(uint32_t v) {
    uint32_t now;
    for (;;) {
      waiters_.fetch_add(1, std::memory_order_seq_cst);  // counted, so that a Bump wakes it too
      now = word_.load(std::memory_order_seq_cst);
      if (now != v) break;
      syscall(SYS_futex, Address(), FUTEX_WAIT_PRIVATE, v, nullptr, nullptr, 0);
      waiters_.fetch_sub(1, std::memory_order_relaxed);
    }
    waiters_.fetch_sub(1, std::memory_order_relaxed);
    return now;
  }
  // Stores `v` (releasing everything written before) and wakes the waiter.
  void Set(uint32_t v) {
    uint32_t* addr = Address();
    word_.store(v, std::memory_order_release);
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  }

  // As a shared counter: a waiter reads the word, checks its own condition,
  // and if it must wait calls WaitOnce with the value it read; a waker
  // changes the condition, then calls Bump, which wakes every waiter with a
  // single system call. A Bump between the read and WaitOnce is not lost.
  // Bump makes the system call only when a thread waits (or is about to):
  // waiters count themselves before they read the word, and Bump reads the
  // count after it changes the word, both sequentially consistent, so
  // either the waiter sees the new value or Bump sees the waiter. Unlike
  // Set(), Bump reads the object after the store: it must outlive Bump.
  void WaitOnce(uint32_t seen) {
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    if (word_.load(std::memory_order_seq_cst) == seen) syscall(SYS_futex, Address(), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
    waiters_.fetch_sub(1, std::memory_order_relaxed);
  }
  // WaitOnce with a deadline; returns false once the deadline has passed.
  bool WaitOnceUntil(uint32_t seen, std::chrono::steady_clock::time_point deadline) {
    const auto left = deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return false;
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    if (word_.load(std::memory_order_seq_cst) != seen) {
      waiters_.fetch_sub(1, std::memory_order_relaxed);
      return true;
    }
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    syscall(SYS_futex, Address(), FUTEX_WAIT_PRIVATE, seen, &ts, nullptr, 0);
    waiters_.fetch_sub(1, std::memory_order_relaxed);
    return std::chrono::steady_clock::now() < deadline;
  }
  void Bump() {
    word_.fetch_add(1, std::memory_order_seq_cst);
    if (waiters_.load(std::memory_order_seq_cst) > 0) {
      syscall(SYS_futex, Address(), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
    }
  }

 private:
  uint32_t* Address() { return reinterpret_cast<uint32_t*>(&word_); }
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
  std::atomic<uint32_t> word_;
  std::atomic<uint32_t> waiters_{0};  // threads in (or about to enter) a counted wait
};

}  // namespace replica
