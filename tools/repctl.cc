// repctl: the operator's view of a cluster through etcd (docs/failover.md):
// status, planned switchover, forced promotion, manual fencing.
#include <boost/json.hpp>
#include <boost/program_options.hpp>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <set>
#include <thread>

#include "base/log.h"
#include "base/names.h"
#include "replication/arbiter.h"
#include "replica/engine.h"
#include "replication/etcd.h"

namespace po = boost::program_options;
// Long options only by their whole names: Boost would take any unambiguous
// prefix (--foll for --follow), so a typo could name another option.
constexpr int kOptionStyle = po::command_line_style::default_style & ~po::command_line_style::allow_guessing;
using namespace replica;
using Clock = std::chrono::steady_clock;

namespace {

[[noreturn]] void Fail(const std::string& msg, int code = 1) {
  std::fprintf(stderr, "repctl: %s\n", msg.c_str());
  std::exit(code);
}

template <typename T>
T OrFail(Result<T> r, const std::string& what) {
  if (!r.ok()) Fail(what + ": " + r.status().ToString());
  return std::move(r).value();
}

const char kUsage[] =
    "Usage: repctl [--etcd URLS] [--cluster NAME] COMMAND [ARGS]\n\n"
    "Commands:\n"
    "  status [--json]              every node: role, epoch, LSNs, lag in records and ms (n/c: not\n"
    "                               connected to the active), eligibility\n"
    "  switchover [--to NODE]       planned hand-over to NODE (default: the most caught-up standby);\n"
    "                               the active refuses writes until NODE holds everything, then steps down\n"
    "  promote --force NODE         make NODE the active when there is none and no eligible standby\n"
    "                               came forward; writes the old active acknowledged but NODE lacks are LOST\n"
    "  fence NODE                   make NODE stop accepting writes and give up the active role\n"
    "  set-commit RULE              change the commit rule at run time (async | remote-write:N |\n"
    "                               remote-apply:N); kept in etcd, so every later active takes it too\n"
    "  reseed NODE                  replace standby NODE's replica with a snapshot of the active\n"
    "                               (files it holds intact are not sent again)\n"
    "  remove [--force] NODE        forget a standby that was shut down for good: the active drops\n"
    "                               its slot (the log kept for it may then be deleted); a NODE no\n"
    "                               running node keeps a slot for is refused as unknown (a mistyped\n"
    "                               id), unless --force (a stopped node may keep one)\n\n"
    "Exit status: 0 done, 1 failed (etcd unreachable, no such node, timed out), 2 usage error.\n\nOptions";

struct Cluster {
  std::optional<ActiveInfo> active;
  std::vector<NodeInfo> nodes;
  std::optional<std::vector<std::string>> sync;  // entries: ID or ID#INCARNATION (SyncEntry)
  std::string commit;  // the rule set at run time (ctl/commit), else the active's; empty if unknown
  // Damage an operator must see, not a reason to refuse every command (the
  // documented way out of a damaged sync key is repctl promote --force):
  std::string sync_unreadable;  // why the sync key could not be read; empty if it could
  std::vector<Arbiter::UnreadableSession> unreadable;  // sessions that are no node session
};

// Reads the cluster; a damaged sync key or node session is reported on
// stderr and kept in the result. etcd unreachable, or a damaged active key,
// fails.
Cluster Read(Arbiter* a) {
  Cluster c;
  c.active = OrFail(a->GetActive(), "read the active key from etcd");
  c.nodes = OrFail(a->GetNodes(), "read the node sessions from etcd");
  c.unreadable = OrFail(a->GetUnreadableNodes(), "read the node sessions from etcd");
  if (auto ctl = a->GetControls(); ctl.ok()) {
    for (const auto& [name, value] : *ctl) {
      if (name == "commit") c.commit = value;
    }
  }
  if (c.commit.empty() && c.active) {
    for (const auto& n : c.nodes) {
      if (n.id == c.active->id) c.commit = n.commit;
    }
  }
  if (c.commit.empty() && !c.nodes.empty()) {
    // No active and no rule set at run time: the nodes' own (--commit), if
    // they agree; each judges its eligibility by its own.
    c.commit = c.nodes.front().commit;
    for (const auto& n : c.nodes) {
      if (n.commit != c.commit) c.commit.clear();
    }
  }
  auto sync = a->GetSyncSet();
  if (sync.ok()) {
    c.sync = *sync;
  } else if (sync.status().IsCorruption()) {
    c.sync_unreadable = sync.status().ToString();
    std::fprintf(stderr, "repctl: WARNING: the sync set is UNREADABLE (%s): while there is no active, no node "
                         "campaigns under a synchronous rule; delete the key, or repctl promote --force NODE\n",
                 c.sync_unreadable.c_str());
  } else {
    Fail("read the sync set from etcd: " + sync.status().ToString());
  }
  for (const auto& u : c.unreadable) {
    std::fprintf(stderr, "repctl: WARNING: node session '%s' is UNREADABLE: %s\n", u.key.c_str(), u.why.c_str());
  }
  for (const auto& n : c.nodes) {
    if (!n.unreadable.empty()) {
      std::fprintf(stderr, "repctl: WARNING: node session '%s' is UNREADABLE in part (read as 0): %s\n", n.id.c_str(),
                   n.unreadable.c_str());
    }
  }
  return c;
}

const NodeInfo* Find(const Cluster& c, const std::string& id) {
  for (const auto& n : c.nodes) {
    if (n.id == id) return &n;
  }
  return nullptr;
}

// May campaign if there were no active: not failed, and under the async
// rule any node, else listed with its data directory (or no list). Unknown
// (nullopt) while the sync set is unreadable under a synchronous rule.
std::optional<bool> Eligible(const Cluster& c, const NodeInfo& n) {
  if (!n.failure.empty()) return false;
  if (c.commit == "async") return true;
  if (!c.sync_unreadable.empty()) return std::nullopt;
  return !c.sync || SyncListed(*c.sync, n.id, n.incarnation);
}

// The sync set's node ids, for display.
std::vector<std::string> SyncIds(const std::vector<std::string>& entries) {
  std::vector<std::string> ids;
  for (const auto& e : entries) ids.push_back(SyncEntry::Parse(e).id);
  return ids;
}

int PrintStatus(Arbiter* a, bool as_json) {
  const Cluster c = Read(a);
  uint64_t head = 0;
  const NodeInfo* act = c.active ? Find(c, c.active->id) : nullptr;
  if (act) head = act->last_lsn;
  // Lag in time, as the active measures it (absent: not connected to it).
  auto lag_ms = [&](const std::string& id) -> std::optional<uint64_t> {
    if (!act) return std::nullopt;
    auto it = act->standby_lag_ms.find(id);
    if (it == act->standby_lag_ms.end()) return std::nullopt;
    return it->second;
  };
  if (as_json) {
    boost::json::array nodes;
    for (const auto& n : c.nodes) {
      const bool is_active = c.active && c.active->id == n.id;
      nodes.push_back(boost::json::object{{"id", n.id},
                                          {"role", is_active ? "active" : "standby"},
                                          {"address", n.address},
                                          {"client_address", n.client_address},
                                          {"epoch", n.epoch},
                                          {"last_lsn", n.last_lsn},
                                          {"durable_lsn", n.durable_lsn},
                                          {"applied_lsn", n.applied_lsn},
                                          {"lag_records", is_active || head < n.durable_lsn ? 0 : head - n.durable_lsn},
                                          {"lag_bytes", is_active ? boost::json::value(0)
                                                        : act && act->standby_lag_bytes.count(n.id)
                                                            ? boost::json::value(act->standby_lag_bytes.at(n.id))
                                                            : boost::json::value(nullptr)},
                                          {"lag_ms", is_active ? boost::json::value(0)
                                                     : lag_ms(n.id) ? boost::json::value(*lag_ms(n.id))
                                                                    : boost::json::value(nullptr)},
                                          {"eligible", is_active ? boost::json::value(false)
                                                       : Eligible(c, n) ? boost::json::value(*Eligible(c, n))
                                                                        : boost::json::value(nullptr)},
                                          {"commit", n.commit},
                                          {"wal_first_lsn", n.wal_first_lsn},
                                          {"wal_bytes", n.wal_bytes},
                                          {"db_bytes", n.db_bytes},
                                          {"slot_lsn", act && act->slots.count(n.id) ? boost::json::value(act->slots.at(n.id))
                                                                                     : boost::json::value(nullptr)},
                                          {"resyncs", n.resyncs},
                                          {"progress", n.progress},
                                          {"failure", n.failure},
                                          {"unreadable", n.unreadable.empty() ? boost::json::value(nullptr)
                                                                              : boost::json::value(n.unreadable)}});
    }
    boost::json::array unreadable;
    for (const auto& u : c.unreadable) unreadable.push_back(boost::json::object{{"key", u.key}, {"why", u.why}});
    boost::json::object out{{"active", c.active ? boost::json::value(c.active->id) : boost::json::value(nullptr)},
                            {"epoch", c.active ? c.active->epoch : 0},
                            {"sync_set", c.sync ? boost::json::value_from(SyncIds(*c.sync)) : boost::json::value(nullptr)},
                            {"sync_set_unreadable", c.sync_unreadable.empty() ? boost::json::value(nullptr)
                                                                              : boost::json::value(c.sync_unreadable)},
                            {"nodes", std::move(nodes)},
                            {"unreadable_sessions", std::move(unreadable)}};
    std::cout << boost::json::serialize(out) << "\n";
    return 0;
  }
  std::printf("active: %s", c.active ? c.active->id.c_str() : "(none)");
  if (c.active) std::printf(" at epoch %llu (%s)", static_cast<unsigned long long>(c.active->epoch), c.active->address.c_str());
  std::printf("\n%-12s %-8s %6s %10s %10s %10s %11s %11s %9s %-9s %-21s %s\n", "NODE", "ROLE", "EPOCH", "LAST",
              "DURABLE", "APPLIED", "LAG(recs)", "LAG(bytes)", "LAG(ms)", "ELIGIBLE", "REPLICATION", "CLIENT");
  for (const auto& n : c.nodes) {
    const bool is_active = c.active && c.active->id == n.id;
    const uint64_t lag = is_active || head < n.durable_lsn ? 0 : head - n.durable_lsn;
    const auto ms = lag_ms(n.id);
    const std::string ms_text = is_active ? "-" : ms ? std::to_string(*ms) : "n/c";
    const std::string bytes_text = is_active ? "-"
                                   : act && act->standby_lag_bytes.count(n.id) ? std::to_string(act->standby_lag_bytes.at(n.id))
                                                                               : "n/c";
    const auto eligible = Eligible(c, n);
    std::printf("%-12s %-8s %6llu %10llu %10llu %10llu %11llu %11s %9s %-9s %-21s %s\n", n.id.c_str(),
                !n.unreadable.empty() ? "UNREADABLE" : is_active ? "active" : n.failure.empty() ? "standby" : "FAILED",
                static_cast<unsigned long long>(n.epoch),
                static_cast<unsigned long long>(n.last_lsn), static_cast<unsigned long long>(n.durable_lsn),
                static_cast<unsigned long long>(n.applied_lsn), static_cast<unsigned long long>(lag), bytes_text.c_str(),
                ms_text.c_str(),
                is_active ? "-" : !eligible ? "?" : *eligible ? "yes" : "no", n.address.c_str(),
                n.client_address.empty() ? "-" : n.client_address.c_str());
  }
  for (const auto& u : c.unreadable) {
    std::printf("%-12s %-8s %6s %10s %10s %10s %11s %11s %9s %-9s %-21s %s\n", u.key.c_str(), "UNREADABLE", "-", "-",
                "-", "-", "-", "-", "-", "-", "-", "-");
  }
  for (const auto& u : c.unreadable) std::printf("%s: UNREADABLE session: %s\n", u.key.c_str(), u.why.c_str());
  if (c.nodes.empty()) {
    std::printf("(no node has a session in this cluster)\n");
    return 0;
  }
  if (act) std::printf("\ncommit rule: %s (on the active)\n", act->commit.empty() ? "?" : act->commit.c_str());
  if (c.sync && c.commit == "async") {
    std::printf("sync set: not used under the async rule (every node is eligible for promotion)\n");
  } else if (c.sync) {
    std::string ids;
    for (const auto& e : *c.sync) {
      const SyncEntry s = SyncEntry::Parse(e);
      const NodeInfo* n = Find(c, s.id);
      ids += (ids.empty() ? "" : ", ") + s.id;
      if (n && !SyncListed({e}, n->id, n->incarnation)) ids += " (listed with another data directory: not eligible)";
    }
    std::printf("sync set (eligible for promotion): %s\n", ids.empty() ? "(empty: none)" : ids.c_str());
  } else if (!c.sync_unreadable.empty()) {
    std::printf("sync set (eligible for promotion): UNREADABLE (%s); while there is no active, no node campaigns "
                "under a synchronous rule: delete the key, or repctl promote --force NODE\n",
                c.sync_unreadable.c_str());
  }
  std::printf("\n%-12s %21s %12s %12s %s\n", "NODE", "WAL (LSNs kept)", "WAL SIZE", "DB SIZE", "SLOT ON THE ACTIVE");
  auto mib = [](uint64_t b) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1 << 20));
    return std::string(buf);
  };
  for (const auto& n : c.nodes) {
    const bool is_active = c.active && c.active->id == n.id;
    std::string slot = "-";
    if (!is_active && act) {
      auto it = act->slots.find(n.id);
      slot = it == act->slots.end() ? "none" : "from LSN " + std::to_string(it->second);
    }
    const std::string kept = std::to_string(n.wal_first_lsn) + ".." + std::to_string(n.last_lsn);
    std::printf("%-12s %21s %12s %12s %s\n", n.id.c_str(), kept.c_str(), mib(n.wal_bytes).c_str(),
                mib(n.db_bytes).c_str(), slot.c_str());
  }
  if (act) {
    for (const auto& [id, lsn] : act->slots) {
      if (!Find(c, id)) {
        std::printf("%-12s %21s %12s %12s from LSN %llu (not running: repctl remove %s forgets it)\n", id.c_str(), "-",
                    "-", "-", static_cast<unsigned long long>(lsn), id.c_str());
      }
    }
  }
  for (const auto& n : c.nodes) {
    if (!n.progress.empty()) std::printf("%s: %s\n", n.id.c_str(), n.progress.c_str());
    if (!n.failure.empty()) std::printf("%s: FAILED (restart it; see its engine.failed log line): %s\n", n.id.c_str(), n.failure.c_str());
    if (!n.unreadable.empty()) std::printf("%s: UNREADABLE in part (read as 0): %s\n", n.id.c_str(), n.unreadable.c_str());
  }
  return 0;
}

