// The CPU backend's bf16 / f16 conversions.
#include "test_util.h"

using moe::cpu::bf16_to_f32;
using moe::cpu::f16_to_f32;
using moe::cpu::f32_to_bf16;
using moe::cpu::f32_to_f16;

#if defined(__FLT16_MAX__)
TEST(Dtype, F16MatchesCompiler) {
  for (uint32_t b = 0; b < 65536; ++b) {
    _Float16 h;
    const uint16_t bits = uint16_t(b);
    std::memcpy(&h, &bits, 2);
    const float want = float(h), got = f16_to_f32(bits);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << b;
      continue;
    }
    ASSERT_EQ(want, got) << b;
    // and back, round trip exact
    ASSERT_EQ(f32_to_f16(got), bits) << b;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 100.f);
  for (int i = 0; i < 200000; ++i) {
    const float f = nd(rng) * (i % 7 == 0 ? 1e-4f : 1.f);
    const _Float16 h = _Float16(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    ASSERT_EQ(f32_to_f16(f), want) << f;
  }
}
#endif

TEST(Dtype, BF16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1).
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);
  // 1 + 3*2^-8 is a tie between 1+2^-7 and 1+2^-6: rounds to even (1+2^-6).
  EXPECT_EQ(f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-2.5f)), -2.5f);
}
