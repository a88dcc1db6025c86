// The fused experts layer (forward and backward) against a naive
// double-precision reference, through the C ABI.
#include "test_util.h"

using namespace moe_test;

namespace {

enum Routing { kRandom, kSubset, kRepeats };

struct Case {
  int64_t T, k, H, I, E;
  int32_t dt = MOE_DTYPE_F32;
  bool transposed = false;  // weights (and weight grads) as transposed views
  bool strided = false;     // x, dout, out, dx with padded rows; s transposed
  Routing routing = kRandom;
  int32_t idx_dt = MOE_DTYPE_I64;
  bool s_f32 = false;       // routing weights in float32 with bf16/f16 activations
};

std::string describe(const Case &c) {
  return "T=" + std::to_string(c.T) + " k=" + std::to_string(c.k) + " H=" + std::to_string(c.H) +
         " I=" + std::to_string(c.I) + " E=" + std::to_string(c.E) + " dtype=" +
         std::to_string(c.dt) + (c.transposed ? " transposed" : "") + (c.strided ? " strided" : "");
}

Tensor make(const Case &c, std::vector<int64_t> shape, bool weight) {
  if (weight && c.transposed) return Tensor::transposed_last2(c.dt, shape);
  if (!weight && c.strided) return Tensor::padded(c.dt, shape, 3);
  return Tensor(c.dt, shape);
}

void run_case(const Case &c, uint32_t seed = 0) {
  SCOPED_TRACE(describe(c));
  std::mt19937 rng(seed + uint32_t(c.T * 131 + c.E));
  const int64_t T = c.T, k = c.k, H = c.H, I = c.I, E = c.E, n = T * k;
  Tensor x = make(c, {T, H}, false), W1 = make(c, {E, 2 * I, H}, true),
         W2 = make(c, {E, H, I}, true), dout = make(c, {T, H}, false);
  const int32_t sdt = c.s_f32 ? MOE_DTYPE_F32 : c.dt;
  Tensor s = c.strided ? Tensor::transposed_last2(sdt, {T, k}) : Tensor(sdt, {T, k});
  Tensor idx(c.idx_dt, {T, k});
  fill_normal(x, rng);
  fill_normal(W1, rng, 1.0 / std::sqrt(double(H)));
  fill_normal(W2, rng, 1.0 / std::sqrt(double(I)));
  fill_normal(dout, rng);
  std::uniform_real_distribution<double> ud(0.1, 1.0);
  for (int64_t i = 0; i < n; ++i) s.set(i, ud(rng));
  const int64_t span = c.routing == kSubset ? std::max<int64_t>(1, E / 3) : E;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = int64_t(rng() % uint32_t(span));
      if (c.routing == kSubset) e = (e * 3 + 1) % E;  // experts 0, 2, ... stay empty
      if (c.routing == kRepeats && j > 0 && rng() % 2) e = int64_t(idx.get(t * k + j - 1));
      idx.set(t * k + j, double(e));
    }

  Plan plan(E, n);
  Tensor h(c.dt, {n, 2 * I});
  Tensor out = make(c, {T, H}, false);
  out.fill_bytes(0x7f);
  Ctx ctx(moe_experts_workspace_size(MOE_DEVICE_CPU, T, k, H, I, E));
  auto xd = x.desc(), id = idx.desc(), sd = s.desc(), w1d = W1.desc(), w2d = W2.desc(),
       hd = h.desc(), od = out.desc();
  ASSERT_EQ(moe_experts_forward(ctx.get(), &xd, &id, &sd, &w1d, &w2d, &plan.plan, &hd, &od),
            MOE_OK)
      << moe_last_error();

