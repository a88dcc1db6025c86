// sm90a row-grouped GEMMs of the experts layer (issue 5; notes/hopper.md): each work item is
// one BM = 128-row tile of one expert's plan-row segment (plan.cu's device-side tile list)
// times one column tile,
//   C[r, n] = sum_k A[arow(r), k] * B_e(k, n),   arow(r) = a_div ? sorted[r] / a_div : r,
// with the portable kernels' epilogues and rounding (grouped_gemm.cu):
//   EPI_SWIGLU   GEMM1: B rows = 128 gate rows + the same 128 up rows; h = [g; u] and
//                a = silu(g) * u from the rounded g, u, each staged in smem and stored in rows
//   EPI_SWIGLU_A the same storing a alone (the no-grad forward: no h; its own instantiation,
//                so EPI_SWIGLU's code is untouched)
//   EPI_STORE    GEMM2, dX, linear: C row (c_scatter ? sorted[r] : r + tile.delta), staged
//                the same way
//   EPI_DSWIGLU  dA': reloads h (TMA, in 64-column chunks), writes dh = dSwiGLU(s dA'), s*a,
//                and the tile's partial of ds = <dA', a> in ds_part[r, column tile]
// B_e is [N][K] (K-major, TMA box {64, 128}) or, B_MN, [K][N] (N-major, four TMA boxes
// {64 N, 64 K} per k-block, read by wgmma transposed).
//
// Kernel (variant v9 of dev/sm90/gemm1_wgmma.cu, generalised): persistent grid, one CTA per
// SM; warp-specialised: a producer warpgroup (16-byte cp.async of the gathered A rows into the
// 128-byte swizzle, or one TMA box where A is not gathered; TMA of B) and two consumer
// warpgroups (wgmma m64n256k16, fp32 accumulators); a 4-stage full/empty mbarrier pipeline
// (kStages) flowing across work items, so the producer loads the next item while the
// consumers run the epilogue. Launched in clusters of two CTAs that take the tile list in
// pairs and share an expert's B tile by TMA multicast (pair_tile).
// Device code only where the arch has the sm_90a features; elsewhere an empty stub.
#include <algorithm>
#include <type_traits>

#include "cuda/fastdiv31.h"
#include "cuda/sm90.h"
#include "cuda/sm90_epilogue.cuh"
#include "cuda/sm90_host.h"
#include "cuda/sm90_ptx.cuh"
#include "cuda/sm90_wgmma.cuh"

