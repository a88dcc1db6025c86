// sm90a (Hopper) path of the experts forward's GEMM1 + SwiGLU (issue 5; design and
// measurements in notes/hopper.md, standalone harness dev/sm90/gemm1_wgmma.cu, variant v9):
//   h[r, :] = x[sorted[r] / k, :] W1[e(r)]^T  (h = [g; u]),  a[r, :] = silu(g) * u
// with the same outputs and rounding as the portable EPI_SWIGLU epilogue (h rounded to the
// dtype, a computed from the rounded g and u with the same silu_f, then rounded).
//
// Kernel: persistent grid (one CTA per SM) over the device-side tile list of plan.cu
// (BM = 128 rows) x the 2I/256 column tiles; warp-specialised: a producer warpgroup
// (16-byte cp.async of the gathered x rows into the 128-byte swizzle, one TMA of 128 gate
// rows + one of the same 128 up rows of W1 per k-block) and two consumer warpgroups
// (wgmma m64n256k16, fp32 accumulators), 3-stage full/empty mbarrier pipeline flowing across
// tiles; epilogue: h staged in smem and written by bulk copies (cp.async.bulk) while the
// warpgroup goes on to the next tile; a stored from the registers.
//
// The device code exists only where the arch has the sm_90a features
// (__CUDA_ARCH_FEAT_SM90_ALL); other archs compile an empty stub, and the host only chooses
// the kernel when the image the device would run is the real one (see sm90_available()).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cuda/kernels.h"
#include "cuda/sm90_gemm1.cuh"
#include "cuda/sm90_ptx.cuh"

