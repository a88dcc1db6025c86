// Routing plan on the device: histogram per 256-pair sub-chunk (one warp
// each), exclusive column scans, expert offsets, stable scatter (pairs keep
// ascending p within an expert), inverse permutation, and the BM-row tile
// list the grouped GEMMs walk. No host synchronisation; graph capturable.
// Three launches (histogram; scans, offsets and tile list; scatter): on slow hosts each
// launch is ~10 us the GPU waits for before the first GEMM can start.
#include <algorithm>

#include "common/backend.h"
#include "cuda/kernels.h"

namespace moe {
namespace cuda {
namespace {

constexpr int kSub = 256;  // pairs per warp sub-chunk

template <class Idx>
__device__ __forceinline__ int expert_of(const Idx *idx, int64_t s0, int64_t s1, int k,
                                         int64_t p, int E) {
  const int64_t v = static_cast<int64_t>(idx[(p / k) * s0 + (p % k) * s1]);
  return v < 0 ? 0 : (v >= E ? E - 1 : static_cast<int>(v));  // clamp: never wild
}

// Also zeroes plan_scan's block counter (the workspace is not zeroed between calls).
template <class Idx>
__global__ void plan_hist(const Idx *idx, int64_t s0, int64_t s1, int k, int64_t n, int E,
                          int32_t *counts, int64_t nsub, unsigned *scan_done) {
  pdl_wait();
  pdl_release();
  if (blockIdx.x == 0 && threadIdx.x == 0) *scan_done = 0u;
  const int64_t warp = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= nsub) return;
  int32_t *c = counts + warp * E;
  for (int e = lane; e < E; e += 32) c[e] = 0;
  __syncwarp();
  const int64_t base = warp * kSub;
  for (int i = 0; i < kSub; i += 32) {
    const int64_t p = base + i + lane;
    const bool valid = p < n;
    const int e = valid ? expert_of(idx, s0, s1, k, p, E) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (valid && lane == __ffs(peers) - 1) atomicAdd(&c[e], __popc(peers));
    __syncwarp();
  }
}

// Block-wide exclusive scan of one int per thread (blockDim.x <= 1024).
__device__ __forceinline__ int block_exclusive_scan(int v, int *total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x / 32, nw = (blockDim.x + 31) / 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[w] = x;
  __syncthreads();
  if (w == 0) {
    int s = lane < nw ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < nw) warp_sums[lane] = s;  // inclusive
  }
  __syncthreads();
  const int before = w > 0 ? warp_sums[w - 1] : 0;
  *total = warp_sums[nw - 1];
  __syncthreads();
  return before + x - v;
}

// offsets[e] = sum_{e' < e} totals[e'], offsets[E] = n; one block. totals come from other
// blocks of plan_scan: read from L2 (__ldcg), past the block counter's fence.
__device__ void offsets_block(const int32_t *totals, int E, int32_t *offsets) {
  int carry = 0;
  for (int b = 0; b < E; b += blockDim.x) {
    const int e = b + threadIdx.x;
    const int v = e < E ? __ldcg(totals + e) : 0;
    int tot;
    const int ex = block_exclusive_scan(v, &tot);
    if (e < E) offsets[e] = carry + ex;
    carry += tot;
  }
  if (threadIdx.x == 0) offsets[E] = carry;
}

template <class Idx>
__global__ void plan_scatter(const Idx *idx, int64_t s0, int64_t s1, int k, int64_t n, int E,
                             int32_t *counts, const int32_t *offsets, int32_t *sorted,
                             int32_t *rows, int64_t nsub) {
  pdl_wait();
  pdl_release();
  const int64_t warp = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= nsub) return;
  int32_t *c = counts + warp * E;
  const int64_t base = warp * kSub;
  const unsigned lt = (1u << lane) - 1u;
  for (int i = 0; i < kSub; i += 32) {
    const int64_t p = base + i + lane;
    const bool valid = p < n;
    const int e = valid ? expert_of(idx, s0, s1, k, p, E) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (valid) {
      const int pos = offsets[e] + c[e] + __popc(peers & lt);
      sorted[pos] = static_cast<int32_t>(p);
      rows[p] = pos;
    }
    __syncwarp();
    if (valid && lane == __ffs(peers) - 1) c[e] += __popc(peers);
    __syncwarp();
  }
}

