// The extern "C" entry points of moe_fused.h: validate every argument, then
// dispatch to moe::cpu::* or moe::cuda::* (common/backend.h). Nothing is
// written or launched before all checks pass.
#include <algorithm>
#include <cinttypes>
#include <climits>
#include <new>

#include "common/backend.h"
#include "common/checks.h"
#include "common/errors.h"

namespace {

using moe::set_error;
namespace check = moe::check;

#define MOE_TRY(expr)                     \
  do {                                    \
    const moe_status_t moe_st_ = (expr);  \
    if (moe_st_ != MOE_OK) return moe_st_; \
  } while (0)

#ifdef MOE_FUSED_WITH_CUDA
#define MOE_DISPATCH(ctx, fn, ...)                                      \
  ((ctx).device_type == MOE_DEVICE_CUDA ? moe::cuda::fn(__VA_ARGS__)    \
                                        : moe::cpu::fn(__VA_ARGS__))
#else
#define MOE_DISPATCH(ctx, fn, ...) moe::cpu::fn(__VA_ARGS__)
#endif

// Runs a body that returns a status; a C++ exception never crosses the ABI.
template <class F> moe_status_t guarded(const char *fn, F &&f) {
  try {
    return f();
  } catch (const std::bad_alloc &) {
    return set_error(MOE_ERR_INTERNAL, "%s: out of host memory", fn);
  } catch (...) {
    return set_error(MOE_ERR_INTERNAL, "%s: unexpected C++ exception", fn);
  }
}

constexpr int64_t kMaxPairs = INT32_MAX;  // the plan is int32

moe_status_t check_pairs(int64_t T, int64_t k, const char *param) {
  if (k > 0 && T > kMaxPairs / k)
    return set_error(MOE_ERR_SHAPE,
                     "%s: T*k = %" PRId64 "*%" PRId64 " exceeds %" PRId64
                     " pairs (the routing plan is int32)",
                     param, T, k, kMaxPairs);
  return MOE_OK;
}

// Optional output tensor: shape, dtype and strides when present.
moe_status_t optional_output(const moe_tensor_t *t, const char *param, int ndim,
                             const char *layout, const int64_t *want, int32_t dtype,
                             const char *dtype_ref, bool also_f32 = false) {
  if (!t) return MOE_OK;
  MOE_TRY(check::tensor(t, param, ndim, layout));
  MOE_TRY(check::same_dtype(*t, param, dtype, dtype_ref, also_f32));
  MOE_TRY(check::shape(*t, param, layout, want, nullptr));
  return check::output(*t, param);
}

size_t plan_ws(int32_t device, int64_t pairs, int64_t E) {
#ifdef MOE_FUSED_WITH_CUDA
  if (device == MOE_DEVICE_CUDA) return moe::cuda::routing_plan_workspace_size(pairs, E);
#endif
  if (device == MOE_DEVICE_CPU) return moe::cpu::routing_plan_workspace_size(pairs, E);
  return 0;
}

size_t linear_ws(int32_t device, const moe::LinearProblem &p) {
#ifdef MOE_FUSED_WITH_CUDA
  if (device == MOE_DEVICE_CUDA) return moe::cuda::linear_workspace_size(p);
#endif
  if (device == MOE_DEVICE_CPU) return moe::cpu::linear_workspace_size(p);
  return 0;
}

size_t experts_fwd_ws(int32_t device, const moe::ExpertsProblem &p, int32_t dtype,
                      uint64_t flags) {
#ifdef MOE_FUSED_WITH_CUDA
  if (device == MOE_DEVICE_CUDA) return moe::cuda::experts_forward_workspace_size(p, dtype, flags);
#endif
  if (device == MOE_DEVICE_CPU) return moe::cpu::experts_forward_workspace_size(p, dtype, flags);
  return 0;
}

size_t experts_bwd_ws(int32_t device, const moe::ExpertsProblem &p, int32_t dtype,
                      uint32_t grads, uint64_t flags) {
#ifdef MOE_FUSED_WITH_CUDA
  if (device == MOE_DEVICE_CUDA)
    return moe::cuda::experts_backward_workspace_size(p, dtype, grads, flags);
#endif
  if (device == MOE_DEVICE_CPU)
    return moe::cpu::experts_backward_workspace_size(p, dtype, grads, flags);
  return 0;
}

bool bad_sizes(int64_t T, int64_t k, int64_t H, int64_t I, int64_t E) {
  return T < 0 || k < 0 || H < 0 || I < 0 || E < 0;
}

// ---- moe_fused_linear ---------------------------------------------------

// Checks input/weight/selected_experts and fills the problem.
moe_status_t linear_common(const moe_context_t *ctx, const moe_tensor_t *input,
                           const moe_tensor_t *weight, const moe_tensor_t *sel,
                           moe::LinearProblem &p) {
  MOE_TRY(check::context(ctx));
  MOE_TRY(check::tensor(input, "input", 2, "[N, in]"));
  MOE_TRY(check::tensor(weight, "weight", 3, "[E, out, in]"));
  MOE_TRY(check::tensor(sel, "selected_experts", 1, "[N]"));
  MOE_TRY(check::float_dtype(*input, "input", ctx->device_type));
  MOE_TRY(check::same_dtype(*weight, "weight", input->dtype, check::name(input, "input")));
  MOE_TRY(check::index_dtype(*sel, "selected_experts"));
  p.n = input->shape[0];
  p.in_features = input->shape[1];
  p.num_experts = weight->shape[0];
  p.out_features = weight->shape[1];
  const int64_t wshape[3] = {p.num_experts, p.out_features, p.in_features};
  MOE_TRY(check::shape(*weight, "weight", "[E, out, in]", wshape, "in from input"));
  const int64_t sshape[1] = {p.n};
  MOE_TRY(check::shape(*sel, "selected_experts", "[N]", sshape, "N from input"));
  if (p.n > kMaxPairs)
    return set_error(MOE_ERR_SHAPE, "%s: N = %" PRId64 " exceeds %" PRId64 " rows",
                     check::name(input, "input"), p.n, kMaxPairs);
  return MOE_OK;
}

// ---- experts ------------------------------------------------------------

struct ExpertsArgs {
  int32_t dtype;
  moe::ExpertsProblem p;
};

// Checks hidden_states, top_k_weights (and top_k_index if given), both
// weights, the plan and h; fills the problem. h may be NULL unless h_required
// (the forward's h is optional: no-grad calls do not store it).
moe_status_t experts_common(const moe_context_t *ctx, const moe_tensor_t *x,
                            const moe_tensor_t *idx, const moe_tensor_t *s,
                            const moe_tensor_t *W1, const moe_tensor_t *W2,
                            const moe_plan_t *plan, const moe_tensor_t *h, bool h_required,
                            ExpertsArgs &a) {
  MOE_TRY(check::context(ctx));
  MOE_TRY(check::tensor(x, "hidden_states", 2, "[T, H]"));
  if (idx) MOE_TRY(check::tensor(idx, "top_k_index", 2, "[T, k]"));
  MOE_TRY(check::tensor(s, "top_k_weights", 2, "[T, k]"));
  MOE_TRY(check::tensor(W1, "gate_up_proj", 3, "[E, 2I, H]"));
  MOE_TRY(check::tensor(W2, "down_proj", 3, "[E, H, I]"));
  if (h || h_required) MOE_TRY(check::tensor(h, "h", 2, "[T*k, 2I]"));

  const char *xname = check::name(x, "hidden_states");
  MOE_TRY(check::float_dtype(*x, "hidden_states", ctx->device_type));
  const int32_t dt = x->dtype;
  if (idx) MOE_TRY(check::index_dtype(*idx, "top_k_index"));
  MOE_TRY(check::same_dtype(*s, "top_k_weights", dt, xname, true));
  MOE_TRY(check::same_dtype(*W1, "gate_up_proj", dt, xname));
  MOE_TRY(check::same_dtype(*W2, "down_proj", dt, xname));
  if (h) MOE_TRY(check::same_dtype(*h, "h", dt, xname));

  moe::ExpertsProblem &p = a.p;
  a.dtype = dt;
  p.tokens = x->shape[0];
  p.hidden = x->shape[1];
  p.top_k = s->shape[1];
  if (idx) p.top_k = idx->shape[1];
  p.num_experts = W1->shape[0];
  const int64_t two_i = W1->shape[1];
  if (two_i % 2 != 0)
    return set_error(MOE_ERR_SHAPE,
                     "%s: dim 1 (2I, gate rows then up rows) must be even, got %" PRId64,
                     check::name(W1, "gate_up_proj"), two_i);
  p.intermediate = two_i / 2;
  const int64_t T = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate,
                E = p.num_experts;
  const int64_t tk[2] = {T, k};
  if (idx) MOE_TRY(check::shape(*idx, "top_k_index", "[T, k]", tk, "T from hidden_states"));
  MOE_TRY(check::shape(*s, "top_k_weights", "[T, k]", tk,
                       idx ? "T from hidden_states, k from top_k_index" : "T from hidden_states"));
  const int64_t w1[3] = {E, 2 * I, H};
  MOE_TRY(check::shape(*W1, "gate_up_proj", "[E, 2I, H]", w1, "H from hidden_states"));
  const int64_t w2[3] = {E, H, I};
  MOE_TRY(check::shape(*W2, "down_proj", "[E, H, I]", w2,
                       "H from hidden_states, E and 2I from gate_up_proj"));
  MOE_TRY(check_pairs(T, k, xname));
  MOE_TRY(check::plan(plan, E, T * k));
  if (!h) return MOE_OK;
  const int64_t hs[2] = {T * k, 2 * I};
  MOE_TRY(check::shape(*h, "h", "[T*k, 2I]", hs, nullptr));
  MOE_TRY(check::contiguous(*h, "h"));
  return MOE_OK;
}

}  // namespace

