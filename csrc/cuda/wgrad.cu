// K-grouped GEMMs on tensor cores: per-expert weight gradients
//   C[e][m][n] = sum_{r in [off[e], off[e+1])} A[arow(r)][m] * B[brow(r)][n]
// The reduction runs over the expert's plan rows; rows of A/B are gathered in
// the mainloop (arow(r) = sorted[r] / a_div, i.e. token rows of x or dout).
// Both operands are stored with the reduction dimension as rows (M/N
// contiguous) and reach the tensor cores through ldmatrix.trans.
// Deterministic: one CTA owns each output tile and walks the rows in order.
#include <algorithm>

#include "cuda/gemm_core.cuh"
#include "cuda/kernels.h"

namespace moe {
namespace cuda {
namespace {

using namespace core;

__device__ __forceinline__ int64_t clamp_row(int32_t v, int64_t n) {
  return v < 0 ? 0 : (v >= n ? n - 1 : v);
}

template <class T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) wgrad_kernel(const WgradArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *smem = reinterpret_cast<T *>(smem_raw);
  float *Cs = reinterpret_cast<float *>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp / WARPS_N, wn = warp % WARPS_N;
  const T *A = static_cast<const T *>(a.A);
  const T *B = static_cast<const T *>(a.B);
  const int e = blockIdx.z;
  const int64_t n = a.n_rows;
  int64_t s = a.offsets[e], t = a.offsets[e + 1];
  s = s < 0 ? 0 : (s > n ? n : s);
  t = t < s ? s : (t > n ? n : t);
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int KT = static_cast<int>((t - s + BK - 1) / BK);
  const int ca = (tid % A_COL_TPR) * 8, cb = (tid % B_COL_TPR) * 8;

  // Ring of gathered row indices, one slot per pipeline stage, filled one
  // iteration ahead of use so that the index load never stalls a cp.async issue.
  __shared__ int32_t s_ar[STAGES][BK], s_br[STAGES][BK];
  auto fetch_idx = [&](int kt, int32_t &ar, int32_t &br) {
    const int64_t r = s + int64_t(kt) * BK + tid;
    ar = br = -1;
    if (r < t) {
      ar = br = static_cast<int32_t>(r);
      if (a.a_div > 0 || a.b_div > 0) {
        const int64_t p = clamp_row(a.sorted[r], n);
        if (a.a_div > 0) ar = static_cast<int32_t>(p / a.a_div);
        if (a.b_div > 0) br = static_cast<int32_t>(p / a.b_div);
      }
    }
  };
  auto load_stage = [&](int st, int kt) {
    T *As = smem + st * STAGE_ELEMS;
    T *Bs = As + A_ELEMS;
    (void)kt;
#pragma unroll
    for (int i = 0; i < A_COL_IT; ++i) {
      const int kr = tid / A_COL_TPR + (THREADS / A_COL_TPR) * i;
      const int32_t ar = s_ar[st][kr];
      const int gm = m0 + ca;
      const int nva = ar >= 0 ? a.M - gm : 0;
      load_chunk<T>(As + kr * ST_MA + ca, nva > 0 ? A + int64_t(ar) * a.lda + gm : A, nva, a.vec_a);
    }
#pragma unroll
    for (int i = 0; i < B_COL_IT; ++i) {
      const int kr = tid / B_COL_TPR + (THREADS / B_COL_TPR) * i;
      const int32_t br = s_br[st][kr];
      const int gn = n0 + cb;
      const int nvb = br >= 0 ? a.N - gn : 0;
      load_chunk<T>(Bs + kr * ST_NB + cb, nvb > 0 ? B + int64_t(br) * a.ldb + gn : B, nvb, a.vec_b);
    }
  };

  if (tid < BK) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      int32_t ar = -1, br = -1;
      if (st < KT) fetch_idx(st, ar, br);
      s_ar[st][tid] = ar;
      s_br[st][tid] = br;
    }
  }
  __syncthreads();

  Acc acc;
  acc.zero();
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < KT) load_stage(st, st);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nk = kt + STAGES - 1;
    if (nk < KT) load_stage(nk % STAGES, nk);
    cp_async_commit();
    // indices of tile kt + STAGES into the slot of tile kt (already consumed)
    const bool pf = tid < BK && kt + STAGES < KT;
    int32_t par = -1, pbr = -1;
    if (pf) fetch_idx(kt + STAGES, par, pbr);
    const T *As = smem + (kt % STAGES) * STAGE_ELEMS;
    mma_tile<T, true, true>(acc, As, As + A_ELEMS, wm, wn, lane);
    if (pf) {
      s_ar[kt % STAGES][tid] = par;
      s_br[kt % STAGES][tid] = pbr;
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  stage_acc(acc, Cs, wm, wn, lane);
  __syncthreads();

  T *C = static_cast<T *>(a.C) + int64_t(e) * a.strideCE;
#pragma unroll 2
  for (int pass = 0; pass < BM * (BN / 8) / THREADS; ++pass) {
    const int row = pass * (THREADS / (BN / 8)) + tid / (BN / 8), col = (tid % (BN / 8)) * 8;
    const int gm = m0 + row, gn = n0 + col;
    if (gm < a.M && gn < a.N) {
      float v[8];
      const float4 x0 = *reinterpret_cast<const float4 *>(Cs + row * CS_ST + col);
      const float4 x1 = *reinterpret_cast<const float4 *>(Cs + row * CS_ST + col + 4);
      v[0] = x0.x; v[1] = x0.y; v[2] = x0.z; v[3] = x0.w;
      v[4] = x1.x; v[5] = x1.y; v[6] = x1.z; v[7] = x1.w;
      store8<T>(C + int64_t(gm) * a.ldc + gn, v, a.N - gn, a.vec_c);
    }
  }
}

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <class T> moe_status_t launch(const WgradArgs &a, cudaStream_t stream) {
  auto kern = wgrad_kernel<T>;
  static uint64_t smem_done = 0;
  cudaError_t e = ensure_smem(kern, kSmemBytes, &smem_done);
  if (e != cudaSuccess) return launch_status("wgrad (smem attribute)");
  const dim3 grid(unsigned((a.N + BN - 1) / BN), unsigned((a.M + BM - 1) / BM), unsigned(a.E));
  kern<<<grid, THREADS, kSmemBytes, stream>>>(a);
  return launch_status("wgrad");
}

}  // namespace

moe_status_t wgrad_gemm(const WgradArgs &args, cudaStream_t stream) {
  WgradArgs a = args;
  if (a.M <= 0 || a.N <= 0 || a.E <= 0) return MOE_OK;
  if (a.E > 65535) return set_error(MOE_ERR_UNSUPPORTED, "CUDA wgrad: more than 65535 experts");
  a.vec_a = a.M % 8 == 0 && a.lda % 8 == 0 && aligned16(a.A);
  a.vec_b = a.N % 8 == 0 && a.ldb % 8 == 0 && aligned16(a.B);
  a.vec_c = a.N % 8 == 0 && a.ldc % 8 == 0 && a.strideCE % 8 == 0 && aligned16(a.C);
  if (a.dtype == MOE_DTYPE_BF16) return launch<__nv_bfloat16>(a, stream);
  if (a.dtype == MOE_DTYPE_F16) return launch<__half>(a, stream);
  return set_error(MOE_ERR_DTYPE, "CUDA wgrad: unsupported dtype %d", a.dtype);
}

}  // namespace cuda
}  // namespace moe
