// Host side of programmatic dependent launch (pdl.h): which devices get it.
#include "cuda/pdl.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "moe_fused.h"

namespace moe {
namespace cuda {
namespace {

// Compiled like every kernel of the library: its image for a device tells which arch the
// library's kernels there were compiled for.
__global__ void pdl_probe() {}

std::atomic<int> g_state[64];  // per device: 0 unknown, 1 PDL usable, 2 not

bool device_supports_pdl() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return false;
  }
  int s = g_state[dev].load(std::memory_order_acquire);
  if (s == 0) {
    int major = 0;
    cudaFuncAttributes fa{};
    const bool ok =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        major >= 9 && cudaFuncGetAttributes(&fa, pdl_probe) == cudaSuccess && fa.ptxVersion >= 90;
    if (!ok) cudaGetLastError();
    s = ok ? 1 : 2;
    g_state[dev].store(s, std::memory_order_release);
  }
  return s == 1;
}

}  // namespace

bool pdl_enabled(uint64_t flags) {
  if (flags & MOE_FLAG_NO_PDL) return false;
  const char *v = std::getenv("MOE_FUSED_PDL");
  if (v && std::strcmp(v, "0") == 0) return false;
  return device_supports_pdl();
}

}  // namespace cuda
}  // namespace moe
