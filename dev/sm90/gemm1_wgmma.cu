// Scratch harness (llm.c style) for the Hopper (sm90a) MoE GEMM1:
//   h[r, :] = x[sorted[r] / k, :] @ W1[e(r)]^T      r in [0, T*k), rows sorted by expert
// x [T,H] bf16 (rows gathered on load, no permuted copy), W1 [E,2I,H] bf16, h [T*k,2I] bf16.
// Kernels: wgmma.mma_async (inline PTX) from 128B-swizzled smem; B (weights) by TMA
// (cp.async.bulk.tensor, CUtensorMap from cuTensorMapEncodeTiled via the runtime's driver
// entry point, no -lcuda); A (gathered x rows) by 16-byte cp.async into the same swizzle;
// mbarrier pipeline; persistent grid over a device-side tile list (expert, row0, row1).
//
// Build: nvcc -gencode=arch=compute_90a,code=sm_90a -std=c++17 -O3 -o gemm1 gemm1_wgmma.cu
// Run:   ./gemm1 [variants, e.g. 1,2,3] [reps]
// Variants (all BM = 128 rows per tile):
//   1: 1 warpgroup (128 thr), 2 x m64n128 per k16 (tile 128x128), 6 stages, all threads load
//   2: 2 warpgroups (256 thr), m64n128 each (tile 128x128), 6 stages, all threads load
//   3: 2 warpgroups (256 thr), m64n256 each (tile 128x256), 4 stages, all threads load
//   4: warp-specialised: 1 producer WG (cp.async A + TMA B) + 2 consumer WGs m64n256
//      (tile 128x256), full/empty mbarriers, 4 stages, setmaxnreg; pipeline flows across tiles
//   5: 4 in 2-CTA clusters, B tile multicast (each CTA loads half); empty partner tiles pad
//   6: 5 + SwiGLU epilogue (writes h and a = silu(g)*u)
//   7: 4 + SwiGLU epilogue (two TMA halves: 128 gate rows + the same 128 up rows)
//   8: 4 with 3 stages + staged epilogue (smem tile, one cp.async.bulk store per valid row)
//   9: 8 + SwiGLU epilogue (h staged, a from registers)
// Measured on an H100: see notes/hopper.md (best: v8 612 TF/s plain, v9 1.68 ms with SwiGLU
// at T=16384).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "wgmma_ops.cuh"
// mbarrier / TMA / cp.async / bulk-store / wgmma-fence primitives and the smem descriptor,
// shared with the library kernel (csrc/cuda/sm90_rowgemm.cu).
#include "../../csrc/cuda/sm90_ptx.cuh"
using namespace moe::cuda::sm90;

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__,   \
              __LINE__, #x);                                                               \
      exit(1);                                                                             \
    }                                                                                      \
  } while (0)

struct Tile {
  int32_t expert, row0, row1, pad;
};

// ----------------------------------------------------------------------------------------
// device helpers (PTX)

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

template <int N>
__device__ __forceinline__ void wgmma_call(float (&d)[N / 2], uint64_t da, uint64_t db, int sd);
template <>
__device__ __forceinline__ void wgmma_call<128>(float (&d)[64], uint64_t da, uint64_t db, int sd) {
  wgmma_m64n128(d, da, db, sd);
}
template <>
__device__ __forceinline__ void wgmma_call<256>(float (&d)[128], uint64_t da, uint64_t db, int sd) {
  wgmma_m64n256(d, da, db, sd);
}

constexpr int BK = 64;  // 64 bf16 = 128 B = one swizzle row

// Store a warpgroup's m64nBN accumulator fragment (rows relative to tile row `m0`).
template <int BN>
__device__ __forceinline__ void store_frag(const float (&acc)[BN / 2], __nv_bfloat16 *out,
                                           int64_t ldo, int row0, int row1, int m0, int n0,
                                           int tid_wg) {
  const int warp = tid_wg >> 5, lane = tid_wg & 31;
  const int rbase = row0 + m0 + warp * 16 + (lane >> 2);
  const int cbase = n0 + (lane & 3) * 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = rbase + h * 8;
    if (r < row1) {
      __nv_bfloat16 *o = out + (int64_t)r * ldo + cbase;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        __nv_bfloat162 v = __floats2bfloat162_rn(acc[j * 4 + h * 2], acc[j * 4 + h * 2 + 1]);
        *reinterpret_cast<__nv_bfloat162 *>(o + j * 8) = v;
      }
    }
  }
}

// ----------------------------------------------------------------------------------------
// Variants 1-3: every thread loads (cp.async A rows, thread 0 the TMA of B), then the MMA
// warpgroups run. One __syncthreads per k-block; wgmma.wait_group<1> keeps one k-block of
// MMA in flight, so a stage is free two k-blocks later: S-2 k-blocks of loads in flight.
template <int BN, int NWG, int MI, int S>
__global__ void __launch_bounds__(128 * NWG, 1)
    gemm1_simple(const __grid_constant__ CUtensorMap tmapB, const __nv_bfloat16 *__restrict__ x,
                 const int32_t *__restrict__ sorted, int a_div, const Tile *__restrict__ tiles,
                 const int32_t *__restrict__ num_tiles, __nv_bfloat16 *__restrict__ out, int H,
                 int N) {
  constexpr int THREADS = 128 * NWG;
  constexpr int BM = 64 * NWG * MI;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
  constexpr int RPT = BM * 8 / THREADS;    // A rows per thread (one 16B chunk each)
  constexpr int RSTEP = THREADS / 8;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sA = sbase, sB = sbase + S * A_BYTES, sBar = sB + S * B_BYTES;
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) mbar_init(sBar + 8 * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int wg = tid / 128, tid_wg = tid % 128;
  const int chunk = tid & 7, trow = tid >> 3;
  const int KB = H / BK;
  const int ntn = N / BN;
  const int total = num_tiles[0] * ntn;
  uint32_t it = 0;  // k-block counter across tiles (stage and phase)
  float acc[MI][BN / 2];

  for (int w = blockIdx.x; w < total; w += gridDim.x) {
    const Tile t = tiles[w / ntn];
    const int n0 = (w % ntn) * BN;
    const int brow = t.expert * N + n0;
    const __nv_bfloat16 *src[RPT];
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
      int r = min(t.row0 + trow + j * RSTEP, t.row1 - 1);
      src[j] = x + (int64_t)(sorted[r] / a_div) * H + chunk * 8;
    }
    auto load = [&](int kb, uint32_t st) {
      const uint32_t a = sA + st * A_BYTES;
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        const int row = trow + j * RSTEP;
        cp_async16_u(a + row * 128 + ((chunk ^ (row & 7)) << 4), src[j] + kb * BK);
      }
      if (tid == 0) {
        mbar_expect_tx(sBar + 8 * st, B_BYTES);
        tma_load_2d(sB + st * B_BYTES, &tmapB, kb * BK, brow, sBar + 8 * st);
      }
    };
