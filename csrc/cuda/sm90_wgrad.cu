// sm90a weight-gradient GEMMs (K-grouped): per expert e,
//   C[e][m][n] = sum over the plan rows r in [off[e], off[e+1]) of A[arow(r)][m] * B[brow(r)][n],
// arow(r) = a_div ? sorted[r] / a_div : r (same for B): dW1 = dh^T x, dW2 = dout^T (s a).
// (Linear dW, whose operands are both gathered, stays portable: Q must be in plan order.)
// Experts without rows get zeros. Deterministic: one CTA owns each output tile and
// walks the expert's rows in order.
//
// The kernel computes D[m][n] = sum_r P[prow(r)][m] Q[r][n] over 128 x 256 tiles, P the
// operand that may be gathered (128 columns a tile, 16-byte cp.async by the producer
// warpgroup, zero-filled past the expert's last row), Q a plan-order operand (256 columns a
// tile, TMA: the bulk of the bytes travels without occupying the load/store unit). Both have
// the reduction (rows) outer, so they reach wgmma M- / N-major (transposed), stored as
// 128-byte-swizzled atoms of 64 columns x 8 rows. dW2: P = dout, Q = s*a, D = C. dW1: P = x,
// Q = dh, D = C^T (written transposed through the pass buffer). Q rows past the segment
// (the next expert's) meet P's zero rows, so they add exact zeros (finite data).
// Two consumer warpgroups run wgmma m64n256k16; the tile goes out through a swizzled smem
// pass buffer in 16-byte row stores or TMA stores (sm90_epilogue.cuh) while the next tile's
// loads are in flight; with TMA stores the second of a tile's two passes waits in registers
// until the next tile's mainloop is under way. Persistent grid over
// (expert, m-tile, n-tile), n fastest so that concurrent CTAs share the expert's rows in L2;
// by default in clusters of two taking an expert's m-tiles in pairs, which share the Q stages
// by TMA multicast (MOE_SM90_WGRAD_MCAST).
#include <algorithm>
#include <cstdlib>
#include <cstring>

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

constexpr int BM = 128, BN = 256, NC = 2, THREADS = 128 * (NC + 1);
// D^T pass (dW1): 128 rows n x this warpgroup's 64 columns m, 128-byte rows, kPassBytes.
constexpr uint32_t kTRow = 64 * 2;
static_assert(128 * kTRow == kPassBytes, "a transposed pass fills one pass buffer");
// Pipeline shapes, same smem: BK = 64 rows a k-block x 4 stages (default) or 32 x 8 (env
// MOE_FUSED_WGRAD_BK=32), beside the two 16 KB pass buffers. A consumer holds a stage until
// its next k-block's wgmma is issued, so smaller stages keep more of the smem in flight;
// larger ones halve the barrier rounds.
template <int BK_> struct Cfg {
  static constexpr int BK = BK_, S = BK_ == 32 ? 8 : 4;
  static constexpr int ATOM = BK * 128;  // bytes of one 64-column atom of a k-block
  static constexpr int P_BYTES = BM * BK * 2, Q_BYTES = BN * BK * 2;
  static constexpr int RPT = BK / 32;  // P rows a producer thread loads: trow + 32 i
  static constexpr size_t kSmem = 1024 + size_t(S) * (P_BYTES + Q_BYTES) + NC * kPassBytes;
  static_assert(kSmem + 256 <= 227 * 1024, "dynamic smem + static barriers fit the opt-in limit");
};
// -DMOE_SM90_WGRAD_TMA_STORE=1: each epilogue pass leaves by TMA bulk tensor stores
// (tma_pass), issued by one thread and drained while the next tile's mainloop runs, instead of
// every thread copying 16-byte chunks smem -> global. K is short here (T k / E rows an
// expert), so the output is a large share of the bytes (dW1 is 3.2 GB at 235B-A22B). H100
// A/B (session 9), dW2 / dW1 ms: 30B-A3B T=4096 0.241 / 0.490 vs 0.278 / 0.509, T=16384
// 0.782 / 1.563 vs 0.808 / 1.544; 235B-A22B T=16384 2.92 / 6.06 vs 3.17 / 6.17.
#ifndef MOE_SM90_WGRAD_TMA_STORE
#define MOE_SM90_WGRAD_TMA_STORE 1
#endif
// The k-block of the next item during which an item's deferred second epilogue pass is
// written (see the consumers). Build knob for A/Bs.
#ifndef MOE_SM90_WGRAD_FLUSH_KB
#define MOE_SM90_WGRAD_FLUSH_KB 2
#endif
[[maybe_unused]] constexpr int DIST = 4;       // k-blocks between an index load and its use
// MOE_SM90_WGRAD_MCAST (default 1): clusters of two CTAs, each item an expert's pair of
// m-tiles (2 mi, 2 mi + 1) at one n-tile: both need the same Q stages (the expert's rows, the
// same 256 columns), so each CTA loads half of every Q stage and the TMA writes it to both
// CTAs (multicast); P (the m-tile's columns) stays each CTA's own. Taken where the m-tiles
// pair up (Mp / BM even). H100 A/B (session 12, three rounds, over GEMM1 in each round):
// 30B-A3B T=16384 dW1 -4.9%, dW2 -1.2%; 235B-A22B T=16384 dW1 -2.9%, dW2 -2.6%; sm90 tests
// and compute-sanitizer clean. (On session 11's older producer it had been level at 30B.)
#ifndef MOE_SM90_WGRAD_MCAST
#define MOE_SM90_WGRAD_MCAST 1
#endif