  // Without h (no-grad): the same plan and a bit-identical out, the workspace unchanged.
  {
    Plan plan2(E, n);
    Tensor out2 = make(c, {T, H}, false);
    out2.fill_bytes(0x7f);
    auto od2 = out2.desc();
    Ctx fwd_ctx(moe_experts_forward_workspace_size(MOE_DEVICE_CPU, c.dt, T, k, H, I, E, 0));
    ASSERT_EQ(moe_experts_forward(fwd_ctx.get(), &xd, &id, &sd, &w1d, &w2d, &plan2.plan, nullptr,
                                  &od2),
              MOE_OK)
        << moe_last_error();
    EXPECT_EQ(out2.mem, out.mem) << "out without h";
    EXPECT_EQ(plan2.off.mem, plan.off.mem);
    EXPECT_EQ(plan2.sorted.mem, plan.sorted.mem);
    EXPECT_EQ(plan2.rows.mem, plan.rows.mem);
  }

  // The plan: offsets = counts scan, rows sorted by expert, stable, inverse.
  std::vector<double> iv = idx.values();
  ASSERT_EQ(plan.at(plan.off, 0), 0);
  ASSERT_EQ(plan.at(plan.off, E), n);
  for (int64_t e = 0; e < E; ++e) {
    int64_t cnt = 0;
    for (double v : iv) cnt += int64_t(v) == e;
    ASSERT_EQ(plan.at(plan.off, e + 1) - plan.at(plan.off, e), cnt) << "expert " << e;
    for (int64_t r = plan.at(plan.off, e); r < plan.at(plan.off, e + 1); ++r) {
      const int32_t p = plan.at(plan.sorted, r);
      ASSERT_EQ(int64_t(iv[size_t(p)]), e);
      if (r > plan.at(plan.off, e)) { ASSERT_LT(plan.at(plan.sorted, r - 1), p); }
      ASSERT_EQ(plan.at(plan.rows, p), r);
    }
  }

  ExpertsRef R = experts_ref(T, k, H, I, E, x.values(), iv, s.values(), W1.values(),
                             W2.values(), dout.values());
  const double tol = tol_for(c.dt);
  if (T * H > 0) { EXPECT_LE(rel_err(out.values(), R.out), tol) << "out"; }

  // h rows in plan order: h[r] = W1[e] x_t for pair sorted[r].
  {
    std::vector<double> hv = h.values(), href(size_t(n * 2 * I));
    std::vector<double> xv = x.values(), w1v = W1.values();
    for (int64_t r = 0; r < n; ++r) {
      const int64_t p = plan.at(plan.sorted, r), t = p / k, e = int64_t(iv[size_t(p)]);
      for (int64_t o = 0; o < 2 * I; ++o) {
        double acc = 0;
        for (int64_t c2 = 0; c2 < H; ++c2) acc += w1v[size_t((e * 2 * I + o) * H + c2)] * xv[size_t(t * H + c2)];
        href[size_t(r * 2 * I + o)] = acc;
      }
    }
    if (n * I > 0) { EXPECT_LE(rel_err(hv, href), tol) << "h"; }
  }

  Tensor dx = make(c, {T, H}, false), ds(sdt, {T, k}), dW1 = make(c, {E, 2 * I, H}, true),
         dW2 = make(c, {E, H, I}, true);
  dx.fill_bytes(0x7f);
  ds.fill_bytes(0x7f);
  dW1.fill_bytes(0x7f);  // must be overwritten, zeros included
  dW2.fill_bytes(0x7f);
  auto god = dout.desc(), dxd = dx.desc(), dsd = ds.desc(), dw1d = dW1.desc(), dw2d = dW2.desc();
  ASSERT_EQ(moe_experts_backward(ctx.get(), &god, &xd, &sd, &w1d, &w2d, &plan.plan, &hd, &dxd,
                                 &dsd, &dw1d, &dw2d),
            MOE_OK)
      << moe_last_error();
  if (T * H > 0) { EXPECT_LE(rel_err(dx.values(), R.dx), tol) << "dx"; }
  if (n * I * H > 0) { EXPECT_LE(rel_err(ds.values(), R.ds), tol) << "ds"; }
  if (E * I * H > 0) {
    EXPECT_LE(rel_err(dW1.values(), R.dW1), tol) << "dW1";
    EXPECT_LE(rel_err(dW2.values(), R.dW2), tol) << "dW2";
  }
  // Experts without rows get exact zeros.
  for (int64_t e = 0; e < E; ++e) {
    if (plan.at(plan.off, e + 1) != plan.at(plan.off, e)) continue;
    for (int64_t i = 0; i < 2 * I * H; ++i) { ASSERT_EQ(dW1.get(e * 2 * I * H + i), 0.0); }
    for (int64_t i = 0; i < H * I; ++i) { ASSERT_EQ(dW2.get(e * H * I + i), 0.0); }
  }

