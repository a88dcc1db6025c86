// moe_fused_linear forward and backward against a double reference.
#include "test_util.h"

using namespace moe_test;

namespace {

struct LCase {
  int64_t N, E, in, out;
  int32_t dt = MOE_DTYPE_F32;
  bool transposed = false;
  bool strided = false;
};

void run_linear(const LCase &c) {
  SCOPED_TRACE("N=" + std::to_string(c.N) + " E=" + std::to_string(c.E) + " in=" +
               std::to_string(c.in) + " out=" + std::to_string(c.out) + " dt=" +
               std::to_string(c.dt));
  std::mt19937 rng(uint32_t(c.N * 7 + c.in));
  const int64_t N = c.N, E = c.E, In = c.in, Out = c.out;
  auto act = [&](std::vector<int64_t> s) {
    return c.strided ? Tensor::padded(c.dt, s, 2) : Tensor(c.dt, s);
  };
  auto wt = [&]() {
    return c.transposed ? Tensor::transposed_last2(c.dt, {E, Out, In}) : Tensor(c.dt, {E, Out, In});
  };
  Tensor x = act({N, In}), W = wt(), sel(MOE_DTYPE_I64, {N}), out = act({N, Out}),
         go = act({N, Out}), gx = act({N, In}), gW = wt();
  fill_normal(x, rng);
  fill_normal(W, rng, 1.0 / std::sqrt(double(std::max<int64_t>(In, 1))));
  fill_normal(go, rng);
  for (int64_t i = 0; i < N; ++i) sel.set(i, double(rng() % uint32_t(E)));
  out.fill_bytes(0x7f);
  gx.fill_bytes(0x7f);
  gW.fill_bytes(0x7f);
  Ctx ctx(moe_linear_workspace_size(MOE_DEVICE_CPU, N, E, In, Out));
  auto xd = x.desc(), wd = W.desc(), sd = sel.desc(), od = out.desc(), gd = go.desc(),
       gxd = gx.desc(), gwd = gW.desc();
  ASSERT_EQ(moe_linear_forward(ctx.get(), &xd, &wd, &sd, &od), MOE_OK) << moe_last_error();
  ASSERT_EQ(moe_linear_backward(ctx.get(), &gd, &xd, &wd, &sd, &gxd, &gwd), MOE_OK)
      << moe_last_error();
  std::vector<double> xv = x.values(), wv = W.values(), sv = sel.values(), gv = go.values();
  std::vector<double> ro(size_t(N * Out), 0), rgx(size_t(N * In), 0), rgw(size_t(E * Out * In), 0);
  for (int64_t b = 0; b < N; ++b) {
    const int64_t e = int64_t(sv[size_t(b)]);
    for (int64_t o = 0; o < Out; ++o)
      for (int64_t i = 0; i < In; ++i) {
        const double w = wv[size_t((e * Out + o) * In + i)];
        ro[size_t(b * Out + o)] += w * xv[size_t(b * In + i)];
        rgx[size_t(b * In + i)] += w * gv[size_t(b * Out + o)];
        rgw[size_t((e * Out + o) * In + i)] += gv[size_t(b * Out + o)] * xv[size_t(b * In + i)];
      }
  }
  const double tol = tol_for(c.dt);
  if (N * Out > 0) { EXPECT_LE(rel_err(out.values(), ro), tol) << "out"; }
  if (N * In > 0) { EXPECT_LE(rel_err(gx.values(), rgx), tol) << "grad_input"; }
  if (E * Out * In > 0) {
    std::vector<double> gwv = gW.values();
    if (N > 0) { EXPECT_LE(rel_err(gwv, rgw), tol) << "grad_weight"; }
    // experts that no row selects: exact zeros
    for (int64_t e = 0; e < E; ++e) {
      bool used = false;
      for (double v : sv) used |= int64_t(v) == e;
      if (!used)
        for (int64_t i = 0; i < Out * In; ++i) { ASSERT_EQ(gwv[size_t(e * Out * In + i)], 0.0); }
    }
  }
}

}  // namespace

TEST(Linear, Small) { run_linear({9, 3, 5, 7}); }
TEST(Linear, ThinOut16) { run_linear({57, 6, 70, 16}); }
TEST(Linear, ThinIn16) { run_linear({57, 6, 16, 70}); }
TEST(Linear, SingleRow) { run_linear({1, 4, 13, 16}); }
TEST(Linear, EmptyExperts) { run_linear({3, 12, 11, 5}); }
TEST(Linear, ManyExpertsParallelPath) { run_linear({300, 40, 33, 16}); }
TEST(Linear, TransposedWeight) {
  LCase c{41, 5, 23, 16};
  c.transposed = true;
  run_linear(c);
}
TEST(Linear, StridedActivations) {
  LCase c{41, 5, 23, 17};
  c.strided = true;
  run_linear(c);
}
TEST(Linear, BF16) {
  LCase c{41, 5, 23, 16};
  c.dt = MOE_DTYPE_BF16;
  run_linear(c);
}
TEST(Linear, BF16TransposedParallel) {
  LCase c{300, 40, 33, 16};
  c.dt = MOE_DTYPE_BF16;
  c.transposed = true;
  run_linear(c);
}
TEST(Linear, F16) {
  LCase c{41, 5, 23, 16};
  c.dt = MOE_DTYPE_F16;
  run_linear(c);
}
TEST(Linear, F64) {
  LCase c{21, 4, 9, 6};
  c.dt = MOE_DTYPE_F64;
  run_linear(c);
}
TEST(Linear, ZeroRows) { run_linear({0, 3, 5, 7}); }