struct WgParams {
  const void *p;  // P: [.., ldp], row of plan row r = p_div ? sorted[r] / p_div : r
  uint32_t ldp;   // < 2^31: 32-bit row offsets
  int p_div;
  FastDiv31 p_fd;  // sorted[r] / p_div (fastdiv31.h)
  int32_t n_rows;
  int Mp, Nq, E;  // columns of P and Q (D is Mp x Nq)
  const int32_t *offsets;
  const int32_t *sorted;
  void *c;  // C: D (or D^T) of expert e at c + e * strideCE, row pitch ldc
  int64_t ldc, strideCE;
  bool tma_c;  // C leaves by TMA (tmapC: [E][rows][columns] of C, MOE_SM90_WGRAD_TMA_STORE)
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
[[maybe_unused]] __device__ __forceinline__ uint16_t bits16(float v, __nv_bfloat16 *) {
  const __nv_bfloat16 h = __float2bfloat16(v);
  return reinterpret_cast<const uint16_t &>(h);
}
[[maybe_unused]] __device__ __forceinline__ uint16_t bits16(float v, __half *) {
  const __half h = __float2half(v);
  return reinterpret_cast<const uint16_t &>(h);
}
// v = *ptr when pred, else v = fallback, as one predicated load that nothing consumes: a
// select on the loaded value would make the thread wait for the load right here.
__device__ __forceinline__ int32_t ld_if(bool pred, const int32_t *ptr, int32_t fallback) {
  int32_t v = fallback;
  asm volatile(
      "{\n.reg .pred q;\n"
      "setp.ne.b32 q, %1, 0;\n"
      "@q ld.global.nc.b32 %0, [%2];\n}\n"
      : "+r"(v)
      : "r"(int(pred)), "l"(ptr));
  return v;
}
// The expert's plan-row segment [r0, r1) from raw offsets a, b: clamped to [0, n], monotone.
__device__ __forceinline__ void clamp_segment(const WgParams &p, int a, int b, int &r0, int &r1) {
  a = a < 0 ? 0 : (a > p.n_rows ? p.n_rows : a);
  b = b < a ? a : (b > p.n_rows ? p.n_rows : b);
  r0 = a;
  r1 = b;
}
// Where a CTA's items come from: its own stream (items blockIdx.x + i gridDim.x), or (MC) its
// cluster's (cluster_id_x + i cluster_count_x), the pair's CTAs taking m-tiles 2 mi + rank.
template <bool MC> struct Stream {
  int first, step;
  uint32_t rank;
  __device__ __forceinline__ Stream() {
    if constexpr (MC) {
      first = int(cluster_id_x()), step = int(cluster_count_x()), rank = cluster_ctarank();
    } else {
      first = int(blockIdx.x), step = int(gridDim.x), rank = 0;
    }
  }
  __device__ __forceinline__ int m_tile(int mi) const { return MC ? 2 * mi + int(rank) : mi; }
};
#endif

template <class T, bool GP, bool TR, int BKT, bool MC>
__global__ void __launch_bounds__(THREADS, 1)
    wgrad_sm90(const __grid_constant__ CUtensorMap tmapQ, const __grid_constant__ CUtensorMap tmapC,
               const WgParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<BKT>;
  constexpr int BK = C::BK, S = C::S, ATOM = C::ATOM, P_BYTES = C::P_BYTES, Q_BYTES = C::Q_BYTES,
                RPT = C::RPT;
  __shared__ __align__(8) uint64_t s_bars[2 * S];
  extern __shared__ __align__(128) uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sP = sbase, sQ = sbase + S * P_BYTES;
  const uint32_t sFull = smem_u32(s_bars), sEmpty = sFull + 8 * S;
  const uint32_t sC = sQ + S * Q_BYTES;  // the consumers' pass buffers
  const int tid = threadIdx.x;
  if (tid == 0) {
    prefetch_tensormap(&tmapQ);
    if (p.tma_c) prefetch_tensormap(&tmapC);
    for (int s = 0; s < S; ++s) {
      mbar_init(sFull + 8 * s, 128 + 1);
      mbar_init(sEmpty + 8 * s, NC * (MC ? 2 : 1));  // MC: a stage is free in both CTAs
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if constexpr (MC)
    cluster_sync();  // the peer's barriers are initialised before any multicast or remote arrive
  else
    __syncthreads();
  // Under PDL all of the above overlaps the previous kernel; nothing before this line reads
  // or writes global memory (pdl.h).
  pdl_wait();
  pdl_release();
  const int wg = tid / 128, tid_wg = tid % 128;
  const Stream<MC> sm;
  const int mt = p.Mp / BM / (MC ? 2 : 1), ntn = p.Nq / BN, per_e = mt * ntn;
  const int total = p.E * per_e;

  if (wg == 0) {  // producer
    // The register split must stay within the launch's 168 x 384: 56 x 128 + 224 x 256, or
    // the consumers' setmaxnreg.inc waits forever.
    setmaxnreg_dec<56>();
    const T *P = static_cast<const T *>(p.p);
    // Four threads a P row (16-byte chunks piece + 4 j), 32 rows a pass: the producer's
    // instructions a k-block bound this kernel (ncu, 30B-A3B T=16384: its consumers waited
    // on full stages 31% of the time, it on empty ones 17%), and the row's index and address
    // work is per thread, so fewer rows a thread is less of it.
    const int piece = tid_wg & 3, trow = tid_wg >> 2;
    // The stream of k-blocks this CTA loads: item w (rows [r0, r1), tile mi, ni), k-block kb.
    // A k-block is a few adds; an item change divides and takes the item's offsets, loaded
    // one item ahead (oa, ob: raw offsets of item w + sm.step), so that only an empty
    // expert costs a dependent load.
    struct Cursor {
      int w, kb, r0, r1, mi, ni, oa, ob;
    };
    auto settle = [&](Cursor &c, int a, int b) {  // a, b: raw offsets of item c.w's expert
      for (;;) {
        if (c.w >= total) return;
        clamp_segment(p, a, b, c.r0, c.r1);
        if (c.r1 > c.r0) break;
        c.w += sm.step;
        if (c.w < total) {
          a = p.offsets[c.w / per_e];
          b = p.offsets[c.w / per_e + 1];
        }
      }
      const int e = c.w / per_e, rem = c.w - e * per_e;
      c.mi = rem / ntn;
      c.ni = rem - c.mi * ntn;
      const int wn = c.w + sm.step;
      c.oa = ld_if(wn < total, p.offsets + wn / per_e, 0);
      c.ob = ld_if(wn < total, p.offsets + wn / per_e + 1, 0);
    };
    // A ring of DIST k-blocks, filled DIST k-blocks ahead of their loads: this thread's rows'
    // raw sorted[] entries (GP) or plan rows, kNone past the segment (zero-filled), and the
    // block's Q row and tile (qrow < 0: the stream has ended). Nothing may consume a loaded
    // index before its slot is used, or the thread would wait for the load right there.
    constexpr int32_t kNone = INT32_MIN;
    int32_t idx[DIST][RPT];
    int qrow[DIST], tile[DIST];
    Cursor f{sm.first, 0, 0, 0, 0, 0, 0, 0};
    if (f.w < total) settle(f, p.offsets[f.w / per_e], p.offsets[f.w / per_e + 1]);
    auto fetch = [&](int d) {
      if (f.w >= total) {
        qrow[d] = -1;
        return;
      }
      qrow[d] = f.r0 + f.kb * BK;
      tile[d] = (sm.m_tile(f.mi) << 16) | f.ni;
      const int r_first = qrow[d] + trow;
      const int32_t *sp = p.sorted + r_first;  // rows r_first + 32 i: immediate offsets
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = r_first + 32 * i;
        if (GP)
          idx[d][i] = ld_if(r < f.r1, sp + 32 * i, kNone);
        else
          idx[d][i] = r < f.r1 ? r : kNone;
      }
      if (++f.kb * BK >= f.r1 - f.r0) {
        f.kb = 0;
        f.w += sm.step;
        settle(f, f.oa, f.ob);
      }
    };
#pragma unroll
    for (int d = 0; d < DIST; ++d) fetch(d);
    uint32_t it = 0;
    bool more = true;
    while (more) {
#pragma unroll
      for (int d = 0; d < DIST; ++d) {
        if (qrow[d] < 0) {
          more = false;
          break;
        }
        const int m0 = (tile[d] >> 16) * BM, n0 = (tile[d] & 0xFFFF) * BN;
        const T *Pm = P + m0 + piece * 8;  // + 32 j for chunk piece + 4 j
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sEmpty + 8 * st, ph ^ 1);
        const uint32_t a = sP + st * P_BYTES;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
          const int kr = trow + 32 * i;
          const int32_t v = idx[d][i];
          const bool ok = v != kNone;
          // Clamped like the portable kernels (a corrupt plan reads nothing out of bounds);
          // sorted / p_div by one 32-bit multiply-high (fastdiv31.h: cv < n_rows < 2^31).
          const uint32_t cv = uint32_t(min(max(v, 0), p.n_rows - 1));
          const uint32_t row = !GP ? uint32_t(v) : __umulhi(cv << 1, p.p_fd.m) >> p.p_fd.l;
          // Past the segment: zero-filled, nothing read (from row 0, in bounds), so that the
          // chunks' sources stay one base and immediate offsets.
          const T *src = ok ? Pm + uint64_t(row) * p.ldp : Pm;
          const uint32_t bytes = ok ? 16 : 0;
#pragma unroll
          for (int j = 0; j < BM / 32; ++j) {  // chunk piece + 4 j of the row's BM columns
            const int ch = piece + 4 * j;
            const uint32_t off = (ch >> 3) * ATOM + kr * 128 + (((ch & 7) ^ (kr & 7)) << 4);
            cp_async16_zfill(a + off, src + 32 * j, bytes);
          }
        }
        cp_async_mbar_arrive(sFull + 8 * st);
        if (tid_wg == 0) {
          const uint32_t bar = sFull + 8 * st, b = sQ + st * Q_BYTES;
          mbar_expect_tx(bar, Q_BYTES);  // MC: half of them from the peer's multicast
#pragma unroll
          for (int q = 0; q < BN / 64; ++q) {
            if (!MC)
              tma_load_2d(b + q * ATOM, &tmapQ, n0 + q * 64, qrow[d], bar);
            else if ((q * 2) / (BN / 64) == int(sm.rank))
              tma_load_2d_mc(b + q * ATOM, &tmapQ, n0 + q * 64, qrow[d], bar, 0x3);
          }
        }
        ++it;
        fetch(d);  // refill this slot, DIST k-blocks ahead
      }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  } else {  // consumers
    setmaxnreg_inc<224>();
    const int c = wg - 1;
    const int warp = tid_wg >> 5, lane = tid_wg & 31;
    T *C = static_cast<T *>(p.c);
    const bool tma_c = MOE_SM90_WGRAD_TMA_STORE && p.tma_c;
    uint32_t it = 0;
    float acc[BN / 2];
    auto release = [&](uint32_t st) {  // the stage is free here and (MC) for the peer's loads
      mbar_arrive(sEmpty + 8 * st);
      if constexpr (MC) mbar_arrive_cluster(sEmpty + 8 * st, sm.rank ^ 1);
    };
    // Fragment: D rows m = c * 64 + warp * 16 + (lane >> 2) + 8 hh, columns
    // n = 8 j + 2 (lane & 3) + b in acc[4 j + 2 hh + b]; a pass is half of them, columns
    // n in [128 pass, 128 pass + 128): v(j, hh, b) = acc[64 pass + 4 j + 2 hh + b].
    // D^T (TR): rows n of C, this warpgroup's 64 columns m of each, 128 rows n a pass. Element
    // (n, m) at row n, 16-byte chunk m / 8 XOR (n & 7): the layout of a {64, 128} TMA box with
    // the 128-byte swizzle; the fragment's writes and the rows' 16-byte reads are
    // conflict-free.
    auto write_tr = [&](uint32_t buf, auto v) {
      if constexpr (MOE_SM90_STMATRIX) {
        // Tile q of an instruction: fragment rows (m) hh = q & 1, columns (n) 8 jj..,
        // jj = jp + q / 2, stored transposed: smem row n = 8 jj + r gets its 8 m.
        const int q = lane >> 3, r = lane & 7;
        auto pk = [&](int jj, int hh) { return pack2<T>(v(jj, hh, 0), v(jj, hh, 1)); };
#pragma unroll
        for (int jp = 0; jp < 16; jp += 2) {
          const int n = 8 * (jp + (q >> 1)) + r;
          const uint32_t addr = buf + n * kTRow + ((((warp * 2 + (q & 1)) ^ r) & 7) << 4);
          stmatrix_x4_trans(addr, pk(jp, 0), pk(jp, 1), pk(jp + 1, 0), pk(jp + 1, 1));
        }
      } else {
        const int ml = warp * 16 + (lane >> 2);  // local column m of fragment row hh = 0
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int m = ml + hh * 8;
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            // n = 8 jj + n7: the swizzle depends on n7 only, so one base address per (hh, b)
            const int n7 = (lane & 3) * 2 + b;
            const uint32_t base = buf + n7 * kTRow + ((((m >> 3) ^ n7) & 7) << 4) + (m & 7) * 2;
#pragma unroll
            for (int jj = 0; jj < 16; ++jj) {
              const uint32_t addr = base + jj * 8 * kTRow;
              asm volatile("st.shared.b16 [%0], %1;" ::"r"(addr),
                           "h"(bits16(v(jj, hh, b), (T *)nullptr))
                           : "memory");
            }
          }
        }
      }
    };
    // One pass of item (e, m0, n0) by TMA (tma_c): values v(j, hh, b), through this
    // warpgroup's pass buffer.
    auto emit = [&](int pass, int e, int m0, int n0, auto v) {
      const uint32_t buf = sC + uint32_t(c) * kPassBytes;
      if constexpr (!TR)
        store_pass_tma<T>(buf, 1 + c, tid_wg, v, [&](uint32_t src, int dc) {
          tma_store_3d(&tmapC, src, n0 + pass * 128 + dc, m0 + c * 64, e);
        });
      else
        tma_pass(1 + c, tid_wg, [&] { write_tr(buf, v); },
                 [&] { tma_store_3d(&tmapC, buf, m0 + c * 64, n0 + pass * 128, e); });
    };
    // With TMA stores, an item's second pass waits in registers (packed, 32 words) until the
    // next item's k-block kFlushKb has been issued: a pass buffer is reused only once the TMA
    // has read the previous pass out of it, so writing both passes back to back kept the
    // tensor cores idle while the first one left. H100, 30B-A3B T=16384 (notes/hopper.md,
    // session 15): dW1 -3%, dW2 -2%; an epilogue storing nothing (timing only) was -12% / -9%,
    // the rest being the cost of the written bytes themselves.
    constexpr int kFlushKb = MOE_SM90_WGRAD_FLUSH_KB;
    uint32_t pend[32] = {};
    int pend_e = -1, pend_m0 = 0, pend_n0 = 0;  // pend_e < 0: nothing pending
    auto flush = [&] {
      emit(1, pend_e, pend_m0, pend_n0,
           [&](int j, int hh, int b) {
             float lo, hi;
             unpack2<T>(pend[j * 2 + hh], lo, hi);
             return b ? hi : lo;
           });
      pend_e = -1;
    };
    // The next item's raw offsets are loaded one item ahead (consumed at its start).
    int oa = 0, ob = 0;
    if (sm.first < total) {
      oa = p.offsets[sm.first / per_e];
      ob = p.offsets[sm.first / per_e + 1];
    }
    for (int w = sm.first; w < total; w += sm.step) {
      const int e = w / per_e, rem = w % per_e;
      const int m0 = sm.m_tile(rem / ntn) * BM, n0 = (rem % ntn) * BN;
      int r0, r1;
      clamp_segment(p, oa, ob, r0, r1);
      const int wn = w + sm.step;
      oa = ld_if(wn < total, p.offsets + wn / per_e, 0);
      ob = ld_if(wn < total, p.offsets + wn / per_e + 1, 0);
      const int KB = (r1 - r0 + BK - 1) / BK;
      uint32_t prev = 0;
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sFull + 8 * st, ph);
        fence_proxy_async();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BK / 16; ++k) {
          const uint64_t da = make_desc_mn(sP + st * P_BYTES + c * ATOM + k * 2048, ATOM);
          const uint64_t db = make_desc_mn(sQ + st * Q_BYTES + k * 2048, ATOM);
          Wgmma<T>::template m64n256<1, 1>(acc, da, db, (kb > 0 || k > 0) ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (kb > 0 && tid_wg == 0) release(prev);
        prev = st;
        if (kb == kFlushKb && pend_e >= 0) flush();  // while this k-block's wgmmas run
      }
      wgmma_wait<0>();
      if (KB > 0 && tid_wg == 0) release(prev);
      if (KB == 0) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
      }
      if (pend_e >= 0) flush();  // KB <= kFlushKb: the previous item's second pass first
      if (tma_c) {
        emit(0, e, m0, n0, [&](int j, int hh, int b) { return acc[j * 4 + hh * 2 + b]; });
#pragma unroll
        for (int i = 0; i < 32; ++i) pend[i] = pack2<T>(acc[64 + 2 * i], acc[64 + 2 * i + 1]);
        pend_e = e, pend_m0 = m0, pend_n0 = n0;
        continue;
      }
      T *Ce = C + int64_t(e) * p.strideCE;
      const uint32_t buf = sC + uint32_t(c) * kPassBytes;