#pragma unroll
    for (int s = 0; s < S - 2; ++s) {
      if (s < KB) load(s, (it + s) % S);
      cp_async_commit();
    }
    for (int kb = 0; kb < KB; ++kb) {
      const uint32_t st = (it + kb) % S, ph = ((it + kb) / S) & 1;
      cp_async_wait<S - 3>();
      fence_proxy_async();
      __syncthreads();
      if (kb + S - 2 < KB) load(kb + S - 2, (it + kb + S - 2) % S);
      cp_async_commit();
      mbar_wait(sBar + 8 * st, ph);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < BK / 16; ++k) {
        const uint64_t db = make_desc(sB + st * B_BYTES + k * 32);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          const uint64_t da = make_desc(sA + st * A_BYTES + (wg * MI + mi) * 64 * 128 + k * 32);
          wgmma_call<BN>(acc[mi], da, db, (kb > 0 || k > 0) ? 1 : 0);
        }
      }
      wgmma_commit();
      wgmma_wait<1>();
    }
    wgmma_wait<0>();
    it += KB;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
      store_frag<BN>(acc[mi], out, N, t.row0, t.row1, (wg * MI + mi) * 64, n0, tid_wg);
    __syncthreads();
  }
}

// SW (variant 6): SwiGLU epilogue. The tile's B rows are [n0h, n0h+BN/2) of the gate and the
// same rows of up (I + n0h...), one half from each CTA's TMA, so each thread holds g in
// acc[j < BN/16 blocks] and u in the matching acc[j + BN/16]: it writes h = [g;u] (the usual
// layout) and a[r, n0h + c] = silu(g) * u.
template <int BN, bool SW>
__device__ __forceinline__ void store_frag_swiglu(const float (&acc)[BN / 2], __nv_bfloat16 *h,
                                                  __nv_bfloat16 *a, int I, int row0, int row1,
                                                  int m0, int n0h, int tid_wg) {
  const int warp = tid_wg >> 5, lane = tid_wg & 31;
  const int rbase = row0 + m0 + warp * 16 + (lane >> 2);
  const int cbase = n0h + (lane & 3) * 2;
  constexpr int HJ = BN / 16;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = rbase + hh * 8;
    if (r < row1) {
      __nv_bfloat16 *o = h + (int64_t)r * 2 * I + cbase;
      __nv_bfloat16 *oa = a + (int64_t)r * I + cbase;
#pragma unroll
      for (int j = 0; j < HJ; ++j) {
        const float g0 = acc[j * 4 + hh * 2], g1 = acc[j * 4 + hh * 2 + 1];
        const float u0 = acc[(j + HJ) * 4 + hh * 2], u1 = acc[(j + HJ) * 4 + hh * 2 + 1];
        *reinterpret_cast<__nv_bfloat162 *>(o + j * 8) = __floats2bfloat162_rn(g0, g1);
        *reinterpret_cast<__nv_bfloat162 *>(o + I + j * 8) = __floats2bfloat162_rn(u0, u1);
        const float a0 = g0 / (1.f + __expf(-g0)) * u0, a1 = g1 / (1.f + __expf(-g1)) * u1;
        *reinterpret_cast<__nv_bfloat162 *>(oa + j * 8) = __floats2bfloat162_rn(a0, a1);
      }
    }
  }
}