extern "C" {

// ---- routing plan -------------------------------------------------------

MOE_API size_t moe_routing_plan_workspace_size(int32_t device_type, int64_t num_pairs,
                                               int64_t num_experts) {
  if (num_pairs < 0 || num_experts < 0) return 0;
  return plan_ws(device_type, num_pairs, num_experts);
}

MOE_API moe_status_t moe_routing_plan(const moe_context_t *ctx, const moe_tensor_t *top_k_index,
                                      int64_t num_experts, const moe_plan_t *plan) {
  return guarded("moe_routing_plan", [&]() -> moe_status_t {
    MOE_TRY(check::context(ctx));
    MOE_TRY(check::tensor(top_k_index, "top_k_index", 2, "[T, k]"));
    MOE_TRY(check::index_dtype(*top_k_index, "top_k_index"));
    if (num_experts < 0 || num_experts > kMaxPairs)
      return set_error(MOE_ERR_SHAPE, "num_experts: must be in [0, %" PRId64 "], got %" PRId64,
                       kMaxPairs, num_experts);
    const int64_t T = top_k_index->shape[0], k = top_k_index->shape[1];
    MOE_TRY(check_pairs(T, k, check::name(top_k_index, "top_k_index")));
    MOE_TRY(check::plan(plan, num_experts, T * k));
    MOE_TRY(check::workspace(*ctx, plan_ws(ctx->device_type, T * k, num_experts),
                             "moe_routing_plan"));
    return MOE_DISPATCH(*ctx, routing_plan, *ctx, *top_k_index, num_experts, *plan);
  });
}

// ---- moe_fused_linear ---------------------------------------------------

MOE_API size_t moe_linear_workspace_size(int32_t device_type, int64_t n, int64_t num_experts,
                                         int64_t in_features, int64_t out_features) {
  if (n < 0 || num_experts < 0 || in_features < 0 || out_features < 0) return 0;
  return linear_ws(device_type, moe::LinearProblem{n, num_experts, in_features, out_features});
}

MOE_API moe_status_t moe_linear_forward(const moe_context_t *ctx, const moe_tensor_t *input,
                                        const moe_tensor_t *weight,
                                        const moe_tensor_t *selected_experts,
                                        const moe_tensor_t *out) {
  return guarded("moe_linear_forward", [&]() -> moe_status_t {
    moe::LinearProblem p{};
    MOE_TRY(linear_common(ctx, input, weight, selected_experts, p));
    MOE_TRY(check::tensor(out, "out", 2, "[N, out]"));
    MOE_TRY(check::same_dtype(*out, "out", input->dtype, check::name(input, "input")));
    const int64_t os[2] = {p.n, p.out_features};
    MOE_TRY(check::shape(*out, "out", "[N, out]", os, "N from input, out from weight"));
    MOE_TRY(check::output(*out, "out"));
    MOE_TRY(check::workspace(*ctx, linear_ws(ctx->device_type, p), "moe_linear_forward"));
    return MOE_DISPATCH(*ctx, linear_forward, *ctx, p, *input, *weight, *selected_experts,
                        *out);
  });
}

MOE_API moe_status_t moe_linear_backward(const moe_context_t *ctx, const moe_tensor_t *grad_out,
                                         const moe_tensor_t *input, const moe_tensor_t *weight,
                                         const moe_tensor_t *selected_experts,
                                         const moe_tensor_t *grad_input,
                                         const moe_tensor_t *grad_weight) {
  return guarded("moe_linear_backward", [&]() -> moe_status_t {
    moe::LinearProblem p{};
    MOE_TRY(linear_common(ctx, input, weight, selected_experts, p));
    const char *xname = check::name(input, "input");
    MOE_TRY(check::tensor(grad_out, "grad_out", 2, "[N, out]"));
    MOE_TRY(check::same_dtype(*grad_out, "grad_out", input->dtype, xname));
    const int64_t os[2] = {p.n, p.out_features};
    MOE_TRY(check::shape(*grad_out, "grad_out", "[N, out]", os, "N from input, out from weight"));
    const int64_t is[2] = {p.n, p.in_features};
    MOE_TRY(optional_output(grad_input, "grad_input", 2, "[N, in]", is, input->dtype, xname));
    const int64_t ws[3] = {p.num_experts, p.out_features, p.in_features};
    MOE_TRY(optional_output(grad_weight, "grad_weight", 3, "[E, out, in]", ws, input->dtype,
                            xname));
    MOE_TRY(check::workspace(*ctx, linear_ws(ctx->device_type, p), "moe_linear_backward"));
    return MOE_DISPATCH(*ctx, linear_backward, *ctx, p, *grad_out, *input, *weight,
                        *selected_experts, grad_input, grad_weight);
  });
}

// ---- fused experts layer --------------------------------------------------

MOE_API size_t moe_experts_workspace_size(int32_t device_type, int64_t T, int64_t k, int64_t H,
                                          int64_t I, int64_t num_experts) {
  if (bad_sizes(T, k, H, I, num_experts)) return 0;
  const moe::ExpertsProblem p{T, k, H, I, num_experts};
  const uint32_t all = MOE_GRAD_HIDDEN_STATES | MOE_GRAD_TOP_K_WEIGHTS | MOE_GRAD_GATE_UP_PROJ |
                       MOE_GRAD_DOWN_PROJ;
  // The largest flags: dh in the workspace (no MOE_FLAG_OVERWRITE_H), one token window.
  const uint64_t largest = MOE_FLAG_ONE_WINDOW;
  return std::max(experts_fwd_ws(device_type, p, -1, largest),
                  experts_bwd_ws(device_type, p, -1, all, largest));
}

MOE_API size_t moe_experts_forward_workspace_size(int32_t device_type, int32_t dtype, int64_t T,
                                                  int64_t k, int64_t H, int64_t I,
                                                  int64_t num_experts, uint64_t flags) {
  if (bad_sizes(T, k, H, I, num_experts)) return 0;
  return experts_fwd_ws(device_type, moe::ExpertsProblem{T, k, H, I, num_experts}, dtype, flags);
}

MOE_API size_t moe_experts_backward_workspace_size(int32_t device_type, int32_t dtype, int64_t T,
                                                   int64_t k, int64_t H, int64_t I,
                                                   int64_t num_experts, uint32_t grads,
                                                   uint64_t flags) {
  if (bad_sizes(T, k, H, I, num_experts)) return 0;
  return experts_bwd_ws(device_type, moe::ExpertsProblem{T, k, H, I, num_experts}, dtype, grads,
                        flags);
}

MOE_API moe_status_t moe_experts_forward(const moe_context_t *ctx,
                                         const moe_tensor_t *hidden_states,
                                         const moe_tensor_t *top_k_index,
                                         const moe_tensor_t *top_k_weights,
                                         const moe_tensor_t *gate_up_proj,
                                         const moe_tensor_t *down_proj, const moe_plan_t *plan,
                                         const moe_tensor_t *h, const moe_tensor_t *out) {
  return guarded("moe_experts_forward", [&]() -> moe_status_t {
    // top_k_index is required here (experts_common treats NULL as absent).
    if (!top_k_index) return set_error(MOE_ERR_NULL, "top_k_index: tensor descriptor is NULL");
    ExpertsArgs a{};
    // h may be NULL: no backward follows, h is not stored.
    MOE_TRY(experts_common(ctx, hidden_states, top_k_index, top_k_weights, gate_up_proj,
                           down_proj, plan, h, false, a));
    const char *xname = check::name(hidden_states, "hidden_states");
    MOE_TRY(check::tensor(out, "out", 2, "[T, H]"));
    MOE_TRY(check::same_dtype(*out, "out", a.dtype, xname));
    const int64_t os[2] = {a.p.tokens, a.p.hidden};
    MOE_TRY(check::shape(*out, "out", "[T, H]", os, "T and H from hidden_states"));
    MOE_TRY(check::output(*out, "out"));
    const uint64_t ws_flags = ctx->flags | (h ? 0 : MOE_FLAG_FORWARD_NO_H);
    MOE_TRY(check::workspace(*ctx, experts_fwd_ws(ctx->device_type, a.p, a.dtype, ws_flags),
                             "moe_experts_forward"));
    return MOE_DISPATCH(*ctx, experts_forward, *ctx, a.p, *hidden_states, *top_k_index,
                        *top_k_weights, *gate_up_proj, *down_proj, *plan, h, *out);
  });
}

MOE_API moe_status_t moe_experts_backward(
    const moe_context_t *ctx, const moe_tensor_t *grad_out, const moe_tensor_t *hidden_states,
    const moe_tensor_t *top_k_weights, const moe_tensor_t *gate_up_proj,
    const moe_tensor_t *down_proj, const moe_plan_t *plan, const moe_tensor_t *h,
    const moe_tensor_t *grad_hidden_states, const moe_tensor_t *grad_top_k_weights,
    const moe_tensor_t *grad_gate_up_proj, const moe_tensor_t *grad_down_proj) {
  return guarded("moe_experts_backward", [&]() -> moe_status_t {
    ExpertsArgs a{};
    MOE_TRY(experts_common(ctx, hidden_states, nullptr, top_k_weights, gate_up_proj, down_proj,
                           plan, h, true, a));
    const char *xname = check::name(hidden_states, "hidden_states");
    const int64_t T = a.p.tokens, k = a.p.top_k, H = a.p.hidden, I = a.p.intermediate,
                  E = a.p.num_experts;
    MOE_TRY(check::tensor(grad_out, "grad_out", 2, "[T, H]"));
    MOE_TRY(check::same_dtype(*grad_out, "grad_out", a.dtype, xname));
    const int64_t th[2] = {T, H};
    MOE_TRY(check::shape(*grad_out, "grad_out", "[T, H]", th, "T and H from hidden_states"));
    MOE_TRY(optional_output(grad_hidden_states, "grad_hidden_states", 2, "[T, H]", th, a.dtype,
                            xname));
    const int64_t tk[2] = {T, k};
    MOE_TRY(optional_output(grad_top_k_weights, "grad_top_k_weights", 2, "[T, k]", tk, a.dtype,
                            xname, true));
    const int64_t w1[3] = {E, 2 * I, H};
    MOE_TRY(optional_output(grad_gate_up_proj, "grad_gate_up_proj", 3, "[E, 2I, H]", w1,
                            a.dtype, xname));
    const int64_t w2[3] = {E, H, I};
    MOE_TRY(optional_output(grad_down_proj, "grad_down_proj", 3, "[E, H, I]", w2, a.dtype,
                            xname));
    const uint32_t grads = moe::experts_grads(a.p, grad_hidden_states, grad_top_k_weights,
                                              grad_gate_up_proj, grad_down_proj);
    MOE_TRY(check::workspace(*ctx, experts_bwd_ws(ctx->device_type, a.p, a.dtype, grads, ctx->flags),
                             "moe_experts_backward"));
    return MOE_DISPATCH(*ctx, experts_backward, *ctx, a.p, *grad_out, *hidden_states,
                        *top_k_weights, *gate_up_proj, *down_proj, *plan, *h,
                        grad_hidden_states, grad_top_k_weights, grad_gate_up_proj,
                        grad_down_proj);
  });
}

}  // extern "C"