#pragma unroll
      for (int pass = 0; pass < 2; ++pass) {
        auto v = [&](int j, int hh, int b) { return acc[(pass * 16 + j) * 4 + hh * 2 + b]; };
        if (!TR) {  // this warpgroup's 64 rows m, 128 columns n a pass
          store_pass<T>(buf, 1 + c, tid_wg, v, [&](int lr, int) -> T * {
            return Ce + int64_t(m0 + c * 64 + lr) * p.ldc + n0 + pass * 128;
          });
          continue;
        }
        named_bar(1 + c, 128);  // the previous pass's reads of buf are done
        write_tr(buf, v);
        named_bar(1 + c, 128);
        const int ch = tid_wg & 7, nr = tid_wg >> 3;  // rows n = nr + 16 i, all n & 7 = nr & 7
        const uint32_t rbase = buf + nr * kTRow + (((ch ^ nr) & 7) << 4);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int n = nr + 16 * i;
          T *dst = Ce + int64_t(n0 + pass * 128 + n) * p.ldc + m0 + c * 64 + ch * 8;
          *reinterpret_cast<uint4 *>(dst) = lds128(rbase + 16 * i * kTRow);
        }
      }
    }
    if (pend_e >= 0) flush();
    if (tma_c && tid_wg == 0) bulk_wait0();  // smem stays until the stores are done
  }
  if constexpr (MC) cluster_sync();  // no CTA leaves while its peer may still write to it
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <class T, bool GP, bool TR, int BKT, bool MC> KernelGate &gate() {
  static KernelGate g;
  return g;
}

