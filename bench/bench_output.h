// The console or JSON reporter that a bench's output flags ask for, for the
// bench's own summary reporter to wrap. Shared by wal_bench and
// transport_bench.
#pragma once

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <string_view>

namespace replica::bench {

// The value of --name=value (or "true" for a bare --name) in argv, or "".
inline std::string FlagValue(int argc, char** argv, const std::string& name) {
  std::string value;
  const std::string prefix = "--" + name;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a == prefix) value = "true";
    if (a.size() > prefix.size() && a.substr(0, prefix.size() + 1) == prefix + "=") {
      value = std::string(a.substr(prefix.size() + 1));
    }
  }
  return value;
}

struct Output {
  std::unique_ptr<benchmark::BenchmarkReporter> reporter;
  bool console = true;  // text output, which the summary follows
};

// Reads --benchmark_format, --benchmark_counters_tabular and
// --benchmark_color; call it before benchmark::Initialize consumes them.
// json gives the JSON reporter; anything else (the deprecated csv included)
// the console reporter.
inline Output OutputFromFlags(int argc, char** argv) {
  const auto is_true = [](const std::string& v) { return v == "true" || v == "1" || v == "yes"; };
  const std::string format = FlagValue(argc, argv, "benchmark_format");
  Output out;
  if (format == "json") {
    out.reporter = std::make_unique<benchmark::JSONReporter>();
    out.console = false;
    return out;
  }
  const std::string color = FlagValue(argc, argv, "benchmark_color");
  int opts = benchmark::ConsoleReporter::OO_None;
  if (is_true(color) || ((color.empty() || color == "auto") && isatty(STDOUT_FILENO))) {
    opts |= benchmark::ConsoleReporter::OO_Color;
  }
  if (is_true(FlagValue(argc, argv, "benchmark_counters_tabular"))) opts |= benchmark::ConsoleReporter::OO_Tabular;
  out.reporter =
      std::make_unique<benchmark::ConsoleReporter>(static_cast<benchmark::ConsoleReporter::OutputOptions>(opts));
  return out;
}

}  // namespace replica::bench
