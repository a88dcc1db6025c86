// The fused MoE experts layer on the CPU (DESIGN.md section 2).
//
// Forward: plan (counting sort), then one task per expert e over its plan
// rows: gather x rows, GEMM1 -> h (saved, activation dtype; without h, the
// no-grad forward, into the per-thread chunk buffer only), SwiGLU,
// GEMM2 -> y rows; then a weighted combine over the k slots of each token in
// slot order (deterministic).
// Backward, per expert: gather dout rows; recompute a from the saved (rounded)
// h; dA' = dout W2[e]; ds = <dA', a>; dW2[e] = (dout)^T (s a);
// dh = dSwiGLU(s dA'); dW1[e] = dh^T x; dx rows = dh W1[e]; then
// dx_t = sum_j dx rows of t in slot order (deterministic).
// GEMMs go through cpu/gemm.h on fp32 (f64 for float64) rows; bf16/f16
// operands are converted into per-thread scratch from the caller workspace.
#include <algorithm>
#include <cmath>

#include "common/backend.h"
#include "common/errors.h"
#include "cpu/parallel.h"
#include "cpu/plan.h"
#include "cpu/swiglu.h"
#include "cpu/util.h"

#ifdef MOE_CPU_PROFILE  // dev-only phase timer (cmake -DCMAKE_CXX_FLAGS=-DMOE_CPU_PROFILE)
#include <chrono>
#include <cstdio>
#define PROF_INIT auto prof_t0 = std::chrono::steady_clock::now();
#define PROF(label)                                                                    \
  do {                                                                                 \
    auto prof_t1 = std::chrono::steady_clock::now();                                   \
    std::fprintf(stderr, "  %-10s %8.2f ms\n", label,                                  \
                 std::chrono::duration<double, std::milli>(prof_t1 - prof_t0).count()); \
    prof_t0 = prof_t1;                                                                 \
  } while (0)
#else
#define PROF_INIT
#define PROF(label)
#endif

