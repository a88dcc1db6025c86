// float32 on CUDA: simple SIMT kernels (simt_f32.cu), correctness over speed.
#pragma once

#include "common/backend.h"
#include "cuda/common.cuh"

namespace moe {
namespace cuda {

// Scratch bytes of the f32 experts backward (dh [n, 2I] f32 + row experts) / forward (row
// experts, and h [n, 2I] f32 for a call without h: MOE_FLAG_FORWARD_NO_H).
size_t f32_experts_bwd_bytes(const ExpertsProblem &p);
size_t f32_experts_fwd_bytes(const ExpertsProblem &p, bool no_h);

moe_status_t f32_experts_forward(cudaStream_t st, const ExpertsProblem &p, const moe_tensor_t &x,
                                 const moe_tensor_t &s, const moe_tensor_t &W1,
                                 const moe_tensor_t &W2, const int32_t *off, const int32_t *sorted,
                                 const int32_t *rows, const moe_tensor_t *h /* may be NULL */,
                                 const moe_tensor_t &out, void *scratch);
moe_status_t f32_experts_backward(cudaStream_t st, const ExpertsProblem &p,
                                  const moe_tensor_t &dout, const moe_tensor_t &x,
                                  const moe_tensor_t &s, const moe_tensor_t &W1,
                                  const moe_tensor_t &W2, const int32_t *off,
                                  const int32_t *sorted, const int32_t *rows,
                                  const moe_tensor_t &h, const moe_tensor_t *dx,
                                  const moe_tensor_t *ds, const moe_tensor_t *dW1,
                                  const moe_tensor_t *dW2, void *scratch);
moe_status_t f32_linear_forward(cudaStream_t st, const LinearProblem &p, const moe_tensor_t &x,
                                const moe_tensor_t &W, const moe_tensor_t &sel,
                                const moe_tensor_t &y);
moe_status_t f32_linear_backward(cudaStream_t st, const LinearProblem &p,
                                 const moe_tensor_t &g, const moe_tensor_t &x,
                                 const moe_tensor_t &W, const moe_tensor_t &sel,
                                 const moe_tensor_t *dx, const moe_tensor_t *dW,
                                 const int32_t *off, const int32_t *sorted);

}  // namespace cuda
}  // namespace moe
