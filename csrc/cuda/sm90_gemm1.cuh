// sm90a (Hopper: wgmma + TMA) GEMM1 + SwiGLU of the experts forward (sm90_gemm1.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"
#include "moe_fused.h"

namespace moe {
namespace cuda {

// Whether the sm90a path is on by default (else only with env MOE_FUSED_SM90=1).
constexpr bool kSm90Gemm1Default = true;

// False when the sm90a path is off: ctx flag MOE_FLAG_FORCE_PORTABLE, env
// MOE_FUSED_PORTABLE=1, env MOE_FUSED_SM90=0 (or, when off by default, no MOE_FUSED_SM90=1).
bool sm90_gemm1_enabled(uint64_t flags);

// Runs the GEMM1 + SwiGLU described by `g` (EPI_SWIGLU, the portable kernel's arguments;
// tile list with BM = 128 rows) with the sm90a kernel when enabled, the device is compute
// capability 9.0, the library holds the sm_90a image, the dtype is bf16/f16 and the layout
// fits (I % 128 == 0, H % 64 == 0, 16-byte aligned rows, W1 experts back to back).
// Returns false (nothing enqueued) otherwise; when true, *status is the launch status.
// No allocation, no host sync; enqueued on `stream`.
bool sm90_gemm1_swiglu(const GroupedGemmArgs &g, int64_t num_experts, uint64_t flags,
                       cudaStream_t stream, moe_status_t *status);

}  // namespace cuda
}  // namespace moe
