// The fused MoE experts layer on the CPU (DESIGN.md section 2).
// Forward: plan, gather x in plan order, GEMM1 per expert -> h (saved,
// activation dtype), SwiGLU, GEMM2 per expert -> y, weighted combine over the
// k slots of each token in slot order (deterministic).
// Backward: recomputes a from the saved (rounded) h; dA' = dout W2[e];
// ds = <dA', a>; dh = dSwiGLU(s dA'); dW2[e] = sum (s dout) a^T;
// dW1[e] = sum dh x^T; dx_t = sum_j (dh W1[e]) in slot order.
#include <algorithm>
#include <cmath>

#include "common/backend.h"
#include "common/errors.h"
#include "cpu/plan.h"
#include "cpu/util.h"

namespace moe {
namespace cpu {
namespace {

template <class C> struct ExpertsLayout {
  int32_t *cursor;  // [E]       counting-sort cursor
  C *sv;            // [n]       routing weight of each plan row
  C *XY;            // [n, H]    gathered x / y / dout / dx rows
  C *Hc;            // [n, 2I]   h in the compute type (when h is not)
  C *A;             // [n, I]    a = silu(g) * u (backward: then s * a)
  C *dA;            // [n, I]    dA' = dout W2[e]
  C *dH;            // [n, 2I]   dh = [dg ; du]
  C *w;             // [2I*H]    one expert's weight in the compute type
  C *g;             // [2I*H]    one expert's weight grad before conversion
};

template <class C> ExpertsLayout<C> experts_layout(Arena &a, const ExpertsProblem &p) {
  const int64_t n = p.tokens * p.top_k, H = p.hidden, I = p.intermediate;
  ExpertsLayout<C> L;
  L.cursor = a.take<int32_t>(p.num_experts);
  L.sv = a.take<C>(n);
  L.XY = a.take<C>(n * H);
  L.Hc = a.take<C>(n * 2 * I);
  L.A = a.take<C>(n * I);
  L.dA = a.take<C>(n * I);
  L.dH = a.take<C>(n * 2 * I);
  L.w = a.take<C>(2 * I * H);
  L.g = a.take<C>(2 * I * H);
  return L;
}

constexpr int64_t kPar = 32768;  // elements of work below which loops stay serial

template <class C> inline C sigmoid(C g) { return C(1) / (C(1) + std::exp(-g)); }

// Plan-ordered routing weights: sv[r] = s[p], p = sorted[r].
template <class C>
void load_row_weights(C *sv, const moe_tensor_t &s, const int32_t *sorted, int64_t n,
                      int64_t k) {
  const int64_t s0 = s.strides[0], s1 = s.strides[1];
  for (int64_t r = 0; r < n; ++r) {
    const int64_t p = sorted[r];
    sv[r] = C(load_scalar(s.data, s.dtype, (p / k) * s0 + (p % k) * s1));
  }
}

// XY row r <- row t = sorted[r] / k of a [T, H] tensor.
template <class T, class C>
void gather_tokens(C *XY, int64_t ld, const moe_tensor_t &x, const int32_t *sorted,
                   int64_t n, int64_t k, int64_t H) {
  const T *xp = data_as<const T>(x);
  const int64_t s0 = x.strides[0], s1 = H > 1 ? x.strides[1] : 1;
#pragma omp parallel for schedule(static) if (n * H > kPar)
  for (int64_t r = 0; r < n; ++r)
    load_row<T, C>(XY + r * ld, xp + (sorted[r] / k) * s0, H, s1);
}

// out[t, :] = sum_j w_j * rows[pair_rows[t*k + j], :]  (w_j = sv or 1),
// accumulated in slot order, in column chunks, written in out's dtype.
template <class T, class C>
void combine_tokens(const moe_tensor_t &out, const C *rows, int64_t ld, const C *sv,
                    const int32_t *pair_rows, int64_t T_, int64_t k, int64_t H) {
  T *op = data_as<T>(out);
  const int64_t s0 = out.strides[0], s1 = H > 1 ? out.strides[1] : 1;
  constexpr int64_t CB = 512;
#pragma omp parallel for schedule(static) if (T_ * k * H > kPar)
  for (int64_t t = 0; t < T_; ++t) {
    C acc[CB];
    for (int64_t c0 = 0; c0 < H; c0 += CB) {
      const int64_t c1 = std::min(H, c0 + CB), w = c1 - c0;
      for (int64_t c = 0; c < w; ++c) acc[c] = C(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = pair_rows[t * k + j];
        const C s = sv ? sv[r] : C(1);
        const C *row = rows + r * ld + c0;
        for (int64_t c = 0; c < w; ++c) acc[c] += s * row[c];
      }
      store_row<T, C>(op + t * s0 + c0 * s1, s1, acc, w);
    }
  }
}

template <class T>
moe_status_t forward_impl(const moe_context_t &ctx, const ExpertsProblem &p,
                          const moe_tensor_t &x, const moe_tensor_t &idx,
                          const moe_tensor_t &s, const moe_tensor_t &W1,
                          const moe_tensor_t &W2, const moe_plan_t &plan,
                          const moe_tensor_t &h, const moe_tensor_t &out) {
  using C = typename Compute<T>::type;
  const int64_t Tn = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate,
                E = p.num_experts, n = Tn * k;
  const int64_t ldx = std::max<int64_t>(H, 1), ldh = std::max<int64_t>(2 * I, 1),
                lda = std::max<int64_t>(I, 1);
  Arena arena(ctx.workspace);
  ExpertsLayout<C> L = experts_layout<C>(arena, p);
  int32_t *off = data_as<int32_t>(plan.expert_offsets);
  int32_t *sorted = data_as<int32_t>(plan.sorted_pairs);
  int32_t *rows = data_as<int32_t>(plan.pair_rows);

  counting_sort(idx, E, off, sorted, rows, L.cursor);
  load_row_weights<C>(L.sv, s, sorted, n, k);
  gather_tokens<T, C>(L.XY, ldx, x, sorted, n, k, H);

  // GEMM1: h_e = X_e W1[e]^T, straight into h when h is in the compute type.
  constexpr bool native = std::is_same<T, C>::value;
  C *Hc = native ? reinterpret_cast<C *>(h.data) : L.Hc;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], ne = off[e + 1] - r0;
    if (ne == 0) continue;
    MatRef<C> w = weight_operand<T, C>(W1, e, L.w);
    gemm(Trans::N, w.as_op(true), ne, 2 * I, H, C(1), L.XY + r0 * ldx, ldx, w.p, w.ld, C(0),
         Hc + r0 * ldh, ldh);
  }
  if (!native) {
    // h is stored in the activation dtype; a is computed from the rounded h.
    T *hp = data_as<T>(h);
    const int64_t m = n * 2 * I;
#pragma omp parallel for schedule(static) if (m > kPar)
    for (int64_t i = 0; i < m; ++i) {
      const T v = from_c<T>(Hc[i]);
      hp[i] = v;
      Hc[i] = to_c<C>(v);
    }
  }
  // SwiGLU: a = silu(g) * u.
#pragma omp parallel for schedule(static) if (n * I > kPar)
  for (int64_t r = 0; r < n; ++r) {
    const C *hr = Hc + r * ldh;
    C *ar = L.A + r * lda;
    for (int64_t i = 0; i < I; ++i) {
      const C g = hr[i];
      ar[i] = g * sigmoid(g) * hr[I + i];
    }
  }
  // GEMM2: y_e = A_e W2[e]^T (into XY).
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], ne = off[e + 1] - r0;
    if (ne == 0) continue;
    MatRef<C> w = weight_operand<T, C>(W2, e, L.w);
    gemm(Trans::N, w.as_op(true), ne, H, I, C(1), L.A + r0 * lda, lda, w.p, w.ld, C(0),
         L.XY + r0 * ldx, ldx);
  }
  combine_tokens<T, C>(out, L.XY, ldx, L.sv, rows, Tn, k, H);
  return MOE_OK;
}

