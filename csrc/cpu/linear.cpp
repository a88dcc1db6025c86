// moe_fused_linear on the CPU: out[b,o] = sum_i W[sel[b],o,i] * x[b,i].
// Rows are sorted by expert (counting sort), gathered into fp32 (or f64)
// scratch, multiplied per expert through the GEMM interface and scattered.
#include <algorithm>

#include "common/backend.h"
#include "common/errors.h"
#include "cpu/plan.h"
#include "cpu/util.h"

namespace moe {
namespace cpu {
namespace {

template <class C> struct LinearLayout {
  int32_t *offsets, *sorted, *cursor;
  C *X;   // [N, in]  gathered input (backward: then grad_input rows)
  C *G;   // [N, out] forward: products; backward: gathered grad_out
  C *w;   // [out, in] converted weight of one expert
  C *g;   // [out, in] grad of one expert's weight before conversion
};

template <class C> LinearLayout<C> linear_layout(Arena &a, const LinearProblem &p) {
  LinearLayout<C> L;
  L.offsets = a.take<int32_t>(p.num_experts + 1);
  L.sorted = a.take<int32_t>(p.n);
  L.cursor = a.take<int32_t>(p.num_experts);
  L.X = a.take<C>(p.n * p.in_features);
  L.G = a.take<C>(p.n * p.out_features);
  L.w = a.take<C>(p.out_features * p.in_features);
  L.g = a.take<C>(p.out_features * p.in_features);
  return L;
}

// dst row r (width n) <- src row sorted[r], for every r.
template <class T, class C>
void gather_rows(C *dst, int64_t ld, const moe_tensor_t &src, const int32_t *sorted,
                 int64_t rows, int64_t n) {
  const T *s = data_as<const T>(src);
  const int64_t s0 = src.strides[0], s1 = n > 1 ? src.strides[1] : 1;
#pragma omp parallel for schedule(static) if (rows * n > 32768)
  for (int64_t r = 0; r < rows; ++r) load_row<T, C>(dst + r * ld, s + sorted[r] * s0, n, s1);
}

template <class T, class C>
void scatter_rows(const moe_tensor_t &dst, const C *src, int64_t ld, const int32_t *sorted,
                  int64_t rows, int64_t n) {
  T *d = data_as<T>(dst);
  const int64_t s0 = dst.strides[0], s1 = n > 1 ? dst.strides[1] : 1;
#pragma omp parallel for schedule(static) if (rows * n > 32768)
  for (int64_t r = 0; r < rows; ++r) store_row<T, C>(d + sorted[r] * s0, s1, src + r * ld, n);
}

template <class T>
moe_status_t forward_impl(const moe_context_t &ctx, const LinearProblem &p,
                          const moe_tensor_t &input, const moe_tensor_t &weight,
                          const moe_tensor_t &sel, const moe_tensor_t &out) {
  using C = typename Compute<T>::type;
  const int64_t N = p.n, E = p.num_experts, In = p.in_features, Out = p.out_features;
  const int64_t ldx = std::max<int64_t>(In, 1), ldg = std::max<int64_t>(Out, 1);
  Arena arena(ctx.workspace);
  LinearLayout<C> L = linear_layout<C>(arena, p);
  counting_sort(sel, E, L.offsets, L.sorted, nullptr, L.cursor);
  gather_rows<T, C>(L.X, ldx, input, L.sorted, N, In);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = L.offsets[e], ne = L.offsets[e + 1] - r0;
    if (ne == 0) continue;
    MatRef<C> w = weight_operand<T, C>(weight, e, L.w);
    gemm(Trans::N, w.as_op(true), ne, Out, In, C(1), L.X + r0 * ldx, ldx, w.p, w.ld,
         C(0), L.G + r0 * ldg, ldg);
  }
  scatter_rows<T, C>(out, L.G, ldg, L.sorted, N, Out);
  return MOE_OK;
}

template <class T>
moe_status_t backward_impl(const moe_context_t &ctx, const LinearProblem &p,
                           const moe_tensor_t &grad_out, const moe_tensor_t &input,
                           const moe_tensor_t &weight, const moe_tensor_t &sel,
                           const moe_tensor_t *grad_input, const moe_tensor_t *grad_weight) {
  using C = typename Compute<T>::type;
  const int64_t N = p.n, E = p.num_experts, In = p.in_features, Out = p.out_features;
  const int64_t ldx = std::max<int64_t>(In, 1), ldg = std::max<int64_t>(Out, 1);
  Arena arena(ctx.workspace);
  LinearLayout<C> L = linear_layout<C>(arena, p);
  counting_sort(sel, E, L.offsets, L.sorted, nullptr, L.cursor);
  gather_rows<T, C>(L.G, ldg, grad_out, L.sorted, N, Out);
  if (grad_weight) gather_rows<T, C>(L.X, ldx, input, L.sorted, N, In);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = L.offsets[e], ne = L.offsets[e + 1] - r0;
    if (grad_weight) {
      if (ne == 0) {
        zero_expert<T>(*grad_weight, e);
      } else {
        // dW[e] [Out, In] = G_e^T X_e
        OutRef<C> o = weight_output<T, C>(*grad_weight, e, L.g);
        gemm_into(o, Trans::T, Trans::N, Out, In, ne, L.G + r0 * ldg, ldg, L.X + r0 * ldx, ldx);
        finish_output<T, C>(o, *grad_weight, e);
      }
    }
    if (grad_input && ne > 0) {
      // dX_e [ne, In] = G_e W[e]   (overwrites X_e, already used for dW[e])
      MatRef<C> w = weight_operand<T, C>(weight, e, L.w);
      gemm(Trans::N, w.as_op(false), ne, In, Out, C(1), L.G + r0 * ldg, ldg, w.p, w.ld, C(0),
           L.X + r0 * ldx, ldx);
    }
  }
  if (grad_input) scatter_rows<T, C>(*grad_input, L.X, ldx, L.sorted, N, In);
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