// ----------------------------------------------------------------------------------------
// Variant 4: warp specialisation. Warpgroup 0 produces (each thread: cp.async of its A chunks,
// then cp.async.mbarrier.arrive.noinc on full[s]; thread 0 also expect_tx + TMA of B), the
// consumer warpgroups 1..NC wait full[s], run wgmma, and release a stage on empty[s] once the
// next k-block's MMAs are issued (wait_group<1>). full[s] count = 128 + 1, empty[s] count = NC.
// SW (variant 7): the SwiGLU epilogue of variant 6 without clusters: the producer issues two
// TMAs of BN/2 rows (gate rows, then the same up rows).
// ST (variants 8, 9): staged epilogue. Each consumer warpgroup writes its 64 x BN fragment
// to a padded smem tile (row stride BN*2+16 B: conflict-free), then 64 of its threads issue
// one bulk copy per valid row (cp.async.bulk, 16-B granular, so ragged rows are simply not
// copied) and the warpgroup goes straight on to the next tile's MMAs while the copy engine
// drains the tile. With SW, h goes through smem (two 256-B copies per row: g part, u part) and
// a is stored from registers. Costs one pipeline stage (S=3) for the 66 KB tile.
template <int BN, int NC, int S, bool SW, bool ST = false>
__global__ void __launch_bounds__(128 * (NC + 1), 1)
    gemm1_ws(const __grid_constant__ CUtensorMap tmapB, const __nv_bfloat16 *__restrict__ x,
             const int32_t *__restrict__ sorted, int a_div, const Tile *__restrict__ tiles,
             const int32_t *__restrict__ num_tiles, __nv_bfloat16 *__restrict__ out,
             __nv_bfloat16 *__restrict__ aout, int H, int N) {
  constexpr int BM = 64 * NC;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
  constexpr int RPT = BM * 8 / 128;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sA = sbase, sB = sbase + S * A_BYTES, sFull = sB + S * B_BYTES,
                 sEmpty = sFull + 8 * S;
  constexpr uint32_t CROW = BN * 2 + 16;
  const uint32_t sC = (sEmpty + 8 * S + 1023) & ~1023u;  // [BM][CROW] staging tile (ST only)
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(sFull + 8 * s, 128 + 1);
      mbar_init(sEmpty + 8 * s, NC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int wg = tid / 128, tid_wg = tid % 128;
  const int KB = H / BK;
  const int ntn = N / BN;
  const int total = num_tiles[0] * ntn;

  if (wg == 0) {
    setmaxnreg_dec<40>();
    const int chunk = tid_wg & 7, trow = tid_wg >> 3;
    uint32_t it = 0;
    for (int w = blockIdx.x; w < total; w += gridDim.x) {
      const Tile t = tiles[w / ntn];
      const int n0 = (w % ntn) * BN;
      const int brow = t.expert * N + n0;
      const __nv_bfloat16 *src[RPT];
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        int r = min(t.row0 + trow + j * 16, t.row1 - 1);
        src[j] = x + (int64_t)(sorted[r] / a_div) * H + chunk * 8;
      }
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sEmpty + 8 * st, ph ^ 1);
        const uint32_t a = sA + st * A_BYTES;
#pragma unroll
        for (int j = 0; j < RPT; ++j) {
          const int row = trow + j * 16;
          cp_async16_u(a + row * 128 + ((chunk ^ (row & 7)) << 4), src[j] + kb * BK);
        }
        cp_async_mbar_arrive(sFull + 8 * st);
        if (tid_wg == 0) {
          mbar_expect_tx(sFull + 8 * st, B_BYTES);
          if constexpr (SW) {
            const int g0 = t.expert * N + (w % ntn) * (BN / 2);
            tma_load_2d(sB + st * B_BYTES, &tmapB, kb * BK, g0, sFull + 8 * st);
            tma_load_2d(sB + st * B_BYTES + B_BYTES / 2, &tmapB, kb * BK, g0 + N / 2, sFull + 8 * st);
          } else {
            tma_load_2d(sB + st * B_BYTES, &tmapB, kb * BK, brow, sFull + 8 * st);
          }
        }
      }
    }
    cp_async_wait<0>();
  } else {
    setmaxnreg_inc<232>();
    const int c = wg - 1;
    uint32_t it = 0;
    float acc[BN / 2];
    for (int w = blockIdx.x; w < total; w += gridDim.x) {
      const Tile t = tiles[w / ntn];
      const int n0 = (w % ntn) * BN;
      uint32_t prev = 0;
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sFull + 8 * st, ph);
        fence_proxy_async();
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BK / 16; ++k) {
          const uint64_t db = make_desc(sB + st * B_BYTES + k * 32);
          const uint64_t da = make_desc(sA + st * A_BYTES + c * 64 * 128 + k * 32);
          wgmma_call<BN>(acc, da, db, (kb > 0 || k > 0) ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (kb > 0 && tid_wg == 0) mbar_arrive(sEmpty + 8 * prev);
        prev = st;
      }
      wgmma_wait<0>();
      if (tid_wg == 0) mbar_arrive(sEmpty + 8 * prev);
      if constexpr (ST) {
        const int warp = tid_wg >> 5, lane = tid_wg & 31;
        if (tid_wg < 64) bulk_wait_read0();  // last tile's copies have read the staging rows
        named_bar(1 + c, 128);
        const uint32_t cbase = sC + (c * 64 + warp * 16 + (lane >> 2)) * CROW + (lane & 3) * 4;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
            __nv_bfloat162 v = __floats2bfloat162_rn(acc[j * 4 + hh * 2], acc[j * 4 + hh * 2 + 1]);
            asm volatile("st.shared.b32 [%0], %1;" ::"r"(cbase + hh * 8 * CROW + j * 16),
                         "r"(*reinterpret_cast<uint32_t *>(&v))
                         : "memory");
          }
        fence_proxy_async();
        named_bar(1 + c, 128);
        if (tid_wg < 64) {
          const int r = t.row0 + c * 64 + tid_wg;
          if (r < t.row1) {
            const uint32_t srow = sC + (c * 64 + tid_wg) * CROW;
            if constexpr (SW) {
              const int I = N / 2, n0h = (w % ntn) * (BN / 2);
              bulk_store(out + (int64_t)r * N + n0h, srow, BN);
              bulk_store(out + (int64_t)r * N + I + n0h, srow + BN, BN);
            } else {
              bulk_store(out + (int64_t)r * N + n0, srow, BN * 2);
            }
          }
          bulk_commit();
        }
        if constexpr (SW) {  // a = silu(g) * u straight from the registers
          const int I = N / 2, n0h = (w % ntn) * (BN / 2);
          const int rbase = t.row0 + c * 64 + warp * 16 + (lane >> 2);
          constexpr int HJ = BN / 16;
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int r = rbase + hh * 8;
            if (r < t.row1) {
              __nv_bfloat16 *oa = aout + (int64_t)r * I + n0h + (lane & 3) * 2;
#pragma unroll
              for (int j = 0; j < HJ; ++j) {
                const float g0 = acc[j * 4 + hh * 2], g1 = acc[j * 4 + hh * 2 + 1];
                const float u0 = acc[(j + HJ) * 4 + hh * 2], u1 = acc[(j + HJ) * 4 + hh * 2 + 1];
                const float a0 = g0 / (1.f + __expf(-g0)) * u0, a1 = g1 / (1.f + __expf(-g1)) * u1;
                *reinterpret_cast<__nv_bfloat162 *>(oa + j * 8) = __floats2bfloat162_rn(a0, a1);
              }
            }
          }
        }
      } else if constexpr (SW) {
        store_frag_swiglu<BN, SW>(acc, out, aout, N / 2, t.row0, t.row1, c * 64,
                                  (w % ntn) * (BN / 2), tid_wg);
      } else {
        store_frag<BN>(acc, out, N, t.row0, t.row1, c * 64, n0, tid_wg);
      }
    }
    if constexpr (ST) {
      if (tid_wg < 64) bulk_wait0();
    }
  }
}