namespace moe {
namespace cuda {
namespace sm90 {
namespace {

// K-block: 64 elements (128-byte rows, 128-byte swizzle), or -DMOE_SM90_ROW_BK=32 (64-byte rows
// and swizzle for the K-major tiles, twice the stages in the same smem: more bytes in flight
// while the consumers hold one or two stages; an A/B candidate, see notes/hopper.md session 6).
#ifndef MOE_SM90_ROW_BK
#define MOE_SM90_ROW_BK 64
#endif
// Where A's rows are not gathered (GEMM2 and dX read the plan-ordered a and dh rows), one
// thread loads them as a TMA box a stage instead of 128 threads' cp.async: no per-row address
// math in the producer, and the consumers skip the generic-to-async proxy fence that cp.async
// writes need before wgmma reads them. A/B on the H100 (30B-A3B, notes/hopper.md session 8):
// T=4096 dX 0.44 vs 0.48 ms, GEMM2 0.240 vs 0.248; at T=16384 the clock drifted by up to 7%
// between rounds, more than any change there.
// -DMOE_SM90_TMA_A=0 keeps cp.async for them.
#ifndef MOE_SM90_TMA_A
#define MOE_SM90_TMA_A 1
#endif
// The gathered A rows' cp.async ask L2 for 256-byte blocks (MOE_SM90_A_L2_256B, default 1):
// a row is read 128 bytes a k-block, so every other k-block's bytes are already in L2 when
// asked for, and the consumers (which wait on loads ~38% of their time in GEMM1) wait less.
// H100, 30B-A3B T=16384, 5 rounds (notes/hopper.md session 17): dA' 0.971 vs 0.997 ms,
// GEMM1 1.452 vs 1.475; T=4096 both ~1% faster. -DMOE_SM90_A_L2_256B=0 drops the hint.
#ifndef MOE_SM90_A_L2_256B
#define MOE_SM90_A_L2_256B 1
#endif
template <int EPI>
constexpr bool kTmaA = MOE_SM90_TMA_A && EPI == EPI_STORE;  // the gathering GEMMs never take it
// The producer's per-tile A row setup when rows are gathered by cp.async: "lean" keeps 32-bit
// row indices (all of a tile's sorted[] loads issued before any arithmetic, / a_div by
// fastdiv31) instead of 64-bit row pointers. Taken by dX (EPI_STORE, B [K][N]) only, whose rows
// come by TMA anyway: there the lean code made ptxas lay out the kernel so that dX ran 2.6-3.0%
// faster (H100, 30B-A3B T=16384, two same-process A/Bs: ab_session17_row_setup_h100.txt,
// ab_session18_lag_setup_bk32_h100.txt; its consumer loop lost a per-k-step YIELD), while the
// same code made GEMM1 3.8-4.5% slower and dA' ~2% (ptxas rescheduled their epilogues), and
// GEMM2 level; at 235B-A22B T=16384 dX -4% (ab_session18_lean_dx_h100.txt).
// -DMOE_SM90_LEAN_ROW_SETUP=0 keeps the pointers everywhere (SASS as session 17), =2 takes the
// lean setup in every row GEMM (session 17's measured build).
#ifndef MOE_SM90_LEAN_ROW_SETUP
#define MOE_SM90_LEAN_ROW_SETUP 1
#endif
template <int EPI, bool B_MN>
constexpr bool kLeanRowSetup =
    MOE_SM90_LEAN_ROW_SETUP == 2 || (MOE_SM90_LEAN_ROW_SETUP == 1 && EPI == EPI_STORE && B_MN);
// -DMOE_SM90_TMA_STORE=1: GEMM2 / dX (EPI_STORE, rows not scattered) send a warpgroup's 64
// output rows by TMA when all are the tile's (store_pass_tma): one thread issues the stores
// and they drain while the next item's mainloop runs, instead of every thread copying 16-byte
// chunks smem -> global. Partial row blocks keep the thread copies. H100, 30B-A3B (session 9
// A/B): GEMM2 0.673 vs 0.767 ms at T=16384, 0.234 vs 0.241 at T=4096; dX 1.5-2% faster.
#ifndef MOE_SM90_TMA_STORE
#define MOE_SM90_TMA_STORE 1
#endif
// -DMOE_SM90_TMA_STORE_H=1: the same for GEMM1's h and a (EPI_SWIGLU), taken at K <= 2048
// only. H100 A/B (session 9): 30B-A3B (K = 2048) GEMM1 1.457 vs 1.532 ms at T=16384, 0.494
// vs 0.507 at T=4096; 235B-A22B (K = 4096) 5.58 vs 5.33 ms, slower (session 10 again: 5.54 vs
// 5.35 with MOE_SM90_TMA_STORE_H_MAX_K=4096). K between: not measured.
// EPI_SWIGLU_A's a alone follows the same rule (not measured apart).
#ifndef MOE_SM90_TMA_STORE_H
#define MOE_SM90_TMA_STORE_H 1
#endif
#ifndef MOE_SM90_TMA_STORE_H_MAX_K
#define MOE_SM90_TMA_STORE_H_MAX_K 2048
#endif
constexpr int64_t kTmaStoreHMaxK = MOE_SM90_TMA_STORE_H_MAX_K;
// dA' sending each h chunk's dg, du out of the chunk buffer by TMA was measured in session 10
// (1.023 vs 1.027 ms at 30B-A3B T=16384, 3.101 vs 3.061 at 235B-A22B: its stores are not
// its bottleneck) and dropped: it keeps the 16-byte thread stores.
template <int EPI>
constexpr bool kTmaStore = (MOE_SM90_TMA_STORE && EPI == EPI_STORE) ||
                           (MOE_SM90_TMA_STORE_H && is_swiglu(EPI));
constexpr int BM = 128, BN = kSm90BN, BK = MOE_SM90_ROW_BK, NC = 2, THREADS = 128 * (NC + 1);
static_assert(BK == 64 || BK == 32, "row GEMM k-block: 64 or 32");
constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
constexpr int ROW = BK * 2;  // bytes of a K-major tile row, and its swizzle span
// Chunk `ch` (16 bytes) of row `r` of a K-major tile, as the TMA's swizzle lays it out.
__host__ __device__ constexpr uint32_t kmajor_off(int r, int ch) {
  return uint32_t(r * ROW + ((ch ^ (BK == 64 ? (r & 7) : ((r >> 1) & 3))) << 4));
}
// dA' without the h ring (below): h arrives in chunks of kHC columns of g and the same of u, 64
// rows (a warpgroup's), two buffers a warpgroup. 32 columns (64-byte swizzle) leave the smem for
// a 4th stage: A/B on the H100 (30B-A3B, in-place dg / du epilogue, two rounds): dA' 1.04 / 1.00
// ms vs 1.12 / 1.08 at T=16384, 0.355 vs 0.364 ms at T=4096. (Before that epilogue 64 had won
// at T=16384.)
#ifndef MOE_SM90_DA_HC
#define MOE_SM90_DA_HC 32
#endif
// MOE_SM90_DA_H_RING (default 1): the producer loads h into the stage ring, after an item's
// k-blocks, as BN / 64 more stages (h-stages: 64 columns of g in the A part, the same of u in the B
// part, all 128 rows), instead of the consumers loading it two 32-column chunks ahead into buffers
// of their own. Why: the epilogue's h loads (from DRAM: h is 384 MiB at 30B-A3B T=16384) then run
// four 48 KB stages ahead like the mainloop's, not one chunk ahead, and the next item's first
// k-blocks load while the epilogue still works (ncu: dA' is the one GEMM whose L2 -> SM bytes run
// at 27 B a cycle an SM, against 36-39 for the others). A/B on the H100 (session 12, three rounds,
// each over GEMM1 in its round): dA' -3.0% at 30B-A3B T=16384 (0.962 vs 1.025 ms), -2.7% at T=4096,
// -2.5% at 235B-A22B T=16384; GPU tests and compute-sanitizer clean. -DMOE_SM90_DA_H_RING=0 keeps
// the chunk buffers.
#ifndef MOE_SM90_DA_H_RING
#define MOE_SM90_DA_H_RING 1
#endif
constexpr bool kHRing = MOE_SM90_DA_H_RING != 0;
constexpr int kHC = kHRing ? 64 : MOE_SM90_DA_HC;
static_assert(kHC == 32 || kHC == 64, "dA' h chunk: 32 or 64 columns");
static_assert(!kHRing || BK == 64, "the h ring puts 128 rows x 64 columns of g in a stage's A");
constexpr uint32_t kHHalf = 64 * kHC * 2;   // bytes of a warpgroup's g (or u) in one chunk
constexpr uint32_t kHChunk = 2 * kHHalf;    // bytes of one chunk buffer (g and u)
// h-stages an item (the h ring), 0 otherwise.
template <int EPI>
constexpr int kHStages = kHRing && EPI == EPI_DSWIGLU ? BN / kHC : 0;
// Stages: the loads are latency-bound (consumers wait on full stages), so as many as fit:
// 192 KB of them beside the 32 KB of staging or of 32-column h chunk buffers (144 KB beside
// 64-column ones): 4 (3) of BK = 64, 8 (6) of BK = 32.
template <int EPI>
constexpr int kStages = (EPI == EPI_DSWIGLU && kHC == 64 && !kHRing ? 3 : 4) * (64 / BK);
template <int EPI>
constexpr uint32_t kEpiBytes =
    EPI == EPI_DSWIGLU ? (kHRing ? 0 : NC * 2 * kHChunk) : NC * kPassBytes;
template <int EPI>
constexpr size_t kSmem = 1024 + size_t(kStages<EPI>) * (A_BYTES + B_BYTES) + kEpiBytes<EPI>;
static_assert(kSmem<EPI_SWIGLU> + 256 <= 227 * 1024 && kSmem<EPI_DSWIGLU> + 256 <= 227 * 1024,
              "dynamic smem + the static barriers fit the sm90 opt-in limit");

struct RowParams {
  const void *a;
  int64_t lda;
  int a_div;
  FastDiv31 a_fd;  // sorted[r] / a_div for kLeanRowSetup kernels (sorted entries < 2^31)
  const int32_t *sorted;
  int32_t n_rows;
  const Tile *tiles;
  const int32_t *num_tiles;
  int N, K;       // output columns (is_swiglu: I, the columns of a), reduction
  int b_rows;     // rows of one expert in the TMA tensor of B ([N][K]: N or 2I; [K][N]: K)
  void *c;
  int64_t ldc;
  bool c_scatter;
  int32_t c_rows;
  void *c2;
  int64_t ldc2;
  const void *hin;
  int64_t ldh;
  float *ds_part;
  int ds_ld;
  const void *sw;
  int sw_dtype;
  int64_t sw_s0, sw_s1;
  int k;
  bool tma_a;    // A's rows not gathered (a_div == 0): loaded by TMA boxes, not cp.async
  bool tma_c;    // C rows not scattered: full 64-row blocks go out by TMA (maps.c, maps.c2)
};
// The kernel's TMA tensors; one an epilogue does not use holds a copy of b.
struct RowMaps {
  CUtensorMap b;   // B, the experts back to back
  CUtensorMap h;   // dA': h, read in chunks (load_h_chunk)
  CUtensorMap a;   // A in plan order (tma_a)
  CUtensorMap c;   // C (tma_c; EPI_SWIGLU_A: none, C is null)
  CUtensorMap c2;  // GEMM1: a = SwiGLU(h) (tma_c)
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <class T> __device__ __forceinline__ float rnd(float v) {
  return DT<T>::to_f(DT<T>::from_f(v));
}
__device__ __forceinline__ int64_t clamp_row(int32_t v, int32_t n) {
  return v < 0 ? 0 : (v >= n ? n - 1 : v);
}
// A cluster of two CTAs takes the list's tiles in pairs (2j, 2j + 1) at one column tile:
// when both are the same expert's, they need the same B tile, so each CTA loads half of it
// and the TMA writes both CTAs' smem (multicast): half the B traffic from L2 (measured on
// the H100: dX and GEMM2 ~5% faster, GEMM1 and dA' unchanged). Otherwise each loads its own
// B. Rank 1 of a last, unpaired tile gets an empty
// tile: it loads and multiplies (keeping the pair's pipelines in step) and stores nothing.
struct PairTile {
  Tile t;
  bool shared;
};
__device__ __forceinline__ PairTile pair_tile(const RowParams &p, int num_tiles, int j, uint32_t rank) {
  const Tile t0 = p.tiles[2 * j];
  const bool has1 = 2 * j + 1 < num_tiles;
  const Tile t1 = has1 ? p.tiles[2 * j + 1] : Tile{t0.expert, t0.row0, t0.row0, 0};
  return PairTile{rank == 0 ? t0 : t1, has1 && t1.expert == t0.expert};
}
// dA': TMA of h chunk q (kHC columns of g and the same of u) of item (t, nt), warpgroup c's
// 64 rows, into buf (g at 0, u at kHChunk / 2); rows past the tensor are zero-filled.
__device__ __forceinline__ void load_h_chunk(const CUtensorMap *map, const RowParams &p, uint32_t buf,
                                             uint32_t bar, const Tile &t, int c, int nt, int q) {
  const int col = nt * BN + q * kHC, row = t.row0 + c * 64;
  mbar_expect_tx(bar, kHChunk);
  tma_load_2d(buf, map, col, row, bar);
  tma_load_2d(buf + kHChunk / 2, map, p.N + col, row, bar);
}
// dA', the h ring: TMA of h-stage q of item (t, nt): g columns nt BN + 64 q.. of the tile's
// 128 rows into the stage's A part, the same u columns into its B part.
__device__ __forceinline__ void load_h_stage(const CUtensorMap *map, const RowParams &p,
                                             uint32_t g, uint32_t u, uint32_t bar, const Tile &t,
                                             int nt, int q) {
  const int col = nt * BN + q * kHC;
  mbar_expect_tx(bar, 2 * NC * kHHalf);
  tma_load_2d(g, map, col, t.row0, bar);
  tma_load_2d(u, map, p.N + col, t.row0, bar);
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <class T, int EPI, bool B_MN>
__global__ void __launch_bounds__(THREADS, 1)
    row_gemm_sm90(const __grid_constant__ RowMaps maps, const RowParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Static shared memory only in the real kernel: the host tells it from the stub by it.
  constexpr int S = kStages<EPI>;
  __shared__ __align__(8) uint64_t s_bars[2 * S];
  __shared__ __align__(8) uint64_t s_hbars[NC * 2];  // EPI_DSWIGLU: an h chunk buffer is full
  extern __shared__ __align__(128) uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sA = sbase, sB = sbase + S * A_BYTES;
  const uint32_t sFull = smem_u32(s_bars), sEmpty = sFull + 8 * S;
  // Epilogue smem: warpgroup c's pass buffer, or (EPI_DSWIGLU) its two h chunk buffers.
  const uint32_t sC = sB + S * B_BYTES;
  auto sHbuf = [&](int c, int b) { return sC + uint32_t(c * 2 + b) * kHChunk; };
  auto hbar = [&](int c, int b) { return smem_u32(s_hbars) + uint32_t(c * 2 + b) * 8; };
  const int tid = threadIdx.x;
  if (tid == 0) {
    prefetch_tensormap(&maps.b);
    if (EPI == EPI_DSWIGLU) prefetch_tensormap(&maps.h);
    if (kTmaA<EPI> && p.tma_a) prefetch_tensormap(&maps.a);
    for (int s = 0; s < S; ++s) {
      mbar_init(sFull + 8 * s, kTmaA<EPI> && p.tma_a ? 1 : 128 + 1);  // + 128 cp.async arrivals
      mbar_init(sEmpty + 8 * s, 2 * NC);  // both CTAs' consumers: a stage is free in both
    }
    for (int b = 0; b < NC * 2; ++b) mbar_init(smem_u32(s_hbars) + 8 * b, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();  // the peer's barriers are initialised before any multicast or remote arrive
  // Under PDL all of the above overlaps the previous kernel; nothing before this line reads
  // or writes global memory (pdl.h).
  pdl_wait();
  pdl_release();
  const int wg = tid / 128, tid_wg = tid % 128;
  const int KB = p.K / BK;
  const int ntn = is_swiglu(EPI) ? p.N / (BN / 2) : p.N / BN;
  const int num_tiles = *p.num_tiles;
  const int total = (num_tiles + 1) / 2 * ntn;  // pair items
  const uint32_t rank = cluster_ctarank(), peer = rank ^ 1;
  const int cl = int(cluster_id_x()), ncl = int(cluster_count_x());

  if (wg == 0) {  // producer
    setmaxnreg_dec<40>();
    constexpr int CPR = BK / 8, RSTEP = 128 / CPR, RPT = BM / RSTEP;  // A: 16-byte chunks
    constexpr int NB = B_MN ? BN / 64 : 2;  // TMA boxes of one B stage
    const T *A = static_cast<const T *>(p.a);
    const uint64_t lda_bytes = uint64_t(p.lda) * sizeof(T);
    constexpr bool LEAN = kLeanRowSetup<EPI, B_MN>;
    const int chunk = tid_wg & (CPR - 1), trow = tid_wg >> (BK == 64 ? 3 : 2);
    // Two loops, one per way of loading A (p.tma_a: thread 0 alone, one box a stage), each
    // within the producer's 40 registers.
    auto produce = [&](auto tma_tag) {
      constexpr bool TMA_A = decltype(tma_tag)::value;
      if (TMA_A && tid_wg != 0) return;
      uint32_t it = 0;
      for (int w = cl; w < total; w += ncl) {
        const PairTile pt = pair_tile(p, num_tiles, w / ntn, rank);
        const Tile t = pt.t;
        const int nt = w % ntn;
        // This thread's A rows: pointers, or (LEAN) row indices.
        const T *src[TMA_A || LEAN ? 1 : RPT];
        uint32_t arow[TMA_A || !LEAN ? 1 : RPT];
        if constexpr (!TMA_A && !LEAN) {
#pragma unroll
          for (int j = 0; j < RPT; ++j) {
            // rows past the end (or of an empty tile): loaded, never stored
            const int r = min(t.row0 + trow + j * RSTEP, max(t.row1 - 1, t.row0));
            const int64_t ar = p.a_div > 0 ? clamp_row(p.sorted[r], p.n_rows) / p.a_div : r;
            src[j] = A + ar * p.lda + chunk * 8;
          }
        } else if constexpr (!TMA_A) {
#pragma unroll
          for (int j = 0; j < RPT; ++j) {
            const int r = min(t.row0 + trow + j * RSTEP, max(t.row1 - 1, t.row0));
            arow[j] = uint32_t(p.a_div > 0 ? __ldg(p.sorted + r) : r);
          }
          if (p.a_div > 0) {
#pragma unroll
            for (int j = 0; j < RPT; ++j) {
              const uint32_t cv = uint32_t(clamp_row(int32_t(arow[j]), p.n_rows));
              arow[j] = __umulhi(cv << 1, p.a_fd.m) >> p.a_fd.l;
            }
          }
        }
        // B rows (K-major) or columns (N-major) of this item in the TMA tensor.
        int b0, b1;
        if (is_swiglu(EPI)) {
          b0 = t.expert * p.b_rows + nt * (BN / 2);
          b1 = b0 + p.N;  // the same columns of the up half
        } else {
          b0 = B_MN ? nt * BN : t.expert * p.b_rows + nt * BN;
          b1 = b0 + BN / 2;
        }
        for (int kb = 0; kb < KB; ++kb, ++it) {
          const uint32_t st = it % S, ph = (it / S) & 1;
          mbar_wait(sEmpty + 8 * st, ph ^ 1);
          const uint32_t a = sA + st * A_BYTES;
          if constexpr (!TMA_A) {
            auto cp_row = [&](int j, const void *src_j) {
              const uint32_t dst = a + kmajor_off(trow + j * RSTEP, chunk);
              if (MOE_SM90_A_L2_256B)
                cp_async16_l2_256(dst, src_j);
              else
                cp_async16_u(dst, src_j);
            };
            if constexpr (LEAN) {
              const char *A_k = reinterpret_cast<const char *>(A + kb * BK + chunk * 8);
#pragma unroll
              for (int j = 0; j < RPT; ++j) cp_row(j, A_k + uint64_t(arow[j]) * lda_bytes);
            } else {
#pragma unroll
              for (int j = 0; j < RPT; ++j) cp_row(j, src[j] + kb * BK);
            }
            cp_async_mbar_arrive(sFull + 8 * st);
          }
          if (tid_wg == 0) {
            const uint32_t bar = sFull + 8 * st, b = sB + st * B_BYTES;
            // B: the whole tile (both halves when shared). TMA A: rows past the tensor come
            // as zeros, those of the next tile are loaded and never stored.
            mbar_expect_tx(bar, B_BYTES + (TMA_A ? A_BYTES : 0));
            if (TMA_A) tma_load_2d(a, &maps.a, kb * BK, t.row0, bar);
            // Box q of B: shared, this CTA loads its half of the boxes, written to both CTAs.
            auto load_b = [&](int q, uint32_t dst, int c0, int c1) {
              if (!pt.shared)
                tma_load_2d(dst, &maps.b, c0, c1, bar);
              else if ((q * 2) / NB == int(rank))
                tma_load_2d_mc(dst, &maps.b, c0, c1, bar, 0x3);
            };
            if (B_MN) {
              const int krow = t.expert * p.b_rows + kb * BK;
#pragma unroll
              for (int q = 0; q < NB; ++q) load_b(q, b + q * (BK * 128), b0 + q * 64, krow);
            } else {
              load_b(0, b, kb * BK, b0);
              load_b(1, b + B_BYTES / 2, kb * BK, b1);
            }
          }
        }
        // The h ring: the item's h-stages behind its k-blocks. The full barrier counts 128
        // thread arrivals as for cp.async, and thread 0's expect_tx.
        for (int q = 0; q < kHStages<EPI>; ++q, ++it) {
          const uint32_t st = it % S, ph = (it / S) & 1;
          mbar_wait(sEmpty + 8 * st, ph ^ 1);
          if (tid_wg == 0)
            load_h_stage(&maps.h, p, sA + st * A_BYTES, sB + st * B_BYTES, sFull + 8 * st, t,
                         nt, q);
          mbar_arrive(sFull + 8 * st);
        }
      }
    };
    if (kTmaA<EPI> && p.tma_a)
      produce(std::true_type{});
    else
      produce(std::false_type{});
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  } else {  // consumers
    setmaxnreg_inc<232>();
    const int c = wg - 1;
    const int warp = tid_wg >> 5, lane = tid_wg & 31;
    uint32_t it = 0;
    float acc[BN / 2];
    auto release = [&](uint32_t st) {  // stage st is free here and, for the peer's loads, there
      mbar_arrive(sEmpty + 8 * st);
      mbar_arrive_cluster(sEmpty + 8 * st, peer);
    };
    for (int w = cl; w < total; w += ncl) {
      const Tile t = pair_tile(p, num_tiles, w / ntn, rank).t;
      const int nt = w % ntn;
      const int rfrag = c * 64 + warp * 16 + (lane >> 2);
      // EPI_DSWIGLU: this thread's two rows' sorted[] entries now, their routing weights (and
      // the first h chunks) 128 k-elements before the end: the epilogue then waits on neither
      // dependent load.
      int32_t pr[2] = {0, 0};
      float sw[2] = {0.f, 0.f};
      if (EPI == EPI_DSWIGLU) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int r = t.row0 + rfrag + hh * 8;
          pr[hh] = r < t.row1 ? p.sorted[r] : 0;
        }
      }
      uint32_t prev = 0;
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        constexpr int kLead = 128 / BK;  // k-blocks
        if (EPI == EPI_DSWIGLU && kb == (KB > kLead ? KB - kLead : 0)) {
          // h chunks 0 and 1 of this warpgroup's rows into its two buffers (free: the previous
          // item's epilogue ended with a proxy fence and a warpgroup barrier, and its TMA
          // stores have read them).
          if (!kHRing && tid_wg == 0) {
            if (kTmaStore<EPI>) bulk_wait_read0();
            load_h_chunk(&maps.h, p, sHbuf(c, 0), hbar(c, 0), t, c, nt, 0);
            load_h_chunk(&maps.h, p, sHbuf(c, 1), hbar(c, 1), t, c, nt, 1);
          }
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int64_t v = clamp_row(pr[hh], p.n_rows);
            sw[hh] = load_weight(p.sw, p.sw_dtype, (v / p.k) * p.sw_s0 + (v % p.k) * p.sw_s1);
          }
        }
        mbar_wait(sFull + 8 * st, ph);
        // cp.async (generic proxy) writes -> wgmma (async proxy) reads; TMA writes need none
        if (!(kTmaA<EPI> && p.tma_a)) fence_proxy_async();
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BK / 16; ++k) {
          const uint64_t db = B_MN ? make_desc_mn(sB + st * B_BYTES + k * 2048, BK * 128)
                                   : make_desc<ROW>(sB + st * B_BYTES + k * 32);
          const uint64_t da = make_desc<ROW>(sA + st * A_BYTES + c * 64 * ROW + k * 32);
          Wgmma<T>::template m64n256<0, B_MN ? 1 : 0>(acc, da, db, (kb > 0 || k > 0) ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (kb > 0 && tid_wg == 0) release(prev);
        prev = st;
      }
      wgmma_wait<0>();
      if (tid_wg == 0) release(prev);  // KB >= 1: the host takes K > 0 only
      // Fragment of a thread: rows rfrag + 8 hh, columns 8 j + 2 (lane & 3) + {0, 1}, held in
      // acc[4 j + 2 hh + {0, 1}].

      if (is_swiglu(EPI) || EPI == EPI_STORE) {
        // Fragment -> swizzled smem -> 16-byte row stores, 128 columns a pass: SwiGLU g, u,
        // then a = silu(g) * u from the rounded g, u (as the portable epilogue); store: the
        // two column halves. Rows at or past row1 (another tile's) are not stored.
        const uint32_t buf = sC + uint32_t(c) * kPassBytes;
        const int rbase = t.row0 + c * 64;
        T *C = static_cast<T *>(p.c);
        if (is_swiglu(EPI)) {
          constexpr int HJ = BN / 16;
          const int col = nt * (BN / 2);
          auto hrow = [&](int lr, int) -> T * {
            const int r = rbase + lr;
            return r < t.row1 ? C + int64_t(r) * p.ldc + col : nullptr;
          };
          T *aout = static_cast<T *>(p.c2);
          // A pass to dst (thread stores) or, for a full 64-row block with tma_c, to the
          // map's columns c0.. by TMA.
          const bool tma = kTmaStore<EPI> && p.tma_c && rbase + 64 <= t.row1;
          if (kTmaStore<EPI> && !tma && tid_wg == 0) bulk_wait_read0();  // see store_pass_tma
          auto pass = [&](auto v, auto dst, const CUtensorMap *map, int c0) {
            constexpr bool kStm = MOE_SM90_STMATRIX_GEMM1 != 0;  // see sm90_epilogue.cuh
            if (tma)
              store_pass_tma<T, kStm>(buf, 1 + c, tid_wg, v, [&](uint32_t src, int dc) {
                tma_store_2d(map, src, c0 + dc, rbase);
              });
            else
              store_pass<T, kStm>(buf, 1 + c, tid_wg, v, dst);
          };
          // h rounded in place first (its stores are then exact): the unrounded values kept
          // beside the rounded ones for a spilled. a goes into g's registers once g is stored.
          // EPI_SWIGLU_A stores no g, u: only the a pass (a from the same rounded g, u).
#pragma unroll
          for (int i = 0; i < BN / 2; ++i) acc[i] = rnd<T>(acc[i]);
          auto g_of = [&](int j, int hh, int i) { return acc[j * 4 + hh * 2 + i]; };
          if constexpr (EPI == EPI_SWIGLU) pass(g_of, hrow, &maps.c, col);
#pragma unroll
          for (int i = 0; i < BN / 4; ++i) acc[i] = silu_f(acc[i]) * acc[i + BN / 4];
          if constexpr (EPI == EPI_SWIGLU)
            pass([&](int j, int hh, int i) { return acc[(j + HJ) * 4 + hh * 2 + i]; },
                 [&](int lr, int m) -> T * {
                   T *d = hrow(lr, m);
                   return d ? d + p.N : nullptr;
                 },
                 &maps.c, p.N + col);
          pass(g_of,  // a, now in g's registers
               [&](int lr, int) -> T * {
                 const int r = rbase + lr;
                 return r < t.row1 ? aout + int64_t(r) * p.ldc2 + col : nullptr;
               },
               &maps.c2, col);
        } else if (kTmaStore<EPI> && p.tma_c && rbase + 64 <= t.row1) {
          // C row = r + delta for all 64: TMA boxes at (columns, rbase + delta)
#pragma unroll
          for (int half = 0; half < 2; ++half)
            store_pass_tma<T>(
                buf, 1 + c, tid_wg,
                [&](int j, int hh, int i) { return acc[(half * 16 + j) * 4 + hh * 2 + i]; },
                [&](uint32_t src, int dc) {
                  tma_store_2d(&maps.c, src, nt * BN + half * 128 + dc, rbase + t.delta);
                });
        } else {
          // the buffer's last TMA stores have read it (see store_pass_tma)
          if (kTmaStore<EPI> && tid_wg == 0) bulk_wait_read0();
          // this thread's eight store rows' destinations, looked up once
          int64_t orow[8];
#pragma unroll
          for (int m = 0; m < 8; ++m) {
            const int r = rbase + (tid_wg >> 4) + 8 * m;
            orow[m] = r >= t.row1 ? -1
                                  : clamp_row(p.c_scatter ? p.sorted[r] : r + t.delta, p.c_rows);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half)
            store_pass<T>(
                buf, 1 + c, tid_wg,
                [&](int j, int hh, int i) { return acc[(half * 16 + j) * 4 + hh * 2 + i]; },
                [&](int, int m) -> T * {
                  const int64_t o = orow[m];
                  return o < 0 ? nullptr : C + o * p.ldc + nt * BN + half * 128;
                });
        }
      }
      if (EPI == EPI_DSWIGLU) {
        // acc = dA' for columns n of a; with g, u from h (as the portable epilogue):
        // dg = s dA' u silu'(g), du = s dA' silu(g), s*a, ds partial = sum_n dA' silu(g) u.
        // h comes by TMA in chunks of kHC columns (g and u, this warpgroup's 64 rows, swizzled
        // by 2 kHC bytes), two buffers deep: chunk q + 2 loads while q + 1 is used. dg and du
        // overwrite g and u in the chunk buffer (each thread the bytes it read), which then
        // goes out in 16-byte row stores; s*a is stored from registers (when wanted: SA null
        // skips it). dH may be h itself (the backward's in-place mode): a chunk's dh is stored
        // only after its TMA read of h has completed, and no other tile reads those bytes.
        T *dH = static_cast<T *>(p.c);
        T *SA = static_cast<T *>(p.c2);
        const int n0 = nt * BN + (lane & 3) * 2;
        float dot[2] = {0.f, 0.f};
#pragma unroll
        for (int q = 0; q < BN / kHC; ++q) {
          // this warpgroup's g of the chunk at hb, its u hu_off bytes on
          uint32_t hb, hu_off = kHHalf, hst = 0;
          if constexpr (kHRing) {
            hst = it % S;
            mbar_wait(sFull + 8 * hst, (it / S) & 1);
            hb = sA + hst * A_BYTES + c * kHHalf;
            hu_off = sB + hst * B_BYTES - sA - hst * A_BYTES;
          } else {
            mbar_wait(hbar(c, q & 1), (q >> 1) & 1);
            hb = sHbuf(c, q & 1);
          }
          // This thread's g, u of the chunk, all loaded before any dg, du store: each store
          // (a memory clobber) kept the next load behind it, and so behind the previous load
          // and its math: one smem latency a column pair, the epilogue's main stall (ncu);
          // A/B on the H100 at 30B T=16384: dA' 0.99 vs 1.07 ms.
          // In 32-column sub-chunks (sc), so that a 64-column chunk's g, u do not all sit in
          // registers at once.
          constexpr int JJ = 4, NSC = kHC / 32;  // 16-byte chunks a sub-chunk; sub-chunks
#pragma unroll
          for (int sc = 0; sc < NSC; ++sc) {
            auto hoff = [&](int hh, int jj) {
              const int lr = warp * 16 + (lane >> 2) + hh * 8;  // row in the chunk buffer
              // the TMA's swizzle: 16-byte chunk jj of row lr XOR (row bits of the atom)
              const int sw = kHC == 64 ? (lr & 7) : ((lr >> 1) & 3);
              return uint32_t(lr * (kHC * 2) + ((jj ^ sw) << 4) + (lane & 3) * 4);
            };
            // stmatrix (MOE_SM90_STMATRIX): the chunk's g, u come by ldmatrix and dg, du go
            // back by stmatrix, four 8 x 8 tiles an instruction; tile q of one is (fragment row
            // half q & 1, 16-byte chunk jp + q / 2), this lane giving the address of its row
            // lane % 8. Rows past the tile get zeros (stored nowhere).
            constexpr bool kStm = MOE_SM90_STMATRIX && JJ % 2 == 0;
            uint32_t stm_addr[JJ / 2 > 0 ? JJ / 2 : 1];
            if constexpr (kStm) {
              const int mq = lane >> 3, lr = warp * 16 + (mq & 1) * 8 + (lane & 7);
              const int swz = kHC == 64 ? (lr & 7) : ((lr >> 1) & 3);
#pragma unroll
              for (int jp = 0; jp < JJ; jp += 2)
                stm_addr[jp / 2] = hb + lr * (kHC * 2) + (((sc * JJ + jp + (mq >> 1)) ^ swz) << 4);
            }
            uint32_t gv[2][JJ], uv[2][JJ];
            if constexpr (kStm) {
#pragma unroll
              for (int jp = 0; jp < JJ; jp += 2) {
                ldmatrix_x4(stm_addr[jp / 2], gv[0][jp], gv[1][jp], gv[0][jp + 1], gv[1][jp + 1]);
                ldmatrix_x4(stm_addr[jp / 2] + hu_off, uv[0][jp], uv[1][jp], uv[0][jp + 1],
                            uv[1][jp + 1]);
              }
            } else {
#pragma unroll
              for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int jj = 0; jj < JJ; ++jj) {
                  gv[hh][jj] = lds32(hb + hoff(hh, sc * JJ + jj));
                  uv[hh][jj] = lds32(hb + hu_off + hoff(hh, sc * JJ + jj));
                }
            }
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              const int r = t.row0 + rfrag + hh * 8;
              if (r < t.row1) {
                const float s = sw[hh];
                T *sar = SA + int64_t(r) * p.ldc2 + n0;
#pragma unroll
                for (int jj = 0; jj < JJ; ++jj) {
                  const int j = (q * NSC + sc) * JJ + jj;
                  const uint32_t off = hoff(hh, sc * JJ + jj);
                  float g[2], u[2], dg[2], du[2], sa[2];
                  unpack2<T>(gv[hh][jj], g[0], g[1]);
                  unpack2<T>(uv[hh][jj], u[0], u[1]);
#pragma unroll
                  for (int i = 0; i < 2; ++i) {
                    float d = acc[j * 4 + hh * 2 + i];
                    const float sg = sigmoid_f(g[i]);
                    const float sil = g[i] * sg;
                    const float dsil = sg + sil * (1.f - sg);
                    dot[hh] += d * sil * u[i];
                    d *= s;
                    dg[i] = d * u[i] * dsil;
                    du[i] = d * sil;
                    sa[i] = s * sil * u[i];
                  }
                  if constexpr (kStm) {  // dg, du in g's, u's registers, stored below
                    gv[hh][jj] = pack2<T>(dg[0], dg[1]);
                    uv[hh][jj] = pack2<T>(du[0], du[1]);
                  } else {
                    sts32(hb + off, pack2<T>(dg[0], dg[1]));
                    sts32(hb + hu_off + off, pack2<T>(du[0], du[1]));
                  }
                  if (SA) *reinterpret_cast<uint32_t *>(sar + j * 8) = pack2<T>(sa[0], sa[1]);
                }
              } else if constexpr (kStm) {
#pragma unroll
                for (int jj = 0; jj < JJ; ++jj) gv[hh][jj] = uv[hh][jj] = 0;
              }
            }
            if constexpr (kStm) {
#pragma unroll
              for (int jp = 0; jp < JJ; jp += 2) {
                stmatrix_x4(stm_addr[jp / 2], gv[0][jp], gv[1][jp], gv[0][jp + 1], gv[1][jp + 1]);
                stmatrix_x4(stm_addr[jp / 2] + hu_off, uv[0][jp], uv[1][jp], uv[0][jp + 1],
                            uv[1][jp + 1]);
              }
            }
          }  // sub-chunk
          named_bar(1 + c, 128);  // the warpgroup's dg, du are in the buffer
          {
            // kCPR 16-byte chunks a row of each half; the warpgroup's 128 threads take rows
            // rb + kStep i of both halves, chunk ch (all rows of one i share a swizzle phase).
            constexpr int kCPR = kHC / 8, kStep = 128 / kCPR;
            const int ch = tid_wg % kCPR, rb = tid_wg / kCPR;
#pragma unroll
            for (int half = 0; half < 2; ++half)
#pragma unroll
              for (int i = 0; i < 64 / kStep; ++i) {
                const int lr = rb + kStep * i, r = t.row0 + c * 64 + lr;
                if (r < t.row1) {
                  const int sw = kHC == 64 ? (lr & 7) : ((lr >> 1) & 3);
                  const uint32_t src =
                      hb + half * hu_off + lr * (kHC * 2) + ((ch ^ sw) << 4);
                  T *dst = dH + int64_t(r) * p.ldc + half * p.N + nt * BN + q * kHC + ch * 8;
                  *reinterpret_cast<uint4 *>(dst) = lds128(src);
                }
              }
          }
          // All reads of this buffer come before the TMA (async proxy) overwrites it, with
          // chunk q + 2 here or with chunk 0 / 1 at the next item (the h ring: with whatever
          // the producer loads into the stage once it is released).
          fence_proxy_async();
          named_bar(1 + c, 128);
          if constexpr (kHRing) {
            if (tid_wg == 0) release(hst);  // the h-stage, for the next loads
            ++it;
          } else if (q + 2 < BN / kHC && tid_wg == 0) {
            load_h_chunk(&maps.h, p, hb, hbar(c, q & 1), t, c, nt, q + 2);
          }
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int r = t.row0 + rfrag + hh * 8;
          float v = dot[hh];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          if ((lane & 3) == 0 && r < t.row1) p.ds_part[int64_t(r) * p.ds_ld + nt] = v;
        }
      }
    }
    if (kTmaStore<EPI> && tid_wg == 0) bulk_wait0();  // smem stays until the stores are done
  }
  cluster_sync();  // no CTA leaves while its peer may still arrive on its barriers
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <class T, int EPI, bool B_MN> KernelGate &gate() {
  static KernelGate g;
  return g;
}

template <class T, int EPI, bool B_MN>
bool launch(const RowMaps &maps, const RowParams &p, int64_t max_items, Launch stream,
            moe_status_t *status) {
  auto kern = row_gemm_sm90<T, EPI, B_MN>;
  constexpr size_t smem = kSmem<EPI>;
  int sms = 0;
  if (!kernel_usable(reinterpret_cast<const void *>(kern), smem, gate<T, EPI, B_MN>(), &sms))
    return false;
  // Clusters of two (pair_tile): an even, persistent grid of the CTAs that fit at once.
  const int fit = cluster_grid(reinterpret_cast<const void *>(kern), smem, THREADS, 2,
                               gate<T, EPI, B_MN>(), sms);
  const int64_t want = (std::max<int64_t>(1, max_items) + 1) / 2 * 2;
  launch_kernel(kern, dim3(unsigned(std::min<int64_t>(fit, want))), dim3(THREADS), smem,
                stream.stream, stream.pdl, 2, maps, p);
  *status = launch_status("sm90 row GEMM");
  return true;
}

template <class T>
bool dispatch(const GroupedGemmArgs &g, const RowMaps &maps, const RowParams &p,
              int64_t max_items, Launch st, moe_status_t *status) {
  switch (g.epilogue) {
    case EPI_SWIGLU:
      return !g.b_kn && launch<T, EPI_SWIGLU, false>(maps, p, max_items, st, status);
    case EPI_SWIGLU_A:
      return !g.b_kn && launch<T, EPI_SWIGLU_A, false>(maps, p, max_items, st, status);
    case EPI_DSWIGLU:
      return g.b_kn && launch<T, EPI_DSWIGLU, true>(maps, p, max_items, st, status);
    case EPI_STORE:
      return g.b_kn ? launch<T, EPI_STORE, true>(maps, p, max_items, st, status)
                    : launch<T, EPI_STORE, false>(maps, p, max_items, st, status);
    default:
      return false;
  }
}

}  // namespace
}  // namespace sm90

bool sm90_grouped_gemm(const GroupedGemmArgs &g, int64_t num_experts, uint64_t flags,
                       Launch stream, moe_status_t *status) {
  using namespace sm90;
  *status = MOE_OK;
  if (!sm90_enabled(flags)) return false;
  if (g.dtype != MOE_DTYPE_BF16 && g.dtype != MOE_DTYPE_F16) return false;
  const bool swiglu = is_swiglu(g.epilogue);
  const bool has_c = g.epilogue != EPI_SWIGLU_A;  // EPI_SWIGLU_A: C (h) null, a in C2 only
  const int64_t N = g.N, K = g.K, E = num_experts;
  if (N <= 0 || K <= 0 || E <= 0 || K % BK != 0) return false;
  if (swiglu ? N % (BN / 2) != 0 : N % BN != 0) return false;
  if (g.n_rows <= 0 || g.n_rows >= (int64_t(1) << 31) || g.a_div < 0) return false;
  // A rows and every written row 16-byte aligned (cp.async, bulk copies, 4-byte pair stores).
  if (!aligned16(g.A) || g.lda % 8 != 0) return false;
  const int64_t c_cols = swiglu ? 2 * N : N;
  if (has_c && (!aligned16(g.C) || g.ldc % 8 != 0 || g.ldc < c_cols)) return false;
  if (g.epilogue != EPI_STORE && (!aligned16(g.C2) || g.ldc2 % 8 != 0 || g.ldc2 < N) &&
      (g.C2 || swiglu))  // dA' without s*a: C2 null, ldc2 unused
    return false;
  if (g.c_rows >= (int64_t(1) << 31)) return false;
  if (g.epilogue == EPI_DSWIGLU && (!aligned16(g.Hin) || g.ldh % 8 != 0 || g.ldh < 2 * N))
    return false;
  if (g.epilogue == EPI_DSWIGLU && g.ds_ld < N / BN) return false;
  // B: the experts back to back as one 2-D tensor, [E * rows][cols] with row pitch ldb.
  const int64_t b_rows = g.b_kn ? K : (swiglu ? 2 * N : N), b_cols = g.b_kn ? N : K;
  if (!aligned16(g.B) || g.ldb % 8 != 0 || g.ldb < b_cols || g.strideBE != b_rows * g.ldb)
    return false;
  if (E * b_rows >= (int64_t(1) << 31)) return false;
  const bool bf16 = g.dtype == MOE_DTYPE_BF16;
  RowMaps maps;
  CUtensorMap &map = maps.b;
  const bool ok = g.b_kn ? encode_2d(&map, bf16, g.B, uint64_t(N), uint64_t(E * b_rows),
                                     uint64_t(g.ldb) * 2, 64, BK)
                         : encode_2d(&map, bf16, g.B, uint64_t(K), uint64_t(E * b_rows),
                                     uint64_t(g.ldb) * 2, BK, BN / 2, ROW);
  if (!ok) return false;
  // dA': h by TMA in boxes of kHC columns x 64 rows (see load_h_chunk), or x 128 rows (the h
  // ring: load_h_stage); the other epilogues
  // take an unused copy of B's map.
  maps.h = map;
  if (g.epilogue == EPI_DSWIGLU &&
      !encode_2d(&maps.h, bf16, g.Hin, uint64_t(2 * N), uint64_t(g.n_rows), uint64_t(g.ldh) * 2,
                 kHC, kHRing ? BM : 64, kHC * 2))
    return false;

  // A's rows in plan order (a_div == 0): a TMA tensor of n_rows rows, boxes {BK, BM}.
  maps.a = map;
  const bool tma_a = MOE_SM90_TMA_A && g.epilogue == EPI_STORE && g.a_div == 0 &&
                     encode_2d(&maps.a, bf16, g.A, uint64_t(K), uint64_t(g.n_rows),
                               uint64_t(g.lda) * 2, BK, BM, ROW);

  // C's rows in plan (or window) order, TMA tensors of c_rows rows: C, {64, 64} boxes; GEMM1
  // C = h (2I columns) and C2 = a (I columns); dA' C = dh, boxes of the h chunks'.
  const int64_t c_rows = g.c_rows > 0 ? g.c_rows : g.n_rows;
  maps.c = map;
  maps.c2 = map;
  bool tma_c = false;
  if (!g.c_scatter) {
    const uint64_t rows = uint64_t(c_rows), pitch = uint64_t(g.ldc) * 2;
    if (MOE_SM90_TMA_STORE && g.epilogue == EPI_STORE)
      tma_c = encode_2d(&maps.c, bf16, g.C, uint64_t(N), rows, pitch, 64, 64);
    else if (MOE_SM90_TMA_STORE_H && swiglu && K <= kTmaStoreHMaxK)  // EPI_SWIGLU_A: a alone
      tma_c = (!has_c || encode_2d(&maps.c, bf16, g.C, uint64_t(2 * N), rows, pitch, 64, 64)) &&
              encode_2d(&maps.c2, bf16, g.C2, uint64_t(N), rows, uint64_t(g.ldc2) * 2, 64, 64);
  }

  RowParams p{};
  p.a = g.A;
  p.lda = g.lda;
  p.a_div = g.a_div;
  p.a_fd = fastdiv31(uint32_t(g.a_div > 0 ? g.a_div : 1));
  p.sorted = g.sorted;
  p.n_rows = int32_t(g.n_rows);
  p.tiles = g.tiles;
  p.num_tiles = g.num_tiles;
  p.N = int(N);
  p.K = int(K);
  p.b_rows = int(b_rows);
  p.c = g.C;
  p.ldc = g.ldc;
  p.c_scatter = g.c_scatter;
  p.c_rows = int32_t(c_rows);
  p.c2 = g.C2;
  p.ldc2 = g.ldc2;
  p.hin = g.Hin;
  p.ldh = g.ldh;
  p.ds_part = g.ds_part;
  p.ds_ld = g.ds_ld;
  p.sw = g.sw;
  p.sw_dtype = g.sw_dtype;
  p.sw_s0 = g.sw_s0;
  p.sw_s1 = g.sw_s1;
  p.k = g.k > 0 ? g.k : 1;
  p.tma_a = tma_a;
  p.tma_c = tma_c;
  const int64_t max_items = g.max_tiles * sm90_col_tiles(g.epilogue, int(N));
  return bf16 ? dispatch<__nv_bfloat16>(g, maps, p, max_items, stream, status)
              : dispatch<__half>(g, maps, p, max_items, stream, status);
}

}  // namespace cuda
}  // namespace moe
