// sm90a (Hopper: wgmma + TMA) kernels of the experts layer and moe_fused_linear, chosen at
// run time in front of the portable kernels (notes/hopper.md has designs and measurements):
//   sm90_rowgemm.cu  row-grouped GEMMs: GEMM1 + SwiGLU, GEMM2, dA' + dSwiGLU, dX, linear
//   sm90_wgrad.cu    K-grouped weight-gradient GEMMs (dW1, dW2)
//   sm90_host.cu     selection (device, image, environment) and TMA descriptors
// Each entry point returns false, having enqueued nothing, when its kernel does not apply
// (path off, not a cc 9.0 device, no sm_90a image in the library, dtype or layout the kernel
// does not take); the caller then runs the portable kernel. When it returns true, *status is
// the launch status. No allocation and no host synchronisation: graph-capturable.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"
#include "moe_fused.h"

namespace moe {
namespace cuda {

// Whether the sm90a path is on by default (else only with env MOE_FUSED_SM90=1).
constexpr bool kSm90Default = true;

// False when the sm90a path is off: ctx flag MOE_FLAG_FORCE_PORTABLE, env
// MOE_FUSED_PORTABLE=1, env MOE_FUSED_SM90=0 (or, when off by default, no MOE_FUSED_SM90=1).
// Read at every call, so a process can compare both paths.
bool sm90_enabled(uint64_t flags);

// Column tiles of the sm90a row GEMMs (BN = 256; is_swiglu: 128 columns of a): the number
// of ds_part columns that sm90_grouped_gemm's EPI_DSWIGLU writes.
constexpr int kSm90BN = 256;
inline int sm90_col_tiles(int epilogue, int N) {
  return is_swiglu(epilogue) ? N / (kSm90BN / 2) : N / kSm90BN;
}

// The row-grouped GEMM `g` (the portable kernel's arguments; tile list with BM = 128) on the
// sm90a kernel. Layouts taken: bf16/f16; K % 64 == 0; N % 256 == 0 (is_swiglu: N = I,
// I % 128 == 0); 16-byte aligned A / C / C2 / Hin rows; the expert weights back to back
// (strideBE == rows * ldb), [N][K] or (b_kn) [K][N], as one 2-D TMA tensor.
bool sm90_grouped_gemm(const GroupedGemmArgs &g, int64_t num_experts, uint64_t flags,
                       Launch stream, moe_status_t *status);

// The weight gradient `w` on the sm90a kernel. Layouts taken: bf16/f16; at most one of A, B
// gathered; with B gathered, N % 128 == 0 and M % 256 == 0 (C is then written transposed),
// else M % 128 == 0 and N % 256 == 0; 16-byte aligned rows of A, B and C; n_rows > 0.
bool sm90_wgrad(const WgradArgs &w, uint64_t flags, Launch stream, moe_status_t *status);

}  // namespace cuda
}  // namespace moe
