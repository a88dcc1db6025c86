// Programmatic dependent launch (PDL, sm90 and later): a kernel launched with it may be
// scheduled while the previous kernel on the stream is still running, so its launch and
// prologue (barrier set-up, descriptor prefetch) hide behind that kernel's last wave instead
// of following it. The rule that keeps it correct: every kernel the library launches with
// PDL calls pdl_wait() in each thread before that thread touches global memory an earlier
// kernel may write or read (the wait returns once the previous grid has finished and its
// writes are visible), and pdl_release() only after it, so a kernel never lets its
// dependent start before it has itself waited (which keeps the chain transitive).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace moe {
namespace cuda {

#if defined(__CUDACC__)
// Both are no-ops in a kernel not launched with PDL, and compiled out below sm90 (where
// pdl_enabled never asks for PDL: those images have no wait).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Lets the next kernel on the stream be scheduled once every CTA of this grid has called it
// (or exited); its own pdl_wait still waits for this whole grid.
__device__ __forceinline__ void pdl_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif  // __CUDACC__

// Whether this call's kernels are launched with PDL: the current device is sm90 or later,
// the library's image for it was compiled for sm90 or later (a PTX JIT of an older arch has
// no wait in it), and neither MOE_FLAG_NO_PDL in `flags` nor MOE_FUSED_PDL=0 turns it off.
// The device check runs once per device; the environment is read at every call.
bool pdl_enabled(uint64_t flags);

// Where a launcher enqueues: the stream, and whether with PDL (pdl_enabled for the call).
// Converts to the stream, so code that launches without PDL takes it as one.
struct Launch {
  cudaStream_t stream;
  bool pdl;
  operator cudaStream_t() const { return stream; }
};

// Launches `kernel` on `stream`: grid x block threads, `smem` bytes of dynamic shared
// memory, in clusters of `cluster` CTAs along x (1: no cluster), with PDL when `pdl`.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, bool pdl, unsigned cluster, Args &&...args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute at[2]{};
  unsigned n = 0;
  if (cluster > 1) {
    at[n].id = cudaLaunchAttributeClusterDimension;
    at[n].val.clusterDim.x = cluster;
    at[n].val.clusterDim.y = 1;
    at[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = at;
  cfg.numAttrs = n;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// The small kernels' case: no dynamic shared memory, no cluster, the call's Launch.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, Launch l, Args &&...args) {
  launch_kernel(kernel, grid, block, 0, l.stream, l.pdl, 1, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace moe