// First row r in [s, t) with sorted[r] >= p (sorted ascends within a segment; on a
// corrupt plan the answer is still inside [s, t)).
__device__ __forceinline__ int lower_row(const int32_t *sorted, int s, int t, int64_t p) {
  while (s < t) {
    const int m = s + (t - s) / 2;
    if (sorted[m] < p) s = m + 1;
    else t = m;
  }
  return s;
}

// One block: per-expert tile counts (segments clamped to [0, n] and made monotone,
// then clipped to the pairs [p0, p1) when sorted is given), their scan, the tile
// entries, and the tile count. With sorted, the window's runs are also packed back to
// back (expert order): delta[e] = (rows of the window before e) - lo_e, in every tile
// of e and in win_delta[e], so C row r + delta is dense in [0, window pairs).
__device__ void tiles_block(const int32_t *offsets, const int32_t *sorted, int E, int64_t n,
                            int64_t p0, int64_t p1, int BM, Tile *tiles, int32_t *num_tiles,
                            int32_t *win_delta, int64_t maxT) {
  int carry = 0, row_carry = 0;
  for (int b = 0; b < E; b += blockDim.x) {
    const int e = b + threadIdx.x;
    int s = 0, t = 0, cnt = 0;
    if (e < E) {
      const int64_t lo_e = offsets[e], hi_e = offsets[e + 1];
      s = static_cast<int>(lo_e < 0 ? 0 : (lo_e > n ? n : lo_e));
      const int64_t t64 = hi_e < s ? s : (hi_e > n ? n : hi_e);
      t = static_cast<int>(t64);
      if (sorted) {  // the window's pairs are one contiguous run of every segment
        const int s2 = p0 > 0 ? lower_row(sorted, s, t, p0) : s;
        t = p1 < n ? lower_row(sorted, s2, t, p1) : t;
        s = s2;
      }
      cnt = t > s ? (t - s + BM - 1) / BM : 0;
    }
    int tot, rows_tot;
    const int ex = block_exclusive_scan(cnt, &tot);
    const int rex = block_exclusive_scan(t - s, &rows_tot);
    const int delta = sorted ? row_carry + rex - s : 0;
    if (win_delta && e < E) win_delta[e] = delta;
    for (int i = 0; i < cnt; ++i) {
      const int64_t slot = int64_t(carry) + ex + i;
      if (slot < maxT) tiles[slot] = Tile{e, s + i * BM, t, delta};
    }
    carry += tot;
    row_carry += rows_tot;
  }
  if (threadIdx.x == 0) *num_tiles = static_cast<int32_t>(carry < maxT ? carry : maxT);
}

__global__ void tiles_kernel(const int32_t *offsets, const int32_t *sorted, int E, int64_t n,
                             int64_t p0, int64_t p1, int BM, Tile *tiles, int32_t *num_tiles,
                             int32_t *win_delta, int64_t maxT) {
  pdl_wait();
  pdl_release();
  tiles_block(offsets, sorted, E, n, p0, p1, BM, tiles, num_tiles, win_delta, maxT);
}

// Block e: counts[s][e] -> exclusive prefix over s, totals[e]. The last block to finish
// (scan_done, zeroed by plan_hist) then makes the expert offsets and, when tiles is given,
// the tile list over them (build_tiles' work).
__global__ void plan_scan(int32_t *counts, int64_t nsub, int E, int32_t *totals,
                          unsigned *scan_done, int32_t *offsets, int64_t n, int BM, Tile *tiles,
                          int32_t *num_tiles, int64_t maxT) {
  pdl_wait();
  pdl_release();
  const int e = blockIdx.x;
  int carry = 0;
  for (int64_t b = 0; b < nsub; b += blockDim.x) {
    const int64_t s = b + threadIdx.x;
    const int v = s < nsub ? counts[s * E + e] : 0;
    int tot;
    const int ex = block_exclusive_scan(v, &tot);
    if (s < nsub) counts[s * E + e] = carry + ex;
    carry += tot;
  }
  if (threadIdx.x == 0) totals[e] = carry;
  __shared__ bool last;
  __threadfence();  // totals[e] visible device-wide before this block counts itself done
  if (threadIdx.x == 0) last = atomicAdd(scan_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  offsets_block(totals, E, offsets);
  __syncthreads();  // this block's offsets writes, visible to its own threads
  if (tiles) tiles_block(offsets, nullptr, E, n, 0, n, BM, tiles, num_tiles, nullptr, maxT);
}

}  // namespace

