// SwiGLU row kernels. The exp is branch-free (Cody-Waite reduction, Cephes
// polynomial, about 2 ulp) so that the loops vectorise; FP exceptions are
// not relied upon here, so no-trapping-math lets the clamps become min/max.
// On x86-64 with GCC, AVX2/AVX-512 clones are chosen at load time.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "cpu/swiglu.h"

#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_CLONES
#endif

namespace moe {
namespace cpu {
namespace {

inline float clampf(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

inline float exp_fast(float x) {
  x = clampf(x, -87.0f, 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = (int32_t(n) + 127) * (1 << 23);
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

}  // namespace

MOE_CLONES
void swiglu_row(float *a, const float *g, const float *u, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    a[i] = x / (1.0f + exp_fast(-x)) * u[i];
  }
}

MOE_CLONES
void swiglu_grad_row(float *dg, float *du, const float *g, const float *u, const float *dA,
                     float s, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i], y = u[i];
    const float sg = 1.0f / (1.0f + exp_fast(-x));
    const float da = s * dA[i];
    dg[i] = da * y * (sg * (1.0f + x * (1.0f - sg)));
    du[i] = da * x * sg;
  }
}

MOE_CLONES
float dot_row(const float *a, const float *b, int64_t n) {
  // 8 independent partial sums in a fixed order: vectorisable, deterministic.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

}  // namespace cpu
}  // namespace moe
