// Vectorised SwiGLU row kernels (float) of the CPU backend.
#pragma once

#include <cstdint>

namespace moe {
namespace cpu {

// a[i] = silu(g[i]) * u[i], i < n.
void swiglu_row(float *a, const float *g, const float *u, int64_t n);

// With da = s * dA[i]: dg[i] = da * u * silu'(g), du[i] = da * silu(g).
// dg/du may be the very arrays g/u (in place), nothing else may overlap.
void swiglu_grad_row(float *dg, float *du, const float *g, const float *u, const float *dA,
                     float s, int64_t n);

// sum_i a[i] * b[i] (fixed order of lanes: deterministic).
float dot_row(const float *a, const float *b, int64_t n);

}  // namespace cpu
}  // namespace moe