template <class T, bool GP, bool TR, int BKT, bool MC>
bool launch(const CUtensorMap &map, const CUtensorMap &mapC, const WgParams &p, Launch stream,
            moe_status_t *status) {
  using C = Cfg<BKT>;
  static_assert(C::ATOM % 1024 == 0 && C::RPT * 32 == C::BK, "atoms of whole 8-row groups");
  auto kern = wgrad_sm90<T, GP, TR, BKT, MC>;
  KernelGate &g = gate<T, GP, TR, BKT, MC>();
  int sms = 0;
  if (!kernel_usable(reinterpret_cast<const void *>(kern), C::kSmem, g, &sms)) return false;
  const int64_t items = int64_t(p.E) * (p.Mp / BM) * (p.Nq / BN);
  if constexpr (MC) {
    // Clusters of two: an even, persistent grid of the CTAs that fit at once.
    const int fit = cluster_grid(reinterpret_cast<const void *>(kern), C::kSmem, THREADS, 2, g,
                                 sms);
    const int64_t want = (std::max<int64_t>(1, items) + 1) / 2 * 2;  // items is even here
    launch_kernel(kern, dim3(unsigned(std::min<int64_t>(fit, want))), dim3(THREADS), C::kSmem,
                  stream.stream, stream.pdl, 2, map, mapC, p);
  } else {
    const int grid = int(std::min<int64_t>(sms, std::max<int64_t>(1, items)));
    launch_kernel(kern, dim3(unsigned(grid)), dim3(THREADS), C::kSmem, stream.stream, stream.pdl,
                  1, map, mapC, p);
  }
  *status = launch_status("sm90 wgrad");
  return true;
}