  // Every gradient is optional: each alone gives the same values.
  Tensor dx2 = make(c, {T, H}, false);
  auto dx2d = dx2.desc();
  ASSERT_EQ(moe_experts_backward(ctx.get(), &god, &xd, &sd, &w1d, &w2d, &plan.plan, &hd, &dx2d,
                                 nullptr, nullptr, nullptr),
            MOE_OK)
      << moe_last_error();
  EXPECT_EQ(dx2.values(), dx.values());
  Tensor dW22 = make(c, {E, H, I}, true);
  auto dw22d = dW22.desc();
  ASSERT_EQ(moe_experts_backward(ctx.get(), &god, &xd, &sd, &w1d, &w2d, &plan.plan, &hd, nullptr,
                                 nullptr, nullptr, &dw22d),
            MOE_OK)
      << moe_last_error();
  EXPECT_EQ(dW22.values(), dW2.values());
}

}  // namespace

TEST(Experts, Tiny) { run_case({1, 1, 5, 3, 4}); }
TEST(Experts, SmallF32) { run_case({7, 2, 5, 3, 4}); }
TEST(Experts, OddSizes) { run_case({13, 3, 17, 6, 5}); }
TEST(Experts, TopK8) { run_case({33, 8, 19, 7, 11}); }
TEST(Experts, SingleTokenTopK8) { run_case({1, 8, 9, 5, 16}); }
TEST(Experts, EmptyExperts) {
  Case c{29, 2, 11, 5, 9};
  c.routing = kSubset;
  run_case(c);
}
TEST(Experts, RepeatedExpertInRow) {
  Case c{21, 4, 10, 4, 6};
  c.routing = kRepeats;
  run_case(c);
}
TEST(Experts, ManyExpertsParallelPath) { run_case({64, 8, 40, 24, 32}); }
TEST(Experts, Int32Indices) {
  Case c{17, 3, 12, 5, 7};
  c.idx_dt = MOE_DTYPE_I32;
  run_case(c);
}
TEST(Experts, TransposedWeights) {
  Case c{19, 4, 13, 6, 7};
  c.transposed = true;
  run_case(c);
}
TEST(Experts, TransposedWeightsParallelPath) {
  Case c{64, 8, 24, 10, 32};
  c.transposed = true;
  run_case(c);
}
TEST(Experts, StridedInputsAndOutputs) {
  Case c{15, 3, 14, 5, 6};
  c.strided = true;
  run_case(c);
}
TEST(Experts, BF16) {
  Case c{23, 3, 17, 6, 5};
  c.dt = MOE_DTYPE_BF16;
  run_case(c);
}
TEST(Experts, BF16ParallelTransposed) {
  Case c{64, 8, 32, 12, 32};
  c.dt = MOE_DTYPE_BF16;
  c.transposed = true;
  run_case(c);
}
TEST(Experts, BF16WithF32RoutingWeights) {
  Case c{23, 3, 17, 6, 5};
  c.dt = MOE_DTYPE_BF16;
  c.s_f32 = true;
  run_case(c);
}
TEST(Experts, F16) {
  Case c{23, 3, 17, 6, 5};
  c.dt = MOE_DTYPE_F16;
  c.strided = true;
  run_case(c);
}
TEST(Experts, F64) {
  Case c{11, 3, 9, 4, 5};
  c.dt = MOE_DTYPE_F64;
  run_case(c);
}
TEST(Experts, ZeroTokens) { run_case({0, 2, 8, 4, 3}); }
TEST(Experts, ZeroTokensBF16) {
  Case c{0, 8, 8, 4, 3};
  c.dt = MOE_DTYPE_BF16;
  run_case(c);
}

