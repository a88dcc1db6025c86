// sm90a weight-gradient GEMMs (K-grouped): per expert e,
//   C[e][m][n] = sum over the plan rows r in [off[e], off[e+1]) of A[arow(r)][m] * B[brow(r)][n],
// arow(r) = a_div ? sorted[r] / a_div : r (same for B): dW1 = dh^T x, dW2 = dout^T (s a),
// linear dW. Experts without rows get zeros. Deterministic: one CTA owns each output tile and
// walks the expert's rows in order.
//
// Both operands have the reduction (rows) as their outer dimension, so they reach wgmma
// M- / N-major (transposed): the producer warpgroup cp.async's 64 rows per k-block into
// 128-byte-swizzled atoms of 64 columns x 8 rows (zero-filled past the expert's last row),
// prefetching the gathered row indices one k-block ahead; two consumer warpgroups run
// wgmma m64n256k16 (tile 128 x 256); the result is staged in smem and written by bulk copies
// while the next tile's loads are already in flight. Persistent grid over
// (expert, m-tile, n-tile), n fastest so that concurrent CTAs share the expert's rows in L2.
#include <algorithm>

#include "cuda/sm90.h"
#include "cuda/sm90_host.h"
#include "cuda/sm90_ptx.cuh"
#include "cuda/sm90_wgmma.cuh"

