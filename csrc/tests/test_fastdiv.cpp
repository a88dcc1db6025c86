// The sm90 wgrad producer's 31-bit division by a launch constant (csrc/cuda/fastdiv31.h).
#include <gtest/gtest.h>

#include <random>

#include "cuda/fastdiv31.h"

namespace {

using moe::cuda::fastdiv31;
using moe::cuda::fastdiv31_apply;

TEST(FastDiv31, MatchesDivisionAtTheEdges) {
  for (uint32_t d = 1; d <= 4096; ++d) {
    const auto f = fastdiv31(d);
    ASSERT_LT(uint64_t(f.m), uint64_t(1) << 32);
    // Around every multiple of d near 0 and near 2^31, where rounding would show first.
    for (uint32_t base : {uint32_t(0), uint32_t(0x7FFFFFFFu / d) * d}) {
      for (int64_t delta = -2; delta <= 2 + int64_t(d); ++delta) {
        const int64_t n = int64_t(base) + delta;
        if (n < 0 || n > 0x7FFFFFFF) continue;
        ASSERT_EQ(fastdiv31_apply(uint32_t(n), f), uint32_t(n) / d) << "n " << n << " d " << d;
      }
    }
  }
}

TEST(FastDiv31, MatchesDivisionOnRandomInputs) {
  std::mt19937 rng(7);
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t d = 1 + rng() % (i % 2 ? 64u : 0x7FFFFFFFu);
    const uint32_t n = rng() & 0x7FFFFFFFu;
    ASSERT_EQ(fastdiv31_apply(n, fastdiv31(d)), n / d) << "n " << n << " d " << d;
  }
}

}  // namespace