// The kernel for P gathered or not (gp) and D stored transposed or not (tr).
template <class T, int BKT, bool MC>
bool launch_for(const CUtensorMap &map, const CUtensorMap &mapC, const WgParams &p, bool gp,
                bool tr, Launch st, moe_status_t *status) {
  if (tr)
    return gp ? launch<T, true, true, BKT, MC>(map, mapC, p, st, status)
              : launch<T, false, true, BKT, MC>(map, mapC, p, st, status);
  return gp ? launch<T, true, false, BKT, MC>(map, mapC, p, st, status)
            : launch<T, false, false, BKT, MC>(map, mapC, p, st, status);
}

template <class T, int BKT>
bool dispatch(const CUtensorMap &map, const CUtensorMap &mapC, const WgParams &p, bool tr,
              Launch st, moe_status_t *status) {
  const bool gp = p.p_div > 0;
  constexpr bool MC = MOE_SM90_WGRAD_MCAST != 0;
  if (MC && (p.Mp / BM) % 2 == 0)  // the multicast pairs need the m-tiles in pairs
    return launch_for<T, BKT, MC>(map, mapC, p, gp, tr, st, status);
  return launch_for<T, BKT, false>(map, mapC, p, gp, tr, st, status);
}

// 64 x 3 measured faster on the H100 (30B-A3B T=16384: dW1 2.84 -> 2.41 ms, dW2 1.37 -> 1.09;
// T=4096 within 3%, dev/sm90/wgrad_bk_ab.py); 32 x 6 stays selectable for comparison.
int wgrad_bk() {
  const char *v = std::getenv("MOE_FUSED_WGRAD_BK");
  return v && std::strcmp(v, "32") == 0 ? 32 : 64;
}

}  // namespace
}  // namespace sm90

