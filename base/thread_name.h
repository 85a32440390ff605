// Names the calling thread, as `top -H`, `ps -L`, gdb and perf show it.
#pragma once

#include <pthread.h>

#include <string>
#include <thread>
#include <utility>

namespace replica {

// Linux keeps at most 15 bytes of a thread's name: a longer one is cut there.
inline void NameThisThread(const std::string& name) {
  const std::string cut = name.substr(0, 15);
  (void)pthread_setname_np(pthread_self(), cut.c_str());
}

// Starts a thread named `name` that runs fn().
template <typename Fn>
std::thread NamedThread(std::string name, Fn fn) {
  return std::thread([name = std::move(name), fn = std::move(fn)]() mutable {
    NameThisThread(name);
    fn();
  });
}

}  // namespace replica
