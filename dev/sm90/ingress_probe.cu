// What limits the row and weight-gradient GEMMs' mainloops on the H100: a synthetic
// mainloop with our tile (128 x 256, k-blocks of 64: 48 KB a stage, 4 stages, a producer
// warpgroup and two consumer warpgroups issuing m64n256k16) fed by different load paths, so
// the per-SM bytes a cycle each path reaches, with and without the tensor cores busy, can be
// compared with the 36-39 B a cycle the GEMMs reach (notes/hopper.md, sessions 11-12, 16).
// The data is whatever the buffer holds: timing only, nothing is checked. Its bulk /
// multicast / DSMEM modes held up; its gather modes do not model the library's producer
// (one thread a row came out 1.4x faster here and made GEMM1 1.7x slower there: notes/hopper.md,
// session 16): read them as a probe of cp.async, not of GEMM1.
//
// Modes (-m):
//   fill      all 48 KB a stage by 1D bulk copies from the buffer, consumers only release
//   mma       the same, consumers run the 4 wgmma k-steps a stage (a GEMM mainloop)
//   mmaonly   no loads: wgmma on stage 0 over and over (the tensor pipe's own rate)
//   mc        2x1 clusters: A (16 KB) own, B (32 KB) half each, multicast to both (our GEMMs)
//   dsmem     2x1 clusters: A and one B half (32 KB) from the buffer, the other B half (16 KB)
//             pushed by the peer from its shared memory (SM-to-SM network, not L2)
//   dsmemfill the same without the wgmma
//   gather    A as 128 gathered 128-byte rows by cp.async (the producer warpgroup, as
//             GEMM1 / dA'), B by bulk copy
//   gathermc  2x1 clusters: A gathered as in gather, B multicast as in mc (GEMM1 / dA' today)
//   gatherhalf 2x1 clusters: 64 of A's rows gathered, the other 64 (8 KB) pushed by the peer
//             from its shared memory, B multicast: the per-SM traffic of 2 x 2 clusters whose
//             N-pairs share their gathered rows
//   deepA     gathermc with the rings split: A (gathered, 16 KB a k-block) NA_DEEP stages
//             deep, B (multicast, 32 KB) NB_DEEP, so the gathered rows are asked for further
//             ahead (B issued NA_DEEP - NB_DEEP k-blocks after A)
//   gather22  2x2 clusters, the real protocol: each CTA gathers its 64 rows, its producer's
//             thread 0 pushes them into its N-peer's stage once landed (it polls for that
//             while it waits for a free stage), B multicast within the M-pairs; a stage is
//             free once its CTA's, M-peer's and N-peer's consumers released it. Launches only
//             the clusters that fit at once (30 of four on the H100)
// -b BYTES: the buffer (default 16 MiB: L2-resident; 4 GiB streams from DRAM), -i k-blocks
// a CTA. Build: nvcc -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3 -I csrc -o /tmp/probe dev/sm90/ingress_probe.cu
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/sm90_ptx.cuh"
#include "cuda/sm90_wgmma.cuh"

using namespace moe::cuda::sm90;

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifndef TILE_KB
#define TILE_KB 32  // the gathered rows stay for this many k-blocks (a tile: K = 2048)
#endif
#ifndef COAL
#define COAL 0  // 1: the gather modes map eight lanes to a row (coalesced)
#endif
enum Mode { FILL, MMA, MMAONLY, MC, DSMEM, DSMEMFILL, GATHER, GATHERMC, GATHERHALF, GATHER22 };
constexpr int NS = 4, A_BYTES = 16384, B_BYTES = 32768, STAGE = A_BYTES + B_BYTES;
constexpr int PUSH_SRC = NS * STAGE;               // dsmem: the 16 KB pushed to the peer
constexpr int BARS = PUSH_SRC + 16384;             // full[NS], empty[NS], half[NS]
constexpr int SMEM = BARS + 24 * NS + 1024;        // + alignment slack

__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void bulk_g2s_mc(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar,
                                            uint16_t mask = 3) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1], %2, [%3], %4;" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "h"(mask)
      : "memory");
}
__device__ __forceinline__ bool mbar_test(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok;
}
__device__ __forceinline__ uint32_t mapa(uint32_t a, uint32_t cta) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(cta));
  return r;
}
__device__ __forceinline__ void bulk_s2peer(uint32_t dst_cluster, uint32_t src, uint32_t bytes, uint32_t bar_cluster) {
  asm volatile(
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          dst_cluster),
      "r"(src), "r"(bytes), "r"(bar_cluster)
      : "memory");
}