namespace moe {
namespace cuda {
namespace sm90 {
namespace {

// BK = 32 rows a k-block with 6 stages (not 64 with 3): the same smem, but the stage a consumer
// holds until its next k-block's wgmma is issued is half as large, so twice the bytes are in
// flight: the gathered row loads are latency-bound (L2 round trips), not bandwidth-bound.
constexpr int BM = 128, BN = 256, BK = 32, S = 6, NC = 2, THREADS = 128 * (NC + 1);
[[maybe_unused]] constexpr int ATOM = BK * 128;  // bytes of one 64-column atom of a k-block
constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
constexpr int CROW = BN * 2 + 16;
constexpr size_t kSmem = 1024 + size_t(S) * (A_BYTES + B_BYTES) + 1024 + size_t(BM) * CROW;
[[maybe_unused]] constexpr int RPT = BK / 16;  // k rows a producer thread loads per k-block: trow + 16 i

struct WgParams {
  const void *a;
  int64_t lda;
  int a_div;
  const void *b;
  int64_t ldb;
  int b_div;
  int32_t n_rows;
  int M, N, E;
  const int32_t *offsets;
  const int32_t *sorted;
  void *c;
  int64_t ldc, strideCE;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <class T> __device__ __forceinline__ uint32_t pack2w(float lo, float hi) {
  const T a = DT<T>::from_f(lo), b = DT<T>::from_f(hi);
  return uint32_t(reinterpret_cast<const uint16_t &>(a)) |
         (uint32_t(reinterpret_cast<const uint16_t &>(b)) << 16);
}
// The expert's plan-row segment [r0, r1), clamped to [0, n] and monotone.
__device__ __forceinline__ void segment(const WgParams &p, int e, int &r0, int &r1) {
  int a = p.offsets[e], b = p.offsets[e + 1];
  a = a < 0 ? 0 : (a > p.n_rows ? p.n_rows : a);
  b = b < a ? a : (b > p.n_rows ? p.n_rows : b);
  r0 = a;
  r1 = b;
}
#endif

template <class T, bool GA, bool GB>
__global__ void __launch_bounds__(THREADS, 1)
    wgrad_sm90(const WgParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(8) uint64_t s_bars[2 * S];
  extern __shared__ __align__(128) uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sA = sbase, sB = sbase + S * A_BYTES;
  const uint32_t sFull = smem_u32(s_bars), sEmpty = sFull + 8 * S;
  const uint32_t sC = (sB + S * B_BYTES + 1023) & ~1023u;
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(sFull + 8 * s, 128);
      mbar_init(sEmpty + 8 * s, NC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int wg = tid / 128, tid_wg = tid % 128;
  const int mt = p.M / BM, ntn = p.N / BN, per_e = mt * ntn;
  const int total = p.E * per_e;

  if (wg == 0) {  // producer
    setmaxnreg_dec<56>();
    const T *A = static_cast<const T *>(p.a);
    const T *B = static_cast<const T *>(p.b);
    const int piece = tid_wg & 7, trow = tid_wg >> 3;
    // Source rows of this thread's k rows of one k-block (-1: past the segment, zero-filled).
    auto fetch = [&](int r0, int r1, int kb, int32_t (&ia)[RPT], int32_t (&ib)[RPT]) {
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = r0 + kb * BK + trow + 16 * i;
        int32_t pr = r;
        if ((GA || GB) && r < r1) {
          pr = p.sorted[r];
          pr = pr < 0 ? 0 : (pr >= p.n_rows ? p.n_rows - 1 : pr);
        }
        ia[i] = r < r1 ? (GA ? pr / p.a_div : r) : -1;
        ib[i] = r < r1 ? (GB ? pr / p.b_div : r) : -1;
      }
    };
    // The next work item (from w on, stride gridDim.x) with at least one row.
    auto next_item = [&](int w, int &r0, int &r1) {
      for (; w < total; w += gridDim.x) {
        segment(p, w / per_e, r0, r1);
        if (r1 > r0) break;
      }
      return w;
    };
    int r0 = 0, r1 = 0;
    int w = next_item(blockIdx.x, r0, r1), kb = 0;
    int32_t ia[RPT], ib[RPT];
    if (w < total) fetch(r0, r1, 0, ia, ib);
    uint32_t it = 0;
    while (w < total) {
      int32_t ca[RPT], cb[RPT];
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        ca[i] = ia[i];
        cb[i] = ib[i];
      }
      const int rem = w % per_e;
      const int m0 = (rem / ntn) * BM, n0 = (rem % ntn) * BN;
      // Prefetch the next k-block's row indices before waiting for a free stage.
      int nw = w, nkb = kb + 1, nr0 = r0, nr1 = r1;
      if (nkb * BK >= r1 - r0) {
        nkb = 0;
        nw = next_item(w + gridDim.x, nr0, nr1);
      }
      if (nw < total) fetch(nr0, nr1, nkb, ia, ib);

      const uint32_t st = it % S, ph = (it / S) & 1;
      mbar_wait(sEmpty + 8 * st, ph ^ 1);
      const uint32_t a = sA + st * A_BYTES, b = sB + st * B_BYTES;
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int kr = trow + 16 * i;
        const uint32_t off = kr * 128 + ((piece ^ (kr & 7)) << 4);
        const bool ok = ca[i] >= 0;
        const T *pa = ok ? A + int64_t(ca[i]) * p.lda + m0 + piece * 8 : A;
        const T *pb = ok ? B + int64_t(cb[i]) * p.ldb + n0 + piece * 8 : B;
#pragma unroll
        for (int q = 0; q < BM / 64; ++q) cp_async16_zfill(a + q * ATOM + off, pa + (ok ? q * 64 : 0), ok ? 16 : 0);
#pragma unroll
        for (int q = 0; q < BN / 64; ++q) cp_async16_zfill(b + q * ATOM + off, pb + (ok ? q * 64 : 0), ok ? 16 : 0);
      }
      cp_async_mbar_arrive(sFull + 8 * st);
      ++it;
      w = nw;
      kb = nkb;
      r0 = nr0;
      r1 = nr1;
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  } else {  // consumers
    setmaxnreg_inc<224>();
    const int c = wg - 1;
    const int warp = tid_wg >> 5, lane = tid_wg & 31;
    T *C = static_cast<T *>(p.c);
    uint32_t it = 0;
    float acc[BN / 2];
    for (int w = blockIdx.x; w < total; w += gridDim.x) {
      const int e = w / per_e, rem = w % per_e;
      const int m0 = (rem / ntn) * BM, n0 = (rem % ntn) * BN;
      int r0, r1;
      segment(p, e, r0, r1);
      const int KB = (r1 - r0 + BK - 1) / BK;
      uint32_t prev = 0;
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sFull + 8 * st, ph);
        fence_proxy_async();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BK / 16; ++k) {
          const uint64_t da = make_desc_mn(sA + st * A_BYTES + c * ATOM + k * 2048, ATOM);
          const uint64_t db = make_desc_mn(sB + st * B_BYTES + k * 2048, ATOM);
          Wgmma<T>::template m64n256<1, 1>(acc, da, db, (kb > 0 || k > 0) ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (kb > 0 && tid_wg == 0) mbar_arrive(sEmpty + 8 * prev);
        prev = st;
      }
      wgmma_wait<0>();
      if (KB > 0 && tid_wg == 0) mbar_arrive(sEmpty + 8 * prev);
      if (KB == 0) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
      }
      // fragment -> smem staging -> one 512-byte bulk copy per output row
      if (tid_wg < 64) bulk_wait_read0();
      named_bar(1 + c, 128);
      const uint32_t cbase = sC + (c * 64 + warp * 16 + (lane >> 2)) * CROW + (lane & 3) * 4;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const uint32_t v = pack2w<T>(acc[j * 4 + hh * 2], acc[j * 4 + hh * 2 + 1]);
          asm volatile("st.shared.b32 [%0], %1;" ::"r"(cbase + hh * 8 * CROW + j * 16), "r"(v)
                       : "memory");
        }
      fence_proxy_async();
      named_bar(1 + c, 128);
      if (tid_wg < 64) {
        const int row = c * 64 + tid_wg;
        bulk_store(C + int64_t(e) * p.strideCE + int64_t(m0 + row) * p.ldc + n0,
                   sC + row * CROW, BN * 2);
        bulk_commit();
      }
    }
    if (tid_wg < 64) bulk_wait0();
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <class T, bool GA, bool GB> KernelGate &gate() {
  static KernelGate g;
  return g;
}

template <class T, bool GA, bool GB>
bool launch(const WgParams &p, cudaStream_t stream, moe_status_t *status) {
  auto kern = wgrad_sm90<T, GA, GB>;
  int sms = 0;
  if (!kernel_usable(reinterpret_cast<const void *>(kern), kSmem, gate<T, GA, GB>(), &sms))
    return false;
  const int64_t items = int64_t(p.E) * (p.M / BM) * (p.N / BN);
  const int grid = int(std::min<int64_t>(sms, std::max<int64_t>(1, items)));
  kern<<<grid, THREADS, kSmem, stream>>>(p);
  *status = launch_status("sm90 wgrad");
  return true;
}

template <class T> bool dispatch(const WgParams &p, cudaStream_t st, moe_status_t *status) {
  const bool ga = p.a_div > 0, gb = p.b_div > 0;
  if (ga && gb) return launch<T, true, true>(p, st, status);
  if (ga) return launch<T, true, false>(p, st, status);
  if (gb) return launch<T, false, true>(p, st, status);
  return launch<T, false, false>(p, st, status);
}

}  // namespace
}  // namespace sm90

bool sm90_wgrad(const WgradArgs &w, uint64_t flags, cudaStream_t stream, moe_status_t *status) {
  using namespace sm90;
  *status = MOE_OK;
  if (!sm90_enabled(flags)) return false;
  if (w.dtype != MOE_DTYPE_BF16 && w.dtype != MOE_DTYPE_F16) return false;
  if (w.M <= 0 || w.N <= 0 || w.E <= 0 || w.M % BM != 0 || w.N % BN != 0) return false;
  if (w.n_rows < 0 || w.n_rows >= (int64_t(1) << 31) || w.a_div < 0 || w.b_div < 0) return false;
  if (!aligned16(w.A) || w.lda % 8 != 0 || !aligned16(w.B) || w.ldb % 8 != 0) return false;
  if (!aligned16(w.C) || w.ldc % 8 != 0 || w.strideCE % 8 != 0) return false;
  WgParams p{};
  p.a = w.A;
  p.lda = w.lda;
  p.a_div = w.a_div;
  p.b = w.B;
  p.ldb = w.ldb;
  p.b_div = w.b_div;
  p.n_rows = int32_t(w.n_rows);
  p.M = w.M;
  p.N = w.N;
  p.E = w.E;
  p.offsets = w.offsets;
  p.sorted = w.sorted;
  p.c = w.C;
  p.ldc = w.ldc;
  p.strideCE = w.strideCE;
  return w.dtype == MOE_DTYPE_BF16 ? dispatch<__nv_bfloat16>(p, stream, status)
                                   : dispatch<__half>(p, stream, status);
}

}  // namespace cuda
}  // namespace moe
