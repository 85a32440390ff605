// The info log of a node's RocksDB (DATA_DIR/db/LOG), written by the engine
// instead of by RocksDB's own file logger.
//
// RocksDB 7.8 as Debian builds it (assertions on) aborts the process when a
// line cannot be appended to its LOG file after an earlier failure, which a
// full disk brings about: the error handler logs the very write error it
// handles. This logger writes each line with one write(2) and drops lines
// it cannot write, so a full disk reaches the engine as an error (the node
// fails cleanly) instead of ending the process. Warnings and errors also go
// to the node's log (event rocksdb.log).
#pragma once

#include <memory>
#include <string>

#include <rocksdb/env.h>

namespace replica {

// The previous run's LOG, if any, is kept as LOG.old (one generation).
std::shared_ptr<rocksdb::Logger> NewDbLogger(const std::string& db_dir);

}  // namespace replica
