// Host side of the sm90a path: selection and TMA descriptors (see sm90.h, sm90_host.h).
#include "cuda/sm90_host.h"

#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cuda/sm90.h"

namespace moe {
namespace cuda {
namespace sm90 {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 get_encode() {
  static std::atomic<int> state{0};  // 0 unknown, 1 ok, 2 unavailable
  static std::atomic<void *> fn_ptr{nullptr};
  const int s = state.load(std::memory_order_acquire);
  if (s == 1) return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn_ptr.load());
  if (s == 2) return nullptr;
  void *fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  cudaError_t e =
      cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
  if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !fn) {
    cudaGetLastError();
    state.store(2, std::memory_order_release);
    return nullptr;
  }
  fn_ptr.store(fn);
  state.store(1, std::memory_order_release);
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
}

std::atomic<int> g_sms[64];

bool env_is(const char *name, const char *val) {
  const char *v = std::getenv(name);
  return v && std::strcmp(v, val) == 0;
}

}  // namespace

bool kernel_usable(const void *kernel, size_t smem, KernelGate &gate, int *sms) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (dev < 0 || dev >= 64) return false;
  int s = gate.state[dev].load(std::memory_order_acquire);
  if (s == 0) {
    int major = 0, minor = 0, n = 0;
    bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
              cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
              cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess;
    ok = ok && major == 9 && minor == 0 && n > 0 && get_encode() != nullptr;
    if (ok) {
      cudaFuncAttributes fa{};
      ok = cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.sharedSizeBytes > 0 &&
           fa.binaryVersion >= 90;
    }
    ok = ok && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)) == cudaSuccess;
    if (!ok) cudaGetLastError();
    g_sms[dev].store(n);
    s = ok ? 1 : 2;
    gate.state[dev].store(s, std::memory_order_release);
  }
  *sms = g_sms[dev].load();
  return s == 1;
}

namespace {
bool encode(CUtensorMap *map, bool bf16, const void *ptr, cuuint32_t rank, const cuuint64_t *dims,
            const cuuint64_t *strides, const cuuint32_t *box, int swizzle_bytes) {
  PFN_cuTensorMapEncodeTiled_v12000 enc = get_encode();
  if (!enc) return false;
  std::memset(map, 0, sizeof(*map));
  const cuuint32_t es[3] = {1, 1, 1};
  return enc(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, rank,
             const_cast<void *>(ptr), dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
             swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
}  // namespace

bool encode_2d(CUtensorMap *map, bool bf16, const void *ptr, uint64_t inner, uint64_t outer,
               uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer, int swizzle_bytes) {
  const cuuint64_t dims[2] = {cuuint64_t(inner), cuuint64_t(outer)};
  const cuuint64_t strides[1] = {cuuint64_t(row_bytes)};
  const cuuint32_t box[2] = {box_inner, box_outer};
  return encode(map, bf16, ptr, 2, dims, strides, box, swizzle_bytes);
}

bool encode_3d(CUtensorMap *map, bool bf16, const void *ptr, uint64_t inner, uint64_t outer,
               uint64_t depth, uint64_t row_bytes, uint64_t matrix_bytes, uint32_t box_inner,
               uint32_t box_outer) {
  const cuuint64_t dims[3] = {cuuint64_t(inner), cuuint64_t(outer), cuuint64_t(depth)};
  const cuuint64_t strides[2] = {cuuint64_t(row_bytes), cuuint64_t(matrix_bytes)};
  const cuuint32_t box[3] = {box_inner, box_outer, 1};
  return encode(map, bf16, ptr, 3, dims, strides, box, 128);
}

int cluster_grid(const void *kernel, size_t smem, int threads, int cluster, KernelGate &gate, int sms) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return sms / cluster * cluster;
  }
  int v = gate.cluster_ctas[dev].load(std::memory_order_acquire);
  if (v == 0) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(unsigned(sms / cluster * cluster));
    cfg.blockDim = dim3(unsigned(threads));
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute at{};
    at.id = cudaLaunchAttributeClusterDimension;
    at.val.clusterDim.x = unsigned(cluster);
    at.val.clusterDim.y = 1;
    at.val.clusterDim.z = 1;
    cfg.attrs = &at;
    cfg.numAttrs = 1;
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = sms / cluster;
    }
    v = std::max(1, n) * cluster;
    gate.cluster_ctas[dev].store(v, std::memory_order_release);
  }
  return v;
}

}  // namespace sm90

bool sm90_enabled(uint64_t flags) {
  if (flags & MOE_FLAG_FORCE_PORTABLE) return false;
  if (sm90::env_is("MOE_FUSED_PORTABLE", "1")) return false;
  if (kSm90Default) return !sm90::env_is("MOE_FUSED_SM90", "0");
  return sm90::env_is("MOE_FUSED_SM90", "1");
}

}  // namespace cuda
}  // namespace moe
