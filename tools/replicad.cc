// replicad: a replication node as a daemon. The engine behind a Redis-
// protocol client port. Static mode: without --follow the node is the
// active; with --follow HOST:PORT it is a standby of that active.
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <boost/program_options.hpp>
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <iostream>
#include <optional>
#include <sstream>
#include <thread>

#include "base/env.h"
#include "base/host_port.h"
#include "base/names.h"
#include "base/log.h"
#include "replica/engine.h"
#include "replication/etcd.h"
#include "replication/metrics_server.h"
#include "replication/resp_server.h"
#include "tools/cli.h"

namespace po = boost::program_options;
// Long options only by their whole names: Boost would take any unambiguous
// prefix (--foll for --follow), so a typo could name another option.
constexpr int kOptionStyle = po::command_line_style::default_style & ~po::command_line_style::allow_guessing;
using namespace replica;

namespace {

[[noreturn]] void Fail(const std::string& msg, int code = 2) {
  std::fprintf(stderr, "replicad: %s\n", msg.c_str());
  if (code == 2) std::fprintf(stderr, "Try 'replicad --help'.\n");
  std::exit(code);
}

}  // namespace

int main(int argc, char** argv) {
  po::options_description desc(
      "Usage: replicad [OPTIONS]\n\n"
      "Runs one replication node: a write-ahead log and a RocksDB database in\n"
      "--data-dir, a replication port for the other nodes, and a client port that\n"
      "speaks the Redis protocol (redis-cli and Redis client libraries work).\n"
      "With --etcd the cluster elects its active through etcd and fails over on\n"
      "its own (docs/failover.md); without it, static mode: without --follow the\n"
      "node is the active, with --follow it is a standby of that active.\n"
      "Options on the command line win over the same options in --config.\n\nOptions");
  // clang-format off
  desc.add_options()
      ("help,h", "show this help")
      ("id", po::value<std::string>(), "this node's name (required)")
      ("data-dir", po::value<std::string>(), "directory for wal/ and db/ (required; created if missing)")
      ("listen", po::value<std::string>()->default_value("127.0.0.1:7400"),
       "HOST:PORT of the replication port (port 0: any free port). Every HOST:PORT option takes an IPv4 "
       "address, a host name or an IPv6 address in brackets ([::1]:7400)")
      ("client-listen", po::value<std::string>()->default_value("127.0.0.1:6380"),
       "HOST:PORT of the Redis-protocol client port (port 0: any free port)")
      ("advertise", po::value<std::string>(),
       "with --etcd: HOST:PORT the other nodes reach the replication port at (port 0: the port bound); "
       "required when --listen is a wildcard (0.0.0.0 or [::]); default: --listen's")
      ("client-advertise", po::value<std::string>(),
       "with --etcd: HOST:PORT clients reach the client port at (published for clients and repctl; port 0: the "
       "port bound); required when --client-listen is a wildcard; default: --client-listen's")
      ("follow", po::value<std::string>(), "static mode: HOST:PORT of the active's replication port; run as its standby")
      ("etcd", po::value<std::string>(), "etcd client URLs, comma-separated (http://HOST:PORT or HOST:PORT): "
       "high availability with automatic failover")
      ("lease-ttl", po::value<int>()->default_value(2),
       "with --etcd: seconds of the node's etcd lease, 2..600; a dead active is replaced about this long after")
      ("fence-margin-ms", po::value<int>()->default_value(500),
       "with --etcd: the active stops accepting writes this long before its lease could expire")
      ("cluster", po::value<std::string>()->default_value("default"), "cluster name; peers must agree")
      ("secret", po::value<std::string>(), "the cluster's shared secret (or --secret-file)")
      ("secret-file", po::value<std::string>(), "file whose first line is the cluster's shared secret")
      ("tls-cert", po::value<std::string>(), "mutual TLS on the replication port: this node's PEM certificate chain "
       "(with --tls-key and --tls-ca; every node of the cluster alike)")
      ("tls-key", po::value<std::string>(), "with --tls-cert: this node's PEM private key")
      ("tls-ca", po::value<std::string>(), "with --tls-cert: PEM CA certificate(s) that sign every node's certificate")
      ("commit", po::value<std::string>()->default_value("async"),
       "when the active acknowledges a write: async | remote-write:N | remote-apply:N")
      ("commit-timeout-ms", po::value<int64_t>()->default_value(5000),
       "how long a write waits for its standbys before the fallback applies")
      ("commit-fallback", po::value<std::string>()->default_value("strict"),
       "after the timeout: strict (keep waiting) | async (acknowledge as async until standbys catch up)")
      ("sync-grace-ms", po::value<int64_t>()->default_value(100),
       "with --etcd: how long a write waits for a standby listed as eligible for promotion that lacks it, "
       "before that standby is removed from the list in etcd and the write acknowledged without it")
      ("wal-sync", po::value<std::string>()->default_value("every"),
       "WAL durability: every (fdatasync per commit group) | interval (a timer fdatasyncs every "
       "--wal-sync-interval-ms; a write is acknowledged once it is synced, so fewer fdatasyncs cost latency) | none "
       "(acknowledged once written; the OS writes back when it likes, and a power loss can lose acknowledged writes)")
      ("wal-sync-interval-ms", po::value<int64_t>()->default_value(10),
       "with --wal-sync interval: milliseconds between fdatasyncs (1..60000)")
      ("wal-segment-size", po::value<std::string>()->default_value("67108864"), "bytes per WAL segment file")
      ("wal-preallocate", po::value<std::string>()->default_value("on"),
       "on | off: reserve each WAL segment's space on disk when it starts (fallocate, under --wal-sync every|interval, "
       "while twice that is free), so that fdatasync need not journal the file's growth")
      ("wal-keep-bytes", po::value<std::string>()->default_value("1073741824"),
       "WAL kept at least (older segments are deleted once applied and no standby's slot needs them); 0: keep all")
      ("slot-max-bytes", po::value<std::string>()->default_value("4294967296"),
       "active: a standby further behind than this many WAL bytes loses its slot and is resynced from a "
       "snapshot once its log is gone; 0: no cap")
      ("max-clients", po::value<int>()->default_value(1000), "client connections served at once")
      ("transport-io-threads", po::value<int>()->default_value(1),
       "threads serving the node's replication connections, 1..64 (with one standby, one measured faster "
       "than two; more may help an active with many standbys)")
      ("metrics-listen", po::value<std::string>(), "HOST:PORT for Prometheus (GET /metrics); off if not given")
      ("log-level", po::value<std::string>()->default_value("info"), "debug | info | warn | error | off")
      ("config", po::value<std::string>(), "file of 'option = value' lines (names as above, without --; "
       "'#' starts a comment only at the start of a line, and no value may hold one)");
  // clang-format on
  // Words that are no option's value (a "follow" missing its dashes, the
  // "GiB" of "--wal-keep-bytes 1 GiB") land here, to be refused: replicad
  // takes no positional arguments. Not shown in --help, not read from --config.
  po::options_description stray_words;
  stray_words.add_options()("stray-word", po::value<std::vector<std::string>>());
  po::options_description command_line;
  command_line.add(desc).add(stray_words);
  po::positional_options_description positional;
  positional.add("stray-word", -1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv)
                  .options(command_line)
                  .positional(positional)
                  .style(kOptionStyle)
                  .run(), vm);
    if (vm.count("stray-word")) {
      Fail("unexpected argument '" + vm["stray-word"].as<std::vector<std::string>>().front() +
           "' (replicad takes only --options, each with at most one value)");
    }
    // The secret given on the command line, either way, wins over the
    // config file's; both ways in one place is a mistake.
    if (vm.count("secret") && vm.count("secret-file")) Fail("--secret and --secret-file exclude each other");
    const bool secret_on_command_line = vm.count("secret") || vm.count("secret-file");
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      auto text = ReadWholeFile(Env::Default(), path);  // a directory is an error too
      if (!text.ok()) Fail("cannot read config file: " + text.status().ToString());
      // program_options ends a value at a '#' anywhere in the line ("secret
      // = ab#cd" read as "ab"): only a '#' that starts a line is a comment
      // here, and any other one is refused rather than cut silently.
      {
        std::istringstream lines(*text);
        std::string line;
        for (int n = 1; std::getline(lines, line); ++n) {
          const size_t first = line.find_first_not_of(" \t");
          if (first == std::string::npos || line[first] == '#') continue;
          if (line.find('#') != std::string::npos) {
            Fail("config file " + path + " line " + std::to_string(n) +
                 ": '#' inside a line (a comment starts only at the start of a line; a secret holding '#' "
                 "goes in a secret-file)");
          }
        }
      }
      std::istringstream in(*text);
      po::parsed_options parsed = po::parse_config_file(in, desc);
      for (const po::option& o : parsed.options) {
        if (o.string_key == "config" || o.string_key == "help") {
          Fail("config file " + path + ": '" + o.string_key + "' goes on the command line only");
        }
      }
      auto is_secret = [](const po::option& o) { return o.string_key == "secret" || o.string_key == "secret-file"; };
      const auto secrets = std::count_if(parsed.options.begin(), parsed.options.end(), is_secret);
      if (secrets > 1) Fail("config file " + path + ": give one of secret and secret-file");
      if (secret_on_command_line) {
        parsed.options.erase(std::remove_if(parsed.options.begin(), parsed.options.end(), is_secret),
                             parsed.options.end());
      }
      po::store(parsed, vm);  // stored second: the command line wins
    }
    po::notify(vm);
  } catch (const po::error& e) {
    Fail(e.what());
  }
  if (vm.count("help")) {
    std::cout << desc << "\nSignals: SIGTERM or SIGINT shut the node down cleanly (with --etcd, its lease is\n"
              << "revoked, so that another node takes over at once).\n"
              << "Exit status: 0 after a clean shutdown; 1 when the node cannot start or stop\n"
              << "cleanly; 2 for bad options; 70 when the node failed while running (its WAL\n"
              << "could not be written, e.g. a full disk; its applier stopped on an error; or a\n"
              << "snapshot install could not open the new data): it steps down, shuts down\n"
              << "cleanly, and a restart retries or finishes the install.\n";
    return 0;
  }
  LogLevel level;
  if (!ParseLogLevel(vm["log-level"].as<std::string>(), &level)) Fail("bad --log-level");
  SetLogLevel(level);

  EngineOptions o;
  if (!vm.count("id")) Fail("--id is required");
  if (!vm.count("data-dir")) Fail("--data-dir is required");
  o.node_id = vm["id"].as<std::string>();
  o.data_dir = vm["data-dir"].as<std::string>();
  if (Status st = CheckName("--id", o.node_id); !st.ok()) Fail(st.message());
  if (o.data_dir.empty()) Fail("--data-dir must not be empty");
  // HOST:PORT options: the syntax here (exit 2); a host that does not
  // resolve, or a port taken, when the node starts (exit 1).
  auto address = [&](const char* name) {
    auto hp = ParseHostPort(vm[name].as<std::string>());
    if (!hp.ok()) Fail(std::string("--") + name + ": " + hp.status().message());
    return *hp;
  };
  const HostPort listen = address("listen");
  o.listen_host = listen.host;
  o.listen_port = listen.port;
  RespServerOptions ro;
  const HostPort client_listen = address("client-listen");
  ro.host = client_listen.host;
  ro.port = client_listen.port;
  if (vm.count("advertise")) {
    if (!vm.count("etcd")) Fail("--advertise goes with --etcd (it is the address published there)");
    if (IsWildcardHost(address("advertise").host)) Fail("--advertise must name a host the other nodes can reach");
    o.advertise = vm["advertise"].as<std::string>();
  }
  if (vm.count("etcd") && !vm.count("advertise") && IsWildcardHost(listen.host)) {
    Fail("--listen " + listen.ToString() +
         " listens on every interface and names no address for the other nodes: give --advertise HOST:PORT");
  }
  std::optional<HostPort> client_advertise;
  if (vm.count("client-advertise")) {
    if (!vm.count("etcd")) Fail("--client-advertise goes with --etcd (it is the address published there)");
    client_advertise = address("client-advertise");
    if (IsWildcardHost(client_advertise->host)) Fail("--client-advertise must name a host clients can reach");
  } else if (vm.count("etcd") && IsWildcardHost(ro.host)) {
    Fail("--client-listen " + client_listen.ToString() +
         " listens on every interface and names no address for clients: give --client-advertise HOST:PORT");
  }
  ro.max_clients = vm["max-clients"].as<int>();
  if (ro.max_clients < 1) Fail("--max-clients must be at least 1");
  // Each client holds a descriptor, and WAL segments, RocksDB, the
  // replication port (at most 256 connections) and the metrics port (32)
  // need theirs: raise the soft limit to the hard one and keep a reserve.
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) {
    nofile.rlim_cur = nofile.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &nofile);
    ::getrlimit(RLIMIT_NOFILE, &nofile);
    const long usable = static_cast<long>(nofile.rlim_cur) - 256 - 256 - 32;
    if (usable < ro.max_clients) {
      if (usable < 1) Fail("the open-file limit (" + std::to_string(nofile.rlim_cur) + ") is too low", 1);
      RLOG(kWarn, "replicad.max_clients") << "lowered from " << ro.max_clients << " to " << usable
                                          << " (open-file limit " << nofile.rlim_cur << ")";
      ro.max_clients = static_cast<int>(usable);
    }
  }
  std::string metrics_host;
  uint16_t metrics_port = 0;
  if (vm.count("metrics-listen")) {
    const HostPort m = address("metrics-listen");
    metrics_host = m.host;
    metrics_port = m.port;
  }
  if (vm.count("follow")) {
    const HostPort f = address("follow");
    if (f.port == 0) Fail("--follow: the active's port cannot be 0");
    if (f.port == listen.port && f.host == listen.host) {
      Fail("--follow " + f.ToString() + " is this node's own --listen address");
    }
    o.follow = f.ToString();
  }
  if (vm.count("etcd")) {
    if (vm.count("follow")) Fail("--etcd and --follow exclude each other: with --etcd, etcd says whom to follow");
    auto eps = etcd::ParseEndpoints(vm["etcd"].as<std::string>());
    if (!eps.ok()) Fail("--etcd: " + eps.status().message());
    o.etcd = *eps;
  }
  {
    // Checked with or without --etcd: a bad value is an error either way.
    const int ttl = vm["lease-ttl"].as<int>();
    const int margin = vm["fence-margin-ms"].as<int>();
    if (ttl < 2 || ttl > 600) Fail("--lease-ttl must be 2..600 seconds");
    if (margin < 0 || margin >= ttl * 1000) Fail("--fence-margin-ms must be at least 0 and below the lease TTL");
    if (!o.etcd.empty()) {
      o.lease_ttl = std::chrono::seconds(ttl);
      o.fence_margin = std::chrono::milliseconds(margin);
    }
  }
  o.cluster = vm["cluster"].as<std::string>();
  if (Status st = CheckName("--cluster", o.cluster); !st.ok()) Fail(st.message());
  if (vm.count("secret")) {
    o.secret = vm["secret"].as<std::string>();
  } else if (vm.count("secret-file")) {
    auto secret = cli::ReadSecretFile(vm["secret-file"].as<std::string>());
    if (!secret.ok()) Fail("--secret-file: " + secret.status().ToString());
    if (const std::string w = cli::SecretFileExposed(vm["secret-file"].as<std::string>()); !w.empty()) {
      std::fprintf(stderr, "replicad: WARNING: %s\n", w.c_str());
    }
    o.secret = *secret;
  }
  if (o.secret.empty()) Fail("a cluster secret is required (--secret or --secret-file)");
  {
    const int tls = static_cast<int>(vm.count("tls-cert") + vm.count("tls-key") + vm.count("tls-ca"));
    if (tls != 0 && tls != 3) Fail("TLS needs all three of --tls-cert, --tls-key and --tls-ca");
    if (tls == 3) {
      // An empty value (a config template's unset variable) would leave the
      // port in plaintext while the operator believes it runs TLS.
      for (const char* name : {"tls-cert", "tls-key", "tls-ca"}) {
        if (vm[name].as<std::string>().empty()) {
          Fail(std::string("--") + name + " is empty: TLS needs a file for each of --tls-cert, --tls-key and --tls-ca");
        }
      }
      o.tls_cert_file = vm["tls-cert"].as<std::string>();
      o.tls_key_file = vm["tls-key"].as<std::string>();
      o.tls_ca_file = vm["tls-ca"].as<std::string>();
    }
  }
  auto commit = CommitRule::Parse(vm["commit"].as<std::string>());
  if (!commit.ok()) Fail("--commit: " + commit.status().message());
  o.commit = *commit;
  if (vm["commit-timeout-ms"].as<int64_t>() < 1 || vm["commit-timeout-ms"].as<int64_t>() > 86400000) {
    Fail("--commit-timeout-ms must be 1..86400000");
  }
  o.commit_timeout = std::chrono::milliseconds(vm["commit-timeout-ms"].as<int64_t>());
  if (vm["sync-grace-ms"].as<int64_t>() < 1 || vm["sync-grace-ms"].as<int64_t>() > 86400000) {
    Fail("--sync-grace-ms must be 1..86400000");
  }
  o.sync_grace = std::chrono::milliseconds(vm["sync-grace-ms"].as<int64_t>());
  o.commit_fallback = vm["commit-fallback"].as<std::string>();
  if (o.commit_fallback != "strict" && o.commit_fallback != "async") Fail("--commit-fallback must be strict or async");
  o.wal_sync = vm["wal-sync"].as<std::string>();
  if (o.wal_sync != "every" && o.wal_sync != "interval" && o.wal_sync != "none") {
    Fail("--wal-sync must be every, interval or none, not \"" + o.wal_sync + "\"");
  }
  if (vm["wal-sync-interval-ms"].as<int64_t>() < 1 || vm["wal-sync-interval-ms"].as<int64_t>() > 60000) {
    Fail("--wal-sync-interval-ms must be 1..60000");
  }
  o.wal_sync_interval = std::chrono::milliseconds(vm["wal-sync-interval-ms"].as<int64_t>());
  // Byte counts are read as text: program_options would take "-5" for an
  // unsigned option as 2^64 - 5.
  auto bytes = [&](const char* name) {
    uint64_t v = 0;
    const std::string text = vm[name].as<std::string>();
    if (!cli::ParseU64(text, &v)) Fail(std::string("--") + name + " must be a whole number of bytes, got '" + text + "'");
    return v;
  };
  o.wal_segment_size = bytes("wal-segment-size");
  if (o.wal_segment_size < 4096 || o.wal_segment_size > (uint64_t{1} << 40)) {
    Fail("--wal-segment-size must be 4096 bytes to 1 TiB");
  }
  const std::string prealloc = vm["wal-preallocate"].as<std::string>();
  if (prealloc != "on" && prealloc != "off") Fail("--wal-preallocate must be on or off, not \"" + prealloc + "\"");
  o.wal_preallocate = prealloc == "on";
  o.wal_keep_bytes = bytes("wal-keep-bytes");
  o.slot_max_bytes = bytes("slot-max-bytes");
  o.transport_io_threads = vm["transport-io-threads"].as<int>();
  if (o.transport_io_threads < 1 || o.transport_io_threads > 64) Fail("--transport-io-threads must be 1..64");

  // Signals are taken by sigwait in this thread; every thread started below
  // inherits the mask, so none is interrupted.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  // A node that fails while running shuts down like on SIGTERM, then exits
  // with 70, so that a supervisor restarts it (which retries, or finishes an
  // interrupted snapshot install).
  static std::atomic<bool> failed{false};
  o.on_failure = [](const Status& why) {
    std::fprintf(stderr, "replicad: the node failed: %s\n", why.ToString().c_str());
    failed.store(true);
    ::kill(::getpid(), SIGTERM);  // taken by the sigwait below
  };
  auto engine = Engine::Open(o);
  if (!engine.ok()) Fail(engine.status().ToString(), 1);
  auto server = RespServer::Start(engine->get(), ro);
  if (!server.ok()) {
    (*engine)->Interrupt();
    (void)(*engine)->Close();
    Fail("client port: " + server.status().ToString(), 1);
  }
  {
    HostPort published = client_advertise ? *client_advertise : HostPort{ro.host, (*server)->port()};
    if (published.port == 0) published.port = (*server)->port();
    (*engine)->SetClientAddress(published.ToString());
  }
  std::unique_ptr<MetricsServer> metrics;
  // A failure from here on closes what is open before exiting.
  auto fail_open = [&](const std::string& msg) {
    if (server.ok()) (*server)->Stop();
    (*engine)->Interrupt();
    (void)(*engine)->Close();
    Fail(msg, 1);
  };
  if (vm.count("metrics-listen")) {
    const std::string& mh = metrics_host;
    const uint16_t mp = metrics_port;
    Engine* e = engine->get();
    RespServer* rs = server->get();
    // Labelled like the engine's metrics (an id needs no escaping: CheckName).
    const std::string label = "{node=\"" + o.node_id + "\"} ";
    auto m = MetricsServer::Start(mh, mp, [e, rs, label] {
      const RespStats& s = rs->stats();
      std::string text = e->PrometheusMetrics();
      auto add = [&text, &label](const char* name, const char* type, const char* help, uint64_t value) {
        text += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + label +
                std::to_string(value) + "\n";
      };
      add("replica_client_connections_total", "counter", "Redis-protocol client connections", s.connections.load());
      add("replica_client_commands_total", "counter", "Redis-protocol commands served", s.commands.load());
      add("replica_client_protocol_errors_total", "counter", "clients closed for bad input", s.protocol_errors.load());
      add("replica_client_rejected_total", "counter", "connections refused past --max-clients",
          s.rejected_clients.load());
      add("replica_client_connected", "gauge", "Redis-protocol client connections open now", s.connected.load());
      return text;
    });
    if (!m.ok()) fail_open("metrics port: " + m.status().ToString());
    metrics = std::move(m).value();
  }
  std::printf("replicad: ready node=%s role=%s replication=%s client=%s metrics=%u\n", o.node_id.c_str(),
              RoleName((*engine)->status().role), HostPort{o.listen_host, (*engine)->listen_port()}.ToString().c_str(),
              HostPort{ro.host, (*server)->port()}.ToString().c_str(), metrics ? metrics->port() : 0);
  std::fflush(stdout);

  int sig = 0;
  sigwait(&signals, &sig);
  RLOG(kInfo, "replicad.stopping") << "node=" << o.node_id << " signal=" << sig;
  // A second signal while shutting down means: stop now.
  std::thread([signals]() mutable {
    int again = 0;
    sigwait(&signals, &again);
    std::fprintf(stderr, "replicad: second signal, exiting at once\n");
    std::_Exit(1);
  }).detach();
  if (metrics) metrics->Stop();
  (*engine)->Interrupt();  // clients blocked in a write or WAIT return now
  (*server)->Stop();
  Status st = (*engine)->Close();
  if (failed.load()) {
    std::printf("replicad: stopped node=%s after a failure (exit status 70)\n", o.node_id.c_str());
    std::fflush(stdout);
    return 70;
  }
  if (!st.ok()) Fail("close: " + st.ToString(), 1);
  std::printf("replicad: stopped node=%s\n", o.node_id.c_str());
  return 0;
}