// A consumer's end: the accumulators pinned after its last wgmma wait and summed (so no
// wgmma is dead code, and ptxas does not serialise them over an unread accumulator), the
// CTA's cycles since t0 written by one thread.
__device__ __forceinline__ void record(float (&acc)[128], long long t0, bool writer, long long *out) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(acc[i])::"memory");
  const long long t1 = clock64();
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 128; ++i) sum += acc[i];
  if (writer) *out = (t1 - t0) + (sum == 12345.f ? 1 : 0);
}

struct Args {
  const char *buf;
  size_t chunks;  // 16 KB chunks in buf
  int iters;
  long long *cycles;
};

template <int MODE> __global__ void __launch_bounds__(384, 1) probe(Args a) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t full = base + BARS, empty = full + 8 * NS, half = empty + 8 * NS;
  constexpr bool CL = MODE == MC || MODE == DSMEM || MODE == DSMEMFILL || MODE == GATHERMC || MODE == GATHERHALF || MODE == GATHER22;
  constexpr bool GA = MODE == GATHER || MODE == GATHERMC || MODE == GATHERHALF || MODE == GATHER22;
  constexpr bool HALF = MODE == GATHERHALF || MODE == GATHER22;
  const int tid = threadIdx.x, wg = tid / 128;
  const uint32_t rank = CL ? cluster_ctarank() : 0;
  if (tid == 0) {
    for (int s = 0; s < NS; ++s) {
      mbar_init(full + 8 * s, GA ? 128 + 1 : 1);
      mbar_init(empty + 8 * s, 2 * (MODE == GATHER22 ? 3 : CL ? 2 : 1));
      mbar_init(half + 8 * s, 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if constexpr (CL) cluster_sync(); else __syncthreads();
  const size_t cta = blockIdx.x;
  auto chunk = [&](int it, int j) {  // a 16 KB chunk of the buffer, spread over CTAs and k-blocks
    return a.buf + ((cta * 131 + size_t(it) * 3 + j) % a.chunks) * 16384;
  };
  if (wg == 0) {
    setmaxnreg_dec<56>();
    // gather22: stage j's own 64 rows, once landed, into the N-peer's stage (its full barrier)
    auto push_prev = [&](int j) {
      const uint32_t st = j % NS, off = base + st * STAGE + (rank >> 1) * 8192;
      mbar_wait(half + 8 * st, (j / NS) & 1);
      fence_proxy_async();  // cp.async (generic proxy) writes -> bulk copy (async proxy) reads
      bulk_s2peer(mapa(off, rank ^ 2), off, 8192, mapa(full + 8 * st, rank ^ 2));
    };
    const bool loads = GA || (MODE != MMAONLY && tid == 0);
    int np = 0;  // gather22: the next stage to push
    for (int it = 0; loads && it < a.iters; ++it) {
      const uint32_t st = it % NS, ph = (it / NS) & 1, s = base + st * STAGE, f = full + 8 * st;
      if (MODE == GATHER22 && tid == 0) {
        // while the stage is not free, push whichever of this CTA's earlier stages has landed
        for (;;) {
          if (np < it && mbar_test(half + 8 * (np % NS), (np / NS) & 1)) {
            push_prev(np++);
            continue;
          }
          if (mbar_test(empty + 8 * st, ph ^ 1)) break;
        }
      } else {
        mbar_wait(empty + 8 * st, ph ^ 1);
      }
      if (GA) {
        // rows of 128 bytes, each from its own 4 KB row of a [rows, 2048] bf16 matrix; 8 x 16
        // bytes a row, one row a thread (gatherhalf: rows 0..63, two threads a row)
        const size_t rows = a.chunks * 4;
        const int r = HALF ? tid >> 1 : tid, c0 = HALF ? (tid & 1) * 4 : 0;
        const uint32_t nb = MODE == GATHER22 ? rank >> 1 : rank;  // which 64 rows this CTA gathers
        const char *src = a.buf + ((cta * 977 + size_t(it / TILE_KB) * 131 + size_t(r) * 7919) % rows) * 4096 + (it % 32) * 128;
        const uint32_t dstrow = s + (HALF ? (r + 64 * nb) : r) * 128;
        if (COAL) {  // eight lanes a row (its 128 bytes: whole lines a warp), as sm90_rowgemm
          const int ch = tid & 7;
#pragma unroll
          for (int j = 0; j < (HALF ? 4 : 8); ++j) {
            const int rr = (tid >> 3) + 16 * j + (HALF ? 64 * nb : 0);
            const char *rs = a.buf + ((cta * 977 + size_t(it / TILE_KB) * 131 + size_t(rr) * 7919) % rows) * 4096 + (it % 32) * 128;
            cp_async16_u(s + rr * 128 + ((ch ^ (rr & 7)) << 4), rs + 16 * ch);
          }
        } else {
#pragma unroll
          for (int c = c0; c < c0 + (HALF ? 4 : 8); ++c) cp_async16_u(dstrow + ((c ^ (r & 7)) << 4), src + 16 * c);
        }
        cp_async_mbar_arrive(f);
        if (MODE == GATHER22) cp_async_mbar_arrive(half + 8 * st);
        if (tid == 0) {
          if (MODE == GATHER) {
            mbar_expect_tx(f, B_BYTES);
            bulk_g2s(s + A_BYTES, chunk(it, 1), 16384, f);
            bulk_g2s(s + A_BYTES + 16384, chunk(it, 2), 16384, f);
          } else if (MODE == GATHER22) {
            const uint32_t mb = rank & 1;
            mbar_expect_tx(f, B_BYTES + 8192);
            bulk_g2s_mc(s + A_BYTES + mb * 16384, chunk(it, 1 + mb), 16384, f, uint16_t(3u << (2 * nb)));
          } else {
            mbar_expect_tx(f, B_BYTES + (MODE == GATHERHALF ? 8192 : 0));
            bulk_g2s_mc(s + A_BYTES + rank * 16384, chunk(it, 1 + rank), 16384, f);
            if (MODE == GATHERHALF)  // the peer's other 64 rows (timing only: from a fixed buffer)
              bulk_s2peer(mapa(s + rank * 8192, rank ^ 1), base + PUSH_SRC, 8192, mapa(f, rank ^ 1));
          }
        }
        continue;
      }
      mbar_expect_tx(f, STAGE);
      bulk_g2s(s, chunk(it, 0), A_BYTES, f);
      if (MODE == FILL || MODE == MMA) {
        bulk_g2s(s + A_BYTES, chunk(it, 1), 16384, f);
        bulk_g2s(s + A_BYTES + 16384, chunk(it, 2), 16384, f);
      } else if (MODE == MC) {
        bulk_g2s_mc(s + A_BYTES + rank * 16384, chunk(it, 1 + rank), 16384, f);
      } else {  // DSMEM: own B half from the buffer, the peer's half pushed from this CTA's smem
        bulk_g2s(s + A_BYTES + rank * 16384, chunk(it, 1 + rank), 16384, f);
        bulk_s2peer(mapa(s + A_BYTES + rank * 16384, rank ^ 1), base + PUSH_SRC, 16384, mapa(f, rank ^ 1));
      }
    }
    while (MODE == GATHER22 && tid == 0 && np < a.iters) push_prev(np++);
    if (GA) asm volatile("cp.async.wait_group 0;" ::: "memory");
  } else {
    setmaxnreg_inc<224>();
    const int c = wg - 1, tw = tid % 128;
    long long t0 = clock64();
    float acc[128];
    auto release = [&](uint32_t st) {
      mbar_arrive(empty + 8 * st);
      if constexpr (CL) mbar_arrive_cluster(empty + 8 * st, rank ^ 1);
      if constexpr (MODE == GATHER22) mbar_arrive_cluster(empty + 8 * st, rank ^ 2);
    };
    constexpr bool DO_MMA = MODE != FILL && MODE != DSMEMFILL;
    uint32_t prev = 0;
    for (int it = 0; it < a.iters; ++it) {
      const uint32_t st = MODE == MMAONLY ? 0 : it % NS, ph = (it / NS) & 1, s = base + st * STAGE;
      if (MODE != MMAONLY) mbar_wait(full + 8 * st, ph);
      if constexpr (DO_MMA) {
        if (GA) fence_proxy_async();
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < 4; ++k)
          Wgmma<__nv_bfloat16>::m64n256<0, 0>(acc, make_desc<128>(s + c * 8192 + k * 32),
                                              make_desc<128>(s + A_BYTES + k * 32), (it > 0 || k > 0) ? 1 : 0);
        wgmma_commit();
        wgmma_wait<1>();
        if (MODE != MMAONLY && it > 0 && tw == 0) release(prev);
        prev = st;
      } else if (tw == 0) {
        release(st);
      }
    }
    if constexpr (DO_MMA) {
      wgmma_wait<0>();
      if (MODE != MMAONLY && a.iters > 0 && tw == 0) release(prev);
    }
    record(acc, t0, tw == 0 && c == 0, a.cycles + cta);
  }
  if constexpr (CL) cluster_sync();
}


// deepA: separate A and B rings (see the modes above). Layout: A stages, B stages, barriers.
#ifndef NA_DEEP
#define NA_DEEP 7
#endif
#ifndef NB_DEEP
#define NB_DEEP 3
#endif
constexpr int NA = NA_DEEP, NB = NB_DEEP, DEEP_BARS = NA * A_BYTES + NB * B_BYTES;
constexpr int DEEP_SMEM = DEEP_BARS + 16 * (NA + NB) + 1024;

__global__ void __launch_bounds__(384, 1) probe_deep(Args a) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u, sB = base + NA * A_BYTES;
  const uint32_t fullA = base + DEEP_BARS, emptyA = fullA + 8 * NA, fullB = emptyA + 8 * NA,
                 emptyB = fullB + 8 * NB;
  const int tid = threadIdx.x, wg = tid / 128;
  const uint32_t rank = cluster_ctarank();
  if (tid == 0) {
    for (int s = 0; s < NA; ++s) mbar_init(fullA + 8 * s, 128), mbar_init(emptyA + 8 * s, 4);
    for (int s = 0; s < NB; ++s) mbar_init(fullB + 8 * s, 1), mbar_init(emptyB + 8 * s, 4);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();
  const size_t cta = blockIdx.x;
  constexpr int LAG = NA - NB;
  if (wg == 0) {
    setmaxnreg_dec<56>();
    const size_t rows = a.chunks * 4;
    auto issue_b = [&](int j) {
      const uint32_t st = j % NB, f = fullB + 8 * st;
      mbar_wait(emptyB + 8 * st, ((j / NB) & 1) ^ 1);
      mbar_expect_tx(f, B_BYTES);
      bulk_g2s_mc(sB + st * B_BYTES + rank * 16384,
                  a.buf + ((cta * 131 + size_t(j) * 3 + 1 + rank) % a.chunks) * 16384, 16384, f);
    };
    for (int it = 0; it < a.iters; ++it) {
      const uint32_t st = it % NA, s = base + st * A_BYTES;
      mbar_wait(emptyA + 8 * st, ((it / NA) & 1) ^ 1);
      const int r = tid;
      const char *src = a.buf + ((cta * 977 + size_t(it / TILE_KB) * 131 + size_t(r) * 7919) % rows) * 4096 + (it % 32) * 128;
#pragma unroll
      for (int c = 0; c < 8; ++c) cp_async16_u(s + r * 128 + ((c ^ (r & 7)) << 4), src + 16 * c);
      cp_async_mbar_arrive(fullA + 8 * st);
      if (tid == 0 && it >= LAG) issue_b(it - LAG);
    }
    if (tid == 0)
      for (int j = a.iters > LAG ? a.iters - LAG : 0; j < a.iters; ++j) issue_b(j);
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  } else {
    setmaxnreg_inc<224>();
    const int c = wg - 1, tw = tid % 128;
    long long t0 = clock64();
    float acc[128];
    auto release = [&](int j) {
      mbar_arrive(emptyA + 8 * (j % NA)), mbar_arrive_cluster(emptyA + 8 * (j % NA), rank ^ 1);
      mbar_arrive(emptyB + 8 * (j % NB)), mbar_arrive_cluster(emptyB + 8 * (j % NB), rank ^ 1);
    };
    for (int it = 0; it < a.iters; ++it) {
      const uint32_t sa = base + (it % NA) * A_BYTES, sb = sB + (it % NB) * B_BYTES;
      mbar_wait(fullA + 8 * (it % NA), (it / NA) & 1);
      mbar_wait(fullB + 8 * (it % NB), (it / NB) & 1);
      fence_proxy_async();
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k)
        Wgmma<__nv_bfloat16>::m64n256<0, 0>(acc, make_desc<128>(sa + c * 8192 + k * 32), make_desc<128>(sb + k * 32),
                                            (it > 0 || k > 0) ? 1 : 0);
      wgmma_commit();
      wgmma_wait<1>();
      if (it > 0 && tw == 0) release(it - 1);
    }
    wgmma_wait<0>();
    if (a.iters > 0 && tw == 0) release(a.iters - 1);
    record(acc, t0, tw == 0 && c == 0, a.cycles + cta);
  }
  cluster_sync();
}

