// Scheduling of per-expert work on the CPU: many experts -> one OpenMP task
// per expert (dynamic schedule, single-threaded BLAS inside, one fork/join
// for the whole pass); few experts -> experts in turn, each using every
// thread (threaded BLAS and parallel row loops).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moe {
namespace cpu {

inline int max_threads() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Per-thread scratch slots reserved in a workspace (for weights that must be
// converted to the compute type, and weight grads that must be converted
// back). Bounded so that big machines do not reserve huge workspaces.
constexpr int kMaxSlots = 8;
inline int scratch_slots() { return std::min(max_threads(), kMaxSlots); }

// Calls body(e, slot, inner) for every expert e in [0, E). `inner` tells the
// body whether it may use parallel loops itself (false inside the per-expert
// parallel pass). need_slots: the body uses scratch slot `slot`, so at most
// `nslots` experts run at once.
template <class F>
void for_each_expert(int64_t E, const int32_t *off, int nslots, bool need_slots, F &&body) {
  const int nthreads = max_threads();
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += off[e + 1] > off[e];
  const int team = need_slots ? std::min(nthreads, nslots) : nthreads;
  if (team > 1 && active >= 2 * team) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
    for (int64_t e = 0; e < E; ++e) body(e, thread_id(), false);
  } else {
    for (int64_t e = 0; e < E; ++e) body(e, 0, true);
  }
}

}  // namespace cpu
}  // namespace moe