// ----------------------------------------------------------------------------------------
// Variant 5: variant 4 in 2-CTA clusters with the B tile multicast. The two CTAs of a cluster
// take the two m-tiles of a tile pair (same expert, same n-tile; the host pads an expert's
// odd tile count with an empty tile row0 == row1, which loads and multiplies nothing but
// still takes part in the pipeline). Each CTA's producer TMA-loads half of B (BN/2 rows) and
// multicasts it into both CTAs, so W1 crosses L2 -> SM once per 256 rows instead of per 128.
// full[s]: 128 noinc arrivals + 1 expect_tx of the whole B tile (half of the bytes come from
// the partner). empty[s]: 2*NC arrivals, from the consumers of both CTAs (a stage of mine is
// written by the partner's multicast, so the partner's producer must wait for my consumers).
// cluster_ctarank, cluster_sync, mbar_arrive_cluster, tma_load_2d_mc: sm90_ptx.cuh.

template <int BN, int NC, int S, bool SW>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(128 * (NC + 1), 1)
    gemm1_ws_mc(const __grid_constant__ CUtensorMap tmapB, const __nv_bfloat16 *__restrict__ x,
                const int32_t *__restrict__ sorted, int a_div, const Tile *__restrict__ tiles,
                const int32_t *__restrict__ num_pairs, __nv_bfloat16 *__restrict__ out,
                __nv_bfloat16 *__restrict__ aout, int H, int N) {
  constexpr int BM = 64 * NC;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
  constexpr int RPT = BM * 8 / 128;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sA = sbase, sB = sbase + S * A_BYTES, sFull = sB + S * B_BYTES,
                 sEmpty = sFull + 8 * S;
  const int tid = threadIdx.x;
  const uint32_t rank = cluster_ctarank(), peer = rank ^ 1;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(sFull + 8 * s, 128 + 1);
      mbar_init(sEmpty + 8 * s, 2 * NC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();
  const int wg = tid / 128, tid_wg = tid % 128;
  const int KB = H / BK;
  const int ntn = N / BN;
  const int total = num_pairs[0] * ntn;
  const int cid = blockIdx.x / 2, ncl = gridDim.x / 2;

  if (wg == 0) {
    setmaxnreg_dec<40>();
    const int chunk = tid_wg & 7, trow = tid_wg >> 3;
    uint32_t it = 0;
    for (int w = cid; w < total; w += ncl) {
      const Tile t = tiles[2 * (w / ntn) + rank];
      const int n0 = (w % ntn) * BN;
      const int brow = SW ? t.expert * N + rank * (N / 2) + (w % ntn) * (BN / 2)
                          : t.expert * N + n0 + rank * (BN / 2);
      const bool valid = t.row0 < t.row1;
      const __nv_bfloat16 *src[RPT];
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        int r = max(min(t.row0 + trow + j * 16, t.row1 - 1), 0);
        src[j] = x + (int64_t)(sorted[r] / a_div) * H + chunk * 8;
      }
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sEmpty + 8 * st, ph ^ 1);
        const uint32_t a = sA + st * A_BYTES;
        if (valid) {
#pragma unroll
          for (int j = 0; j < RPT; ++j) {
            const int row = trow + j * 16;
            cp_async16_u(a + row * 128 + ((chunk ^ (row & 7)) << 4), src[j] + kb * BK);
          }
        }
        cp_async_mbar_arrive(sFull + 8 * st);
        if (tid_wg == 0) {
          mbar_expect_tx(sFull + 8 * st, B_BYTES);
          tma_load_2d_mc(sB + st * B_BYTES + rank * (B_BYTES / 2), &tmapB, kb * BK, brow,
                         sFull + 8 * st, (uint16_t)3);
        }
      }
    }
    cp_async_wait<0>();
  } else {
    setmaxnreg_inc<232>();
    const int c = wg - 1;
    uint32_t it = 0;
    float acc[BN / 2];
    for (int w = cid; w < total; w += ncl) {
      const Tile t = tiles[2 * (w / ntn) + rank];
      const int n0 = (w % ntn) * BN;
      const bool valid = t.row0 < t.row1;
      uint32_t prev = 0;
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sFull + 8 * st, ph);
        fence_proxy_async();
        if (valid) {
          wgmma_fence();
#pragma unroll
          for (int k = 0; k < BK / 16; ++k) {
            const uint64_t db = make_desc(sB + st * B_BYTES + k * 32);
            const uint64_t da = make_desc(sA + st * A_BYTES + c * 64 * 128 + k * 32);
            wgmma_call<BN>(acc, da, db, (kb > 0 || k > 0) ? 1 : 0);
          }
          wgmma_commit();
          wgmma_wait<1>();
        }
        if (kb > 0 && tid_wg == 0) {
          mbar_arrive(sEmpty + 8 * prev);
          mbar_arrive_cluster(sEmpty + 8 * prev, peer);
        }
        prev = st;
      }
      wgmma_wait<0>();
      if (tid_wg == 0) {
        mbar_arrive(sEmpty + 8 * prev);
        mbar_arrive_cluster(sEmpty + 8 * prev, peer);
      }
      if (valid) {
        if constexpr (SW)
          store_frag_swiglu<BN, SW>(acc, out, aout, N / 2, t.row0, t.row1, c * 64,
                                    (w % ntn) * (BN / 2), tid_wg);
        else
          store_frag<BN>(acc, out, N, t.row0, t.row1, c * 64, n0, tid_wg);
      }
    }
  }
  cluster_sync();  // no CTA leaves while its partner may still write its smem or barriers
}