namespace moe {
namespace cuda {
namespace sm90 {
namespace {

constexpr int BM = 128, BN = 256, BK = 64, S = 3, NC = 2, THREADS = 128 * (NC + 1);
constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
constexpr int CROW = BN * 2 + 16;  // staging row stride (bytes), conflict-free
constexpr size_t kSmem = 1024 + size_t(S) * (A_BYTES + B_BYTES) + 1024 + size_t(BM) * CROW;

struct Params {
  const void *x;
  int64_t ldx;
  const int32_t *sorted;
  int32_t n_rows;
  int a_div;
  const Tile *tiles;
  const int32_t *num_tiles;
  void *h;
  int64_t ldh;
  void *a;
  int64_t lda;
  int H, I;  // K, the columns of a
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void wgmma_m64n256_bf16(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n256_f16(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(scale_d));
}
template <class T> struct Wg;
template <> struct Wg<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&d)[128], uint64_t da, uint64_t db, int sd) {
    wgmma_m64n256_bf16(d, da, db, sd);
  }
};
template <> struct Wg<__half> {
  static __device__ __forceinline__ void mma(float (&d)[128], uint64_t da, uint64_t db, int sd) {
    wgmma_m64n256_f16(d, da, db, sd);
  }
};

// Two floats -> two rounded elements packed in 32 bits (the same rounding as DT<T>::from_f).
template <class T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = DT<T>::from_f(lo), b = DT<T>::from_f(hi);
  return uint32_t(reinterpret_cast<const uint16_t &>(a)) |
         (uint32_t(reinterpret_cast<const uint16_t &>(b)) << 16);
}
template <class T> __device__ __forceinline__ float rnd(float v) {
  return DT<T>::to_f(DT<T>::from_f(v));
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <class T>
__global__ void __launch_bounds__(THREADS, 1)
    gemm1_swiglu_sm90(const __grid_constant__ CUtensorMap tmapB, const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Static shared memory only in the real kernel: the host tells it from the stub by
  // cudaFuncAttributes::sharedSizeBytes (see sm90_available()).
  __shared__ __align__(8) uint64_t s_bars[2 * S];
  extern __shared__ __align__(128) uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sA = sbase, sB = sbase + S * A_BYTES;
  const uint32_t sFull = smem_u32(s_bars), sEmpty = sFull + 8 * S;
  const uint32_t sC = (sB + S * B_BYTES + 1023) & ~1023u;  // [BM][CROW] staging tile of h
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(sFull + 8 * s, 128 + 1);
      mbar_init(sEmpty + 8 * s, NC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int wg = tid / 128, tid_wg = tid % 128;
  const int KB = p.H / BK;
  const int I = p.I;
  const int ntn = I / (BN / 2);
  const int total = *p.num_tiles * ntn;
  const T *x = static_cast<const T *>(p.x);

  if (wg == 0) {  // producer
    setmaxnreg_dec<40>();
    constexpr int RPT = BM * 8 / 128;
    const int chunk = tid_wg & 7, trow = tid_wg >> 3;
    uint32_t it = 0;
    for (int w = blockIdx.x; w < total; w += gridDim.x) {
      const Tile t = p.tiles[w / ntn];
      const T *src[RPT];
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        const int r = min(t.row0 + trow + j * 16, t.row1 - 1);  // rows past the end: never stored
        int32_t pr = p.sorted[r];
        pr = pr < 0 ? 0 : (pr >= p.n_rows ? p.n_rows - 1 : pr);
        src[j] = x + int64_t(pr / p.a_div) * p.ldx + chunk * 8;
      }
      const int g0 = t.expert * 2 * I + (w % ntn) * (BN / 2);
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sEmpty + 8 * st, ph ^ 1);
        const uint32_t a = sA + st * A_BYTES;
#pragma unroll
        for (int j = 0; j < RPT; ++j) {
          const int row = trow + j * 16;
          cp_async16_u(a + row * 128 + ((chunk ^ (row & 7)) << 4), src[j] + kb * BK);
        }
        cp_async_mbar_arrive(sFull + 8 * st);
        if (tid_wg == 0) {
          mbar_expect_tx(sFull + 8 * st, B_BYTES);
          tma_load_2d(sB + st * B_BYTES, &tmapB, kb * BK, g0, sFull + 8 * st);
          tma_load_2d(sB + st * B_BYTES + B_BYTES / 2, &tmapB, kb * BK, g0 + I, sFull + 8 * st);
        }
      }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  } else {  // consumers
    setmaxnreg_inc<232>();
    const int c = wg - 1;
    const int warp = tid_wg >> 5, lane = tid_wg & 31;
    T *hout = static_cast<T *>(p.h);
    T *aout = static_cast<T *>(p.a);
    uint32_t it = 0;
    float acc[BN / 2];
    for (int w = blockIdx.x; w < total; w += gridDim.x) {
      const Tile t = p.tiles[w / ntn];
      const int n0h = (w % ntn) * (BN / 2);
      uint32_t prev = 0;
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const uint32_t st = it % S, ph = (it / S) & 1;
        mbar_wait(sFull + 8 * st, ph);
        fence_proxy_async();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BK / 16; ++k) {
          const uint64_t db = make_desc(sB + st * B_BYTES + k * 32);
          const uint64_t da = make_desc(sA + st * A_BYTES + c * 64 * 128 + k * 32);
          Wg<T>::mma(acc, da, db, (kb > 0 || k > 0) ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (kb > 0 && tid_wg == 0) mbar_arrive(sEmpty + 8 * prev);
        prev = st;
      }
      wgmma_wait<0>();
      if (tid_wg == 0) mbar_arrive(sEmpty + 8 * prev);
      if (KB == 0) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
      }

      // h: fragment -> smem staging tile -> one bulk copy per valid row and half (g, u).
      if (tid_wg < 64) bulk_wait_read0();  // the previous tile's copies have read the rows
      named_bar(1 + c, 128);
      const uint32_t cbase = sC + (c * 64 + warp * 16 + (lane >> 2)) * CROW + (lane & 3) * 4;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const uint32_t v = pack2<T>(acc[j * 4 + hh * 2], acc[j * 4 + hh * 2 + 1]);
          asm volatile("st.shared.b32 [%0], %1;" ::"r"(cbase + hh * 8 * CROW + j * 16), "r"(v)
                       : "memory");
        }
      fence_proxy_async();
      named_bar(1 + c, 128);
      if (tid_wg < 64) {
        const int r = t.row0 + c * 64 + tid_wg;
        if (r < t.row1) {
          const uint32_t srow = sC + (c * 64 + tid_wg) * CROW;
          T *hr = hout + int64_t(r) * p.ldh;
          bulk_store(hr + n0h, srow, BN);
          bulk_store(hr + I + n0h, srow + BN, BN);
        }
        bulk_commit();
      }
      // a = silu(g) * u from the rounded g and u (as the portable epilogue), from registers.
      const int rbase = t.row0 + c * 64 + warp * 16 + (lane >> 2);
      constexpr int HJ = BN / 16;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = rbase + hh * 8;
        if (r < t.row1) {
          T *oa = aout + int64_t(r) * p.lda + n0h + (lane & 3) * 2;
#pragma unroll
          for (int j = 0; j < HJ; ++j) {
            const float g0 = rnd<T>(acc[j * 4 + hh * 2]), g1 = rnd<T>(acc[j * 4 + hh * 2 + 1]);
            const float u0 = rnd<T>(acc[(j + HJ) * 4 + hh * 2]),
                        u1 = rnd<T>(acc[(j + HJ) * 4 + hh * 2 + 1]);
            *reinterpret_cast<uint32_t *>(oa + j * 8) =
                pack2<T>(silu_f(g0) * u0, silu_f(g1) * u1);
          }
        }
      }
    }
    if (tid_wg < 64) bulk_wait0();
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---- host ---------------------------------------------------------------------------------

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

// Per device: 0 unknown, 1 usable (cc 9.0 and the real sm_90a image), 2 not usable.
struct DevInfo {
  std::atomic<int> state[2];  // per dtype: bf16, f16
  std::atomic<int> sms;
};
DevInfo g_dev[64];

template <class T> bool kernel_is_real() {
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, gemm1_swiglu_sm90<T>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return fa.sharedSizeBytes >= sizeof(uint64_t) * 2 * S && fa.binaryVersion >= 90;
}

