// moe_routing_plan: counting sort of (token, slot) pairs by expert.
#include "test_util.h"

using namespace moe_test;

namespace {

void check_plan(int64_t T, int64_t k, int64_t E, int32_t idx_dt, uint32_t seed,
                bool transposed_idx = false) {
  SCOPED_TRACE("T=" + std::to_string(T) + " k=" + std::to_string(k) + " E=" + std::to_string(E));
  std::mt19937 rng(seed);
  Tensor idx = transposed_idx ? Tensor::transposed_last2(idx_dt, {T, k}) : Tensor(idx_dt, {T, k});
  for (int64_t i = 0; i < T * k; ++i) idx.set(i, double(rng() % uint32_t(E)));
  const int64_t n = T * k;
  Plan plan(E, n);
  Ctx ctx(moe_routing_plan_workspace_size(MOE_DEVICE_CPU, n, E));
  auto id = idx.desc();
  ASSERT_EQ(moe_routing_plan(ctx.get(), &id, E, &plan.plan), MOE_OK) << moe_last_error();
  // Reference: stable sort of p by expert.
  std::vector<int32_t> ref(static_cast<size_t>(n));
  for (int64_t p = 0; p < n; ++p) ref[size_t(p)] = int32_t(p);
  std::vector<double> iv = idx.values();
  std::stable_sort(ref.begin(), ref.end(),
                   [&](int32_t a, int32_t b) { return iv[size_t(a)] < iv[size_t(b)]; });
  for (int64_t r = 0; r < n; ++r) {
    ASSERT_EQ(plan.at(plan.sorted, r), ref[size_t(r)]) << "row " << r;
    ASSERT_EQ(plan.at(plan.rows, ref[size_t(r)]), r);
  }
  int64_t acc = 0;
  for (int64_t e = 0; e <= E; ++e) {
    ASSERT_EQ(plan.at(plan.off, e), acc) << "offset " << e;
    if (e < E)
      for (double v : iv) acc += int64_t(v) == e;
  }
}

}  // namespace

TEST(Plan, SingleToken) { check_plan(1, 1, 4, MOE_DTYPE_I64, 1); }
TEST(Plan, SingleTokenTopK8) { check_plan(1, 8, 8, MOE_DTYPE_I64, 2); }
TEST(Plan, K1) { check_plan(37, 1, 5, MOE_DTYPE_I32, 3); }
TEST(Plan, K8) { check_plan(100, 8, 64, MOE_DTYPE_I64, 4); }
TEST(Plan, MoreExpertsThanPairs) { check_plan(3, 2, 50, MOE_DTYPE_I32, 5); }  // empty experts
TEST(Plan, StridedIndices) { check_plan(17, 4, 6, MOE_DTYPE_I64, 6, true); }
TEST(Plan, Large) { check_plan(4096, 8, 128, MOE_DTYPE_I64, 7); }

TEST(Plan, AllOneExpert) {
  const int64_t T = 9, k = 2, E = 4, n = T * k;
  Tensor idx(MOE_DTYPE_I32, {T, k});
  for (int64_t i = 0; i < n; ++i) idx.set(i, 2);
  Plan plan(E, n);
  Ctx ctx(moe_routing_plan_workspace_size(MOE_DEVICE_CPU, n, E));
  auto id = idx.desc();
  ASSERT_EQ(moe_routing_plan(ctx.get(), &id, E, &plan.plan), MOE_OK);
  EXPECT_EQ(plan.at(plan.off, 0), 0);
  EXPECT_EQ(plan.at(plan.off, 2), 0);
  EXPECT_EQ(plan.at(plan.off, 3), n);
  EXPECT_EQ(plan.at(plan.off, 4), n);
  for (int64_t r = 0; r < n; ++r) EXPECT_EQ(plan.at(plan.sorted, r), r);
}

TEST(Plan, ZeroTokens) {
  const int64_t E = 3;
  Tensor idx(MOE_DTYPE_I64, {0, 4});
  Plan plan(E, 0);
  plan.off.fill_bytes(0x7f);
  plan.refresh();
  Ctx ctx(moe_routing_plan_workspace_size(MOE_DEVICE_CPU, 0, E));
  auto id = idx.desc();
  ASSERT_EQ(moe_routing_plan(ctx.get(), &id, E, &plan.plan), MOE_OK) << moe_last_error();
  for (int64_t e = 0; e <= E; ++e) EXPECT_EQ(plan.at(plan.off, e), 0);
}
