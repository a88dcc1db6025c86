// The seam between the validating C ABI (common/api.cpp) and the compute
// backends (cpu/, cuda/). Everything reaching a backend has been checked:
// shapes agree, dtypes are supported, pointers of required tensors are set,
// and the workspace is at least the size the backend's query returned.
// Backends may still refuse (MOE_ERR_STRIDE, MOE_ERR_UNSUPPORTED) what they
// do not implement, through moe::set_error (common/errors.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "moe_fused.h"

namespace moe {

struct LinearProblem {
  int64_t n;             // rows of input
  int64_t num_experts;   // E
  int64_t in_features;   // in
  int64_t out_features;  // out
};

struct ExpertsProblem {
  int64_t tokens;        // T
  int64_t top_k;         // k
  int64_t hidden;        // H
  int64_t intermediate;  // I (gate_up_proj has 2I rows)
  int64_t num_experts;   // E
};

// The MOE_GRAD_* bits of the gradients a backward call asks for (non-NULL), as the
// workspace queries count them: MOE_GRAD_GATE_UP_PROJ only for a dense [E, 2I, H]
// grad_gate_up_proj, which the CUDA backward also uses as scratch before writing it.
inline uint32_t experts_grads(const ExpertsProblem &p, const moe_tensor_t *dx,
                              const moe_tensor_t *ds, const moe_tensor_t *dw1,
                              const moe_tensor_t *dw2) {
  const bool dense_dw1 = dw1 && dw1->ndim == 3 && dw1->strides[2] == 1 &&
                         dw1->strides[1] == p.hidden &&
                         dw1->strides[0] == 2 * p.intermediate * p.hidden;
  return (dx ? MOE_GRAD_HIDDEN_STATES : 0u) | (ds ? MOE_GRAD_TOP_K_WEIGHTS : 0u) |
         (dense_dw1 ? MOE_GRAD_GATE_UP_PROJ : 0u) | (dw2 ? MOE_GRAD_DOWN_PROJ : 0u);
}

// Each backend implements this same set of functions in its own namespace.
#define MOE_DECLARE_BACKEND(NS)                                                \
  namespace NS {                                                               \
  size_t routing_plan_workspace_size(int64_t num_pairs, int64_t num_experts);  \
  moe_status_t routing_plan(const moe_context_t &ctx,                          \
                            const moe_tensor_t &top_k_index,                   \
                            int64_t num_experts, const moe_plan_t &plan);      \
  size_t linear_workspace_size(const LinearProblem &p);                        \
  moe_status_t linear_forward(const moe_context_t &ctx, const LinearProblem &p,\
                              const moe_tensor_t &input,                       \
                              const moe_tensor_t &weight,                      \
                              const moe_tensor_t &selected_experts,            \
                              const moe_tensor_t &out);                        \
  moe_status_t linear_backward(                                                \
      const moe_context_t &ctx, const LinearProblem &p,                        \
      const moe_tensor_t &grad_out, const moe_tensor_t &input,                 \
      const moe_tensor_t &weight, const moe_tensor_t &selected_experts,        \
      const moe_tensor_t *grad_input, const moe_tensor_t *grad_weight);        \
  /* dtype: the activations' moe_dtype_t, or -1 for any */                    \
  size_t experts_forward_workspace_size(const ExpertsProblem &p,               \
                                        int32_t dtype, uint64_t flags);        \
  size_t experts_backward_workspace_size(const ExpertsProblem &p,              \
                                         int32_t dtype, uint32_t grads,        \
                                         uint64_t flags);                      \
  moe_status_t experts_forward(                                                \
      const moe_context_t &ctx, const ExpertsProblem &p,                       \
      const moe_tensor_t &hidden_states, const moe_tensor_t &top_k_index,      \
      const moe_tensor_t &top_k_weights, const moe_tensor_t &gate_up_proj,     \
      const moe_tensor_t &down_proj, const moe_plan_t &plan,                   \
      const moe_tensor_t *h /* NULL: not stored */, const moe_tensor_t &out);  \
  moe_status_t experts_backward(                                               \
      const moe_context_t &ctx, const ExpertsProblem &p,                       \
      const moe_tensor_t &grad_out, const moe_tensor_t &hidden_states,         \
      const moe_tensor_t &top_k_weights, const moe_tensor_t &gate_up_proj,     \
      const moe_tensor_t &down_proj, const moe_plan_t &plan,                   \
      const moe_tensor_t &h, const moe_tensor_t *grad_hidden_states,           \
      const moe_tensor_t *grad_top_k_weights,                                  \
      const moe_tensor_t *grad_gate_up_proj,                                   \
      const moe_tensor_t *grad_down_proj);                                     \
  }

MOE_DECLARE_BACKEND(cpu)
#ifdef MOE_FUSED_WITH_CUDA
MOE_DECLARE_BACKEND(cuda)
#endif

#undef MOE_DECLARE_BACKEND

}  // namespace moe
