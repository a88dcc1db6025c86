// sm90a epilogue helpers shared by the row GEMMs and the weight-gradient GEMMs: a
// warpgroup's 64 x 128 fp32 fragment goes through a swizzled smem pass buffer to 16-byte row
// stores (coalesced, issued by every thread). Per-row bulk copies (cp.async.bulk) take
// uniform operands, so a warp's 32 different rows became a 32-iteration loop (ncu: 17% of
// the dW1 kernel's samples at T=4096).
#pragma once

#include "cuda/common.cuh"
#include "cuda/sm90_ptx.cuh"

namespace moe {
namespace cuda {
namespace sm90 {

// Staging of the stores: a warpgroup's 64 rows x 128 columns (one pass of its epilogue),
// 16-byte chunks XOR-swizzled within each row's groups of eight (conflict-free both for the
// fragment's 4-byte writes and the rows' 16-byte reads), 16 KB a warpgroup.
constexpr uint32_t kPassRow = 128 * 2, kPassBytes = 64 * kPassRow;
// MOE_SM90_STMATRIX=1: fragments go to smem by stmatrix (four 8 x 8 tiles, 16-byte rows, an
// instruction) instead of 4-byte st.shared: 8 instructions a thread a pass instead of 32
// (the wgrad's transposed pass: 8 stmatrix.trans instead of 64 2-byte stores). H100 A/B
// (session 10, five rounds against an identical build, which stayed within 1.2%): without
// it dW1 is 3-6% slower and dW2 2%; dA', dX and GEMM2 are within the noise. GEMM1 lost with
// it in the first A/B (T=4096 +2%, 235B +4%; its build spills 28 bytes), so it has its own
// knob, MOE_SM90_STMATRIX_GEMM1, off.
#ifndef MOE_SM90_STMATRIX
#define MOE_SM90_STMATRIX 1
#endif
#ifndef MOE_SM90_STMATRIX_GEMM1
#define MOE_SM90_STMATRIX_GEMM1 0
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Two floats -> two rounded elements packed in 32 bits (the rounding of DT<T>::from_f).
template <class T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = DT<T>::from_f(lo), b = DT<T>::from_f(hi);
  return uint32_t(reinterpret_cast<const uint16_t &>(a)) |
         (uint32_t(reinterpret_cast<const uint16_t &>(b)) << 16);
}
// A pack2 word back as its two floats (exact).
template <class T> __device__ __forceinline__ void unpack2(uint32_t v, float &lo, float &hi) {
  const uint16_t l = uint16_t(v & 0xFFFF), h = uint16_t(v >> 16);
  lo = DT<T>::to_f(reinterpret_cast<const T &>(l));
  hi = DT<T>::to_f(reinterpret_cast<const T &>(h));
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 q;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(q.x), "=r"(q.y), "=r"(q.z), "=r"(q.w)
               : "r"(addr));
  return q;
}
// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a pass buffer (kPassRow rows).
__device__ __forceinline__ uint32_t pass_off(int row, int chunk) {
  return uint32_t(row) * kPassRow + uint32_t((chunk & 8) | ((chunk ^ row) & 7)) * 16;
}
// A warpgroup's fragment (values v(j, hh, i) of local row lr = 16 warp + lane / 4 + 8 hh,
// columns 8 j + 2 (lane & 3) + i, j < 16) into `buf`: 16-byte chunk j of row lr at off(lr, j).
template <class T, bool Stm = (MOE_SM90_STMATRIX != 0), class Val, class Off>
__device__ __forceinline__ void write_fragment(uint32_t buf, int tid_wg, Val v, Off off) {
  const int warp = tid_wg >> 5, lane = tid_wg & 31;
  if constexpr (Stm) {
    // Tile q of an instruction (this lane's address: row r = lane % 8 of it) is the 8 x 8
    // (fragment row half hh = q & 1, chunk j = jp + q / 2): row lr's chunk j is 16 bytes.
    const int q = lane >> 3, lr = warp * 16 + (q & 1) * 8 + (lane & 7);
    auto pk = [&](int j, int hh) { return pack2<T>(v(j, hh, 0), v(j, hh, 1)); };
#pragma unroll
    for (int jp = 0; jp < 16; jp += 2)
      stmatrix_x4(buf + off(lr, jp + (q >> 1)), pk(jp, 0), pk(jp, 1), pk(jp + 1, 0), pk(jp + 1, 1));
  } else {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int lr = warp * 16 + (lane >> 2) + hh * 8;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        sts32(buf + off(lr, j) + (lane & 3) * 4, pack2<T>(v(j, hh, 0), v(j, hh, 1)));
    }
  }
}
// One epilogue pass of a warpgroup: its fragment's 64 rows x 128 columns, values v(j, hh, i)
// for columns 8 j + 2 (lane & 3) + i of fragment row hh, through the swizzled buffer `buf` to
// dst(lr, m) (the global row of local row lr = tid_wg / 16 + 8 m, nullptr: not stored), 16
// bytes a thread a row.
// The barriers keep the buffer's previous readers before the writes and the writes before
// the reads.
template <class T, bool Stm = (MOE_SM90_STMATRIX != 0), class Val, class Dst>
__device__ __forceinline__ void store_pass(uint32_t buf, int bar, int tid_wg, Val v, Dst dst) {
  named_bar(bar, 128);
  write_fragment<T, Stm>(buf, tid_wg, v, pass_off);
  named_bar(bar, 128);
  const int chunk = tid_wg & 15;
#pragma unroll
  for (int m = 0; m < 8; ++m) {
    const int lr = (tid_wg >> 4) + 8 * m;
    T *d = dst(lr, m);
    if (d != nullptr) *reinterpret_cast<uint4 *>(d + chunk * 8) = lds128(buf + pass_off(lr, chunk));
  }
}
// A pass that leaves by TMA bulk tensor stores: write() fills `buf` in the tensor map's
// 128-byte swizzle, then thread 0 issues the stores (issue()) as one bulk group, which drains
// while the warpgroup goes on. The buffer is reused only after the previous group's smem
// reads: thread 0 waits for them before the first barrier (so must a thread pass that follows
// one of these in the same buffer, and the kernel must wait for the last group before exit).
template <class Write, class Issue>
__device__ __forceinline__ void tma_pass(int bar, int tid_wg, Write write, Issue issue) {
  if (tid_wg == 0) bulk_wait_read0();
  named_bar(bar, 128);
  write();
  fence_proxy_async();  // the generic-proxy writes, before the TMA (async proxy) reads them
  named_bar(bar, 128);
  if (tid_wg == 0) {
    issue();
    bulk_commit();
  }
}
// store_pass's 64 rows x 128 columns as two {64, 64} boxes (8 KB each; the fragment's writes
// conflict-free, as pass_off): issue(src, dc) stores the box at src, columns dc..dc + 63.
template <class T, bool Stm = (MOE_SM90_STMATRIX != 0), class Val, class Issue>
__device__ __forceinline__ void store_pass_tma(uint32_t buf, int bar, int tid_wg, Val v,
                                               Issue issue) {
  tma_pass(
      bar, tid_wg,
      [&] {
        write_fragment<T, Stm>(buf, tid_wg, v, [](int lr, int j) {
          return uint32_t(j >> 3) * 8192 + uint32_t(lr) * 128 + uint32_t(((j & 7) ^ (lr & 7)) << 4);
        });
      },
      [&] {
        issue(buf, 0);
        issue(buf + 8192, 64);
      });
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace sm90
}  // namespace cuda
}  // namespace moe
