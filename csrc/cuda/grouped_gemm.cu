// Row-grouped GEMMs on tensor cores: each CTA takes one BM-row tile of one
// expert's plan-row segment (device-side tile list) and one BN column tile:
//   C[r, n] = sum_k A[arow(r), k] * B_e(k, n)
// A rows are gathered in the mainloop (arow(r) = sorted[r] / a_div: token rows
// of x or dout, no permuted copy), B_e is the expert's weight ([N][K] or
// [K][N]). Epilogues (through an fp32 smem staging tile):
//   EPI_STORE   plain store (optionally scattered to row sorted[r])
//   EPI_SWIGLU  GEMM1: the tile's B rows are I/2... gate rows c0.. and up rows I+c0..,
//               writes h = [g;u] and a = silu(g)*u (a from the rounded h)
//   EPI_SWIGLU_A the same, writing a alone (the no-grad forward: no h kept)
//   EPI_DSWIGLU backward of GEMM2/SwiGLU: acc = dA'; reloads h, writes
//               dh = dSwiGLU(s dA'), s*a, and per-tile partials of ds = <dA', a>
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

template <class T, int EPI, bool B_KN>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) grouped_gemm_kernel(const GroupedGemmArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *smem = reinterpret_cast<T *>(smem_raw);
  float *Cs = reinterpret_cast<float *>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp / WARPS_N, wn = warp % WARPS_N;
  const T *A = static_cast<const T *>(a.A);
  const T *Bbase = static_cast<const T *>(a.B);
  const int N = a.N, K = a.K;
  const int KT = (K + BK - 1) / BK;
  const int ntiles = *a.num_tiles;
  // Column tile: output columns [n0, n0+BN); SwiGLU: a-columns [c0, c0+BN/2).
  const int n0 = (is_swiglu(EPI) ? BN / 2 : BN) * blockIdx.x;

  for (int ti = blockIdx.y; ti < ntiles; ti += gridDim.y) {
    const Tile tile = a.tiles[ti];
    const int r0 = tile.row0, r1 = min(tile.row0 + BM, tile.row1);
    const T *B = Bbase + int64_t(tile.expert) * a.strideBE;

    // Row tables: the global row of each of the tile's A rows (gathered), and of
    // each B row ([N][K] layout; SwiGLU: gate rows then up rows). nullptr = none.
    __shared__ const T *s_arow[BM];
    __shared__ const T *s_brow[BN];
    for (int q = tid; q < BM + (B_KN ? 0 : BN); q += THREADS) {
      if (q < BM) {
        const int r = r0 + q;
        const T *ptr = nullptr;
        if (r < r1) {
          int64_t src = r;
          if (a.a_div > 0) src = clamp_row(a.sorted[r], a.n_rows) / a.a_div;
          ptr = A + src * a.lda;
        }
        s_arow[q] = ptr;
      } else {
        const int nr = q - BM;
        int64_t grow;
        bool ok;
        if (is_swiglu(EPI)) {
          const int c = n0 + (nr & (BN / 2 - 1));
          ok = c < N;
          grow = nr < BN / 2 ? c : int64_t(N) + c;
        } else {
          grow = n0 + nr;
          ok = grow < N;
        }
        s_brow[nr] = ok ? B + grow * a.ldb : nullptr;
      }
    }
    __syncthreads();

    // Chunks of 8 elements: [rows][BK] tiles: row (tid>>3) + (THREADS/8) i, k (tid&7)*8;
    // [BK][cols] tiles: k row tid / (BN/8) + (THREADS/(BN/8)) i, col (tid % (BN/8))*8.
    const int kc = (tid & 7) * 8;
    auto load_stage = [&](int s, int kt) {
      T *As = smem + s * STAGE_ELEMS;
      T *Bs = As + A_ELEMS;
      const int k0 = kt * BK;
#pragma unroll
      for (int i = 0; i < A_ROW_IT; ++i) {
        const int row = (tid >> 3) + (THREADS / 8) * i;
        const T *rp = s_arow[row];
        const int nv = rp ? K - (k0 + kc) : 0;
        load_chunk<T>(As + row * ST_K + kc, nv > 0 ? rp + k0 + kc : A, nv, a.vec_a);
      }
      if (!B_KN) {
#pragma unroll
        for (int i = 0; i < B_ROW_IT; ++i) {
          const int row = (tid >> 3) + (THREADS / 8) * i;
          const T *rp = s_brow[row];
          const int nv = rp ? K - (k0 + kc) : 0;
          load_chunk<T>(Bs + row * ST_K + kc, nv > 0 ? rp + k0 + kc : Bbase, nv, a.vec_b);
        }
      } else {
        const int nc = (tid % B_COL_TPR) * 8;
#pragma unroll
        for (int i = 0; i < B_COL_IT; ++i) {
          const int kr = tid / B_COL_TPR + (THREADS / B_COL_TPR) * i;
          const int kg = k0 + kr;
          const int gn = n0 + nc;
          const int nv = kg < K ? N - gn : 0;
          load_chunk<T>(Bs + kr * ST_NB + nc, nv > 0 ? B + int64_t(kg) * a.ldb + gn : Bbase, nv,
                        a.vec_b);
        }
      }
    };

    Acc acc;
    acc.zero();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < KT) load_stage(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      const int nk = kt + STAGES - 1;
      if (nk < KT) load_stage(nk % STAGES, nk);
      cp_async_commit();
      const T *As = smem + (kt % STAGES) * STAGE_ELEMS;
      mma_tile<T, false, B_KN>(acc, As, As + A_ELEMS, wm, wn, lane);
    }
    cp_async_wait<0>();
    __syncthreads();
    stage_acc(acc, Cs, wm, wn, lane);
    __syncthreads();

    // ---- epilogues ----
    if (EPI == EPI_STORE) {
      T *C = static_cast<T *>(a.C);
#pragma unroll 2
      for (int pass = 0; pass < BM * (BN / 8) / THREADS; ++pass) {
        const int row = pass * (THREADS / (BN / 8)) + tid / (BN / 8), col = (tid % (BN / 8)) * 8;
        const int r = r0 + row, gn = n0 + col;
        if (r < r1 && gn < N) {
          float v[8];
          const float4 x0 = *reinterpret_cast<const float4 *>(Cs + row * CS_ST + col);
          const float4 x1 = *reinterpret_cast<const float4 *>(Cs + row * CS_ST + col + 4);
          v[0] = x0.x; v[1] = x0.y; v[2] = x0.z; v[3] = x0.w;
          v[4] = x1.x; v[5] = x1.y; v[6] = x1.z; v[7] = x1.w;
          const int64_t orow =
              clamp_row(a.c_scatter ? a.sorted[r] : r + tile.delta, a.c_rows);
          store8<T>(C + orow * a.ldc + gn, v, N - gn, a.vec_c);
        }
      }
    } else if (is_swiglu(EPI)) {
      T *Hh = static_cast<T *>(a.C);
      T *Aa = static_cast<T *>(a.C2);
#pragma unroll 2
      for (int pass = 0; pass < BM * (BN / 16) / THREADS; ++pass) {
        const int row = pass * (THREADS / (BN / 16)) + tid / (BN / 16), col = (tid % (BN / 16)) * 8;
        const int r = r0 + row, gc = n0 + col;
        if (r < r1 && gc < N) {
          float g[8], u[8], av[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            g[i] = DT<T>::to_f(DT<T>::from_f(Cs[row * CS_ST + col + i]));
            u[i] = DT<T>::to_f(DT<T>::from_f(Cs[row * CS_ST + BN / 2 + col + i]));
            av[i] = silu_f(g[i]) * u[i];
          }
          if (EPI == EPI_SWIGLU) {  // EPI_SWIGLU_A: no h (C is null)
            T *hr = Hh + int64_t(r) * a.ldc;
            store8<T>(hr + gc, g, N - gc, a.vec_c);
            store8<T>(hr + N + gc, u, N - gc, a.vec_c);
          }
          store8<T>(Aa + int64_t(r) * a.ldc2 + gc, av, N - gc, a.vec_c);
        }
      }
    } else {  // EPI_DSWIGLU
      T *dH = static_cast<T *>(a.C);
      T *SA = static_cast<T *>(a.C2);
      const T *Hin = static_cast<const T *>(a.Hin);
#pragma unroll 1
      for (int pass = 0; pass < BM * (BN / 8) / THREADS; ++pass) {
        const int row = pass * (THREADS / (BN / 8)) + tid / (BN / 8), col = (tid % (BN / 8)) * 8;
        const int r = r0 + row, gn = n0 + col;
        float dot = 0.f;
        if (r < r1 && gn < N) {
          const int64_t p = clamp_row(a.sorted[r], a.n_rows);
          const float s = load_weight(a.sw, a.sw_dtype, (p / a.k) * a.sw_s0 + (p % a.k) * a.sw_s1);
          float g[8], u[8], d[8], o[8];
          const T *hr = Hin + int64_t(r) * a.ldh;
          load8<T>(g, hr + gn, N - gn, a.vec_h);
          load8<T>(u, hr + N + gn, N - gn, a.vec_h);
          T *dr = dH + int64_t(r) * a.ldc;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            d[i] = Cs[row * CS_ST + col + i];
            const float sg = sigmoid_f(g[i]);
            g[i] *= sg;                      // g <- silu(g)
            const float dsil = sg + g[i] * (1.f - sg);  // silu'(g) = sg (1 + g (1 - sg))
            dot += d[i] * g[i] * u[i];
            d[i] *= s;                       // da = s dA'
            o[i] = d[i] * u[i] * dsil;       // dg
          }
          store8<T>(dr + gn, o, N - gn, a.vec_c);
#pragma unroll
          for (int i = 0; i < 8; ++i) o[i] = d[i] * g[i];  // du = da silu(g)
          store8<T>(dr + N + gn, o, N - gn, a.vec_c);
          if (SA) {
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = s * g[i] * u[i];  // s a
            store8<T>(SA + int64_t(r) * a.ldc2 + gn, o, N - gn, a.vec_c);
          }
        }
#pragma unroll
        for (int o = BN / 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (tid % (BN / 8) == 0 && r < r1) a.ds_part[int64_t(r) * a.ds_ld + blockIdx.x] = dot;
      }
    }
    __syncthreads();  // the next tile's loads reuse the staging smem
  }
}

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <class T, int EPI, bool B_KN>
moe_status_t launch(const GroupedGemmArgs &a, cudaStream_t stream) {
  auto kern = grouped_gemm_kernel<T, EPI, B_KN>;
  static uint64_t smem_done = 0;
  cudaError_t e = ensure_smem(kern, kSmemBytes, &smem_done);
  if (e != cudaSuccess) return launch_status("grouped_gemm (smem attribute)");
  const int gx = grouped_gemm_col_tiles(EPI, a.N);
  const int64_t gy = std::min<int64_t>(a.max_tiles, 65535);
  if (gx <= 0 || gy <= 0) return MOE_OK;
  kern<<<dim3(gx, unsigned(gy)), THREADS, kSmemBytes, stream>>>(a);
  return launch_status("grouped_gemm");
}

