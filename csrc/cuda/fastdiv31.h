// Division of a 31-bit unsigned n by a divisor d >= 1 fixed for a launch, by one 32-bit
// multiply-high: n / d = umulhi(2 n, m) >> l, l = ceil(log2 d), m = ceil(2^(31 + l) / d).
// Exact for n < 2^31 (Granlund and Montgomery, "Division by invariant integers using
// multiplication", 1994, theorem 4.2 with N = 31: m d - 2^(31 + l) < d <= 2^l), and m < 2^32
// for every d (m = 2^31 at d = 1). The sm90 wgrad producer divides a gathered row's sorted[]
// entry by k this way (the 64-bit multiply-high it replaced cost four instructions a row).
// Plain C++ so that the CPU unit tests check it against n / d.
#pragma once

#include <cstdint>

namespace moe {
namespace cuda {

struct FastDiv31 {
  uint32_t m;
  uint32_t l;
};

inline FastDiv31 fastdiv31(uint32_t d) {
  uint32_t l = 0;
  while (l < 31 && (uint32_t(1) << l) < d) ++l;
  return FastDiv31{uint32_t(((uint64_t(1) << (31 + l)) + d - 1) / d), l};
}

// The host's mirror of the device's __umulhi(n << 1, m) >> l.
inline uint32_t fastdiv31_apply(uint32_t n, FastDiv31 f) {
  return uint32_t((uint64_t(n << 1) * f.m) >> 32) >> f.l;
}

}  // namespace cuda
}  // namespace moe
