// CPU scratch benchmark of the experts layer through the C ABI (not a test):
//   moe_fused_bench_cpu [T H I E k iters dtype(f32|bf16)]
// Times forward and backward with a pre-touched workspace and reports the
// median and min ms and GFLOP/s, next to one dense sgemm of equal flops.
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/gemm.h"
#include "moe_fused.h"

namespace {
moe_tensor_t desc(void *p, int32_t dt, std::vector<int64_t> shape) {
  moe_tensor_t t{};
  t.data = p;
  t.dtype = dt;
  t.ndim = int32_t(shape.size());
  int64_t s = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.shape[d] = shape[d];
    t.strides[d] = s;
    s *= shape[d];
  }
  return t;
}
double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
double cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}
// Wall time (median, min) and process CPU time (min; with OMP_NUM_THREADS=1
// it is robust against other processes on the machine).
template <class F> void time_it(const char *what, int iters, double flops, F &&f) {
  std::vector<double> ms, cpu;
  f();
  for (int i = 0; i < iters; ++i) {
    double t0 = now_ms(), c0 = cpu_ms();
    f();
    ms.push_back(now_ms() - t0);
    cpu.push_back(cpu_ms() - c0);
  }
  std::sort(ms.begin(), ms.end());
  std::sort(cpu.begin(), cpu.end());
  std::printf("%-10s median %8.2f ms  min %8.2f ms  %6.1f GFLOP/s (min)  cpu %8.2f ms\n", what,
              ms[ms.size() / 2], ms[0], flops / ms[0] / 1e6, cpu[0]);
}
}  // namespace

int main(int argc, char **argv) {
  int64_t T = argc > 1 ? atoll(argv[1]) : 512, H = argc > 2 ? atoll(argv[2]) : 1024,
          I = argc > 3 ? atoll(argv[3]) : 384, E = argc > 4 ? atoll(argv[4]) : 64,
          k = argc > 5 ? atoll(argv[5]) : 8;
  int iters = argc > 6 ? atoi(argv[6]) : 5;
  std::string dts = argc > 7 ? argv[7] : "f32";
  const int32_t dt = dts == "bf16" ? MOE_DTYPE_BF16 : MOE_DTYPE_F32;
  const size_t es = dt == MOE_DTYPE_BF16 ? 2 : 4;
  const int64_t n = T * k;
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  auto fill = [&](std::vector<char> &v, int64_t cnt, float scale) {
    v.resize(size_t(cnt) * es);
    for (int64_t i = 0; i < cnt; ++i) {
      float x = nd(rng) * scale;
      if (es == 4) std::memcpy(&v[i * 4], &x, 4);
      else {
        uint16_t b = moe::cpu::f32_to_bf16(x);
        std::memcpy(&v[i * 2], &b, 2);
      }
    }
  };
  std::vector<char> x, w1, w2, s, go, h(n * 2 * I * es), out(T * H * es), gx(T * H * es),
      gs(T * k * es), gw1(E * 2 * I * H * es), gw2(E * H * I * es);
  fill(x, T * H, 1.f);
  fill(w1, E * 2 * I * H, 0.03f);
  fill(w2, E * H * I, 0.05f);
  fill(s, T * k, 0.3f);
  fill(go, T * H, 1.f);
  std::vector<int64_t> idx(n);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> perm(E);
    for (int64_t e = 0; e < E; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t j = 0; j < k; ++j) idx[t * k + j] = perm[j];
  }
  std::vector<int32_t> off(E + 1), sp(n), pr(n);
  moe_plan_t plan{desc(off.data(), MOE_DTYPE_I32, {E + 1}), desc(sp.data(), MOE_DTYPE_I32, {n}),
                  desc(pr.data(), MOE_DTYPE_I32, {n})};
  size_t ws = moe_experts_workspace_size(MOE_DEVICE_CPU, T, k, H, I, E);
  std::vector<char> wsbuf(ws, 1);
  moe_context_t ctx{};
  ctx.device_type = MOE_DEVICE_CPU;
  ctx.workspace = wsbuf.data();
  ctx.workspace_bytes = ws;
  auto X = desc(x.data(), dt, {T, H}), IDX = desc(idx.data(), MOE_DTYPE_I64, {T, k}),
       S = desc(s.data(), dt, {T, k}), W1 = desc(w1.data(), dt, {E, 2 * I, H}),
       W2 = desc(w2.data(), dt, {E, H, I}), Hh = desc(h.data(), dt, {n, 2 * I}),
       O = desc(out.data(), dt, {T, H}), GO = desc(go.data(), dt, {T, H}),
       GX = desc(gx.data(), dt, {T, H}), GS = desc(gs.data(), dt, {T, k}),
       GW1 = desc(gw1.data(), dt, {E, 2 * I, H}), GW2 = desc(gw2.data(), dt, {E, H, I});
  std::printf("T=%ld H=%ld I=%ld E=%ld k=%ld %s, workspace %.1f MB\n", long(T), long(H), long(I),
              long(E), long(k), dts.c_str(), ws / 1e6);
  const double f = 6.0 * n * H * I;
  time_it("forward", iters, f, [&] {
    if (moe_experts_forward(&ctx, &X, &IDX, &S, &W1, &W2, &plan, &Hh, &O) != MOE_OK)
      std::printf("error: %s\n", moe_last_error());
  });
  time_it("backward", iters, 2 * f, [&] {
    if (moe_experts_backward(&ctx, &GO, &X, &S, &W1, &W2, &plan, &Hh, &GX, &GS, &GW1, &GW2) !=
        MOE_OK)
      std::printf("error: %s\n", moe_last_error());
  });
  // One dense GEMM with the forward's flops, for reference.
  const int64_t M = n, N = 3 * I, K = H;
  std::vector<float> A(M * K, 1.f), B(N * K, 1.f), C(M * N);
  time_it("sgemm-ref", iters, 2.0 * M * N * K, [&] {
    moe::cpu::gemm(moe::cpu::Trans::N, moe::cpu::Trans::T, M, N, K, 1.f, A.data(), K, B.data(), K,
                   0.f, C.data(), N);
  });
  return 0;
}