namespace moe {
namespace cpu {
namespace {

// Rows of one expert are processed in chunks of at most kChunk plan rows,
// so the per-row scratch (a, dA', h/dh in the compute type) is per thread and
// bounded; only x / y / dout / dx rows live in one [n, H] buffer (the combine
// over the k slots of a token needs all of them).
constexpr int64_t kChunk = 256;

template <class C> struct Slot {
  C *w1;  // [2I*H]  gate_up_proj[e] in the compute type (when it is not usable in place)
  C *w2;  // [H*I]   down_proj[e]
  C *g1;  // [2I*H]  grad of gate_up_proj[e] before conversion
  C *g2;  // [H*I]   grad of down_proj[e]
  C *A;   // [kChunk, I]   a (backward: then s * a)
  C *dA;  // [kChunk, I]   dA' = dout W2[e]
  C *HD;  // [kChunk, 2I]  h in the compute type (when h is not, or is not stored) / dh
};

template <class C> struct ExpertsLayout {
  int32_t *cursor;  // [E]     counting-sort cursor
  C *sv;            // [n]     routing weight of each plan row
  C *XY;            // [n, H]  x / y / dout / dx rows, in plan order
  Slot<C> slot[kMaxSlots];
  int nslots;
};

template <class C> ExpertsLayout<C> experts_layout(Arena &a, const ExpertsProblem &p) {
  const int64_t n = p.tokens * p.top_k, H = p.hidden, I = p.intermediate;
  const int64_t R = std::min<int64_t>(kChunk, n);
  ExpertsLayout<C> L;
  L.cursor = a.take<int32_t>(p.num_experts);
  L.sv = a.take<C>(n);
  L.XY = a.take<C>(n * H);
  L.nslots = scratch_slots();
  for (int s = 0; s < L.nslots; ++s) {
    Slot<C> &S = L.slot[s];
    S.w1 = a.take<C>(2 * I * H);
    S.w2 = a.take<C>(H * I);
    S.g1 = a.take<C>(2 * I * H);
    S.g2 = a.take<C>(H * I);
    S.A = a.take<C>(R * I);
    S.dA = a.take<C>(R * I);
    S.HD = a.take<C>(R * 2 * I);
  }
  return L;
}

constexpr int64_t kPar = 32768;  // elements of work below which loops stay serial

// Row kernels: float through the vectorised cpu/swiglu.cpp, double (the
// gradcheck path) with std::exp.
inline void act_row(float *a, const float *h, int64_t I) { swiglu_row(a, h, h + I, I); }
inline void act_row(double *a, const double *h, int64_t I) {
  for (int64_t i = 0; i < I; ++i) a[i] = h[i] / (1.0 + std::exp(-h[i])) * h[I + i];
}
inline void act_grad_row(float *dh, const float *h, const float *dA, float s, int64_t I) {
  swiglu_grad_row(dh, dh + I, h, h + I, dA, s, I);
}
inline void act_grad_row(double *dh, const double *h, const double *dA, double s, int64_t I) {
  for (int64_t i = 0; i < I; ++i) {
    const double g = h[i], u = h[I + i];
    const double sg = 1.0 / (1.0 + std::exp(-g));
    const double da = s * dA[i];
    dh[i] = da * u * (sg * (1.0 + g * (1.0 - sg)));
    dh[I + i] = da * g * sg;
  }
}
inline float row_dot(const float *a, const float *b, int64_t n) { return dot_row(a, b, n); }
inline double row_dot(const double *a, const double *b, int64_t n) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Plan-ordered routing weights: sv[r] = s[p], p = sorted[r].
template <class C>
void load_row_weights(C *sv, const moe_tensor_t &s, const int32_t *sorted, int64_t n,
                      int64_t k) {
  const int64_t s0 = s.strides[0], s1 = s.strides[1];
  const void *d = s.data;
  if (s.dtype == MOE_DTYPE_F32) {
    const float *f = static_cast<const float *>(d);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t p = sorted[r];
      sv[r] = C(f[(p / k) * s0 + (p % k) * s1]);
    }
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    const int64_t p = sorted[r];
    sv[r] = C(load_scalar(d, s.dtype, (p / k) * s0 + (p % k) * s1));
  }
}

// XY rows [r0, r1) <- rows t = sorted[r] / k of a [T, H] tensor.
template <class T, class C>
void gather_tokens(C *XY, int64_t ld, const moe_tensor_t &x, const int32_t *sorted, int64_t r0,
                   int64_t r1, int64_t k, int64_t H, bool inner) {
  const T *xp = data_as<const T>(x);
  const int64_t s0 = x.strides[0], s1 = H > 1 ? x.strides[1] : 1;
#pragma omp parallel for schedule(static) if (inner && (r1 - r0) * H > kPar)
  for (int64_t r = r0; r < r1; ++r) load_row<T, C>(XY + r * ld, xp + (sorted[r] / k) * s0, H, s1);
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

// a rows [0, m) = silu(g) * u from h rows (ld 2I).
template <class C>
void swiglu_rows(C *A, int64_t lda, const C *Hc, int64_t ldh, int64_t m, int64_t I, bool inner) {
#pragma omp parallel for schedule(static) if (inner && m * I > kPar)
  for (int64_t r = 0; r < m; ++r) act_row(A + r * lda, Hc + r * ldh, I);
}

template <class T>
moe_status_t forward_impl(const moe_context_t &ctx, const ExpertsProblem &p,
                          const moe_tensor_t &x, const moe_tensor_t &idx,
                          const moe_tensor_t &s, const moe_tensor_t &W1,
                          const moe_tensor_t &W2, const moe_plan_t &plan,
                          const moe_tensor_t *h, const moe_tensor_t &out) {
  using C = typename Compute<T>::type;
  constexpr bool native = std::is_same<T, C>::value;
  const int64_t Tn = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate,
                E = p.num_experts, n = Tn * k;
  const int64_t ldx = std::max<int64_t>(H, 1), ldh = std::max<int64_t>(2 * I, 1),
                lda = std::max<int64_t>(I, 1);
  Arena arena(ctx.workspace);
  ExpertsLayout<C> L = experts_layout<C>(arena, p);
  int32_t *off = data_as<int32_t>(plan.expert_offsets);
  int32_t *sorted = data_as<int32_t>(plan.sorted_pairs);
  int32_t *rows = data_as<int32_t>(plan.pair_rows);
  PROF_INIT
  counting_sort(idx, E, off, sorted, rows, L.cursor);
  load_row_weights<C>(L.sv, s, sorted, n, k);
  PROF("plan");

  for_each_expert(E, off, L.nslots, true, [&](int64_t e, int slot, bool inner) {
    const int64_t r0 = off[e], r1 = off[e + 1];
    if (r1 == r0) return;
    const Slot<C> &S = L.slot[slot];
    const MatRef<C> w1 = weight_operand<T, C>(W1, e, S.w1);
    const MatRef<C> w2 = weight_operand<T, C>(W2, e, S.w2);
    for (int64_t c0 = r0; c0 < r1; c0 += kChunk) {
      const int64_t m = std::min(kChunk, r1 - c0);
      C *X = L.XY + c0 * ldx;
      gather_tokens<T, C>(L.XY, ldx, x, sorted, c0, c0 + m, k, H, inner);
      // GEMM1: h = X W1[e]^T (straight into h when h is in the compute type). Without h,
      // into the chunk's HD rows (the same ld, so the same GEMM and the same values).
      C *Hc = native && h ? reinterpret_cast<C *>(h->data) + c0 * ldh : S.HD;
      gemm(Trans::N, w1.as_op(true), m, 2 * I, H, C(1), X, ldx, w1.p, w1.ld, C(0), Hc, ldh);
      if (!native) {
        // h is stored in the activation dtype; a is computed from the rounded h (also
        // when h is not stored, so that out does not depend on it).
        T *hp = h ? data_as<T>(*h) + c0 * 2 * I : nullptr;
        const int64_t cnt = m * 2 * I;
#pragma omp parallel for schedule(static) if (inner && cnt > kPar)
        for (int64_t i = 0; i < cnt; ++i) {
          const T v = from_c<T>(Hc[i]);
          if (hp) hp[i] = v;
          Hc[i] = to_c<C>(v);
        }
      }
      swiglu_rows(S.A, lda, Hc, ldh, m, I, inner);
      // GEMM2: y = A W2[e]^T, into the XY rows of the chunk (X is used up).
      gemm(Trans::N, w2.as_op(true), m, H, I, C(1), S.A, lda, w2.p, w2.ld, C(0), X, ldx);
    }
  });
  PROF("experts");
  combine_tokens<T, C>(out, L.XY, ldx, L.sv, rows, Tn, k, H);
  PROF("combine");
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
  constexpr bool native = std::is_same<T, C>::value;
  const int64_t Tn = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate,
                E = p.num_experts, n = Tn * k;
  const int64_t ldx = std::max<int64_t>(H, 1), ldh = std::max<int64_t>(2 * I, 1),
                lda = std::max<int64_t>(I, 1);
  Arena arena(ctx.workspace);
  ExpertsLayout<C> L = experts_layout<C>(arena, p);
  const int32_t *off = data_as<const int32_t>(plan.expert_offsets);
  const int32_t *sorted = data_as<const int32_t>(plan.sorted_pairs);
  const int32_t *rows = data_as<const int32_t>(plan.pair_rows);
  PROF_INIT
  load_row_weights<C>(L.sv, s, sorted, n, k);

  const bool need_dA = dx || ds || dW1;
  const bool need_A = ds || dW2;
  const bool need_dH = dx || dW1;

  for_each_expert(E, off, L.nslots, true, [&](int64_t e, int slot, bool inner) {
    const int64_t r0 = off[e], r1 = off[e + 1];
    if (r1 == r0) {
      if (dW1) zero_expert<T>(*dW1, e);
      if (dW2) zero_expert<T>(*dW2, e);
      return;
    }
    const Slot<C> &S = L.slot[slot];
    MatRef<C> w1{}, w2{};
    if (need_dA) w2 = weight_operand<T, C>(W2, e, S.w2);
    if (dx) w1 = weight_operand<T, C>(W1, e, S.w1);
    OutRef<C> o1{}, o2{};
    if (dW1) o1 = weight_output<T, C>(*dW1, e, S.g1);
    if (dW2) o2 = weight_output<T, C>(*dW2, e, S.g2);
    for (int64_t c0 = r0; c0 < r1; c0 += kChunk) {
      const int64_t m = std::min(kChunk, r1 - c0);
      const C beta = c0 == r0 ? C(0) : C(1);  // dW accumulate over the chunks
      C *D = L.XY + c0 * ldx;  // dout rows, then x rows, then dx rows of the chunk
      gather_tokens<T, C>(L.XY, ldx, dout, sorted, c0, c0 + m, k, H, inner);
      // h rows in the compute type: h itself, or converted into HD (then dh
      // overwrites them in place, element by element).
      const C *Hc = native ? reinterpret_cast<const C *>(h.data) + c0 * ldh : S.HD;
      if (!native) {
        const T *hp = data_as<const T>(h) + c0 * 2 * I;
        const int64_t cnt = m * 2 * I;
#pragma omp parallel for schedule(static) if (inner && cnt > kPar)
        for (int64_t i = 0; i < cnt; ++i) S.HD[i] = to_c<C>(hp[i]);
      }
      if (need_A) swiglu_rows(S.A, lda, Hc, ldh, m, I, inner);
      // dA' = D W2[e]
      if (need_dA)
        gemm(Trans::N, w2.as_op(false), m, I, H, C(1), D, ldx, w2.p, w2.ld, C(0), S.dA, lda);
      if (ds) {
        // ds_tj = <dA', a>
        const int64_t s0 = ds->strides[0], s1 = ds->strides[1];
        for (int64_t r = 0; r < m; ++r) {
          const C acc = row_dot(S.A + r * lda, S.dA + r * lda, I);
          const int64_t pr = sorted[c0 + r];
          store_scalar(ds->data, ds->dtype, (pr / k) * s0 + (pr % k) * s1, double(acc));
        }
      }
      if (dW2) {
        // dW2[e] += D^T (s a)
        for (int64_t r = 0; r < m; ++r) {
          C *a = S.A + r * lda;
          const C sr = L.sv[c0 + r];
          for (int64_t i = 0; i < I; ++i) a[i] *= sr;
        }
        gemm_into(o2, Trans::T, Trans::N, H, I, m, D, ldx, S.A, lda, beta);
      }
      if (!need_dH) continue;
      // dh = [dg ; du], da = s dA', dg = da u silu'(g), du = da silu(g).
#pragma omp parallel for schedule(static) if (inner && m * I > kPar)
      for (int64_t r = 0; r < m; ++r)
        act_grad_row(S.HD + r * ldh, Hc + r * ldh, S.dA + r * lda, L.sv[c0 + r], I);
      if (dW1) {
        // dW1[e] += dh^T X
        gather_tokens<T, C>(L.XY, ldx, x, sorted, c0, c0 + m, k, H, inner);
        gemm_into(o1, Trans::T, Trans::N, 2 * I, H, m, S.HD, ldh, D, ldx, beta);
      }
      // dx rows = dh W1[e]  (overwrites X rows, already used for dW1[e])
      if (dx)
        gemm(Trans::N, w1.as_op(false), m, H, 2 * I, C(1), S.HD, ldh, w1.p, w1.ld, C(0), D, ldx);
    }
    if (dW1) finish_output<T, C>(o1, *dW1, e);
    if (dW2) finish_output<T, C>(o2, *dW2, e);
  });
  PROF("experts");
  if (dx) combine_tokens<T, C>(*dx, L.XY, ldx, nullptr, rows, Tn, k, H);
  PROF("combine");
  return MOE_OK;
}

}  // namespace

// One layout serves both calls (the CPU path keeps no dh buffer that h could replace), and
// the forward without h too: its h rows live in the per-thread [kChunk, 2I] HD buffers.
size_t experts_forward_workspace_size(const ExpertsProblem &p, int32_t, uint64_t) {
  Arena a(nullptr);
  experts_layout<double>(a, p);
  return a.required();
}

size_t experts_backward_workspace_size(const ExpertsProblem &p, int32_t dtype, uint32_t,
                                       uint64_t flags) {
  return experts_forward_workspace_size(p, dtype, flags);
}

moe_status_t experts_forward(const moe_context_t &ctx, const ExpertsProblem &p,
                             const moe_tensor_t &hidden_states, const moe_tensor_t &top_k_index,
                             const moe_tensor_t &top_k_weights, const moe_tensor_t &gate_up_proj,
                             const moe_tensor_t &down_proj, const moe_plan_t &plan,
                             const moe_tensor_t *h, const moe_tensor_t &out) {
  // Indices first: on a bad index nothing (plan, h, out) is written.
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
  // A corrupt plan is an error, not a wild read.
  moe_status_t st = check_plan(plan, p.num_experts, p.tokens * p.top_k);
  if (st != MOE_OK) return st;
  if (!grad_hidden_states && !grad_top_k_weights && !grad_gate_up_proj && !grad_down_proj)
    return MOE_OK;
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
