// Shared device helpers of the CUDA backend (sm80+): dtype traits, cp.async,
// ldmatrix, mma.sync m16n8k16, workspace carving, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/errors.h"
#include "moe_fused.h"

// Column tile of the tensor-core GEMMs: 128 (8 warps, 2 CTAs/SM; default,
// measured 1-5% faster on H100) or 256 (16 warps, 1 CTA/SM, 25% less L2 traffic
// per FLOP, no faster in practice). Compile-time choice (-DMOE_GEMM_BN=256).
#ifndef MOE_GEMM_BN
#define MOE_GEMM_BN 128
#endif

namespace moe {
namespace cuda {

// ---- host side --------------------------------------------------------------

constexpr size_t kWsAlign = 256;
inline size_t ws_align(size_t v) { return (v + kWsAlign - 1) / kWsAlign * kWsAlign; }

// Carves 256-byte aligned sub-buffers from the caller's workspace; with a
// null base it only measures (the *_workspace_size queries share the layout).
class WsArena {
 public:
  explicit WsArena(void *base) : base_(static_cast<char *>(base)) {
    if (base_) {
      uintptr_t p = reinterpret_cast<uintptr_t>(base_);
      base_ = reinterpret_cast<char *>((p + kWsAlign - 1) / kWsAlign * kWsAlign);
    }
  }
  template <class T> T *take(int64_t n) {
    const size_t bytes = ws_align(size_t(n > 0 ? n : 0) * sizeof(T));
    T *p = base_ ? reinterpret_cast<T *>(base_ + used_) : nullptr;
    used_ += bytes;
    return p;
  }
  size_t required() const { return used_ ? used_ + kWsAlign : 0; }

 private:
  char *base_;
  size_t used_ = 0;
};

inline cudaStream_t stream_of(const moe_context_t &ctx) {
  return static_cast<cudaStream_t>(ctx.stream);
}

// Makes ctx.device_index current for the scope of a call, restoring the
// caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != dev) {
      ok_ = cudaSetDevice(dev) == cudaSuccess;
      switched_ = ok_;
    }
  }
  ~DeviceGuard() {
    if (switched_ && prev_ >= 0) cudaSetDevice(prev_);
  }
  bool ok() const { return ok_; }

 private:
  int prev_ = -1;
  bool ok_ = true, switched_ = false;
};

// Status of the launches enqueued so far (MOE_ERR_CUDA with the message).
inline moe_status_t launch_status(const char *what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return set_error(MOE_ERR_CUDA, "%s: CUDA error %s (%s)", what, cudaGetErrorName(e),
                     cudaGetErrorString(e));
  return MOE_OK;
}

// Raises a kernel's dynamic shared-memory limit once per device (so that calls
// made later, e.g. under CUDA-graph capture, make no attribute call at all).
template <class K> inline cudaError_t ensure_smem(K kernel, size_t bytes, uint64_t *done_mask) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit && (__atomic_load_n(done_mask, __ATOMIC_ACQUIRE) & bit)) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e == cudaSuccess && bit) __atomic_fetch_or(done_mask, bit, __ATOMIC_RELEASE);
  return e;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Inner stride 1 (or a size-1 last dim): what every CUDA operand needs.
inline bool inner_contiguous(const moe_tensor_t &t) {
  return t.ndim == 0 || t.shape[t.ndim - 1] <= 1 || t.strides[t.ndim - 1] == 1;
}

// ---- device side ------------------------------------------------------------

template <class T> struct DT;
template <> struct DT<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16(v); }
  static constexpr bool is_bf16 = true;
};
template <> struct DT<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half(v); }
  static constexpr bool is_bf16 = false;
};

// Routing-weight load: float32 (dtype 0), float16 (1) or bfloat16 (2).
__device__ __forceinline__ float load_weight(const void *p, int dtype, int64_t off) {
  if (dtype == MOE_DTYPE_F32) return static_cast<const float *>(p)[off];
  if (dtype == MOE_DTYPE_F16) return __half2float(static_cast<const __half *>(p)[off]);
  return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[off]);
}
// The routing-weight gradient in the dtype of the weights (the inverse of load_weight).
__device__ __forceinline__ void store_weight(void *p, int dtype, int64_t off, float v) {
  if (dtype == MOE_DTYPE_F32)
    static_cast<float *>(p)[off] = v;
  else if (dtype == MOE_DTYPE_F16)
    static_cast<__half *>(p)[off] = __float2half(v);
  else
    static_cast<__nv_bfloat16 *>(p)[off] = __float2bfloat16(v);
}

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes 0 fills the 16 bytes with zeros
// (no global read happens).
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The approximate division has no slow path (an IEEE x / y branches around a subnormal
// fix-up: a call per element in the epilogues), and 1 / inf = 0 keeps the g -> -inf limit.
__device__ __forceinline__ float sigmoid_f(float g) { return __fdividef(1.f, 1.f + __expf(-g)); }
__device__ __forceinline__ float silu_f(float g) { return g * sigmoid_f(g); }

// Eight consecutive elements <-> floats (16-byte vector when `vec`).
template <class T>
__device__ __forceinline__ void load8(float (&v)[8], const T *p, int n, bool vec) {
  if (vec && n >= 8) {
    uint4 raw = *reinterpret_cast<const uint4 *>(p);
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = DT<T>::to_f(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = i < n ? DT<T>::to_f(p[i]) : 0.f;
  }
}
template <class T>
__device__ __forceinline__ void store8(T *p, const float (&v)[8], int n, bool vec) {
  if (vec && n >= 8) {
    uint4 raw;
    T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = DT<T>::from_f(v[i]);
    *reinterpret_cast<uint4 *>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < n) p[i] = DT<T>::from_f(v[i]);
  }
}

// A device-side tile of a grouped (per-expert row segment) GEMM.
struct Tile {
  int32_t expert;
  int32_t row0;  // first plan row of the tile
  int32_t row1;  // one past the segment's last row (the tile covers [row0, min(row0+BM, row1)))
  int32_t delta;  // EPI_STORE writes plan row r to C row r + delta (token windows; else 0)
};

// Upper bound of the number of BM-row tiles over E segments of n rows in all.
inline int64_t max_tiles(int64_t n, int64_t E, int BM) { return n / BM + E + 1; }

}  // namespace cuda
}  // namespace moe
