// Host-side helpers of the sm90a kernels (sm90_host.cu): path selection, the per-device
// check that a kernel can run, and 2-D TMA descriptors.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace moe {
namespace cuda {
namespace sm90 {

// One kernel's readiness on each device: 0 unknown, 1 usable, 2 not usable; and, for a
// kernel launched in clusters, how many of its CTAs fit on the device at once (0 unknown).
struct KernelGate {
  std::atomic<int> state[64];
  std::atomic<int> cluster_ctas[64];
};

// Whether `kernel` (a __global__ function of an sm90a .cu file) runs on the current device:
// compute capability 9.0, the library's image for it is the real sm_90a kernel (the real
// kernels declare static shared memory, the stubs compiled for other archs do not), and its
// dynamic shared memory limit raised to `smem` bytes. Checked once per device; *sms is the
// device's SM count.
bool kernel_usable(const void *kernel, size_t smem, KernelGate &gate, int *sms);

// CTAs of `kernel` (already passed by kernel_usable) resident at once when launched in
// clusters of `cluster` CTAs of `threads` threads and `smem` bytes: the largest persistent
// grid. Queried once per device; sms / cluster * cluster if the query fails.
int cluster_grid(const void *kernel, size_t smem, int threads, int cluster, KernelGate &gate, int sms);

// 2-D tensor map of a bf16/f16 matrix [outer][inner] (row pitch row_bytes), box
// {box_inner, box_outer}, 128-byte swizzle (or 64-byte: swizzle_bytes = 64, for boxes 32
// elements wide). False when the driver entry point is missing or the TMA refuses the layout.
bool encode_2d(CUtensorMap *map, bool bf16, const void *ptr, uint64_t inner, uint64_t outer,
               uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer, int swizzle_bytes = 128);
// 3-D tensor map of a stack of such matrices ([depth][outer][inner], matrix pitch
// matrix_bytes), box {box_inner, box_outer, 1}, 128-byte swizzle.
bool encode_3d(CUtensorMap *map, bool bf16, const void *ptr, uint64_t inner, uint64_t outer,
               uint64_t depth, uint64_t row_bytes, uint64_t matrix_bytes, uint32_t box_inner,
               uint32_t box_outer);

inline bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace sm90
}  // namespace cuda
}  // namespace moe