template <class T>
moe_status_t backward_impl(const moe_context_t &ctx, const ExpertsProblem &p,
                           const moe_tensor_t &dout, const moe_tensor_t &x,
                           const moe_tensor_t &s, const moe_tensor_t &W1,
                           const moe_tensor_t &W2, const moe_plan_t &plan,
                           const moe_tensor_t &h, const moe_tensor_t *dx,
                           const moe_tensor_t *ds, const moe_tensor_t *dW1,
                           const moe_tensor_t *dW2) {
  using C = typename Compute<T>::type;
  const int64_t Tn = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate,
                E = p.num_experts, n = Tn * k;
  const int64_t ldx = std::max<int64_t>(H, 1), ldh = std::max<int64_t>(2 * I, 1),
                lda = std::max<int64_t>(I, 1);
  Arena arena(ctx.workspace);
  ExpertsLayout<C> L = experts_layout<C>(arena, p);
  const int32_t *off = data_as<const int32_t>(plan.expert_offsets);
  const int32_t *sorted = data_as<const int32_t>(plan.sorted_pairs);
  const int32_t *rows = data_as<const int32_t>(plan.pair_rows);

  load_row_weights<C>(L.sv, s, sorted, n, k);
  gather_tokens<T, C>(L.XY, ldx, dout, sorted, n, k, H);  // D = dout rows

  constexpr bool native = std::is_same<T, C>::value;
  const C *Hc = native ? reinterpret_cast<const C *>(h.data) : L.Hc;
  if (!native) {
    const T *hp = data_as<const T>(h);
    const int64_t m = n * 2 * I;
#pragma omp parallel for schedule(static) if (m > kPar)
    for (int64_t i = 0; i < m; ++i) L.Hc[i] = to_c<C>(hp[i]);
  }
  const bool need_dA = dx || ds || dW1;
  const bool need_A = ds || dW2;
  if (need_A) {
#pragma omp parallel for schedule(static) if (n * I > kPar)
    for (int64_t r = 0; r < n; ++r) {
      const C *hr = Hc + r * ldh;
      C *ar = L.A + r * lda;
      for (int64_t i = 0; i < I; ++i) {
        const C g = hr[i];
        ar[i] = g * sigmoid(g) * hr[I + i];
      }
    }
  }
  if (need_dA) {
    // dA'_e = D_e W2[e]
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[e], ne = off[e + 1] - r0;
      if (ne == 0) continue;
      MatRef<C> w = weight_operand<T, C>(W2, e, L.w);
      gemm(Trans::N, w.as_op(false), ne, I, H, C(1), L.XY + r0 * ldx, ldx, w.p, w.ld, C(0),
           L.dA + r0 * lda, lda);
    }
  }
  if (ds) {
    // ds_tj = <dA', a>
    const int64_t s0 = ds->strides[0], s1 = ds->strides[1];
#pragma omp parallel for schedule(static) if (n * I > kPar)
    for (int64_t r = 0; r < n; ++r) {
      const C *a = L.A + r * lda, *d = L.dA + r * lda;
      C acc = C(0);
      for (int64_t i = 0; i < I; ++i) acc += a[i] * d[i];
      const int64_t pr = sorted[r];
      store_scalar(ds->data, ds->dtype, (pr / k) * s0 + (pr % k) * s1, double(acc));
    }
  }
  if (dW2) {
    // dW2[e] = sum (s dout) a^T = D_e^T (s A)_e
#pragma omp parallel for schedule(static) if (n * I > kPar)
    for (int64_t r = 0; r < n; ++r) {
      C *a = L.A + r * lda;
      const C sr = L.sv[r];
      for (int64_t i = 0; i < I; ++i) a[i] *= sr;
    }
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off[e], ne = off[e + 1] - r0;
      if (ne == 0) {
        zero_expert<T>(*dW2, e);
        continue;
      }
      OutRef<C> o = weight_output<T, C>(*dW2, e, L.g);
      gemm_into(o, Trans::T, Trans::N, H, I, ne, L.XY + r0 * ldx, ldx, L.A + r0 * lda, lda);
      finish_output<T, C>(o, *dW2, e);
    }
  }
  if (!dx && !dW1) return MOE_OK;
  // dh = [dg ; du], da = s dA', dg = da u silu'(g), du = da silu(g).