// ----------------------------------------------------------------------------------------
// Reference on the GPU (fp32 SIMT, 64x64 tiles, 4x4 per thread), itself checked against a
// float64 CPU reference on sampled rows.
__global__ void ref_kernel(const __nv_bfloat16 *x, const __nv_bfloat16 *W, const int32_t *sorted,
                           int a_div, const Tile *tiles, int H, int N, float *out) {
  __shared__ float As[16][65], Bs[16][65];
  const Tile t = tiles[blockIdx.y];  // 64-row tiles: one expert per block
  const int r0 = t.row0, n0 = blockIdx.x * 64;
  const __nv_bfloat16 *w = W + (int64_t)t.expert * N * H;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < H; k0 += 16) {
    for (int i = threadIdx.x; i < 64 * 16; i += 256) {
      int rr = i / 16, kk = i % 16;
      int r = r0 + rr;
      As[kk][rr] = r < t.row1 ? __bfloat162float(x[(int64_t)(sorted[r] / a_div) * H + k0 + kk]) : 0.f;
      Bs[kk][rr] = __bfloat162float(w[(int64_t)(n0 + rr) * H + k0 + kk]);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += As[kk][ty * 4 + i] * Bs[kk][tx * 4 + j];
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      int r = r0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (r < t.row1) out[(int64_t)r * N + n] = acc[i][j];
    }
}

// Deterministic inputs whose values are exact in bf16: (hash mod 256 - 128) / 256.
__host__ __device__ inline float init_val(uint32_t seed, uint64_t i) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xBF58476D1CE4E5B9ull + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)((int)(z & 255) - 128) / 256.f;
}
__global__ void init_kernel(__nv_bfloat16 *p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16(init_val(seed, i));
}
__global__ void check_kernel(const __nv_bfloat16 *out, const float *ref, int64_t n, double *acc,
                             unsigned long long *bad) {
  double d2 = 0, r2 = 0, dmax = 0;
  unsigned long long nb = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float o = __bfloat162float(out[i]), r = ref[i];
    if (!isfinite(o)) { ++nb; continue; }
    double d = (double)o - r;
    d2 += d * d;
    r2 += (double)r * r;
    dmax = fmax(dmax, fabs(d));
  }
  atomicAdd(&acc[0], d2);
  atomicAdd(&acc[1], r2);
  atomicMax(reinterpret_cast<unsigned long long *>(&acc[2]), __double_as_longlong(dmax));
  atomicAdd(bad, nb);
}

// a = silu(g) * u against the fp32 reference h (g = ref[:, n], u = ref[:, I + n]).
__global__ void check_swiglu_kernel(const __nv_bfloat16 *a, const float *ref, int64_t R, int I,
                                    double *acc, unsigned long long *bad) {
  double d2 = 0, r2 = 0, dmax = 0;
  unsigned long long nb = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < R * I;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / I, n = i % I;
    double g = ref[r * 2 * I + n], u = ref[r * 2 * I + I + n];
    double want = g / (1.0 + exp(-g)) * u;
    float o = __bfloat162float(a[i]);
    if (!isfinite(o)) { ++nb; continue; }
    double d = (double)o - want;
    d2 += d * d;
    r2 += want * want;
    dmax = fmax(dmax, fabs(d));
  }
  atomicAdd(&acc[0], d2);
  atomicAdd(&acc[1], r2);
  atomicMax(reinterpret_cast<unsigned long long *>(&acc[2]), __double_as_longlong(dmax));
  atomicAdd(bad, nb);
}

// ----------------------------------------------------------------------------------------
// host

static PFN_cuTensorMapEncodeTiled_v12000 get_encode() {
  void *fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
  if (!fn || q != cudaDriverEntryPointSuccess) {
    fprintf(stderr, "no cuTensorMapEncodeTiled\n");
    exit(1);
  }
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
}

// W [rows, H] bf16 (rows = E*2I), box {64, box_rows}, 128B swizzle.
static CUtensorMap make_map(const void *W, int64_t rows, int H, int box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 enc = get_encode();
  CUtensorMap m;
  cuuint64_t dims[2] = {(cuuint64_t)H, (cuuint64_t)rows};
  cuuint64_t strides[1] = {(cuuint64_t)H * 2};
  cuuint32_t box[2] = {(cuuint32_t)BK, (cuuint32_t)box_rows};
  cuuint32_t es[2] = {1, 1};
  CUresult r = enc(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void *>(W), dims, strides,
                   box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    fprintf(stderr, "cuTensorMapEncodeTiled failed %d\n", (int)r);
    exit(1);
  }
  return m;
}

struct Problem {
  int T, H, I, E, k;
  int R, N;
  std::vector<int32_t> offsets, sorted, row_expert;
  std::vector<Tile> tiles, ptiles;  // ptiles: pairs of m-tiles of one expert (v5)
  __nv_bfloat16 *dx, *dW, *dout, *da;  // da: a = silu(g)*u [R, I] (v6)
  int32_t *dsorted, *drow_expert, *dnum;
  Tile *dtiles, *dptiles;
  int32_t *dpnum;
  float *dref;
};