__global__ void fill_buf(uint32_t *p, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u;
    x ^= x >> 15;
    // two bf16 in [-1, 1): exponent 0x3F / 0xBF range, random mantissa
    p[i] = ((x & 0x807Fu) | 0x3F00u) | (((x >> 16) & 0x807Fu) | 0x3F00u) << 16;
  }
}

constexpr int DEEP = 100;  // run<DEEP>: probe_deep
template <int MODE> float run(const Args &a, int &grid, int reps) {
  void (*k)(Args) = MODE == DEEP ? probe_deep : probe<MODE == DEEP ? 0 : MODE>;
  const int SMEM = MODE == DEEP ? DEEP_SMEM : ::SMEM;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(384);
  cfg.dynamicSmemBytes = SMEM;
  cudaLaunchAttribute attr[1];
  int na = 0;
  if (MODE == MC || MODE == DSMEM || MODE == DSMEMFILL || MODE == GATHERMC || MODE == GATHERHALF ||
      MODE == GATHER22 || MODE == DEEP) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = MODE == GATHER22 ? 4 : 2, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    na = 1;
  }
  cfg.attrs = attr;
  cfg.numAttrs = na;
  if (na) {  // only as many clusters as fit at once (4-CTA clusters: not all 132 SMs)
    int nc = 0;
    cudaOccupancyMaxActiveClusters(&nc, k, &cfg);
    const int cs = attr[0].val.clusterDim.x;
    if (nc * cs < grid) cfg.gridDim = dim3(nc * cs);
    grid = cfg.gridDim.x;
  }
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  cudaLaunchKernelEx(&cfg, k, a);  // warm-up
  cudaEventRecord(e0);
  for (int r = 0; r < reps; ++r) cudaLaunchKernelEx(&cfg, k, a);
  cudaEventRecord(e1);
  cudaError_t err = cudaEventSynchronize(e1);
  if (err != cudaSuccess || (err = cudaGetLastError()) != cudaSuccess) {
    fprintf(stderr, "mode %d: %s\n", MODE, cudaGetErrorString(err));
    exit(1);
  }
  float ms;
  cudaEventElapsedTime(&ms, e0, e1);
  return ms / reps;
}