#pragma omp parallel for schedule(static) if (n * I > kPar)
  for (int64_t r = 0; r < n; ++r) {
    const C *hr = Hc + r * ldh;
    const C *d = L.dA + r * lda;
    C *dh = L.dH + r * ldh;
    const C sr = L.sv[r];
    for (int64_t i = 0; i < I; ++i) {
      const C g = hr[i], u = hr[I + i];
      const C sg = sigmoid(g);
      const C da = sr * d[i];
      dh[i] = da * u * (sg * (C(1) + g * (C(1) - sg)));
      dh[I + i] = da * g * sg;
    }
  }
  if (dW1) gather_tokens<T, C>(L.XY, ldx, x, sorted, n, k, H);  // X rows (D is done)
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], ne = off[e + 1] - r0;
    if (dW1) {
      if (ne == 0) {
        zero_expert<T>(*dW1, e);
      } else {
        // dW1[e] [2I, H] = dH_e^T X_e
        OutRef<C> o = weight_output<T, C>(*dW1, e, L.g);
        gemm_into(o, Trans::T, Trans::N, 2 * I, H, ne, L.dH + r0 * ldh, ldh, L.XY + r0 * ldx,
                  ldx);
        finish_output<T, C>(o, *dW1, e);
      }
    }
    if (dx && ne > 0) {
      // dx rows of e = dH_e W1[e] (overwrites X_e, already used by dW1[e])
      MatRef<C> w = weight_operand<T, C>(W1, e, L.w);
      gemm(Trans::N, w.as_op(false), ne, H, 2 * I, C(1), L.dH + r0 * ldh, ldh, w.p, w.ld, C(0),
           L.XY + r0 * ldx, ldx);
    }
  }
  if (dx) combine_tokens<T, C>(*dx, L.XY, ldx, nullptr, rows, Tn, k, H);
  return MOE_OK;
}

}  // namespace