// Random top-k routing (k distinct experts per token, experts in `empty` never chosen),
// pairs stably sorted by expert, BM-row tiles.
static void build_problem(Problem &P, uint32_t seed, const std::vector<int> &empty, int BM) {
  P.R = P.T * P.k;
  P.N = 2 * P.I;
  std::mt19937 rng(seed);
  std::vector<int> allowed;
  for (int e = 0; e < P.E; ++e)
    if (std::find(empty.begin(), empty.end(), e) == empty.end()) allowed.push_back(e);
  std::vector<int> pair_e(P.R);
  for (int t = 0; t < P.T; ++t) {
    std::vector<int> a = allowed;
    for (int j = 0; j < P.k; ++j) {
      int q = j + rng() % (a.size() - j);
      std::swap(a[j], a[q]);
      pair_e[t * P.k + j] = a[j];
    }
  }
  P.offsets.assign(P.E + 1, 0);
  for (int p = 0; p < P.R; ++p) P.offsets[pair_e[p] + 1]++;
  for (int e = 0; e < P.E; ++e) P.offsets[e + 1] += P.offsets[e];
  std::vector<int> pos(P.offsets.begin(), P.offsets.end() - 1);
  P.sorted.resize(P.R);
  P.row_expert.resize(P.R);
  for (int p = 0; p < P.R; ++p) {
    int r = pos[pair_e[p]]++;
    P.sorted[r] = p;
    P.row_expert[r] = pair_e[p];
  }
  P.tiles.clear();
  for (int e = 0; e < P.E; ++e)
    for (int r = P.offsets[e]; r < P.offsets[e + 1]; r += BM) P.tiles.push_back({e, r, P.offsets[e + 1], 0});
  P.ptiles.clear();
  for (int e = 0; e < P.E; ++e) {
    int n = 0;
    for (int r = P.offsets[e]; r < P.offsets[e + 1]; r += BM, ++n) P.ptiles.push_back({e, r, P.offsets[e + 1], 0});
    if (n % 2) P.ptiles.push_back({e, P.offsets[e + 1], P.offsets[e + 1], 0});  // empty partner
  }
  CK(cudaMalloc(&P.dx, (size_t)P.T * P.H * 2));
  CK(cudaMalloc(&P.dW, (size_t)P.E * P.N * P.H * 2));
  CK(cudaMalloc(&P.dout, (size_t)P.R * P.N * 2));
  CK(cudaMalloc(&P.da, (size_t)P.R * P.I * 2));
  CK(cudaMalloc(&P.dref, (size_t)P.R * P.N * 4));
  CK(cudaMalloc(&P.dsorted, P.R * 4));
  CK(cudaMalloc(&P.drow_expert, P.R * 4));
  CK(cudaMalloc(&P.dtiles, P.tiles.size() * sizeof(Tile) + 16));
  CK(cudaMalloc(&P.dnum, 4));
  init_kernel<<<1024, 256>>>(P.dx, (int64_t)P.T * P.H, seed * 2 + 1);
  init_kernel<<<4096, 256>>>(P.dW, (int64_t)P.E * P.N * P.H, seed * 2 + 2);
  CK(cudaGetLastError());
  CK(cudaMemcpy(P.dsorted, P.sorted.data(), P.R * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.drow_expert, P.row_expert.data(), P.R * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.dtiles, P.tiles.data(), P.tiles.size() * sizeof(Tile), cudaMemcpyHostToDevice));
  int nt = (int)P.tiles.size();
  CK(cudaMemcpy(P.dnum, &nt, 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&P.dptiles, P.ptiles.size() * sizeof(Tile) + 16));
  CK(cudaMalloc(&P.dpnum, 4));
  CK(cudaMemcpy(P.dptiles, P.ptiles.data(), P.ptiles.size() * sizeof(Tile), cudaMemcpyHostToDevice));
  int np = (int)P.ptiles.size() / 2;
  CK(cudaMemcpy(P.dpnum, &np, 4, cudaMemcpyHostToDevice));
}

static void free_problem(Problem &P) {
  cudaFree(P.dx); cudaFree(P.dW); cudaFree(P.dout); cudaFree(P.da); cudaFree(P.dref); cudaFree(P.dsorted);
  cudaFree(P.drow_expert); cudaFree(P.dtiles); cudaFree(P.dnum);
  cudaFree(P.dptiles); cudaFree(P.dpnum);
}

// GPU fp32 reference, then float64 CPU check of `nsample` rows of it (values are recomputed
// on the host from init_val, so no copy of W is needed).
static bool reference(Problem &P, int nsample, uint32_t seed) {
  std::vector<Tile> rt;
  for (int e = 0; e < P.E; ++e)
    for (int r = P.offsets[e]; r < P.offsets[e + 1]; r += 64) rt.push_back({e, r, std::min(r + 64, P.offsets[e + 1]), 0});
  Tile *drt;
  CK(cudaMalloc(&drt, rt.size() * sizeof(Tile)));
  CK(cudaMemcpy(drt, rt.data(), rt.size() * sizeof(Tile), cudaMemcpyHostToDevice));
  dim3 grid(P.N / 64, (unsigned)rt.size());
  ref_kernel<<<grid, 256>>>(P.dx, P.dW, P.dsorted, P.k, drt, P.H, P.N, P.dref);
  CK(cudaGetLastError());
  CK(cudaFree(drt));
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::mt19937 rng(seed + 7);
  std::vector<float> row(P.N);
  std::vector<double> xr(P.H);
  double maxerr = 0;
  for (int s = 0; s < nsample; ++s) {
    int r = (s == 0) ? 0 : (s == 1 ? P.R - 1 : rng() % P.R);
    CK(cudaMemcpy(row.data(), P.dref + (int64_t)r * P.N, P.N * 4, cudaMemcpyDeviceToHost));
    int tok = P.sorted[r] / P.k, e = P.row_expert[r];
    for (int h = 0; h < P.H; ++h) xr[h] = init_val(seed * 2 + 1, (uint64_t)tok * P.H + h);
    for (int n = 0; n < P.N; ++n) {
      double acc = 0;
      uint64_t base = ((uint64_t)e * P.N + n) * P.H;
      for (int h = 0; h < P.H; ++h) acc += xr[h] * init_val(seed * 2 + 2, base + h);
      maxerr = std::max(maxerr, std::fabs(acc - row[n]) / (std::fabs(acc) + 1.0));
    }
  }
  printf("  GPU fp32 reference vs CPU float64 (%d rows): max err %.2e %s\n", nsample, maxerr,
         maxerr < 1e-4 ? "ok" : "FAIL");
  return maxerr < 1e-4;
}

