// The tensor-core mainloop shared by grouped_gemm.cu and wgrad.cu:
// 128x128x64 CTA tile, MOE_GEMM_WARPS warps (8: 2 x 4 warps of 64x32, the
// default, measured faster on H100; 4: 2 x 2 warps of 64x64), mma.sync m16n8k16
// (bf16/fp16 in, fp32 accumulate), ldmatrix, a 3-stage cp.async pipeline
// (110.6 KB of shared memory: 2 CTAs per SM on sm80/sm90).
// Operand loading is a separate "loader" object per operand so that other
// sources (LoRA K blocks, NF4 dequantisation) can replace it.
#pragma once

#include "cuda/common.cuh"

namespace moe {
namespace cuda {
namespace core {

#ifndef MOE_GEMM_WARPS
#define MOE_GEMM_WARPS 8
#endif
constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 32 * MOE_GEMM_WARPS;
constexpr int WARPS_N = MOE_GEMM_WARPS / 2;  // 2 warps along M (64 rows each)
constexpr int WTN = BN / WARPS_N;            // warp tile columns: 64 or 32
constexpr int NI = WTN / 8;                  // n8 fragments per warp
constexpr int LD_ITERS = BM * BK / 8 / THREADS;  // 16-byte chunks per thread per operand tile
constexpr int MIN_BLOCKS = MOE_GEMM_WARPS == 4 ? 2 : 2;
constexpr int PAD = 8;          // halfs of padding per smem row (conflict-free ldmatrix)
constexpr int ST_K = BK + PAD;  // row stride of a [rows][BK] tile (K contiguous)
constexpr int ST_MN = BM + PAD; // row stride of a [BK][cols] tile (M/N contiguous), BM == BN
constexpr int TILE_ELEMS_K = BM * ST_K;    // [128][72]
constexpr int TILE_ELEMS_MN = BK * ST_MN;  // [64][136]
constexpr int CS_ST = BN + 4;              // fp32 epilogue staging row stride
constexpr int kMaxTileElems = TILE_ELEMS_K > TILE_ELEMS_MN ? TILE_ELEMS_K : TILE_ELEMS_MN;
constexpr size_t kPipeBytes = size_t(STAGES) * 2 * kMaxTileElems * 2;
constexpr size_t kStageBytes = size_t(BM) * CS_ST * 4;
constexpr size_t kSmemBytes = kPipeBytes > kStageBytes ? kPipeBytes : kStageBytes;

// Accumulators of one thread: warp tile 64 x WTN = 4 (m16) x NI (n8) fragments.
struct Acc {
  float v[4][NI][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) v[i][j][q] = 0.f;
  }
};

// One k-tile of MMAs from smem tiles As and Bs.
// A_KM: A stored [BK][BM] (M contiguous) else [BM][BK]; B_KN: B stored [BK][BN] else [BN][BK].
template <class T, bool A_KM, bool B_KN>
__device__ __forceinline__ void mma_tile(Acc &acc, const T *As, const T *Bs, int wm, int wn,
                                         int lane) {
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    uint32_t a[4][4], b[NI][2];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      if (!A_KM) {
        const int row = wm * 64 + mi * 16 + (lane & 15);
        const int col = kk * 16 + (lane >> 4) * 8;
        ldmatrix_x4(a[mi], As + row * ST_K + col);
      } else {
        const int kr = kk * 16 + (lane >> 4) * 8 + (lane & 7);
        const int m = wm * 64 + mi * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(a[mi], As + kr * ST_MN + m);
      }
    }
#pragma unroll
    for (int nj = 0; nj < NI / 2; ++nj) {
      uint32_t r[4];
      if (!B_KN) {
        const int n = wn * WTN + nj * 16 + (lane >> 4) * 8 + (lane & 7);
        const int kc = kk * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(r, Bs + n * ST_K + kc);
      } else {
        const int kr = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int n = wn * WTN + nj * 16 + (lane >> 4) * 8;
        ldmatrix_x4_trans(r, Bs + kr * ST_MN + n);
      }
      b[2 * nj][0] = r[0];
      b[2 * nj][1] = r[1];
      b[2 * nj + 1][0] = r[2];
      b[2 * nj + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) mma16816<T>(acc.v[mi][ni], a[mi], b[ni]);
  }
}

// Writes the accumulators to the fp32 staging tile Cs[BM][CS_ST].
__device__ __forceinline__ void stage_acc(const Acc &acc, float *Cs, int wm, int wn, int lane) {
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int row = wm * 64 + mi * 16 + (lane >> 2);
      const int col = wn * WTN + ni * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2 *>(Cs + row * CS_ST + col) =
          make_float2(acc.v[mi][ni][0], acc.v[mi][ni][1]);
      *reinterpret_cast<float2 *>(Cs + (row + 8) * CS_ST + col) =
          make_float2(acc.v[mi][ni][2], acc.v[mi][ni][3]);
    }
}

// Copies 8 elements (one 16-byte chunk) of a K-contiguous or M/N-contiguous row
// into smem: cp.async when `vec` (whole chunk in range or zero-filled), else a
// guarded scalar copy (n_valid elements, the rest zero). `src` must be a valid
// address even when n_valid <= 0 (callers pass the operand's base then).
template <class T>
__device__ __forceinline__ void load_chunk(T *dst, const T *src, int n_valid, bool vec) {
  if (vec) {
    cp_async16(dst, src, n_valid > 0 ? 16 : 0);
  } else {
    T tmp[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) tmp[i] = i < n_valid ? src[i] : DT<T>::from_f(0.f);
    *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(tmp);
  }
}

}  // namespace core
}  // namespace cuda
}  // namespace moe