int main(int argc, char **argv) {
  std::string mode = "mma";
  size_t bytes = size_t(16) << 20;
  int iters = 4000, reps = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "-m")) mode = argv[i + 1];
    else if (!strcmp(argv[i], "-b")) bytes = strtoull(argv[i + 1], nullptr, 0);
    else if (!strcmp(argv[i], "-i")) iters = atoi(argv[i + 1]);
  }
  int dev = 0, sms = 0, clk = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&clk, cudaDevAttrClockRate, dev);
  int grid = sms & ~3;
  char *buf;
  if (cudaMalloc(&buf, bytes) != cudaSuccess) return fprintf(stderr, "alloc %zu failed\n", bytes), 1;
  fill_buf<<<1024, 256>>>(reinterpret_cast<uint32_t *>(buf), bytes / 4);
  long long *cyc;
  cudaMalloc(&cyc, grid * sizeof(long long));
  Args a{buf, bytes / 16384, iters, cyc};
  float ms = 0;
  if (mode == "fill") ms = run<FILL>(a, grid, reps);
  else if (mode == "mma") ms = run<MMA>(a, grid, reps);
  else if (mode == "mmaonly") ms = run<MMAONLY>(a, grid, reps);
  else if (mode == "mc") ms = run<MC>(a, grid, reps);
  else if (mode == "dsmem") ms = run<DSMEM>(a, grid, reps);
  else if (mode == "dsmemfill") ms = run<DSMEMFILL>(a, grid, reps);
  else if (mode == "gather") ms = run<GATHER>(a, grid, reps);
  else if (mode == "gathermc") ms = run<GATHERMC>(a, grid, reps);
  else if (mode == "gatherhalf") ms = run<GATHERHALF>(a, grid, reps);
  else if (mode == "gather22") ms = run<GATHER22>(a, grid, reps);
  else if (mode == "deepA") ms = run<DEEP>(a, grid, reps);
  else return fprintf(stderr, "unknown mode %s\n", mode.c_str()), 1;
  long long *h = new long long[grid];
  cudaMemcpy(h, cyc, grid * sizeof(long long), cudaMemcpyDeviceToHost);
  double cmean = 0;
  for (int i = 0; i < grid; ++i) cmean += double(h[i]) / grid;  // grid: the CTAs run
  const double per_sm = double(iters) * STAGE, flop = 2.0 * 128 * 256 * 64 * iters * grid;
  const bool mma = mode != "fill" && mode != "dsmemfill";
  printf("%3d CTAs ", grid);
  printf("%-9s buf %6zu MiB  %.3f ms  %7.1f B/clk/SM (smem fill, %.0f kcycles)  %6.2f TB/s in  %s%.0f TF/s\n",
         mode.c_str(), bytes >> 20, ms, per_sm / cmean, cmean / 1e3, per_sm * grid / (ms * 1e-3) / 1e12,
         mma ? "" : "(no mma) ", mma ? flop / (ms * 1e-3) / 1e12 : 0.0);
  return 0;
}