struct Variant {
  int id;
  const char *name;
  int BN, threads;
  int box_rows, grid;  // TMA box rows of B; grid (0: #SMs)
  size_t smem;
  void (*launch)(const CUtensorMap &, Problem &, int grid, size_t smem, int threads);
  bool swiglu = false;
};

template <int BN, int NWG, int MI, int S>
static void launch_simple(const CUtensorMap &m, Problem &P, int grid, size_t smem, int threads) {
  gemm1_simple<BN, NWG, MI, S><<<grid, threads, smem>>>(m, P.dx, P.dsorted, P.k, P.dtiles, P.dnum,
                                                        P.dout, P.H, P.N);
}
template <int BN, int NC, int S, bool SW, bool ST>
static void launch_ws(const CUtensorMap &m, Problem &P, int grid, size_t smem, int threads) {
  gemm1_ws<BN, NC, S, SW, ST><<<grid, threads, smem>>>(m, P.dx, P.dsorted, P.k, P.dtiles, P.dnum,
                                                   P.dout, P.da, P.H, P.N);
}
template <int BN, int NWG, int MI, int S>
static Variant mk_simple(int id, const char *name) {
  size_t smem = 1024 + S * (64 * NWG * MI * BK * 2 + BN * BK * 2) + 8 * S;
  CK(cudaFuncSetAttribute(gemm1_simple<BN, NWG, MI, S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          (int)smem));
  return {id, name, BN, 128 * NWG, BN, 0, smem, launch_simple<BN, NWG, MI, S>};
}
template <int BN, int NC, int S, bool SW, bool ST = false>
static Variant mk_ws(int id, const char *name) {
  size_t smem = 1024 + S * (64 * NC * BK * 2 + BN * BK * 2) + 16 * S;
  if (ST) smem += 1024 + 64 * NC * (BN * 2 + 16);
  CK(cudaFuncSetAttribute(gemm1_ws<BN, NC, S, SW, ST>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  return {id, name, BN, 128 * (NC + 1), SW ? BN / 2 : BN, 0, smem, launch_ws<BN, NC, S, SW, ST>, SW};
}
template <int BN, int NC, int S, bool SW>
static void launch_ws_mc(const CUtensorMap &m, Problem &P, int grid, size_t smem, int threads) {
  gemm1_ws_mc<BN, NC, S, SW><<<grid, threads, smem>>>(m, P.dx, P.dsorted, P.k, P.dptiles, P.dpnum,
                                                      P.dout, P.da, P.H, P.N);
}
template <int BN, int NC, int S, bool SW>
static Variant mk_ws_mc(int id, const char *name, int nsm) {
  size_t smem = 1024 + S * (64 * NC * BK * 2 + BN * BK * 2) + 16 * S;
  CK(cudaFuncSetAttribute(gemm1_ws_mc<BN, NC, S, SW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(nsm);
  cfg.blockDim = dim3(128 * (NC + 1));
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 2; attr.val.clusterDim.y = 1; attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int ncl = 0;
  CK(cudaOccupancyMaxActiveClusters(&ncl, gemm1_ws_mc<BN, NC, S, SW>, &cfg));
  printf("%s: max active 2-CTA clusters %d\n", name, ncl);
  if (ncl < 1) ncl = nsm / 2;
  return {id, name, BN, 128 * (NC + 1), BN / 2, 2 * std::min(ncl, nsm / 2), smem, launch_ws_mc<BN, NC, S, SW>, SW};
}

int main(int argc, char **argv) {
  std::string which = argc > 1 ? argv[1] : "1,2,3,4,5,6,7,8,9";
  int reps = argc > 2 ? atoi(argv[2]) : 20;
  std::string case_mask = argc > 3 ? argv[3] : "012";
  int dev = 0;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  printf("device %s, %d SMs, smem/block optin %zu\n", prop.name, prop.multiProcessorCount,
         prop.sharedMemPerBlockOptin);
  std::vector<Variant> all = {
      mk_simple<128, 1, 2, 6>(1, "v1 1WG 2xm64n128 S6"),
      mk_simple<128, 2, 1, 6>(2, "v2 2WG m64n128 S6"),
      mk_simple<256, 2, 1, 4>(3, "v3 2WG m64n256 S4"),
      mk_ws<256, 2, 4, false>(4, "v4 WS 1P+2C m64n256 S4"),
      mk_ws_mc<256, 2, 4, false>(5, "v5 v4 + 2-CTA B multicast", prop.multiProcessorCount),
      mk_ws_mc<256, 2, 4, true>(6, "v6 v5 + SwiGLU epilogue", prop.multiProcessorCount),
      mk_ws<256, 2, 4, true>(7, "v7 v4 + SwiGLU epilogue"),
      mk_ws<256, 2, 3, false, true>(8, "v8 v4 S3 + staged bulk store"),
      mk_ws<256, 2, 3, true, true>(9, "v9 v8 + SwiGLU epilogue"),
  };
  std::vector<Variant> vs;
  for (auto &v : all)
    if (which.find(std::to_string(v.id)) != std::string::npos) vs.push_back(v);

  struct Case { const char *name; int T, H, I, E, k; std::vector<int> empty; int nsample; bool bench; };
  std::vector<Case> cases = {
      {"ragged T=333 H=512 I=256 E=16 k=4 (experts 0,3,7,8,15 empty)", 333, 512, 256, 16, 4, {0, 3, 7, 8, 15}, 1 << 30, false},
      {"Qwen3-30B-A3B T=4096", 4096, 2048, 768, 128, 8, {}, 48, true},
      {"Qwen3-30B-A3B T=16384", 16384, 2048, 768, 128, 8, {}, 48, true},
  };
  std::vector<std::string> table;
  double *dacc;
  unsigned long long *dbad;
  CK(cudaMalloc(&dacc, 3 * sizeof(double)));
  CK(cudaMalloc(&dbad, 8));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  int ci = 0;
  for (auto &c : cases) {
    if (case_mask.find(std::to_string(ci)) == std::string::npos) { ++ci; continue; }
    Problem P{};
    P.T = c.T; P.H = c.H; P.I = c.I; P.E = c.E; P.k = c.k;
    uint32_t seed = 1234 + 17 * ci++;
    build_problem(P, seed, c.empty, 128);
    int nempty = 0, nonmult = 0;
    for (int e = 0; e < P.E; ++e) {
      int n = P.offsets[e + 1] - P.offsets[e];
      nempty += n == 0;
      nonmult += n % 128 != 0;
    }
    printf("case %s: rows %d, tiles %zu (pairs for v5 %zu), empty experts %d, segments not a multiple of 128: %d\n",
           c.name, P.R, P.tiles.size(), P.ptiles.size() / 2, nempty, nonmult);
    int ns = std::min(c.nsample, P.R);
    if (!reference(P, ns, seed)) printf("  REFERENCE FAILED\n");
    double flop = 2.0 * P.R * P.N * P.H;
    for (auto &v : vs) {
      CUtensorMap m = make_map(P.dW, (int64_t)P.E * P.N, P.H, v.box_rows);
      int grid = v.grid ? v.grid : prop.multiProcessorCount;
      bool ok = true;
      double rel = 0, maxe = 0;
      for (int trial = 0; trial < 2; ++trial) {  // poison (NaN), run, check every element; twice
        CK(cudaMemset(P.dout, 0xFF, (size_t)P.R * P.N * 2));
        CK(cudaMemset(P.da, 0xFF, (size_t)P.R * P.I * 2));
        v.launch(m, P, grid, v.smem, v.threads);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        CK(cudaMemset(dacc, 0, 24));
        CK(cudaMemset(dbad, 0, 8));
        check_kernel<<<512, 256>>>(P.dout, P.dref, (int64_t)P.R * P.N, dacc, dbad);
        CK(cudaDeviceSynchronize());
        double h[3];
        unsigned long long bad;
        CK(cudaMemcpy(h, dacc, 24, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(&bad, dbad, 8, cudaMemcpyDeviceToHost));
        rel = std::sqrt(h[0] / h[1]);
        maxe = h[2];
        bool pass = bad == 0 && rel < 5e-3;
        if (v.swiglu) {
          CK(cudaMemset(dacc, 0, 24));
          CK(cudaMemset(dbad, 0, 8));
          check_swiglu_kernel<<<512, 256>>>(P.da, P.dref, P.R, P.I, dacc, dbad);
          CK(cudaDeviceSynchronize());
          double ha[3];
          unsigned long long bada;
          CK(cudaMemcpy(ha, dacc, 24, cudaMemcpyDeviceToHost));
          CK(cudaMemcpy(&bada, dbad, 8, cudaMemcpyDeviceToHost));
          double rela = std::sqrt(ha[0] / ha[1]);
          printf("  %-26s trial %d: a=silu(g)*u rel err %.3e, max abs err %.3e, unwritten/NaN %llu\n",
                 v.name, trial, rela, ha[2], bada);
          pass = pass && bada == 0 && rela < 5e-3;
        }
        printf("  %-26s trial %d: rel err %.3e, max abs err %.3e, unwritten/NaN %llu -> %s\n",
               v.name, trial, rel, maxe, bad, pass ? "PASS" : "FAIL");
        ok = ok && pass;
      }
      if (c.bench) {
        for (int i = 0; i < 3; ++i) v.launch(m, P, grid, v.smem, v.threads);
        std::vector<float> ts;
        for (int i = 0; i < reps; ++i) {
          CK(cudaEventRecord(e0));
          v.launch(m, P, grid, v.smem, v.threads);
          CK(cudaEventRecord(e1));
          CK(cudaEventSynchronize(e1));
          float ms;
          CK(cudaEventElapsedTime(&ms, e0, e1));
          ts.push_back(ms);
        }
        CK(cudaGetLastError());
        std::sort(ts.begin(), ts.end());
        float med = ts[ts.size() / 2];
        char buf[256];
        snprintf(buf, sizeof buf, "| %s | %s | %s | %.3f ms (min %.3f) | %.0f TF/s |", c.name, v.name,
                 ok ? "PASS" : "FAIL", med, ts[0], flop / med / 1e9);
        table.push_back(buf);
      }
    }
    free_problem(P);
  }
  printf("\n| case | variant | valid | median | TFLOP/s |\n|---|---|---|---|---|\n");
  for (auto &s : table) printf("%s\n", s.c_str());
  return 0;
}