bool sm90_wgrad(const WgradArgs &w, uint64_t flags, Launch stream, moe_status_t *status) {
  using namespace sm90;
  *status = MOE_OK;
  if (!sm90_enabled(flags)) return false;
  if (w.dtype != MOE_DTYPE_BF16 && w.dtype != MOE_DTYPE_F16) return false;
  if (w.n_rows <= 0 || w.n_rows >= (int64_t(1) << 31) || w.a_div < 0 || w.b_div < 0) return false;
  if (w.E <= 0 || w.M <= 0 || w.N <= 0) return false;
  // Q (256 columns a tile, TMA) must be in plan order: B unless B is gathered, then A
  // (D = C^T). P (128 columns a tile) may be gathered.
  const bool tr = w.b_div > 0;
  if (tr && w.a_div > 0) return false;
  const void *P = tr ? w.B : w.A, *Q = tr ? w.A : w.B;
  const int64_t ldp = tr ? w.ldb : w.lda, ldq = tr ? w.lda : w.ldb;
  const int Mp = tr ? w.N : w.M, Nq = tr ? w.M : w.N;
  if (Mp % BM != 0 || Nq % BN != 0) return false;
  if (Mp / BM >= (1 << 15) || Nq / BN >= (1 << 16)) return false;  // the producer's packed tile
  if (int64_t(w.E) * (Mp / BM) * (Nq / BN) >= (int64_t(1) << 31)) return false;
  if (!aligned16(P) || ldp % 8 != 0 || !aligned16(Q) || ldq % 8 != 0 || ldq < Nq) return false;
  if (ldp >= (int64_t(1) << 31)) return false;
  if (!aligned16(w.C) || w.ldc % 8 != 0 || w.strideCE % 8 != 0) return false;
  const bool bf16 = w.dtype == MOE_DTYPE_BF16;
  CUtensorMap map;
  const int bk = wgrad_bk();
  if (!encode_2d(&map, bf16, Q, uint64_t(Nq), uint64_t(w.n_rows), uint64_t(ldq) * 2, 64, bk))
    return false;
  // C as [E][M][N]: a warpgroup's pass is a {64, 64} box of D = C, or a {64 m, 128 n} box of
  // D^T; thread stores where the TMA refuses the layout (e.g. strideCE = 0).
  CUtensorMap mapC = map;
  const bool tma_c = MOE_SM90_WGRAD_TMA_STORE &&
                     encode_3d(&mapC, bf16, w.C, uint64_t(w.N), uint64_t(w.M), uint64_t(w.E),
                               uint64_t(w.ldc) * 2, uint64_t(w.strideCE) * 2, 64, tr ? 128 : 64);
  WgParams p{};
  p.p = P;
  p.ldp = uint32_t(ldp);
  p.p_div = tr ? w.b_div : w.a_div;
  p.p_fd = fastdiv31(uint32_t(p.p_div > 0 ? p.p_div : 1));
  p.n_rows = int32_t(w.n_rows);
  p.Mp = Mp;
  p.Nq = Nq;
  p.E = w.E;
  p.offsets = w.offsets;
  p.sorted = w.sorted;
  p.c = w.C;
  p.ldc = w.ldc;
  p.strideCE = w.strideCE;
  p.tma_c = tma_c;
  if (bk == 64)
    return bf16 ? dispatch<__nv_bfloat16, 64>(map, mapC, p, tr, stream, status)
                : dispatch<__half, 64>(map, mapC, p, tr, stream, status);
  return bf16 ? dispatch<__nv_bfloat16, 32>(map, mapC, p, tr, stream, status)
              : dispatch<__half, 32>(map, mapC, p, tr, stream, status);
}

}  // namespace cuda
}  // namespace moe
