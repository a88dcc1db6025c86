// The order of the row GEMMs' tile list (A/B candidate, notes/hopper.md session 21).
//
// The persistent row GEMMs walk the list side by side, one item per cluster: in expert order
// every tile pair of an expert asks for that expert's weight tiles at the same moment, so all
// of them wait for the same DRAM reads (with every weight tile held in L2 instead, a timing
// build ran GEMM1 4%, dX 5%, dA' 8% faster at Qwen3-30B-A3B T=16384). "Lead" order lets each
// expert's first tile pair run `lead` experts ahead of its other tiles: for x = 0, 1, ...,
//   lead(x) if x < E, then follow(x - lead) if 0 <= x - lead < E,
// where lead(e) is e's first min(cnt_e, 2) tiles and follow(e) the rest. The first pair then
// brings e's weights into L2 for the rest. lead = 0 is expert order. Each output row still
// comes from one tile with the same arithmetic: results are bit-identical in any order.
// Plain C++ so that the CPU unit tests check the slots.
#pragma once

#include <cstdint>

namespace moe {
namespace cuda {

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

// The most experts the lead order handles (per-expert scans in shared memory); beyond it the
// list stays in expert order.
constexpr int kLeadMaxExperts = 1024;

// Tiles of expert e that go in its lead run.
MOE_HOST_DEVICE inline int lead_tiles(int cnt) { return cnt < 2 ? cnt : 2; }

struct LeadSlots {
  int64_t lead, follow;  // list slots of e's lead run and of its follow run
};

// lead_ex / follow_ex: exclusive prefix sums over e of lead_tiles(cnt_e) and of
// cnt_e - lead_tiles(cnt_e), E + 1 entries each (totals last).
MOE_HOST_DEVICE inline LeadSlots lead_slots(const int32_t *lead_ex, const int32_t *follow_ex,
                                            int E, int lead, int e) {
  const int behind = e - lead > 0 ? e - lead : 0;     // follow runs before lead(e)
  const int ahead = e + lead + 1 < E ? e + lead + 1 : E;  // lead runs before follow(e)
  return LeadSlots{int64_t(lead_ex[e]) + follow_ex[behind],
                   int64_t(lead_ex[ahead]) + follow_ex[e]};
}

}  // namespace cuda
}  // namespace moe

#undef MOE_HOST_DEVICE
