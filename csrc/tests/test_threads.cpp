// Calls from several threads at once: results equal the single-threaded
// ones, and the last-error message is per thread.
#include <thread>

#include "test_util.h"

using namespace moe_test;

TEST(Threads, ConcurrentForwardCallsAgree) {
  const int64_t T = 40, k = 4, H = 24, I = 10, E = 12, n = T * k;
  std::mt19937 rng(11);
  Tensor x(MOE_DTYPE_F32, {T, H}), W1(MOE_DTYPE_F32, {E, 2 * I, H}), W2(MOE_DTYPE_F32, {E, H, I}),
      s(MOE_DTYPE_F32, {T, k}), idx(MOE_DTYPE_I32, {T, k});
  fill_normal(x, rng);
  fill_normal(W1, rng, 0.2);
  fill_normal(W2, rng, 0.2);
  fill_normal(s, rng);
  for (int64_t i = 0; i < n; ++i) idx.set(i, double(rng() % E));
  auto run = [&](std::vector<unsigned char> &result) {
    Ctx ctx(moe_experts_workspace_size(MOE_DEVICE_CPU, T, k, H, I, E));
    Plan plan(E, n);
    Tensor h(MOE_DTYPE_F32, {n, 2 * I}), out(MOE_DTYPE_F32, {T, H});
    auto xd = x.desc(), id = idx.desc(), sd = s.desc(), w1d = W1.desc(), w2d = W2.desc(),
         hd = h.desc(), od = out.desc();
    for (int rep = 0; rep < 20; ++rep)
      if (moe_experts_forward(ctx.get(), &xd, &id, &sd, &w1d, &w2d, &plan.plan, &hd, &od) !=
          MOE_OK)
        return;
    result = out.mem;
  };
  std::vector<unsigned char> ref;
  run(ref);
  ASSERT_FALSE(ref.empty());
  std::vector<std::vector<unsigned char>> got(4);
  std::vector<std::thread> threads;
  for (auto &g : got) threads.emplace_back([&run, &g] { run(g); });
  for (auto &t : threads) t.join();
  for (auto &g : got) EXPECT_EQ(g, ref);
}

TEST(Threads, LastErrorIsPerThread) {
  moe_tensor_t bad{};
  bad.ndim = 2;
  bad.dtype = MOE_DTYPE_F32;
  moe_context_t ctx{};
  EXPECT_EQ(moe_routing_plan(&ctx, &bad, 4, nullptr), MOE_ERR_DTYPE);
  const std::string mine = moe_last_error();
  std::string other;
  std::thread t([&] {
    other = moe_last_error();
    moe_routing_plan(nullptr, nullptr, 4, nullptr);
  });
  t.join();
  EXPECT_EQ(other, "");
  EXPECT_EQ(mine, moe_last_error());
  EXPECT_NE(mine.find("top_k_index"), std::string::npos) << mine;
}
