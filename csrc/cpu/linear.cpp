// moe_fused_linear on the CPU: out[b,o] = sum_i W[sel[b],o,i] * x[b,i].
// Rows are sorted by expert (counting sort), gathered into fp32 (or f64)
// scratch, multiplied per expert through the GEMM interface and scattered.
#include <algorithm>

#include "common/backend.h"
#include "common/errors.h"
#include "cpu/parallel.h"
#include "cpu/plan.h"
#include "cpu/util.h"

namespace moe {
namespace cpu {
namespace {

template <class C> struct LinearLayout {
  int32_t *offsets, *sorted, *cursor;
  C *X;      // [N, in]  gathered input (backward: then grad_input rows)
  C *G;      // [N, out] forward: products; backward: gathered grad_out
  C *slots;  // [nslots, 2*out*in] per-thread weight / weight-grad scratch
  int nslots;
  int64_t slot_elems;
};

template <class C> LinearLayout<C> linear_layout(Arena &a, const LinearProblem &p) {
  LinearLayout<C> L;
  L.offsets = a.take<int32_t>(p.num_experts + 1);
  L.sorted = a.take<int32_t>(p.n);
  L.cursor = a.take<int32_t>(p.num_experts);
  L.X = a.take<C>(p.n * p.in_features);
  L.G = a.take<C>(p.n * p.out_features);
  L.nslots = scratch_slots();
  L.slot_elems = 2 * p.out_features * p.in_features;
  L.slots = a.take<C>(L.nslots * L.slot_elems);
  return L;
}

constexpr int64_t kPar = 32768;

// dst rows [r0, r1) (width n) <- src rows sorted[r].
template <class T, class C>
void gather_rows(C *dst, int64_t ld, const moe_tensor_t &src, const int32_t *sorted, int64_t r0,
                 int64_t r1, int64_t n, bool inner) {
  const T *s = data_as<const T>(src);
  const int64_t s0 = src.strides[0], s1 = n > 1 ? src.strides[1] : 1;
#pragma omp parallel for schedule(static) if (inner && (r1 - r0) * n > kPar)
  for (int64_t r = r0; r < r1; ++r) load_row<T, C>(dst + r * ld, s + sorted[r] * s0, n, s1);
}

// dst rows sorted[r] <- src rows [r0, r1).
template <class T, class C>
void scatter_rows(const moe_tensor_t &dst, const C *src, int64_t ld, const int32_t *sorted,
                  int64_t r0, int64_t r1, int64_t n, bool inner) {
  T *d = data_as<T>(dst);
  const int64_t s0 = dst.strides[0], s1 = n > 1 ? dst.strides[1] : 1;
#pragma omp parallel for schedule(static) if (inner && (r1 - r0) * n > kPar)
  for (int64_t r = r0; r < r1; ++r) store_row<T, C>(d + sorted[r] * s0, s1, src + r * ld, n);
}

template <class T, class C> bool needs_scratch(const moe_tensor_t &w) {
  if (!std::is_same<T, C>::value) return true;
  const int64_t R = w.shape[1], K = w.shape[2];
  int64_t sr = w.strides[1], sk = w.strides[2];
  norm_strides(R, K, sr, sk);
  return !((sk == 1 && sr >= std::max<int64_t>(K, 1)) || (sr == 1 && sk >= std::max<int64_t>(R, 1)));
}

template <class T>
moe_status_t forward_impl(const moe_context_t &ctx, const LinearProblem &p,
                          const moe_tensor_t &input, const moe_tensor_t &weight,
                          const moe_tensor_t &sel, const moe_tensor_t &out) {
  using C = typename Compute<T>::type;
  const int64_t E = p.num_experts, In = p.in_features, Out = p.out_features;
  const int64_t ldx = std::max<int64_t>(In, 1), ldg = std::max<int64_t>(Out, 1);
  Arena arena(ctx.workspace);
  LinearLayout<C> L = linear_layout<C>(arena, p);
  counting_sort(sel, E, L.offsets, L.sorted, nullptr, L.cursor);
  for_each_expert(E, L.offsets, L.nslots, needs_scratch<T, C>(weight),
                  [&](int64_t e, int slot, bool inner) {
    const int64_t r0 = L.offsets[e], r1 = L.offsets[e + 1], ne = r1 - r0;
    if (ne == 0) return;
    gather_rows<T, C>(L.X, ldx, input, L.sorted, r0, r1, In, inner);
    MatRef<C> w = weight_operand<T, C>(weight, e, L.slots + slot * L.slot_elems);
    gemm(Trans::N, w.as_op(true), ne, Out, In, C(1), L.X + r0 * ldx, ldx, w.p, w.ld, C(0),
         L.G + r0 * ldg, ldg);
    scatter_rows<T, C>(out, L.G, ldg, L.sorted, r0, r1, Out, inner);
  });
  return MOE_OK;
}

template <class T>
moe_status_t backward_impl(const moe_context_t &ctx, const LinearProblem &p,
                           const moe_tensor_t &grad_out, const moe_tensor_t &input,
                           const moe_tensor_t &weight, const moe_tensor_t &sel,
                           const moe_tensor_t *grad_input, const moe_tensor_t *grad_weight) {
  using C = typename Compute<T>::type;
  const int64_t E = p.num_experts, In = p.in_features, Out = p.out_features;
  const int64_t ldx = std::max<int64_t>(In, 1), ldg = std::max<int64_t>(Out, 1);
  Arena arena(ctx.workspace);
  LinearLayout<C> L = linear_layout<C>(arena, p);
  counting_sort(sel, E, L.offsets, L.sorted, nullptr, L.cursor);
  const bool need_slots = (grad_input && needs_scratch<T, C>(weight)) ||
                          (grad_weight && needs_scratch<T, C>(*grad_weight));
  for_each_expert(E, L.offsets, L.nslots, need_slots, [&](int64_t e, int slot, bool inner) {
    const int64_t r0 = L.offsets[e], r1 = L.offsets[e + 1], ne = r1 - r0;
    if (ne == 0) {
      if (grad_weight) zero_expert<T>(*grad_weight, e);
      return;
    }
    C *wscratch = L.slots + slot * L.slot_elems;
    C *gscratch = wscratch + Out * In;
    gather_rows<T, C>(L.G, ldg, grad_out, L.sorted, r0, r1, Out, inner);
    if (grad_weight) {
      // dW[e] [Out, In] = G_e^T X_e
      gather_rows<T, C>(L.X, ldx, input, L.sorted, r0, r1, In, inner);
      OutRef<C> o = weight_output<T, C>(*grad_weight, e, gscratch);
      gemm_into(o, Trans::T, Trans::N, Out, In, ne, L.G + r0 * ldg, ldg, L.X + r0 * ldx, ldx);
      finish_output<T, C>(o, *grad_weight, e);
    }
    if (grad_input) {
      // dX_e [ne, In] = G_e W[e]   (overwrites X_e, already used for dW[e])
      MatRef<C> w = weight_operand<T, C>(weight, e, wscratch);
      gemm(Trans::N, w.as_op(false), ne, In, Out, C(1), L.G + r0 * ldg, ldg, w.p, w.ld, C(0),
           L.X + r0 * ldx, ldx);
      scatter_rows<T, C>(*grad_input, L.X, ldx, L.sorted, r0, r1, In, inner);
    }
  });
  return MOE_OK;
}

}  // namespace

size_t linear_workspace_size(const LinearProblem &p) {
  Arena a(nullptr);
  linear_layout<double>(a, p);
  return a.required();
}

moe_status_t linear_forward(const moe_context_t &ctx, const LinearProblem &p,
                            const moe_tensor_t &input, const moe_tensor_t &weight,
                            const moe_tensor_t &selected_experts, const moe_tensor_t &out) {
  moe_status_t st = check_indices(selected_experts, p.num_experts, "selected_experts");
  if (st != MOE_OK) return st;
  st = MOE_ERR_DTYPE;
  dispatch_float(input.dtype, [&](auto tag) {
    st = forward_impl<decltype(tag)>(ctx, p, input, weight, selected_experts, out);
  });
  if (st == MOE_ERR_DTYPE) return set_error(st, "input: unsupported dtype %d", input.dtype);
  return st;
}

moe_status_t linear_backward(const moe_context_t &ctx, const LinearProblem &p,
                             const moe_tensor_t &grad_out, const moe_tensor_t &input,
                             const moe_tensor_t &weight, const moe_tensor_t &selected_experts,
                             const moe_tensor_t *grad_input, const moe_tensor_t *grad_weight) {
  moe_status_t st = check_indices(selected_experts, p.num_experts, "selected_experts");
  if (st != MOE_OK) return st;
  if (!grad_input && !grad_weight) return MOE_OK;
  st = MOE_ERR_DTYPE;
  dispatch_float(input.dtype, [&](auto tag) {
    st = backward_impl<decltype(tag)>(ctx, p, grad_out, input, weight, selected_experts,
                                      grad_input, grad_weight);
  });
  if (st == MOE_ERR_DTYPE) return set_error(st, "input: unsupported dtype %d", input.dtype);
  return st;
}

}  // namespace cpu
}  // namespace moe