// Polls the active key until pred holds or the limit passes; returns the elapsed time or -1.
template <typename Pred>
long WaitFor(Arbiter* a, Pred pred, std::chrono::seconds limit) {
  const auto start = Clock::now();
  while (Clock::now() - start < limit) {
    auto active = a->GetActive();
    if (active.ok() && pred(*active)) {
      return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

// Polls node `id`'s session until pred holds or the limit passes; returns
// the elapsed time or -1. Nodes publish their session every 0.5 s.
template <typename Pred>
long WaitForNode(Arbiter* a, const std::string& id, Pred pred, std::chrono::seconds limit) {
  const auto start = Clock::now();
  while (Clock::now() - start < limit) {
    if (auto nodes = a->GetNodes(); nodes.ok()) {
      for (const auto& n : *nodes) {
        if (n.id == id && pred(n)) {
          return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count());
        }
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  po::options_description desc(kUsage);
  // clang-format off
  desc.add_options()
      ("help,h", "show this help")
      ("etcd", po::value<std::string>()->default_value("127.0.0.1:2379"), "etcd client URLs, comma-separated")
      ("cluster", po::value<std::string>()->default_value("default"), "cluster name (as given to replicad)")
      ("json", "status: one JSON object instead of a table")
      ("to", po::value<std::string>(), "switchover: the node to hand over to")
      ("force", "promote: required, to acknowledge the risk of losing writes; remove: also an id no running node "
                "keeps a slot for")
      ("timeout", po::value<int>()->default_value(20),
       "seconds to wait for a command to take effect (switchover, promote, fence, set-commit, reseed, remove), "
       "1..86400");
  // clang-format on
  // COMMAND and its arguments, given as positionals; not listed in --help.
  po::options_description hidden;
  hidden.add_options()("command", po::value<std::vector<std::string>>());
  po::options_description all;
  all.add(desc).add(hidden);
  po::positional_options_description pos;
  pos.add("command", -1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(all).positional(pos).style(kOptionStyle).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    Fail(std::string(e.what()) + " (see repctl --help)", 2);
  }
  if (vm.count("help") || !vm.count("command")) {
    std::cout << desc << "\n";
    return vm.count("help") ? 0 : 2;
  }
  SetLogLevel(LogLevel::kWarn);
  const auto args = vm["command"].as<std::vector<std::string>>();
  const std::string& cmd = args[0];
  // An option given to a command that does not take it is a mistake the
  // operator should hear of (repctl promote --to b is not a switchover).
  if (vm.count("json") && cmd != "status") Fail("--json goes with status only", 2);
  if (vm.count("to") && cmd != "switchover") Fail("--to goes with switchover only", 2);
  if (vm.count("force") && cmd != "promote" && cmd != "remove") Fail("--force goes with promote or remove only", 2);
  auto endpoints = etcd::ParseEndpoints(vm["etcd"].as<std::string>());
  if (!endpoints.ok()) Fail("--etcd: " + endpoints.status().message(), 2);
  EtcdArbiterOptions ao;
  ao.endpoints = *endpoints;
  ao.cluster = vm["cluster"].as<std::string>();
  if (Status st = CheckName("--cluster", ao.cluster); !st.ok()) Fail(st.message(), 2);
  auto arbiter = OrFail(NewEtcdArbiter(ao), "etcd");
  if (vm["timeout"].as<int>() < 1 || vm["timeout"].as<int>() > 86400) Fail("--timeout must be 1..86400 seconds", 2);
  const auto limit = std::chrono::seconds(vm["timeout"].as<int>());

  if (cmd == "status") {
    if (args.size() != 1) Fail("status takes no argument", 2);
    return PrintStatus(arbiter.get(), vm.count("json") > 0);
  }
  if (cmd == "fence") {
    if (args.size() != 2) Fail("usage: repctl fence NODE", 2);
    const Cluster c = Read(arbiter.get());
    const NodeInfo* n = Find(c, args[1]);
    if (!n) Fail("no node '" + args[1] + "' has a session in cluster '" + ao.cluster + "'");
    if (n->role != "active" && (!c.active || c.active->id != args[1])) {
      std::printf("%s is a standby (the active is %s): nothing to fence\n", args[1].c_str(),
                  c.active ? c.active->id.c_str() : "none");
      return 0;
    }
    Status put = arbiter->PutControl("fence/" + args[1], "repctl");
    if (!put.ok()) Fail("etcd: " + put.ToString());
    const long ms = WaitFor(arbiter.get(), [&](const std::optional<ActiveInfo>& a) { return !a || a->id != args[1]; }, limit);
    if (ms < 0) Fail("node " + args[1] + " still holds the active key after " + std::to_string(limit.count()) + " s");
    std::printf("fenced %s: it no longer holds the active role (%ld ms)\n", args[1].c_str(), ms);
    return 0;
  }
  if (cmd == "switchover") {
    if (args.size() != 1) Fail("usage: repctl switchover [--to NODE]", 2);
    const Cluster c = Read(arbiter.get());
    if (!c.active) Fail("there is no active to switch over from");
    std::string target;
    if (vm.count("to")) {
      target = vm["to"].as<std::string>();
      if (!Find(c, target)) Fail("no node '" + target + "' has a session in cluster '" + ao.cluster + "'");
      if (target == c.active->id) Fail(target + " is already the active");
      if (const NodeInfo* t = Find(c, target); t && !t->failure.empty()) Fail(target + " has failed: " + t->failure);
    } else {
      uint64_t best = 0;
      for (const auto& n : c.nodes) {
        if (n.id != c.active->id && n.failure.empty() && (target.empty() || n.durable_lsn > best)) {
          target = n.id;
          best = n.durable_lsn;
        }
      }
      if (target.empty()) Fail("no standby to switch over to");
    }
    const std::string from = c.active->id;
    // Bound to this epoch: a request left behind (this process killed while
    // it waits) is void once the role has moved.
    const uint64_t epoch = OrFail(arbiter->GetEpoch(), "read the epoch from etcd");
    Status put = arbiter->PutControl("switchover", OperatorRequest(target, epoch));
    if (!put.ok()) Fail("etcd: " + put.ToString());
    const long ms = WaitFor(arbiter.get(), [&](const std::optional<ActiveInfo>& a) { return a && a->id == target; }, limit);
    (void)arbiter->ClearControl("switchover");
    if (ms < 0) {
      // Say where it stopped: the old active still holds the role (it
      // refused: its log says engine.switchover_failed), or it handed over
      // and the target never took the role (stopped, paused, not eligible).
      std::string now = "no active now";
      bool kept = false;  // still the term the request was made in
      if (auto a = arbiter->GetActive(); a.ok() && *a) {
        now = "the active is now " + (*a)->id + " (epoch " + std::to_string((*a)->epoch) + ")";
        kept = (*a)->id == from && (*a)->epoch == epoch;
      }
      Fail("the switchover to " + target + " did not complete in " + std::to_string(limit.count()) + " s: " + now +
           (kept ? " (it did not hand over; see its log: engine.switchover_failed)"
                 : " (" + from + " handed over, engine.switchover_handed in its log, but " + target +
                       " did not take the role: is it running and not paused? its log may say engine.not_eligible)"));
    }
    std::printf("switched over from %s to %s: the active key moved %ld ms after the request\n", from.c_str(),
                target.c_str(), ms);
    return 0;
  }
  if (cmd == "promote") {
    if (args.size() != 2 || !vm.count("force")) {
      Fail("usage: repctl promote --force NODE (writes NODE lacks are lost; prefer switchover)", 2);
    }
    const Cluster c = Read(arbiter.get());
    if (c.active) Fail(c.active->id + " is the active; use repctl switchover --to " + args[1]);
    const NodeInfo* n = Find(c, args[1]);
    if (!n) Fail("no node '" + args[1] + "' has a session in cluster '" + ao.cluster + "'");
    uint64_t best = 0;
    for (const auto& o : c.nodes) best = std::max(best, o.durable_lsn);
    std::fprintf(stderr, "repctl: WARNING: forcing %s (durable LSN %llu; the highest among running nodes is %llu, "
                         "and nodes that are down may hold more): writes the old active acknowledged but %s lacks are "
                         "lost\n",
                 args[1].c_str(), static_cast<unsigned long long>(n->durable_lsn),
                 static_cast<unsigned long long>(best), args[1].c_str());
    const uint64_t epoch = OrFail(arbiter->GetEpoch(), "read the epoch from etcd");
    Status put = arbiter->PutControl("promote", OperatorRequest(args[1], epoch));
    if (!put.ok()) Fail("etcd: " + put.ToString());
    const long ms = WaitFor(arbiter.get(), [&](const std::optional<ActiveInfo>& a) { return a && a->id == args[1]; }, limit);
    (void)arbiter->ClearControl("promote");
    if (ms < 0) Fail(args[1] + " did not become the active within " + std::to_string(limit.count()) + " s");
    std::printf("promoted %s (%ld ms)\n", args[1].c_str(), ms);
    return 0;
  }
  if (cmd == "set-commit") {
    if (args.size() != 2) Fail("usage: repctl set-commit RULE (async | remote-write:N | remote-apply:N)", 2);
    auto rule = CommitRule::Parse(args[1]);
    if (!rule.ok()) Fail("bad rule '" + args[1] + "': " + rule.status().message(), 2);
    const std::string want = rule->ToString();
    Status put = arbiter->PutControl("commit", want);
    if (!put.ok()) Fail("etcd: " + put.ToString());
    const Cluster c = Read(arbiter.get());
    if (!c.active) {
      std::printf("stored commit rule %s; there is no active now: the next one takes it\n", want.c_str());
      return 0;
    }
    const long ms = WaitForNode(arbiter.get(), c.active->id, [&](const NodeInfo& n) { return n.commit == want; }, limit);
    if (ms >= 0) {
      std::printf("commit rule is now %s on the active %s (%ld ms)\n", want.c_str(), c.active->id.c_str(), ms);
      return 0;
    }
    Fail("the active did not take commit rule " + want + " within " + std::to_string(limit.count()) +
         " s (see its log: engine.commit_rule_refused); the rule stays stored in etcd");
  }
  if (cmd == "reseed") {
    if (args.size() != 2) Fail("usage: repctl reseed NODE", 2);
    const Cluster c = Read(arbiter.get());
    const NodeInfo* n = Find(c, args[1]);
    if (!n) Fail("no node '" + args[1] + "' has a session in cluster '" + ao.cluster + "'");
    if (c.active && c.active->id == args[1]) Fail(args[1] + " is the active; switch over first, then reseed it");
    if (!c.active) Fail("there is no active to take a snapshot from");
    const uint64_t before = n->resyncs;
    Status put = arbiter->PutControl("reseed/" + args[1], "repctl");
    if (!put.ok()) Fail("etcd: " + put.ToString());
    std::string last_progress;
    uint64_t holds = 0;
    const long ms = WaitForNode(arbiter.get(), args[1], [&](const NodeInfo& m) {
      if (!m.progress.empty() && m.progress != last_progress) {
        std::fprintf(stderr, "repctl: %s: %s\n", args[1].c_str(), m.progress.c_str());
        last_progress = m.progress;
      }
      holds = m.last_lsn;
      return m.resyncs > before;
    }, limit);
    if (ms >= 0) {
      std::printf("reseeded %s from a snapshot of %s; it now holds LSN %llu (%ld ms)\n", args[1].c_str(),
                  c.active->id.c_str(), static_cast<unsigned long long>(holds), ms);
      return 0;
    }
    (void)arbiter->ClearControl("reseed/" + args[1]);
    Fail(args[1] + " was not reseeded within " + std::to_string(limit.count()) +
         " s (a large database needs a larger --timeout; see its log: engine.resync_*)");
  }
  if (cmd == "remove") {
    if (args.size() != 2) Fail("usage: repctl remove NODE", 2);
    const Cluster c = Read(arbiter.get());
    if (Find(c, args[1])) Fail(args[1] + " is running (it has a session); stop it first, then remove it");
    if (!c.active) Fail("there is no active to drop the slot of " + args[1]);
    const NodeInfo* act = Find(c, c.active->id);
    if (!act) {
      Fail("the active " + c.active->id + " has no readable session in etcd: cannot tell whether it keeps a slot for " +
           args[1]);
    }
    // Every running node publishes the slots it keeps (a standby: those it
    // kept as an earlier active, which it would keep again if promoted). An
    // id none of them keeps is most likely mistyped: its removal would stay
    // in etcd for good, waiting for a node that never comes. One removed
    // already (a repeat, or a first call that timed out) is not refused.
    bool removed_before = false;
    if (auto ctl = arbiter->GetControls(); ctl.ok()) {
      for (const auto& [name, value] : *ctl) removed_before |= name == "remove/" + args[1];
    }
    std::set<std::string> keeping;
    for (const auto& n : c.nodes) {
      if (n.slots.count(args[1])) keeping.insert(n.id);
    }
    if (keeping.empty() && removed_before) {
      std::printf("%s was removed already: no running node keeps a slot for it\n", args[1].c_str());
      return 0;
    }
    if (keeping.empty() && !vm.count("force")) {
      std::string held;
      for (const auto& n : c.nodes) {
        for (const auto& [id, lsn] : n.slots) held += (held.empty() ? "" : ", ") + id + " (on " + n.id + ")";
      }
      Fail("nothing to remove: no running node keeps a slot for " + args[1] + " (slots kept: " +
           (held.empty() ? "none" : held) + "). Check the id; if it is right, no running node keeps log for it. "
           "A stopped node may keep one from an earlier term: repctl remove --force " + args[1] +
           " writes the removal anyway, and whichever node is the active drops the slot");
    }
    // The request stays in etcd until the node comes back, so that any
    // later active drops a slot it kept for it from an earlier term.
    Status put = arbiter->PutControl("remove/" + args[1], "repctl");
    if (!put.ok()) Fail("etcd: " + put.ToString());
    if (!act->slots.count(args[1])) {
      std::string others;
      for (const auto& id : keeping) others += (others.empty() ? "" : ", ") + id;
      std::printf("removed %s: the active %s keeps no log for it (nor will a later active%s)\n", args[1].c_str(),
                  c.active->id.c_str(),
                  others.empty() ? "" : ("; " + others + " drops the slot it kept from an earlier term if promoted").c_str());
      return 0;
    }
    if (WaitForNode(arbiter.get(), c.active->id, [&](const NodeInfo& m) { return !m.slots.count(args[1]); }, limit) >= 0) {
      std::printf("removed %s: the active %s no longer keeps log for it\n", args[1].c_str(), c.active->id.c_str());
      return 0;
    }
    (void)arbiter->ClearControl("remove/" + args[1]);
    Fail("the active did not drop the slot of " + args[1] + " within " + std::to_string(limit.count()) + " s");
  }
  Fail("unknown command '" + cmd + "' (see repctl --help)", 2);
}
