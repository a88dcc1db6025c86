// moe::cuda: the CUDA backend behind common/api.cpp (common/backend.h).
// Host-side orchestration only; the kernels live in plan.cu, grouped_gemm.cu,
// wgrad.cu and combine.cu. Every call enqueues on ctx.stream, never
// allocates, never synchronises with the host (graph capturable).
// Dtypes: bfloat16 and float16 on the tensor-core kernels; float32 through a
// simple SIMT path (simt_f32.cu: exact fp32, slow). Operands need a unit inner stride (else MOE_ERR_STRIDE); row and
// expert strides are free.
#include <algorithm>

#include "common/backend.h"
#include "common/errors.h"
#include "cuda/kernels.h"
#include "cuda/simt_f32.h"
#include "cuda/sm90.h"

namespace moe {
namespace cuda {

// The sm90a kernel where it applies (sm90.h), else the portable one. *sm90 tells which ran.
static moe_status_t row_gemm(const GroupedGemmArgs &g, int64_t num_experts, uint64_t flags,
                             Launch st, bool *sm90 = nullptr) {
  moe_status_t s = MOE_OK;
  const bool fast = sm90_grouped_gemm(g, num_experts, flags, st, &s);
  if (sm90) *sm90 = fast;
  return fast ? s : grouped_gemm(g, st);
}
static moe_status_t weight_grad(const WgradArgs &w, uint64_t flags, Launch st) {
  moe_status_t s = MOE_OK;
  return sm90_wgrad(w, flags, st, &s) ? s : wgrad_gemm(w, st);
}

namespace {

constexpr int BMT = kGemmBM;

// A call's launches: its stream, with PDL where pdl_enabled allows (after the DeviceGuard:
// it asks about the current device).
Launch launch_of(const moe_context_t &ctx) {
  return Launch{stream_of(ctx), pdl_enabled(ctx.flags)};
}

const char *tname(const moe_tensor_t &t, const char *param) { return t.name ? t.name : param; }

moe_status_t check_half(const moe_tensor_t &t, const char *param) {
  if (t.dtype != MOE_DTYPE_BF16 && t.dtype != MOE_DTYPE_F16 && t.dtype != MOE_DTYPE_F32)
    return set_error(MOE_ERR_DTYPE,
                     "%s: the CUDA path supports bfloat16, float16 and float32 (got dtype %d); "
                     "cast, or run on the CPU",
                     tname(t, param), int(t.dtype));
  return MOE_OK;
}

moe_status_t check_inner(const moe_tensor_t &t, const char *param) {
  if (!inner_contiguous(t))
    return set_error(MOE_ERR_STRIDE,
                     "%s: the CUDA path needs a unit stride on the last dim (got %lld); "
                     "call .contiguous()",
                     tname(t, param), static_cast<long long>(t.strides[t.ndim - 1]));
  return MOE_OK;
}

#define MOE_CU_TRY(expr)                  \
  do {                                    \
    const moe_status_t st_ = (expr);      \
    if (st_ != MOE_OK) return st_;        \
  } while (0)

// Index tensor strides as (s0 rows, s1 slots) with k slots per row.
void index_strides(const moe_tensor_t &idx, int64_t *s0, int64_t *s1, int64_t *k) {
  if (idx.ndim >= 2) {
    *s0 = idx.strides[0];
    *s1 = idx.strides[1];
    *k = idx.shape[1];
  } else {
    *s0 = idx.ndim == 1 ? idx.strides[0] : 1;
    *s1 = 0;
    *k = 1;
  }
}

// ---- workspace layouts (shared by the size queries and the calls) ----

struct PlanWs {
  void *scratch;
};
PlanWs plan_layout(WsArena &ar, int64_t n, int64_t E) {
  return PlanWs{ar.take<char>(int64_t(plan_scratch_bytes(n, E)))};
}

struct LinearWs {
  int32_t *offsets, *sorted, *rows;
  PlanWs plan;
  Tile *tiles;
  int32_t *num_tiles;
};
LinearWs linear_layout(WsArena &ar, const LinearProblem &p) {
  LinearWs L;
  L.offsets = ar.take<int32_t>(p.num_experts + 1);
  L.sorted = ar.take<int32_t>(p.n);
  L.rows = ar.take<int32_t>(p.n);
  L.plan = plan_layout(ar, p.n, p.num_experts);
  L.tiles = ar.take<Tile>(max_tiles(p.n, p.num_experts, BMT));
  L.num_tiles = ar.take<int32_t>(1);
  return L;
}

// Token windows. GEMM2's per-pair rows y and dX's per-pair rows dh W1[e] are produced a
// token window [t0, t1) at a time into a buffer of (t1 - t0) k rows, and the combine sums
// each token's k rows straight into out / dx (fp32, slot order, one rounding: the numerics
// of one window). A window's pairs are one run of every expert's plan rows, written packed
// (tile.delta) so the GEMM's stores stay dense. Count: the fewest windows whose buffer
// (tokens k H) is no larger than the [T k, I] buffers beside it (a, s*a), so windows never
// set the peak; but only while an expert gets MOE_WINDOW_ROWS rows a window, since each
// window cuts every expert's segment into a partial tile (measured on the H200, 30B-A3B
// T=16384: 2 windows -0.2 ms against the former fp32 accumulator, 3 windows +0.1 ms more;
// on the H100, 3 windows 0.95 ms of GEMM2, one 0.79 ms). MOE_FLAG_ONE_WINDOW: one window,
// the caller having the memory to spare.
#ifndef MOE_WINDOW_ROWS
#define MOE_WINDOW_ROWS 256
#endif
#ifndef MOE_MAX_WINDOWS
#define MOE_MAX_WINDOWS 4
#endif
struct Windows {
  int64_t count, tokens;  // windows, tokens a window (the last may have fewer)
};
Windows token_windows(const ExpertsProblem &p, uint64_t flags) {
  const int64_t T = p.tokens, n = T * p.top_k;
  if (flags & MOE_FLAG_ONE_WINDOW) return Windows{1, std::max<int64_t>(1, T)};
  const int64_t fit = (p.hidden + p.intermediate - 1) / std::max<int64_t>(1, p.intermediate);
  const int64_t rows = n / std::max<int64_t>(1, p.num_experts * MOE_WINDOW_ROWS);
  const int64_t count = std::max<int64_t>(1, std::min({fit, rows, int64_t(MOE_MAX_WINDOWS)}));
  const int64_t tokens = std::max<int64_t>(1, (T + count - 1) / count);
  return Windows{std::max<int64_t>(1, (T + tokens - 1) / tokens), tokens};
}

// Runs `row_gemm` (EPI_STORE into `buf`) and the combine into `out` window by window.
// One window: the full tile list (already built), rows in plan order. Several: each
// window's tiles, rows packed.
moe_status_t windowed_store_combine(GroupedGemmArgs g, const ExpertsProblem &p, Windows W,
                                    const int32_t *off, const int32_t *sorted,
                                    const int32_t *rows, Tile *tiles, int32_t *num_tiles,
                                    int32_t *win_delta, const void *sw, int sw_dtype,
                                    int64_t sw_s0, int64_t sw_s1, void *out, int64_t ldo,
                                    uint64_t flags, Launch st) {
  const int64_t T = p.tokens, k = p.top_k, E = p.num_experts, n = T * k;
  g.c_scatter = false;
  for (int64_t t0 = 0; t0 < T; t0 += W.tokens) {
    const int64_t t1 = std::min(T, t0 + W.tokens);
    WindowRows win{nullptr, nullptr, int(E)};
    if (W.count > 1) {
      build_tiles_pairs(off, sorted, int(E), n, t0 * k, t1 * k, BMT, tiles, num_tiles, win_delta,
                        st);
      win = WindowRows{off, win_delta, int(E)};
    }
    g.c_rows = (t1 - t0) * k;
    MOE_CU_TRY(row_gemm(g, E, flags, st));
    MOE_CU_TRY(combine_rows(g.dtype, g.C, g.ldc, g.c_rows, rows, win, sw, sw_dtype, sw_s0, sw_s1,
                            t0, t1, int(k), g.N, out, ldo, st));
  }
  return MOE_OK;
}

struct FwdWs {
  PlanWs plan;
  Tile *tiles;
  int32_t *num_tiles, *win_delta;
  void *a, *y;  // a [n, I]; y: one token window's pair rows [tokens * k, H]
};
FwdWs fwd_layout(WsArena &ar, const ExpertsProblem &p, uint64_t flags) {
  const int64_t n = p.tokens * p.top_k;
  FwdWs L;
  L.plan = plan_layout(ar, n, p.num_experts);
  L.tiles = ar.take<Tile>(max_tiles(n, p.num_experts, BMT));
  L.num_tiles = ar.take<int32_t>(1);
  L.win_delta = ar.take<int32_t>(p.num_experts);
  L.a = ar.take<uint16_t>(n * p.intermediate);
  L.y = ar.take<uint16_t>(token_windows(p, flags).tokens * p.top_k * p.hidden);
  return L;
}

// Backward workspace: dh [n, 2I] (none when MOE_FLAG_OVERWRITE_H lets dh replace h), and
// one buffer that first holds s*a [n, I] (only for dW2) and, once dW2 has read it, dX's
// per-pair rows (a token window's); ds partials. A dense grad_gate_up_proj (bit
// MOE_GRAD_GATE_UP_PROJ, see experts_grads) is written last, by dW1, so until then it can
// hold s*a and dX's rows instead (all of them at once when they fit: one window).
struct BwdPlan {
  bool sa_in_dw1, rows_in_dw1;
  Windows dx;  // dX's token windows
};
BwdPlan bwd_plan(const ExpertsProblem &p, uint32_t grads, uint64_t flags) {
  const int64_t n = p.tokens * p.top_k;
  const int64_t scratch = (grads & MOE_GRAD_GATE_UP_PROJ)
                              ? p.num_experts * 2 * p.intermediate * p.hidden : 0;
  const int64_t sa = (grads & MOE_GRAD_DOWN_PROJ) ? n * p.intermediate : 0;
  BwdPlan b;
  b.dx = n * p.hidden <= scratch ? Windows{1, p.tokens} : token_windows(p, flags);
  const int64_t rows = (grads & MOE_GRAD_HIDDEN_STATES) ? b.dx.tokens * p.top_k * p.hidden : 0;
  b.sa_in_dw1 = sa > 0 && sa <= scratch;
  b.rows_in_dw1 = rows > 0 && rows <= scratch;
  return b;
}

struct BwdWs {
  BwdPlan plan;
  Tile *tiles;
  int32_t *num_tiles, *win_delta;
  void *dh;   // null: dh overwrites h
  void *buf;  // s*a, then dX's rows (each unless it is in grad_gate_up_proj)
  float *ds_part;
  int ds_ld;
};
BwdWs bwd_layout(WsArena &ar, const ExpertsProblem &p, uint32_t grads, uint64_t flags) {
  const int64_t n = p.tokens * p.top_k;
  BwdWs L;
  L.plan = bwd_plan(p, grads, flags);
  const BwdPlan &b = L.plan;
  L.tiles = ar.take<Tile>(max_tiles(n, p.num_experts, BMT));
  L.num_tiles = ar.take<int32_t>(1);
  L.win_delta = ar.take<int32_t>(p.num_experts);
  L.dh = (flags & MOE_FLAG_OVERWRITE_H) ? nullptr : ar.take<uint16_t>(n * 2 * p.intermediate);
  const int64_t sa = (grads & MOE_GRAD_DOWN_PROJ) && !b.sa_in_dw1 ? n * p.intermediate : 0;
  const int64_t rows = (grads & MOE_GRAD_HIDDEN_STATES) && !b.rows_in_dw1
                           ? b.dx.tokens * p.top_k * p.hidden : 0;
  L.buf = ar.take<uint16_t>(std::max(sa, rows));
  L.ds_ld = grouped_gemm_col_tiles(EPI_DSWIGLU, int(std::min<int64_t>(p.intermediate, 1 << 30)));
  L.ds_part = ar.take<float>(n * std::max(L.ds_ld, 1));
  return L;
}

moe_status_t check_sizes(int64_t a, int64_t b, int64_t c) {
  const int64_t lim = int64_t(1) << 30;
  if (a >= lim || b >= lim || c >= lim)
    return set_error(MOE_ERR_UNSUPPORTED, "CUDA path: a dimension of 2^30 or more");
  return MOE_OK;
}

}  // namespace

// ---- routing plan ----------------------------------------------------------------

size_t routing_plan_workspace_size(int64_t num_pairs, int64_t num_experts) {
  WsArena ar(nullptr);
  plan_layout(ar, num_pairs, num_experts);
  return ar.required();
}

moe_status_t routing_plan(const moe_context_t &ctx, const moe_tensor_t &top_k_index,
                          int64_t num_experts, const moe_plan_t &plan) {
  DeviceGuard dg(ctx.device_index);
  if (!dg.ok()) return launch_status("routing_plan (device)");
  int64_t s0, s1, k;
  index_strides(top_k_index, &s0, &s1, &k);
  int64_t n = 1;
  for (int d = 0; d < top_k_index.ndim; ++d) n *= top_k_index.shape[d];
  WsArena ar(ctx.workspace);
  PlanWs L = plan_layout(ar, n, num_experts);
  if (k <= 0) k = 1;
  build_plan(top_k_index.data, top_k_index.dtype, s0, s1, int(k), n, int(num_experts),
             static_cast<int32_t *>(plan.expert_offsets.data),
             static_cast<int32_t *>(plan.sorted_pairs.data),
             static_cast<int32_t *>(plan.pair_rows.data), L.scratch, launch_of(ctx));
  return launch_status("routing_plan");
}

// ---- moe_fused_linear --------------------------------------------------------------

size_t linear_workspace_size(const LinearProblem &p) {
  WsArena ar(nullptr);
  linear_layout(ar, p);
  return ar.required();
}

static moe_status_t linear_plan(Launch st, const LinearProblem &p, const moe_tensor_t &sel,
                                LinearWs &L) {
  int64_t s0, s1, k;
  index_strides(sel, &s0, &s1, &k);
  const PlanTiles tiles{BMT, L.tiles, L.num_tiles};
  build_plan(sel.data, sel.dtype, s0, 0, 1, p.n, int(p.num_experts), L.offsets, L.sorted, L.rows,
             L.plan.scratch, st, &tiles);
  return launch_status("moe_linear (plan)");
}

moe_status_t linear_forward(const moe_context_t &ctx, const LinearProblem &p,
                            const moe_tensor_t &input, const moe_tensor_t &weight,
                            const moe_tensor_t &selected_experts, const moe_tensor_t &out) {
  MOE_CU_TRY(check_half(input, "input"));
  MOE_CU_TRY(check_inner(input, "input"));
  MOE_CU_TRY(check_inner(weight, "weight"));
  MOE_CU_TRY(check_inner(out, "out"));
  MOE_CU_TRY(check_sizes(p.in_features, p.out_features, p.num_experts));
  DeviceGuard dg(ctx.device_index);
  if (!dg.ok()) return launch_status("moe_linear_forward (device)");
  if (input.dtype == MOE_DTYPE_F32)
    return f32_linear_forward(stream_of(ctx), p, input, weight, selected_experts, out);
  WsArena ar(ctx.workspace);
  LinearWs L = linear_layout(ar, p);
  const Launch st = launch_of(ctx);
  MOE_CU_TRY(linear_plan(st, p, selected_experts, L));
  GroupedGemmArgs g{};
  g.dtype = input.dtype;
  g.epilogue = EPI_STORE;
  g.b_kn = false;
  g.A = input.data;
  g.lda = input.strides[0];
  g.a_div = 1;
  g.B = weight.data;
  g.ldb = weight.strides[1];
  g.strideBE = weight.strides[0];
  g.n_rows = p.n;
  g.N = int(p.out_features);
  g.K = int(p.in_features);
  g.sorted = L.sorted;
  g.tiles = L.tiles;
  g.num_tiles = L.num_tiles;
  g.max_tiles = max_tiles(p.n, p.num_experts, BMT);
  g.C = out.data;
  g.ldc = out.strides[0];
  g.c_scatter = true;
  g.k = 1;
  if (p.in_features == 0) {
    // Empty reduction: out = 0 (the GEMM below still writes zeros: K = 0 -> acc = 0).
  }
  return row_gemm(g, p.num_experts, ctx.flags, st);
}

moe_status_t linear_backward(const moe_context_t &ctx, const LinearProblem &p,
                             const moe_tensor_t &grad_out, const moe_tensor_t &input,
                             const moe_tensor_t &weight, const moe_tensor_t &selected_experts,
                             const moe_tensor_t *grad_input, const moe_tensor_t *grad_weight) {
  MOE_CU_TRY(check_half(input, "input"));
  MOE_CU_TRY(check_inner(input, "input"));
  MOE_CU_TRY(check_inner(weight, "weight"));
  MOE_CU_TRY(check_inner(grad_out, "grad_out"));
  if (grad_input) MOE_CU_TRY(check_inner(*grad_input, "grad_input"));
  if (grad_weight) MOE_CU_TRY(check_inner(*grad_weight, "grad_weight"));
  MOE_CU_TRY(check_sizes(p.in_features, p.out_features, p.num_experts));
  if (!grad_input && !grad_weight) return MOE_OK;
  DeviceGuard dg(ctx.device_index);
  if (!dg.ok()) return launch_status("moe_linear_backward (device)");
  WsArena ar(ctx.workspace);
  LinearWs L = linear_layout(ar, p);
  const Launch st = launch_of(ctx);
  MOE_CU_TRY(linear_plan(st, p, selected_experts, L));
  if (input.dtype == MOE_DTYPE_F32)
    return f32_linear_backward(st, p, grad_out, input, weight, selected_experts, grad_input,
                               grad_weight, L.offsets, L.sorted);
  if (grad_input) {
    GroupedGemmArgs g{};
    g.dtype = input.dtype;
    g.epilogue = EPI_STORE;
    g.b_kn = true;  // weight[e] read as [K = out][N = in]
    g.A = grad_out.data;
    g.lda = grad_out.strides[0];
    g.a_div = 1;
    g.B = weight.data;
    g.ldb = weight.strides[1];
    g.strideBE = weight.strides[0];
    g.n_rows = p.n;
    g.N = int(p.in_features);
    g.K = int(p.out_features);
    g.sorted = L.sorted;
    g.tiles = L.tiles;
    g.num_tiles = L.num_tiles;
    g.max_tiles = max_tiles(p.n, p.num_experts, BMT);
    g.C = grad_input->data;
    g.ldc = grad_input->strides[0];
    g.c_scatter = true;
    g.k = 1;
    MOE_CU_TRY(row_gemm(g, p.num_experts, ctx.flags, st));
  }
  if (grad_weight) {
    WgradArgs w{};
    w.dtype = input.dtype;
    w.A = grad_out.data;
    w.lda = grad_out.strides[0];
    w.a_div = 1;
    w.B = input.data;
    w.ldb = input.strides[0];
    w.b_div = 1;
    w.n_rows = p.n;
    w.M = int(p.out_features);
    w.N = int(p.in_features);
    w.E = int(p.num_experts);
    w.offsets = L.offsets;
    w.sorted = L.sorted;
    w.C = grad_weight->data;
    w.ldc = grad_weight->strides[1];
    w.strideCE = grad_weight->strides[0];
    MOE_CU_TRY(weight_grad(w, ctx.flags, st));
  }
  return MOE_OK;
}

// ---- fused experts layer ---------------------------------------------------------------

// dtype < 0: any dtype. float32 runs the SIMT path (its own scratch after the plan's).
size_t experts_forward_workspace_size(const ExpertsProblem &p, int32_t dtype, uint64_t flags) {
  WsArena f(nullptr), f32(nullptr);
  if (dtype != MOE_DTYPE_F32) fwd_layout(f, p, flags);
  else plan_layout(f, p.tokens * p.top_k, p.num_experts);
  if (dtype < 0 || dtype == MOE_DTYPE_F32)
    f32.take<char>(int64_t(f32_experts_fwd_bytes(p, (flags & MOE_FLAG_FORWARD_NO_H) != 0)));
  return std::max(f.required(), f32.required());
}

size_t experts_backward_workspace_size(const ExpertsProblem &p, int32_t dtype, uint32_t grads,
                                       uint64_t flags) {
  WsArena b(nullptr), f32(nullptr);
  if (dtype != MOE_DTYPE_F32) bwd_layout(b, p, grads, flags);
  if (dtype < 0 || dtype == MOE_DTYPE_F32) f32.take<char>(int64_t(f32_experts_bwd_bytes(p)));
  return std::max(b.required(), f32.required());
}

moe_status_t experts_forward(const moe_context_t &ctx, const ExpertsProblem &p,
                             const moe_tensor_t &hidden_states, const moe_tensor_t &top_k_index,
                             const moe_tensor_t &top_k_weights, const moe_tensor_t &gate_up_proj,
                             const moe_tensor_t &down_proj, const moe_plan_t &plan,
                             const moe_tensor_t *h, const moe_tensor_t &out) {
  MOE_CU_TRY(check_half(hidden_states, "hidden_states"));
  MOE_CU_TRY(check_inner(hidden_states, "hidden_states"));
  MOE_CU_TRY(check_inner(gate_up_proj, "gate_up_proj"));
  MOE_CU_TRY(check_inner(down_proj, "down_proj"));
  if (h) MOE_CU_TRY(check_inner(*h, "h"));
  MOE_CU_TRY(check_inner(out, "out"));
  MOE_CU_TRY(check_sizes(p.hidden, 2 * p.intermediate, p.num_experts));
  if (p.top_k > 64) return set_error(MOE_ERR_UNSUPPORTED, "CUDA path: top_k > 64");
  DeviceGuard dg(ctx.device_index);
  if (!dg.ok()) return launch_status("moe_experts_forward (device)");
  const int64_t T = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate,
                E = p.num_experts, n = T * k;
  const Launch st = launch_of(ctx);
  WsArena ar(ctx.workspace);
  FwdWs L = fwd_layout(ar, p, ctx.flags);
  int32_t *off = static_cast<int32_t *>(plan.expert_offsets.data);
  int32_t *sorted = static_cast<int32_t *>(plan.sorted_pairs.data);
  int32_t *rows = static_cast<int32_t *>(plan.pair_rows.data);
  int64_t s0, s1, kk;
  index_strides(top_k_index, &s0, &s1, &kk);
  // The tile list with the plan (float32 runs the SIMT path, which does not walk tiles).
  const bool f32 = hidden_states.dtype == MOE_DTYPE_F32;
  const PlanTiles tiles{BMT, L.tiles, L.num_tiles};
  build_plan(top_k_index.data, top_k_index.dtype, s0, s1, int(k), n, int(E), off, sorted, rows,
             L.plan.scratch, st, f32 ? nullptr : &tiles);
  MOE_CU_TRY(launch_status("moe_experts_forward (plan)"));
  if (f32) {
    WsArena ar32(ctx.workspace);
    return f32_experts_forward(st, p, hidden_states, top_k_weights, gate_up_proj, down_proj, off,
                               sorted, rows, h, out, ar32.take<char>(1));
  }

  // GEMM1 + SwiGLU. Without h (no backward follows) the epilogue stores a alone: h is 2/3
  // of GEMM1's output bytes. a is the same either way (from the rounded g, u).
  GroupedGemmArgs g{};
  g.dtype = hidden_states.dtype;
  g.epilogue = h ? EPI_SWIGLU : EPI_SWIGLU_A;
  g.b_kn = false;
  g.A = hidden_states.data;
  g.lda = hidden_states.strides[0];
  g.a_div = int(k);
  g.B = gate_up_proj.data;
  g.ldb = gate_up_proj.strides[1];
  g.strideBE = gate_up_proj.strides[0];
  g.n_rows = n;
  g.N = int(I);
  g.K = int(H);
  g.sorted = sorted;
  g.tiles = L.tiles;
  g.num_tiles = L.num_tiles;
  g.max_tiles = max_tiles(n, E, BMT);
  g.C = h ? h->data : nullptr;
  g.ldc = h ? h->strides[0] : 0;
  g.C2 = L.a;
  g.ldc2 = I;
  g.k = int(k);
  MOE_CU_TRY(row_gemm(g, E, ctx.flags, st));

  // y = a W2[e] per pair, a token window at a time, each token's k rows combined into out.
  GroupedGemmArgs g2 = g;
  g2.epilogue = EPI_STORE;
  g2.A = L.a;
  g2.lda = I;
  g2.a_div = 0;
  g2.B = down_proj.data;
  g2.ldb = down_proj.strides[1];
  g2.strideBE = down_proj.strides[0];
  g2.N = int(H);
  g2.K = int(I);
  g2.C = L.y;
  g2.ldc = H;
  g2.C2 = nullptr;
  return windowed_store_combine(g2, p, token_windows(p, ctx.flags), off, sorted, rows, L.tiles,
                                L.num_tiles, L.win_delta, top_k_weights.data, top_k_weights.dtype,
                                top_k_weights.strides[0], top_k_weights.strides[1], out.data,
                                out.strides[0], ctx.flags, st);
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
  MOE_CU_TRY(check_half(hidden_states, "hidden_states"));
  MOE_CU_TRY(check_inner(hidden_states, "hidden_states"));
  MOE_CU_TRY(check_inner(grad_out, "grad_out"));
  MOE_CU_TRY(check_inner(gate_up_proj, "gate_up_proj"));
  MOE_CU_TRY(check_inner(down_proj, "down_proj"));
  MOE_CU_TRY(check_inner(h, "h"));
  if (grad_hidden_states) MOE_CU_TRY(check_inner(*grad_hidden_states, "grad_hidden_states"));
  if (grad_gate_up_proj) MOE_CU_TRY(check_inner(*grad_gate_up_proj, "grad_gate_up_proj"));
  if (grad_down_proj) MOE_CU_TRY(check_inner(*grad_down_proj, "grad_down_proj"));
  MOE_CU_TRY(check_sizes(p.hidden, 2 * p.intermediate, p.num_experts));
  if (p.top_k > 64) return set_error(MOE_ERR_UNSUPPORTED, "CUDA path: top_k > 64");
  if (!grad_hidden_states && !grad_top_k_weights && !grad_gate_up_proj && !grad_down_proj)
    return MOE_OK;
  DeviceGuard dg(ctx.device_index);
  if (!dg.ok()) return launch_status("moe_experts_backward (device)");
  const int64_t T = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate,
                E = p.num_experts, n = T * k;
  const Launch st = launch_of(ctx);
  const uint32_t grads =
      experts_grads(p, grad_hidden_states, grad_top_k_weights, grad_gate_up_proj, grad_down_proj);
  WsArena ar(ctx.workspace);
  BwdWs L = bwd_layout(ar, p, grads, ctx.flags);
  const BwdPlan &bp = L.plan;
  void *sa = bp.sa_in_dw1 ? grad_gate_up_proj->data : L.buf;
  void *dx_rows = bp.rows_in_dw1 ? grad_gate_up_proj->data : L.buf;
  const int32_t *off = static_cast<const int32_t *>(plan.expert_offsets.data);
  const int32_t *sorted = static_cast<const int32_t *>(plan.sorted_pairs.data);
  const int32_t *rows = static_cast<const int32_t *>(plan.pair_rows.data);
  if (hidden_states.dtype == MOE_DTYPE_F32) {
    WsArena ar32(ctx.workspace);
    return f32_experts_backward(st, p, grad_out, hidden_states, top_k_weights, gate_up_proj,
                                down_proj, off, sorted, rows, h, grad_hidden_states,
                                grad_top_k_weights, grad_gate_up_proj, grad_down_proj,
                                ar32.take<char>(1));
  }
  build_tiles(off, int(E), n, BMT, L.tiles, L.num_tiles, st);
  MOE_CU_TRY(launch_status("moe_experts_backward (tiles)"));

  // dA' = dout W2[e] (gathered), epilogue: dh (over h itself in the in-place mode: each
  // element of h is read before its dh is written, and nothing reads h afterwards), s*a
  // (only for dW2), ds partials.
  void *dh = L.dh ? L.dh : h.data;
  const int64_t ldd = L.dh ? 2 * I : h.strides[0];
  GroupedGemmArgs g{};
  g.dtype = hidden_states.dtype;
  g.epilogue = EPI_DSWIGLU;
  g.b_kn = true;
  g.A = grad_out.data;
  g.lda = grad_out.strides[0];
  g.a_div = int(k);
  g.B = down_proj.data;
  g.ldb = down_proj.strides[1];
  g.strideBE = down_proj.strides[0];
  g.n_rows = n;
  g.N = int(I);
  g.K = int(H);
  g.sorted = sorted;
  g.tiles = L.tiles;
  g.num_tiles = L.num_tiles;
  g.max_tiles = max_tiles(n, E, BMT);
  g.C = dh;
  g.ldc = ldd;
  g.C2 = grad_down_proj ? sa : nullptr;
  g.ldc2 = I;
  g.Hin = h.data;
  g.ldh = h.strides[0];
  g.ds_part = L.ds_part;
  g.ds_ld = L.ds_ld;
  g.sw = top_k_weights.data;
  g.sw_dtype = top_k_weights.dtype;
  g.sw_s0 = top_k_weights.strides[0];
  g.sw_s1 = top_k_weights.strides[1];
  g.k = int(k);
  bool ds_sm90 = false;  // the sm90a kernel writes fewer (wider) ds_part column tiles
  MOE_CU_TRY(row_gemm(g, E, ctx.flags, st, &ds_sm90));
  const int ds_cols = ds_sm90 ? sm90_col_tiles(EPI_DSWIGLU, int(I)) : L.ds_ld;

  if (grad_top_k_weights)
    MOE_CU_TRY(reduce_ds(L.ds_part, L.ds_ld, ds_cols, rows, T, int(k), grad_top_k_weights->data,
                         grad_top_k_weights->dtype, grad_top_k_weights->strides[0],
                         grad_top_k_weights->strides[1], st));
  // What dW2 and dW1 share: the plan they reduce over and the [E][M][N] gradient they write.
  auto wgrad_into = [&](const moe_tensor_t &grad, int64_t M, int64_t N) {
    WgradArgs w{};
    w.dtype = hidden_states.dtype;
    w.n_rows = n;
    w.M = int(M);
    w.N = int(N);
    w.E = int(E);
    w.offsets = off;
    w.sorted = sorted;
    w.C = grad.data;
    w.ldc = grad.strides[1];
    w.strideCE = grad.strides[0];
    return w;
  };
  if (grad_down_proj) {
    WgradArgs w = wgrad_into(*grad_down_proj, H, I);
    w.A = grad_out.data;
    w.lda = grad_out.strides[0];
    w.a_div = int(k);
    w.B = sa;
    w.ldb = I;
    w.b_div = 0;
    MOE_CU_TRY(weight_grad(w, ctx.flags, st));
  }
  if (grad_hidden_states) {
    // dx = sum over the k slots of dh W1[e], a token window at a time (s*a, where the rows
    // may go, is dead once dW2 has run): each token's k rows combined into dx, fp32, slot
    // order.
    GroupedGemmArgs d{};
    d.dtype = hidden_states.dtype;
    d.epilogue = EPI_STORE;
    d.b_kn = true;  // W1[e] read as [K = 2I][N = H]
    d.A = dh;
    d.lda = ldd;
    d.a_div = 0;
    d.B = gate_up_proj.data;
    d.ldb = gate_up_proj.strides[1];
    d.strideBE = gate_up_proj.strides[0];
    d.n_rows = n;
    d.N = int(H);
    d.K = int(2 * I);
    d.sorted = sorted;
    d.tiles = L.tiles;
    d.num_tiles = L.num_tiles;
    d.max_tiles = max_tiles(n, E, BMT);
    d.C = dx_rows;
    d.ldc = H;
    d.k = int(k);
    MOE_CU_TRY(windowed_store_combine(d, p, bp.dx, off, sorted, rows, L.tiles, L.num_tiles,
                                      L.win_delta, nullptr, MOE_DTYPE_F32, 0, 0,
                                      grad_hidden_states->data, grad_hidden_states->strides[0],
                                      ctx.flags, st));
  }
  // dW1 last: until here grad_gate_up_proj may have held s*a and dX's rows.
  if (grad_gate_up_proj) {
    WgradArgs w = wgrad_into(*grad_gate_up_proj, 2 * I, H);
    w.A = dh;
    w.lda = ldd;
    w.a_div = 0;
    w.B = hidden_states.data;
    w.ldb = hidden_states.strides[0];
    w.b_div = int(k);
    MOE_CU_TRY(weight_grad(w, ctx.flags, st));
  }
  return MOE_OK;
}

}  // namespace cuda
}  // namespace moe
