// The tensor-core mainloop shared by grouped_gemm.cu and wgrad.cu:
// 128 x BN x 64 CTA tile (BN = MOE_GEMM_BN: 128 by default, 256 selectable),
// 2 x BN/32 warps of 64x32 each, mma.sync m16n8k16 (bf16/fp16 in, fp32
// accumulate), ldmatrix(.trans), a 3-stage cp.async pipeline with padded
// (conflict-free) shared-memory rows. BN=256: 512 threads, 166 KB smem, 1 CTA/SM;
// BN=128: 256 threads, 110.6 KB, 2 CTAs/SM. The larger tile moves 25% fewer
// bytes from L2 per FLOP (ncu: 128x128 ran at 80% of L2 throughput) but lost the
// epilogue/mainloop overlap of two CTAs per SM: no faster on H100.
// Operand loading is separate from the MMA loop (loaders fill smem tiles) so that
// other sources (LoRA K blocks, NF4 dequantisation) can replace it.
#pragma once

#include "cuda/common.cuh"

namespace moe {
namespace cuda {
namespace core {

constexpr int BM = 128, BN = MOE_GEMM_BN, BK = 64, STAGES = 3;
constexpr int WARPS_N = BN / 32;             // warps along N (32 columns each)
constexpr int THREADS = 32 * 2 * WARPS_N;    // 2 warps along M (64 rows each)
constexpr int WTN = 32;                      // warp tile columns
constexpr int NI = WTN / 8;                  // n8 fragments per warp
constexpr int MIN_BLOCKS = BN == 128 ? 2 : 1;
constexpr int PAD = 8;                       // halfs of padding per smem row
constexpr int ST_K = BK + PAD;               // [rows][BK] tiles (K contiguous)
constexpr int ST_MA = BM + PAD;              // [BK][BM] A tiles (M contiguous)
constexpr int ST_NB = BN + PAD;              // [BK][BN] B tiles (N contiguous)
constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int A_ELEMS = cmax(BM * ST_K, BK * ST_MA);
constexpr int B_ELEMS = cmax(BN * ST_K, BK * ST_NB);
constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS;
constexpr int CS_ST = BN + 4;                // fp32 epilogue staging row stride
constexpr size_t kPipeBytes = size_t(STAGES) * STAGE_ELEMS * 2;
constexpr size_t kStageBytes = size_t(BM) * CS_ST * 4;
constexpr size_t kSmemBytes = kPipeBytes > kStageBytes ? kPipeBytes : kStageBytes;
// 16-byte chunks: [rows][BK] tiles have BK/8 = 8 per row; [BK][cols] tiles cols/8.
constexpr int A_ROW_IT = BM * BK / 8 / THREADS;  // [BM][BK] A tile
constexpr int B_ROW_IT = BN * BK / 8 / THREADS;  // [BN][BK] B tile
constexpr int A_COL_TPR = BM / 8;                // [BK][BM] A tile: threads per k row
constexpr int A_COL_IT = BK * A_COL_TPR / THREADS;
constexpr int B_COL_TPR = BN / 8;                // [BK][BN] B tile
constexpr int B_COL_IT = BK * B_COL_TPR / THREADS;
static_assert(A_ROW_IT >= 1 && B_ROW_IT >= 1 && A_COL_IT >= 1 && B_COL_IT >= 1, "tile/threads");

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
        ldmatrix_x4_trans(a[mi], As + kr * ST_MA + m);
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
        ldmatrix_x4_trans(r, Bs + kr * ST_NB + n);
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