size_t experts_workspace_size(const ExpertsProblem &p) {
  Arena a(nullptr);
  experts_layout<double>(a, p);
  return a.required();
}

moe_status_t experts_forward(const moe_context_t &ctx, const ExpertsProblem &p,
                             const moe_tensor_t &hidden_states, const moe_tensor_t &top_k_index,
                             const moe_tensor_t &top_k_weights, const moe_tensor_t &gate_up_proj,
                             const moe_tensor_t &down_proj, const moe_plan_t &plan,
                             const moe_tensor_t &h, const moe_tensor_t &out) {
  moe_status_t st = check_indices(top_k_index, p.num_experts, "top_k_index");
  if (st != MOE_OK) return st;
  st = MOE_ERR_DTYPE;
  dispatch_float(hidden_states.dtype, [&](auto tag) {
    st = forward_impl<decltype(tag)>(ctx, p, hidden_states, top_k_index, top_k_weights,
                                     gate_up_proj, down_proj, plan, h, out);
  });
  if (st == MOE_ERR_DTYPE)
    return set_error(st, "hidden_states: unsupported dtype %d", hidden_states.dtype);
  return st;
}

moe_status_t experts_backward(const moe_context_t &ctx, const ExpertsProblem &p,
                              const moe_tensor_t &grad_out, const moe_tensor_t &hidden_states,
                              const moe_tensor_t &top_k_weights,
                              const moe_tensor_t &gate_up_proj, const moe_tensor_t &down_proj,
                              const moe_plan_t &plan, const moe_tensor_t &h,
                              const moe_tensor_t *grad_hidden_states,
                              const moe_tensor_t *grad_top_k_weights,
                              const moe_tensor_t *grad_gate_up_proj,
                              const moe_tensor_t *grad_down_proj) {
  moe_status_t st = check_plan(plan, p.num_experts, p.tokens * p.top_k);
  if (st != MOE_OK) return st;
  st = MOE_ERR_DTYPE;
  dispatch_float(hidden_states.dtype, [&](auto tag) {
    st = backward_impl<decltype(tag)>(ctx, p, grad_out, hidden_states, top_k_weights,
                                      gate_up_proj, down_proj, plan, h, grad_hidden_states,
                                      grad_top_k_weights, grad_gate_up_proj, grad_down_proj);
  });
  if (st == MOE_ERR_DTYPE)
    return set_error(st, "hidden_states: unsupported dtype %d", hidden_states.dtype);
  return st;
}

}  // namespace cpu
}  // namespace moe
