// Deterministic per-token reductions over the k slots (no atomics):
//   combine_rows: out[t] = sum_j w_tj * Y[row(t, j)]   (fp32, slot order), Y holding every
//                 plan row or one token window's rows packed by build_tiles_pairs
//   reduce_ds:    grad_s[t,j] = sum_i ds_part[rows[t*k+j], i]  (i ascending)
#include <algorithm>

#include "cuda/kernels.h"

namespace moe {
namespace cuda {
namespace {

constexpr int kMaxK = 64;

// The expert whose segment holds plan row r: the last e with offsets[e] <= r.
__device__ __forceinline__ int segment_of(const int32_t *offsets, int E, int64_t r) {
  int lo = 0, hi = E;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int m = (lo + hi) / 2;
    if (offsets[m] <= r) lo = m;
    else hi = m;
  }
  return lo;
}

template <class T>
__global__ void combine_kernel(const T *Y, int64_t ldy, int64_t ny, const int32_t *rows,
                               WindowRows win, const void *sw, int sw_dtype, int64_t sw_s0,
                               int64_t sw_s1, int64_t t0, int k, int64_t H, T *out, int64_t ldo,
                               bool vec) {
  pdl_wait();
  pdl_release();
  const int64_t t = t0 + blockIdx.x;
  __shared__ int64_t srow[kMaxK];
  __shared__ float sw_s[kMaxK];
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const int64_t p = t * k + j;
    int64_t r = rows[p];
    if (win.offsets) r += win.win_delta[segment_of(win.offsets, win.E, r)];
    r = r < 0 ? 0 : (r >= ny ? ny - 1 : r);
    srow[j] = r;
    sw_s[j] = sw ? load_weight(sw, sw_dtype, t * sw_s0 + j * sw_s1) : 1.f;
  }
  __syncthreads();
  for (int64_t c = int64_t(threadIdx.x) * 8; c < H; c += int64_t(blockDim.x) * 8) {
    const int nv = int(std::min<int64_t>(8, H - c));
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    // The slot loop unrolled 4 times (four rows' loads in flight a thread) was measured in
    // session 10: 4% slower on the H100, so the compiler's choice stays.
    for (int j = 0; j < k; ++j) {
      float v[8];
      load8<T>(v, Y + srow[j] * ldy + c, nv, vec);
      const float w = sw_s[j];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += w * v[i];
    }
    store8<T>(out + t * ldo + c, acc, nv, vec);
  }
}

__global__ void reduce_ds_kernel(const float *ds_part, int ds_ld, int ncols, const int32_t *rows,
                                 int64_t T, int k, void *gs, int gs_dtype, int64_t gs_s0,
                                 int64_t gs_s1) {
  pdl_wait();
  pdl_release();
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = T * k;
  if (p >= n) return;
  int64_t r = rows[p];
  r = r < 0 ? 0 : (r >= n ? n - 1 : r);
  float acc = 0.f;
  for (int i = 0; i < ncols; ++i) acc += ds_part[r * ds_ld + i];
  const int64_t off = (p / k) * gs_s0 + (p % k) * gs_s1;
  store_weight(gs, gs_dtype, off, acc);
}

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

moe_status_t combine_rows(int dtype, const void *Y, int64_t ldy, int64_t ny, const int32_t *rows,
                          WindowRows win, const void *sw, int sw_dtype, int64_t sw_s0,
                          int64_t sw_s1, int64_t t0, int64_t t1, int k, int64_t H, void *out,
                          int64_t ldo, Launch stream) {
  if (t1 <= t0 || H <= 0 || ny <= 0) return MOE_OK;
  if (k > kMaxK) return set_error(MOE_ERR_UNSUPPORTED, "CUDA: top_k %d > %d", k, kMaxK);
  if (t1 - t0 > 2147483647) return set_error(MOE_ERR_UNSUPPORTED, "CUDA: too many tokens");
  const bool vec = H % 8 == 0 && ldy % 8 == 0 && ldo % 8 == 0 && aligned16(Y) && aligned16(out);
  const int threads = int(std::min<int64_t>(256, std::max<int64_t>(32, (H + 7) / 8)));
  const unsigned blocks = unsigned(t1 - t0);
  if (dtype == MOE_DTYPE_BF16)
    launch_kernel(combine_kernel<__nv_bfloat16>, dim3(blocks), dim3(unsigned(threads)), stream,
                  static_cast<const __nv_bfloat16 *>(Y), ldy, ny, rows, win, sw, sw_dtype, sw_s0,
                  sw_s1, t0, k, H, static_cast<__nv_bfloat16 *>(out), ldo, vec);
  else if (dtype == MOE_DTYPE_F16)
    launch_kernel(combine_kernel<__half>, dim3(blocks), dim3(unsigned(threads)), stream,
                  static_cast<const __half *>(Y), ldy, ny, rows, win, sw, sw_dtype, sw_s0, sw_s1,
                  t0, k, H, static_cast<__half *>(out), ldo, vec);
  else
    return set_error(MOE_ERR_DTYPE, "CUDA combine: unsupported dtype %d", dtype);
  return launch_status("combine_rows");
}

moe_status_t reduce_ds(const float *ds_part, int ds_ld, int ncols, const int32_t *rows,
                       int64_t T, int k, void *gs, int gs_dtype, int64_t gs_s0, int64_t gs_s1,
                       Launch stream) {
  const int64_t n = T * k;
  if (n <= 0) return MOE_OK;
  launch_kernel(reduce_ds_kernel, dim3(unsigned((n + 255) / 256)), dim3(256), stream, ds_part,
                ds_ld, ncols, rows, T, k, gs, gs_dtype, gs_s0, gs_s1);
  return launch_status("reduce_ds");
}

}  // namespace cuda
}  // namespace moe