// The forward and backward are deterministic: two runs are bit-identical.
TEST(Experts, Deterministic) {
  const int64_t T = 48, k = 8, H = 32, I = 16, E = 24, n = T * k;
  std::mt19937 rng(5);
  Tensor x(MOE_DTYPE_F32, {T, H}), W1(MOE_DTYPE_F32, {E, 2 * I, H}), W2(MOE_DTYPE_F32, {E, H, I}),
      s(MOE_DTYPE_F32, {T, k}), idx(MOE_DTYPE_I64, {T, k});
  fill_normal(x, rng);
  fill_normal(W1, rng, 0.2);
  fill_normal(W2, rng, 0.2);
  fill_normal(s, rng);
  for (int64_t i = 0; i < n; ++i) idx.set(i, double(rng() % E));
  Ctx ctx(moe_experts_workspace_size(MOE_DEVICE_CPU, T, k, H, I, E));
  std::vector<unsigned char> first_out, first_dx, first_dw;
  for (int rep = 0; rep < 2; ++rep) {
    Plan plan(E, n);
    Tensor h(MOE_DTYPE_F32, {n, 2 * I}), out(MOE_DTYPE_F32, {T, H}), dx(MOE_DTYPE_F32, {T, H}),
        dW1(MOE_DTYPE_F32, {E, 2 * I, H});
    auto xd = x.desc(), id = idx.desc(), sd = s.desc(), w1d = W1.desc(), w2d = W2.desc(),
         hd = h.desc(), od = out.desc(), dxd = dx.desc(), dw1d = dW1.desc();
    ASSERT_EQ(moe_experts_forward(ctx.get(), &xd, &id, &sd, &w1d, &w2d, &plan.plan, &hd, &od),
              MOE_OK);
    ASSERT_EQ(moe_experts_backward(ctx.get(), &xd /*grad_out*/, &xd, &sd, &w1d, &w2d, &plan.plan,
                                   &hd, &dxd, nullptr, &dw1d, nullptr),
              MOE_OK);
    if (rep == 0) {
      first_out = out.mem;
      first_dx = dx.mem;
      first_dw = dW1.mem;
    } else {
      EXPECT_EQ(first_out, out.mem);
      EXPECT_EQ(first_dx, dx.mem);
      EXPECT_EQ(first_dw, dW1.mem);
    }
  }
}

// Experts with more rows than one chunk (256): dW accumulates over chunks.
TEST(Experts, ManyRowsPerExpert) { run_case({300, 2, 12, 5, 2}); }
TEST(Experts, ManyRowsPerExpertTransposed) {
  Case c{300, 3, 10, 4, 3};
  c.transposed = true;
  run_case(c);
}
TEST(Experts, ManyRowsPerExpertBF16) {
  Case c{290, 2, 12, 5, 2};
  c.dt = MOE_DTYPE_BF16;
  run_case(c);
}
TEST(Experts, ManyRowsManyExperts) { run_case({700, 4, 16, 6, 8}); }

// Degenerate sizes are valid: k = 0 (out = 0), I = 0 (out = 0), H = 0, E with T = 0.
TEST(Experts, ZeroTopK) { run_case({5, 0, 6, 3, 4}); }
TEST(Experts, ZeroIntermediate) { run_case({5, 2, 6, 0, 4}); }
TEST(Experts, ZeroHidden) { run_case({5, 2, 0, 3, 4}); }
TEST(Experts, ZeroExpertsZeroTokens) { run_case({0, 2, 6, 3, 0}); }
