// Internal launchers of the CUDA backend, one family per .cu file:
//   plan.cu          routing plan (histogram, scan, stable scatter) + tile lists
//   grouped_gemm.cu  row-grouped GEMMs (per-expert row segments) with fused
//                    gathers and epilogues (SwiGLU, dSwiGLU + ds, plain store)
//   wgrad.cu         K-grouped GEMMs: per-expert weight gradients
//   combine.cu       deterministic per-token k-slot reductions, ds reduce
// Everything is enqueued on `stream`; nothing allocates or synchronises. The launchers of
// the kernels the sm90 path chains take a Launch (pdl.h): with PDL where the call has it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/pdl.h"
#include "moe_fused.h"

namespace moe {
namespace cuda {

// ---- plan.cu -----------------------------------------------------------------

// Scratch bytes (already 256-aligned) of build_plan for n pairs and E experts.
size_t plan_scratch_bytes(int64_t n, int64_t E);
// idx: [n/k, k] int32/int64 with element strides s0 (rows) and s1 (slots); for a
// [N] index tensor pass k = 1, s1 = 0. Values outside [0, E) are clamped (the
// Python layer checks ranges; here they must only never cause a wild access).
// Writes offsets[E+1], sorted[n], rows[n] (the inverse), and with `tiles` the tile list
// build_tiles would make (in the same launches: one launch fewer).
struct PlanTiles {
  int BM;
  Tile *tiles;          // [max_tiles(n, E, BM)]
  int32_t *num_tiles;   // [1]
};
void build_plan(const void *idx, int idx_dtype, int64_t s0, int64_t s1, int k, int64_t n,
                int E, int32_t *offsets, int32_t *sorted, int32_t *rows, void *scratch,
                Launch stream, const PlanTiles *tiles = nullptr);
// Tile list of BM-row tiles over the segments [offsets[e], offsets[e+1]) (clamped
// to [0, n], made monotone): tiles[max_tiles(n,E,BM)], num_tiles[1].
void build_tiles(const int32_t *offsets, int E, int64_t n, int BM, Tile *tiles,
                 int32_t *num_tiles, Launch stream);
// The same over the rows of the pairs [p0, p1) only (a token window [t0, t1) is the
// pairs [t0 k, t1 k)): plan rows ascend in p within a segment, so each expert's rows of
// the window are one run [lo_e, hi_e), found by binary search in sorted[]. The runs are
// packed in expert order: tile.delta = win_delta[e] = (window rows before e) - lo_e.
void build_tiles_pairs(const int32_t *offsets, const int32_t *sorted, int E, int64_t n,
                       int64_t p0, int64_t p1, int BM, Tile *tiles, int32_t *num_tiles,
                       int32_t *win_delta, Launch stream);

// ---- grouped_gemm.cu -----------------------------------------------------------

enum Epilogue : int {
  EPI_STORE = 0,     // C[row] = acc (row = r + tile.delta, or sorted[r] when c_scatter)
  EPI_SWIGLU = 1,    // C = h: [g;u] (g at col n, u at col I+n, I = N); C2 = a = silu(g)*u
  EPI_DSWIGLU = 2,   // acc = dA'; h from Hin; C = dh, C2 = s*a, ds_part[r, tile_n] = <dA', a>
  EPI_SWIGLU_A = 3,  // EPI_SWIGLU storing a alone (C null: the no-grad forward keeps no h)
};
// GEMM1's epilogues: B rows are gate rows then the same up rows; N = I, the columns of a.
constexpr bool is_swiglu(int epilogue) {
  return epilogue == EPI_SWIGLU || epilogue == EPI_SWIGLU_A;
}

constexpr int kGemmBM = 128;
constexpr int kGemmBN = MOE_GEMM_BN;

struct GroupedGemmArgs {
  int dtype;  // MOE_DTYPE_BF16 / F16
  int epilogue;
  bool b_kn;  // B stored [K][N] per expert (else [N][K])
  // A: rows of the activation, K contiguous. Row of plan row r: a_div ? sorted[r]/a_div : r.
  const void *A;
  int64_t lda;
  int a_div;
  // B: per-expert weight, B + e*strideBE, row stride ldb.
  const void *B;
  int64_t ldb, strideBE;
  int64_t n_rows;  // plan rows (T*k or N)
  int N, K;        // output columns (is_swiglu: I, the columns of a), reduction
  const int32_t *sorted;
  const Tile *tiles;
  const int32_t *num_tiles;
  int64_t max_tiles;
  // epilogue
  void *C;
  int64_t ldc;
  // EPI_STORE: C row = c_scatter ? sorted[r] : r + tile.delta, clamped to [0, c_rows)
  // (c_rows = 0: n_rows). A token window's rows go packed to a buffer of c_rows rows.
  bool c_scatter;
  int64_t c_rows;
  void *C2;  // EPI_DSWIGLU: may be null (s*a not wanted)
  int64_t ldc2;
  const void *Hin;
  int64_t ldh;
  float *ds_part;  // [n_rows, ds_ld]
  int ds_ld;
  const void *sw;  // routing weights [T,k] strides sw_s0, sw_s1, dtype sw_dtype
  int sw_dtype;
  int64_t sw_s0, sw_s1;
  int k;
  // set by grouped_gemm() from sizes, strides and alignment: 16-byte paths allowed
  bool vec_a, vec_b, vec_c, vec_h;
};
// Number of column tiles of a grouped GEMM (ds_part needs that many columns).
int grouped_gemm_col_tiles(int epilogue, int N);
moe_status_t grouped_gemm(const GroupedGemmArgs &a, cudaStream_t stream);

// ---- wgrad.cu --------------------------------------------------------------------

// C[e][m][n] = sum over rows r of expert e of A[arow(r)][m] * B[brow(r)][n],
// arow(r) = a_div ? sorted[r]/a_div : r (same for B). Experts without rows get 0.
struct WgradArgs {
  int dtype;
  const void *A;
  int64_t lda;
  int a_div;
  const void *B;
  int64_t ldb;
  int b_div;
  int64_t n_rows;
  int M, N, E;
  const int32_t *offsets;
  const int32_t *sorted;
  void *C;
  int64_t ldc, strideCE;
  bool vec_a, vec_b, vec_c;  // set by wgrad_gemm()
};
moe_status_t wgrad_gemm(const WgradArgs &a, cudaStream_t stream);

// ---- combine.cu ------------------------------------------------------------------

// For the tokens t in [t0, t1): out[t, :] = sum_j w_tj * Y[row(t, j), :] (fp32 sum in
// slot order, one rounding; w = 1 when sw is null). r = rows[t*k+j] is the pair's plan
// row; row(t, j) = r, or, for a token window packed by build_tiles_pairs, r + win_delta[e]
// with e the expert whose segment [offsets[e], offsets[e+1]) holds r. Y has ny rows, row
// stride ldy; out row stride ldo.
struct WindowRows {
  const int32_t *offsets;    // [E + 1]; null: Y holds every plan row
  const int32_t *win_delta;  // [E]
  int E;
};
moe_status_t combine_rows(int dtype, const void *Y, int64_t ldy, int64_t ny, const int32_t *rows,
                          WindowRows win, const void *sw, int sw_dtype, int64_t sw_s0,
                          int64_t sw_s1, int64_t t0, int64_t t1, int k, int64_t H, void *out,
                          int64_t ldo, Launch stream);
// grad_s[t, j] = sum_i ds_part[rows[t*k+j], i] (i ascending), in gs_dtype.
moe_status_t reduce_ds(const float *ds_part, int ds_ld, int ncols, const int32_t *rows,
                       int64_t T, int k, void *gs, int gs_dtype, int64_t gs_s0,
                       int64_t gs_s1, Launch stream);

}  // namespace cuda
}  // namespace moe