template <class T> bool sm90_available(int dev, int slot, int *sms) {
  if (dev < 0 || dev >= 64) return false;
  DevInfo &d = g_dev[dev];
  int s = d.state[slot].load(std::memory_order_acquire);
  if (s == 0) {
    int major = 0, minor = 0, n = 0;
    bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
              cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
              cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess;
    if (!ok) cudaGetLastError();
    ok = ok && major == 9 && minor == 0 && n > 0 && get_encode() != nullptr && kernel_is_real<T>();
    if (ok) {
      static uint64_t smem_done[2] = {0, 0};
      ok = ensure_smem(gemm1_swiglu_sm90<T>, kSmem, &smem_done[slot]) == cudaSuccess;
      if (!ok) cudaGetLastError();
    }
    d.sms.store(n);
    s = ok ? 1 : 2;
    d.state[slot].store(s, std::memory_order_release);
  }
  *sms = d.sms.load();
  return s == 1;
}

bool aligned16(const void *ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

bool env_is(const char *name, const char *val) {
  const char *v = std::getenv(name);
  return v && std::strcmp(v, val) == 0;
}

}  // namespace
}  // namespace sm90

bool sm90_gemm1_enabled(uint64_t flags) {
  if (flags & MOE_FLAG_FORCE_PORTABLE) return false;
  if (sm90::env_is("MOE_FUSED_PORTABLE", "1")) return false;
  if (kSm90Gemm1Default) return !sm90::env_is("MOE_FUSED_SM90", "0");
  return sm90::env_is("MOE_FUSED_SM90", "1");
}

bool sm90_gemm1_swiglu(const GroupedGemmArgs &g, int64_t num_experts, uint64_t flags,
                       cudaStream_t stream, moe_status_t *status) {
  using namespace sm90;
  *status = MOE_OK;
  if (!sm90_gemm1_enabled(flags)) return false;
  if (g.epilogue != EPI_SWIGLU || g.b_kn) return false;
  if (g.dtype != MOE_DTYPE_BF16 && g.dtype != MOE_DTYPE_F16) return false;
  const int64_t I = g.N, H = g.K, E = num_experts;
  // Layouts the kernel supports: whole 128-column tiles of a, whole 64-deep k-blocks, 16-byte
  // aligned rows everywhere, W1 experts back to back ([E*2I, H] as one 2-D TMA tensor).
  if (I <= 0 || H <= 0 || E <= 0 || I % (BN / 2) != 0 || H % BK != 0) return false;
  if (E * 2 * I >= (int64_t(1) << 31)) return false;
  if (g.a_div <= 0 || g.n_rows <= 0 || g.n_rows >= (int64_t(1) << 31)) return false;
  if (!aligned16(g.A) || g.lda % 8 != 0) return false;
  if (!aligned16(g.B) || g.ldb % 8 != 0 || g.ldb < H || g.strideBE != 2 * I * g.ldb) return false;
  if (!aligned16(g.C) || g.ldc % 8 != 0 || g.ldc < 2 * I) return false;
  if (!aligned16(g.C2) || g.ldc2 % 8 != 0 || g.ldc2 < I) return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  int sms = 0;
  const bool bf16 = g.dtype == MOE_DTYPE_BF16;
  if (!(bf16 ? sm90_available<__nv_bfloat16>(dev, 0, &sms) : sm90_available<__half>(dev, 1, &sms)))
    return false;

  // TMA descriptor of W1 viewed as [E*2I, H] (row stride ldb), box {64, 128}, 128-byte
  // swizzle. Host-only work (no sync, graph capturable); passed as a __grid_constant__.
  PFN_cuTensorMapEncodeTiled_v12000 enc = get_encode();
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  cuuint64_t dims[2] = {cuuint64_t(H), cuuint64_t(E * 2 * I)};
  cuuint64_t strides[1] = {cuuint64_t(g.ldb) * 2};
  cuuint32_t box[2] = {cuuint32_t(BK), cuuint32_t(BN / 2)};
  cuuint32_t es[2] = {1, 1};
  CUresult r = enc(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                   2, const_cast<void *>(g.B), dims, strides, box, es,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return false;  // e.g. a layout the TMA refuses: portable path

  Params p{};
  p.x = g.A;
  p.ldx = g.lda;
  p.sorted = g.sorted;
  p.n_rows = int32_t(g.n_rows);
  p.a_div = g.a_div;
  p.tiles = g.tiles;
  p.num_tiles = g.num_tiles;
  p.h = g.C;
  p.ldh = g.ldc;
  p.a = g.C2;
  p.lda = g.ldc2;
  p.H = int(H);
  p.I = int(I);
  const int grid = int(std::min<int64_t>(sms, std::max<int64_t>(1, g.max_tiles * (I / (BN / 2)))));
  if (bf16)
    gemm1_swiglu_sm90<__nv_bfloat16><<<grid, THREADS, kSmem, stream>>>(map, p);
  else
    gemm1_swiglu_sm90<__half><<<grid, THREADS, kSmem, stream>>>(map, p);
  *status = launch_status("moe_experts_forward (sm90 GEMM1)");
  return true;
}

}  // namespace cuda
}  // namespace moe