template <class T> moe_status_t dispatch(const GroupedGemmArgs &a, cudaStream_t stream) {
  switch (a.epilogue) {
    case EPI_STORE:
      return a.b_kn ? launch<T, EPI_STORE, true>(a, stream) : launch<T, EPI_STORE, false>(a, stream);
    case EPI_SWIGLU:
      if (a.b_kn) break;
      return launch<T, EPI_SWIGLU, false>(a, stream);
    case EPI_SWIGLU_A:
      if (a.b_kn) break;
      return launch<T, EPI_SWIGLU_A, false>(a, stream);
    case EPI_DSWIGLU:
      if (!a.b_kn) break;
      return launch<T, EPI_DSWIGLU, true>(a, stream);
    default:
      break;
  }
  return set_error(MOE_ERR_INTERNAL, "grouped_gemm: unsupported epilogue/layout %d/%d",
                   a.epilogue, int(a.b_kn));
}

}  // namespace

int grouped_gemm_col_tiles(int epilogue, int N) {
  const int bn = is_swiglu(epilogue) ? kGemmBN / 2 : kGemmBN;
  return (N + bn - 1) / bn;
}

moe_status_t grouped_gemm(const GroupedGemmArgs &args, cudaStream_t stream) {
  GroupedGemmArgs a = args;
  if (a.n_rows <= 0 || a.N <= 0) return MOE_OK;
  a.vec_a = a.K % 8 == 0 && a.lda % 8 == 0 && aligned16(a.A);
  if (a.b_kn)
    a.vec_b = a.N % 8 == 0 && a.ldb % 8 == 0 && a.strideBE % 8 == 0 && aligned16(a.B);
  else
    a.vec_b = a.K % 8 == 0 && a.ldb % 8 == 0 && a.strideBE % 8 == 0 && aligned16(a.B);
  if (a.c_rows <= 0) a.c_rows = a.n_rows;
  a.vec_c = a.N % 8 == 0 && a.ldc % 8 == 0 && aligned16(a.C);  // EPI_SWIGLU_A: C null, ldc 0
  if (a.epilogue != EPI_STORE) a.vec_c = a.vec_c && a.ldc2 % 8 == 0 && aligned16(a.C2);
  a.vec_h = a.epilogue == EPI_DSWIGLU && a.N % 8 == 0 && a.ldh % 8 == 0 && aligned16(a.Hin);
  if (a.dtype == MOE_DTYPE_BF16) return dispatch<__nv_bfloat16>(a, stream);
  if (a.dtype == MOE_DTYPE_F16) return dispatch<__half>(a, stream);
  return set_error(MOE_ERR_DTYPE, "CUDA grouped GEMM: unsupported dtype %d", a.dtype);
}

}  // namespace cuda
}  // namespace moe