size_t plan_scratch_bytes(int64_t n, int64_t E) {
  const int64_t nsub = (n + kSub - 1) / kSub;
  return ws_align(size_t(std::max<int64_t>(nsub, 1)) * size_t(E) * 4) + ws_align(size_t(E) * 4) +
         ws_align(sizeof(unsigned));  // counts, totals, plan_scan's block counter
}

void build_plan(const void *idx, int idx_dtype, int64_t s0, int64_t s1, int k, int64_t n,
                int E, int32_t *offsets, int32_t *sorted, int32_t *rows, void *scratch,
                Launch stream, const PlanTiles *tiles) {
  const int64_t nsub = (n + kSub - 1) / kSub;
  const size_t counts_bytes = ws_align(size_t(std::max<int64_t>(nsub, 1)) * size_t(E) * 4);
  int32_t *counts = static_cast<int32_t *>(scratch);
  int32_t *totals = reinterpret_cast<int32_t *>(static_cast<char *>(scratch) + counts_bytes);
  unsigned *scan_done = reinterpret_cast<unsigned *>(static_cast<char *>(scratch) + counts_bytes +
                                                     ws_align(size_t(E) * 4));
  const int warps_per_block = 4;
  const unsigned blocks = static_cast<unsigned>((nsub + warps_per_block - 1) / warps_per_block);
  // at least one block: it zeroes scan_done even without pairs
  const unsigned hist_blocks = std::max(blocks, 1u);
  const dim3 warps(32 * warps_per_block);
  if (idx_dtype == MOE_DTYPE_I64)
    launch_kernel(plan_hist<int64_t>, dim3(hist_blocks), warps, stream,
                  static_cast<const int64_t *>(idx), s0, s1, k, n, E, counts, nsub, scan_done);
  else
    launch_kernel(plan_hist<int32_t>, dim3(hist_blocks), warps, stream,
                  static_cast<const int32_t *>(idx), s0, s1, k, n, E, counts, nsub, scan_done);
  launch_kernel(plan_scan, dim3(unsigned(E)), dim3(256), stream, counts, nsub, E, totals,
                scan_done, offsets, n, tiles ? tiles->BM : 1, tiles ? tiles->tiles : nullptr,
                tiles ? tiles->num_tiles : nullptr,
                tiles ? max_tiles(n, E, tiles->BM) : int64_t(0));
  if (nsub > 0) {
    if (idx_dtype == MOE_DTYPE_I64)
      launch_kernel(plan_scatter<int64_t>, dim3(blocks), warps, stream,
                    static_cast<const int64_t *>(idx), s0, s1, k, n, E, counts, offsets, sorted,
                    rows, nsub);
    else
      launch_kernel(plan_scatter<int32_t>, dim3(blocks), warps, stream,
                    static_cast<const int32_t *>(idx), s0, s1, k, n, E, counts, offsets, sorted,
                    rows, nsub);
  }
}

void build_tiles(const int32_t *offsets, int E, int64_t n, int BM, Tile *tiles,
                 int32_t *num_tiles, Launch stream) {
  launch_kernel(tiles_kernel, dim3(1), dim3(1024), stream, offsets, nullptr, E, n, int64_t(0), n,
                BM, tiles, num_tiles, nullptr, max_tiles(n, E, BM));
}

void build_tiles_pairs(const int32_t *offsets, const int32_t *sorted, int E, int64_t n,
                       int64_t p0, int64_t p1, int BM, Tile *tiles, int32_t *num_tiles,
                       int32_t *win_delta, Launch stream) {
  launch_kernel(tiles_kernel, dim3(1), dim3(1024), stream, offsets, sorted, E, n, p0, p1, BM,
                tiles, num_tiles, win_delta, max_tiles(n, E, BM));
}

}  // namespace cuda
}  // namespace moe
