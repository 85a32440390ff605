// Clang thread-safety annotations (-Wthread-safety). They compile to nothing
// under GCC; the sanitizer CI build uses clang and turns violations into errors.
// Every member guarded by a lock is annotated GUARDED_BY(that lock).
#pragma once

#if defined(__clang__)
#define REPLICA_TSA(x) __attribute__((x))
#else
#define REPLICA_TSA(x)
#endif

#define CAPABILITY(x) REPLICA_TSA(capability(x))
#define SCOPED_CAPABILITY REPLICA_TSA(scoped_lockable)
#define GUARDED_BY(x) REPLICA_TSA(guarded_by(x))
#define PT_GUARDED_BY(x) REPLICA_TSA(pt_guarded_by(x))
#define ACQUIRED_BEFORE(...) REPLICA_TSA(acquired_before(__VA_ARGS__))
#define REQUIRES(...) REPLICA_TSA(requires_capability(__VA_ARGS__))
#define ACQUIRE(...) REPLICA_TSA(acquire_capability(__VA_ARGS__))
#define RELEASE(...) REPLICA_TSA(release_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) REPLICA_TSA(acquire_shared_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) REPLICA_TSA(release_shared_capability(__VA_ARGS__))
#define RELEASE_GENERIC(...) REPLICA_TSA(release_generic_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) REPLICA_TSA(try_acquire_capability(__VA_ARGS__))
#define EXCLUDES(...) REPLICA_TSA(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) REPLICA_TSA(assert_capability(x))
#define NO_THREAD_SAFETY_ANALYSIS REPLICA_TSA(no_thread_safety_analysis)
