// The C ABI's argument checks: each error status, a message that names the
// argument, and nothing written on failure.
#include "test_util.h"

using namespace moe_test;

namespace {

bool has(const std::string &msg, const std::string &what) {
  return msg.find(what) != std::string::npos;
}

// A valid experts problem whose descriptors each test breaks in one way.
struct ExpertsArgs {
  int64_t T = 6, k = 2, H = 8, I = 3, E = 4;
  Tensor x, idx, s, W1, W2, h, out, dout, dx, ds, dW1, dW2;
  Plan plan;
  Ctx ctx;
  moe_tensor_t xd, id, sd, w1d, w2d, hd, od, god, dxd, dsd, dw1d, dw2d;
  ExpertsArgs()
      : x(MOE_DTYPE_F32, {T, H}), idx(MOE_DTYPE_I64, {T, k}), s(MOE_DTYPE_F32, {T, k}),
        W1(MOE_DTYPE_F32, {E, 2 * I, H}), W2(MOE_DTYPE_F32, {E, H, I}),
        h(MOE_DTYPE_F32, {T * k, 2 * I}), out(MOE_DTYPE_F32, {T, H}), dout(MOE_DTYPE_F32, {T, H}),
        dx(MOE_DTYPE_F32, {T, H}), ds(MOE_DTYPE_F32, {T, k}), dW1(MOE_DTYPE_F32, {E, 2 * I, H}),
        dW2(MOE_DTYPE_F32, {E, H, I}), plan(E, T * k),
        ctx(moe_experts_workspace_size(MOE_DEVICE_CPU, T, k, H, I, E)) {
    std::mt19937 rng(3);
    for (Tensor *t : {&x, &s, &W1, &W2, &dout}) fill_normal(*t, rng);
    for (int64_t i = 0; i < T * k; ++i) idx.set(i, double(i % E));
    refresh();
  }
  void refresh() {
    xd = x.desc(), id = idx.desc(), sd = s.desc(), w1d = W1.desc(), w2d = W2.desc();
    hd = h.desc(), od = out.desc(), god = dout.desc(), dxd = dx.desc(), dsd = ds.desc();
    dw1d = dW1.desc(), dw2d = dW2.desc();
    plan.refresh();
  }
  moe_status_t forward() {
    return moe_experts_forward(ctx.get(), &xd, &id, &sd, &w1d, &w2d, &plan.plan, &hd, &od);
  }
  moe_status_t backward() {
    return moe_experts_backward(ctx.get(), &god, &xd, &sd, &w1d, &w2d, &plan.plan, &hd, &dxd,
                                &dsd, &dw1d, &dw2d);
  }
};

}  // namespace

TEST(Abi, Library) {
  EXPECT_EQ(moe_abi_version(), MOE_ABI_VERSION);
#ifdef MOE_FUSED_WITH_CUDA
  EXPECT_EQ(moe_has_cuda(), 1);
#else
  EXPECT_EQ(moe_has_cuda(), 0);
#endif
  ASSERT_NE(moe_last_error(), nullptr);
}

TEST(Abi, ValidCallsSucceed) {
  ExpertsArgs a;
  ASSERT_EQ(a.forward(), MOE_OK) << moe_last_error();
  ASSERT_EQ(a.backward(), MOE_OK) << moe_last_error();
}

TEST(Abi, NullContext) {
  ExpertsArgs a;
  EXPECT_EQ(moe_experts_forward(nullptr, &a.xd, &a.id, &a.sd, &a.w1d, &a.w2d, &a.plan.plan, &a.hd,
                                &a.od),
            MOE_ERR_NULL);
  EXPECT_TRUE(has(moe_last_error(), "ctx")) << moe_last_error();
}

TEST(Abi, NullDescriptor) {
  ExpertsArgs a;
  EXPECT_EQ(moe_experts_forward(a.ctx.get(), &a.xd, &a.id, &a.sd, nullptr, &a.w2d, &a.plan.plan,
                                &a.hd, &a.od),
            MOE_ERR_NULL);
  EXPECT_TRUE(has(moe_last_error(), "gate_up_proj")) << moe_last_error();
  EXPECT_EQ(moe_experts_forward(a.ctx.get(), &a.xd, &a.id, &a.sd, &a.w1d, &a.w2d, nullptr, &a.hd,
                                &a.od),
            MOE_ERR_NULL);
  EXPECT_TRUE(has(moe_last_error(), "plan")) << moe_last_error();
}

TEST(Abi, NullData) {
  ExpertsArgs a;
  a.w2d.data = nullptr;
  EXPECT_EQ(a.forward(), MOE_ERR_NULL);
  EXPECT_TRUE(has(moe_last_error(), "down_proj")) << moe_last_error();
}

TEST(Abi, WrongRankNamesArgument) {
  ExpertsArgs a;
  a.w1d.ndim = 2;
  a.w1d.shape[0] = 4;
  a.w1d.shape[1] = 6;
  EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
  EXPECT_STREQ(moe_last_error(), "gate_up_proj: expected 3 dims [E, 2I, H], got 2 dims [4, 6]");
}

TEST(Abi, DescriptorNameIsUsed) {
  ExpertsArgs a;
  a.W1.name = "experts.gate_up_proj";
  a.refresh();
  a.w1d.ndim = 2;
  EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "experts.gate_up_proj:")) << moe_last_error();
}

TEST(Abi, OddTwoI) {
  ExpertsArgs a;
  a.w1d.shape[1] = 5;
  EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "gate_up_proj")) << moe_last_error();
  EXPECT_TRUE(has(moe_last_error(), "even")) << moe_last_error();
}

TEST(Abi, MismatchedHidden) {
  ExpertsArgs a;
  a.w2d.shape[1] = 7;
  EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "down_proj")) << moe_last_error();
  ExpertsArgs b;
  b.w1d.shape[2] = 9;
  EXPECT_EQ(b.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "gate_up_proj")) << moe_last_error();
}

TEST(Abi, MismatchedExperts) {
  ExpertsArgs a;
  a.w2d.shape[0] = 3;
  EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "down_proj")) << moe_last_error();
}

TEST(Abi, MismatchedTopK) {
  ExpertsArgs a;
  a.sd.shape[1] = 3;
  EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "top_k_weights")) << moe_last_error();
  ExpertsArgs b;
  b.id.shape[0] = 5;
  EXPECT_EQ(b.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "top_k_index")) << moe_last_error();
}

TEST(Abi, IntegerActivations) {
  ExpertsArgs a;
  a.xd.dtype = MOE_DTYPE_I32;
  EXPECT_EQ(a.forward(), MOE_ERR_DTYPE);
  EXPECT_TRUE(has(moe_last_error(), "hidden_states")) << moe_last_error();
}

TEST(Abi, FloatIndices) {
  ExpertsArgs a;
  a.id.dtype = MOE_DTYPE_F32;
  EXPECT_EQ(a.forward(), MOE_ERR_DTYPE);
  EXPECT_TRUE(has(moe_last_error(), "top_k_index")) << moe_last_error();
}

TEST(Abi, MixedWeightDtype) {
  ExpertsArgs a;
  a.w2d.dtype = MOE_DTYPE_BF16;
  EXPECT_EQ(a.forward(), MOE_ERR_DTYPE);
  EXPECT_TRUE(has(moe_last_error(), "down_proj")) << moe_last_error();
}

TEST(Abi, PlanTensorDtype) {
  ExpertsArgs a;
  a.plan.plan.sorted_pairs.dtype = MOE_DTYPE_I64;
  EXPECT_EQ(a.forward(), MOE_ERR_DTYPE);
  EXPECT_TRUE(has(moe_last_error(), "plan.sorted_pairs")) << moe_last_error();
}

TEST(Abi, PlanTensorShape) {
  ExpertsArgs a;
  a.plan.plan.expert_offsets.shape[0] = 4;  // E+1 = 5
  EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "plan.expert_offsets")) << moe_last_error();
}

TEST(Abi, NonContiguousH) {
  ExpertsArgs a;
  a.hd.strides[0] = 1;
  a.hd.strides[1] = a.T * a.k;
  EXPECT_EQ(a.forward(), MOE_ERR_STRIDE);
  EXPECT_TRUE(has(moe_last_error(), "h:")) << moe_last_error();
}

// h is optional in the forward (no-grad calls): NULL is valid, nothing is stored for it and
// out is bit-identical; the backward still requires it; a given h is still checked.
TEST(Abi, ForwardWithoutH) {
  ExpertsArgs a;
  ASSERT_EQ(a.forward(), MOE_OK) << moe_last_error();
  const auto out_with_h = a.out.mem;
  a.out.fill_bytes(0x5a);
  a.refresh();
  ASSERT_EQ(moe_experts_forward(a.ctx.get(), &a.xd, &a.id, &a.sd, &a.w1d, &a.w2d, &a.plan.plan,
                                nullptr, &a.od),
            MOE_OK)
      << moe_last_error();
  EXPECT_EQ(a.out.mem, out_with_h);
  // Errors of the other arguments are still reported, naming them.
  a.w2d.data = nullptr;
  EXPECT_EQ(moe_experts_forward(a.ctx.get(), &a.xd, &a.id, &a.sd, &a.w1d, &a.w2d, &a.plan.plan,
                                nullptr, &a.od),
            MOE_ERR_NULL);
  EXPECT_TRUE(has(moe_last_error(), "down_proj")) << moe_last_error();
  a.refresh();
  // The backward needs h.
  EXPECT_EQ(moe_experts_backward(a.ctx.get(), &a.god, &a.xd, &a.sd, &a.w1d, &a.w2d, &a.plan.plan,
                                 nullptr, &a.dxd, &a.dsd, &a.dw1d, &a.dw2d),
            MOE_ERR_NULL);
  EXPECT_STREQ(moe_last_error(), "h: tensor descriptor is NULL");
  // A given h is validated as before.
  a.hd.shape[0] = a.T * a.k + 1;
  EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "h:")) << moe_last_error();
}

TEST(Abi, ForwardWithoutHIndexOutOfRangeWritesNothing) {
  ExpertsArgs a;
  a.idx.set(2 * a.k, double(a.E));
  a.out.fill_bytes(0x5a);
  a.refresh();
  const auto before = a.out.mem;
  EXPECT_EQ(moe_experts_forward(a.ctx.get(), &a.xd, &a.id, &a.sd, &a.w1d, &a.w2d, &a.plan.plan,
                                nullptr, &a.od),
            MOE_ERR_INDEX);
  EXPECT_EQ(a.out.mem, before);
}

TEST(Abi, OverlappingOutput) {
  ExpertsArgs a;
  a.od.strides[0] = 0;
  EXPECT_EQ(a.forward(), MOE_ERR_STRIDE);
  EXPECT_TRUE(has(moe_last_error(), "out")) << moe_last_error();
}

TEST(Abi, IndexOutOfRangeWritesNothing) {
  for (int64_t bad : {int64_t(4), int64_t(-1), int64_t(128)}) {
    ExpertsArgs a;
    a.idx.set(3 * a.k + 1, double(bad));
    a.out.fill_bytes(0x5a);
    a.h.fill_bytes(0x5a);
    a.plan.off.fill_bytes(0x5a);
    a.plan.sorted.fill_bytes(0x5a);
    a.refresh();
    const auto out_before = a.out.mem, h_before = a.h.mem, off_before = a.plan.off.mem,
               sorted_before = a.plan.sorted.mem;
    EXPECT_EQ(a.forward(), MOE_ERR_INDEX);
    EXPECT_EQ(std::string(moe_last_error()),
              "top_k_index: value " + std::to_string(bad) + " at [3,1] is outside [0, 4)");
    EXPECT_EQ(a.out.mem, out_before);
    EXPECT_EQ(a.h.mem, h_before);
    EXPECT_EQ(a.plan.off.mem, off_before);
    EXPECT_EQ(a.plan.sorted.mem, sorted_before);
    // The routing plan alone refuses it too.
    Ctx c(moe_routing_plan_workspace_size(MOE_DEVICE_CPU, a.T * a.k, a.E));
    EXPECT_EQ(moe_routing_plan(c.get(), &a.id, a.E, &a.plan.plan), MOE_ERR_INDEX);
    EXPECT_EQ(a.plan.off.mem, off_before);
  }
}

TEST(Abi, CorruptPlanInBackward) {
  ExpertsArgs a;
  ASSERT_EQ(a.forward(), MOE_OK);
  reinterpret_cast<int32_t *>(a.plan.sorted.mem.data())[2] = 1000;
  a.dx.fill_bytes(0x5a);
  a.refresh();
  const auto before = a.dx.mem;
  EXPECT_EQ(a.backward(), MOE_ERR_INDEX);
  EXPECT_TRUE(has(moe_last_error(), "plan.sorted_pairs")) << moe_last_error();
  EXPECT_EQ(a.dx.mem, before);
}

TEST(Abi, WorkspaceTooSmall) {
  ExpertsArgs a;
  a.ctx.ctx.workspace_bytes -= 1;
  EXPECT_EQ(a.forward(), MOE_ERR_WORKSPACE);
  EXPECT_TRUE(has(moe_last_error(), "workspace")) << moe_last_error();
  a.ctx.ctx.workspace = nullptr;
  EXPECT_EQ(a.backward(), MOE_ERR_WORKSPACE);
  EXPECT_TRUE(has(moe_last_error(), "workspace")) << moe_last_error();
}

TEST(Abi, UnalignedWorkspaceWorks) {
  ExpertsArgs a;
  std::vector<unsigned char> ws(a.ctx.ws.size() + 8);
  a.ctx.ctx.workspace = ws.data() + 3;  // the backend aligns inside the given bytes
  a.ctx.ctx.workspace_bytes = a.ctx.ws.size();
  EXPECT_EQ(a.forward(), MOE_OK) << moe_last_error();
}

TEST(Abi, DeviceTypes) {
  ExpertsArgs a;
  a.ctx.ctx.device_type = 7;
  EXPECT_EQ(a.forward(), MOE_ERR_DEVICE);
  EXPECT_TRUE(has(moe_last_error(), "device_type")) << moe_last_error();
#ifndef MOE_FUSED_WITH_CUDA
  a.ctx.ctx.device_type = MOE_DEVICE_CUDA;
  EXPECT_EQ(a.forward(), MOE_ERR_UNSUPPORTED);
  EXPECT_TRUE(has(moe_last_error(), "CUDA")) << moe_last_error();
  EXPECT_EQ(moe_experts_workspace_size(MOE_DEVICE_CUDA, 4, 2, 8, 4, 4), 0u);
#endif
}

TEST(Abi, NegativeSizesInQueries) {
  EXPECT_EQ(moe_experts_workspace_size(MOE_DEVICE_CPU, -1, 2, 8, 4, 4), 0u);
  EXPECT_EQ(moe_experts_forward_workspace_size(MOE_DEVICE_CPU, -1, 4, 2, -8, 4, 4, 0), 0u);
  EXPECT_EQ(moe_experts_backward_workspace_size(MOE_DEVICE_CPU, -1, 4, 2, 8, -4, 4, 0xf, 0), 0u);
  EXPECT_EQ(moe_linear_workspace_size(MOE_DEVICE_CPU, 3, -2, 8, 4), 0u);
  EXPECT_EQ(moe_routing_plan_workspace_size(MOE_DEVICE_CPU, 3, -1), 0u);
}

TEST(Abi, PerCallWorkspaceQueriesFitTheCombinedOne) {
  const size_t both = moe_experts_workspace_size(MOE_DEVICE_CPU, 9, 2, 8, 4, 4);
  EXPECT_GT(moe_experts_forward_workspace_size(MOE_DEVICE_CPU, MOE_DTYPE_F32, 9, 2, 8, 4, 4, 0), 0u);
  EXPECT_LE(moe_experts_forward_workspace_size(MOE_DEVICE_CPU, MOE_DTYPE_F32, 9, 2, 8, 4, 4, 0), both);
  EXPECT_LE(moe_experts_backward_workspace_size(MOE_DEVICE_CPU, MOE_DTYPE_F32, 9, 2, 8, 4, 4, 0xf, 0), both);
}

#ifdef MOE_FUSED_WITH_CUDA
// Sizes only: no GPU needed. Qwen3-30B-A3B's layer at T = 16384 takes 3 token windows.
TEST(Abi, OneWindowFlagAsksForTheWholeRowsBuffer) {
  const int64_t T = 16384, k = 8, H = 2048, I = 768, E = 128;
  const size_t lean = moe_experts_forward_workspace_size(MOE_DEVICE_CUDA, MOE_DTYPE_BF16, T, k, H, I, E, 0);
  const size_t one = moe_experts_forward_workspace_size(MOE_DEVICE_CUDA, MOE_DTYPE_BF16, T, k, H, I, E,
                                                        MOE_FLAG_ONE_WINDOW);
  const size_t rows = size_t(T * k * H) * 2, window = size_t((T + 2) / 3 * k * H) * 2;
  EXPECT_GE(one - lean, rows - window - 4096);
  EXPECT_LE(one - lean, rows - window + 4096);
  // The backward without dW1 (no grad_gate_up_proj to borrow) windows dX's rows the same way.
  const uint32_t lora = MOE_GRAD_HIDDEN_STATES | MOE_GRAD_TOP_K_WEIGHTS;
  EXPECT_GT(moe_experts_backward_workspace_size(MOE_DEVICE_CUDA, MOE_DTYPE_BF16, T, k, H, I, E, lora,
                                                MOE_FLAG_ONE_WINDOW),
            moe_experts_backward_workspace_size(MOE_DEVICE_CUDA, MOE_DTYPE_BF16, T, k, H, I, E, lora, 0));
  EXPECT_GE(moe_experts_workspace_size(MOE_DEVICE_CUDA, T, k, H, I, E), one);
}

// Sizes only. The float32 (SIMT) forward keeps h in the workspace when h is NULL: its query
// counts T*k*2I floats with MOE_FLAG_FORWARD_NO_H (which the combined query, the float32
// backward's dh, already had) and not without it, so a training forward needs no more than
// before h became optional. The bf16 query does not move with the flag.
TEST(Abi, CudaFloat32ForwardQueryHoldsHOnlyWhenAsked) {
  const int64_t T = 300, k = 4, H = 64, I = 48, E = 8;
  const size_t with_h = moe_experts_forward_workspace_size(MOE_DEVICE_CUDA, MOE_DTYPE_F32, T, k, H,
                                                           I, E, 0);
  const size_t no_h = moe_experts_forward_workspace_size(MOE_DEVICE_CUDA, MOE_DTYPE_F32, T, k, H, I,
                                                         E, MOE_FLAG_FORWARD_NO_H);
  EXPECT_GE(no_h, with_h + size_t(T * k * 2 * I) * 4);
  EXPECT_LT(with_h, size_t(T * k * 2 * I) * 4);
  EXPECT_LE(no_h, moe_experts_workspace_size(MOE_DEVICE_CUDA, T, k, H, I, E));
  EXPECT_LE(moe_experts_forward_workspace_size(MOE_DEVICE_CUDA, -1, T, k, H, I, E,
                                               MOE_FLAG_FORWARD_NO_H),
            moe_experts_workspace_size(MOE_DEVICE_CUDA, T, k, H, I, E));
  EXPECT_EQ(moe_experts_forward_workspace_size(MOE_DEVICE_CUDA, MOE_DTYPE_BF16, T, k, H, I, E, 0),
            moe_experts_forward_workspace_size(MOE_DEVICE_CUDA, MOE_DTYPE_BF16, T, k, H, I, E,
                                               MOE_FLAG_FORWARD_NO_H));
  EXPECT_EQ(moe_experts_forward_workspace_size(MOE_DEVICE_CPU, MOE_DTYPE_F32, T, k, H, I, E, 0),
            moe_experts_forward_workspace_size(MOE_DEVICE_CPU, MOE_DTYPE_F32, T, k, H, I, E,
                                               MOE_FLAG_FORWARD_NO_H));
}
#endif

TEST(Abi, ErrorMessagePersistsAfterSuccess) {
  ExpertsArgs a;
  a.xd.dtype = MOE_DTYPE_I64;
  EXPECT_EQ(a.forward(), MOE_ERR_DTYPE);
  const std::string msg = moe_last_error();
  ExpertsArgs b;
  EXPECT_EQ(b.forward(), MOE_OK);
  EXPECT_EQ(msg, moe_last_error());
}

TEST(Abi, BackwardOptionalGradChecked) {
  ExpertsArgs a;
  ASSERT_EQ(a.forward(), MOE_OK);
  a.dsd.shape[1] = 5;
  EXPECT_EQ(a.backward(), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "grad_top_k_weights")) << moe_last_error();
  ExpertsArgs b;
  b.dw1d.dtype = MOE_DTYPE_F64;
  EXPECT_EQ(b.backward(), MOE_ERR_DTYPE);
  EXPECT_TRUE(has(moe_last_error(), "grad_gate_up_proj")) << moe_last_error();
}

TEST(Abi, F64AllowedOnCpu) {
  const int64_t T = 3, k = 1, H = 4, I = 2, E = 2;
  Tensor x(MOE_DTYPE_F64, {T, H}), idx(MOE_DTYPE_I32, {T, k}), s(MOE_DTYPE_F64, {T, k}),
      W1(MOE_DTYPE_F64, {E, 2 * I, H}), W2(MOE_DTYPE_F64, {E, H, I}),
      h(MOE_DTYPE_F64, {T * k, 2 * I}), out(MOE_DTYPE_F64, {T, H});
  Plan plan(E, T * k);
  Ctx ctx(moe_experts_workspace_size(MOE_DEVICE_CPU, T, k, H, I, E));
  auto xd = x.desc(), id = idx.desc(), sd = s.desc(), w1d = W1.desc(), w2d = W2.desc(),
       hd = h.desc(), od = out.desc();
  EXPECT_EQ(moe_experts_forward(ctx.get(), &xd, &id, &sd, &w1d, &w2d, &plan.plan, &hd, &od),
            MOE_OK)
      << moe_last_error();
}

// ---- moe_fused_linear ------------------------------------------------------

struct LinearArgs {
  int64_t N = 5, E = 3, In = 7, Out = 16;
  Tensor x, W, sel, out;
  Ctx ctx;
  moe_tensor_t xd, wd, sd, od;
  LinearArgs()
      : x(MOE_DTYPE_F32, {N, In}), W(MOE_DTYPE_F32, {E, Out, In}), sel(MOE_DTYPE_I32, {N}),
        out(MOE_DTYPE_F32, {N, Out}), ctx(moe_linear_workspace_size(MOE_DEVICE_CPU, N, E, In, Out)) {
    for (int64_t i = 0; i < N; ++i) sel.set(i, double(i % E));
    refresh();
  }
  void refresh() { xd = x.desc(), wd = W.desc(), sd = sel.desc(), od = out.desc(); }
  moe_status_t forward() { return moe_linear_forward(ctx.get(), &xd, &wd, &sd, &od); }
};

TEST(AbiLinear, IndexOutOfRangeWritesNothing) {
  LinearArgs a;
  a.sel.set(2, 3);
  a.out.fill_bytes(0x5a);
  a.refresh();
  const auto before = a.out.mem;
  EXPECT_EQ(a.forward(), MOE_ERR_INDEX);
  EXPECT_STREQ(moe_last_error(), "selected_experts: value 3 at [2] is outside [0, 3)");
  EXPECT_EQ(a.out.mem, before);
  Tensor gx(MOE_DTYPE_F32, {a.N, a.In});
  gx.fill_bytes(0x5a);
  const auto gbefore = gx.mem;
  auto gxd = gx.desc();
  EXPECT_EQ(moe_linear_backward(a.ctx.get(), &a.od, &a.xd, &a.wd, &a.sd, &gxd, nullptr),
            MOE_ERR_INDEX);
  EXPECT_EQ(gx.mem, gbefore);
}

TEST(AbiLinear, ShapeAndDtypeErrors) {
  {
    LinearArgs a;
    a.wd.shape[2] = 6;
    EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
    EXPECT_TRUE(has(moe_last_error(), "weight")) << moe_last_error();
  }
  {
    LinearArgs a;
    a.sd.shape[0] = 4;
    EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
    EXPECT_TRUE(has(moe_last_error(), "selected_experts")) << moe_last_error();
  }
  {
    LinearArgs a;
    a.sd.dtype = MOE_DTYPE_F32;
    EXPECT_EQ(a.forward(), MOE_ERR_DTYPE);
    EXPECT_TRUE(has(moe_last_error(), "selected_experts")) << moe_last_error();
  }
  {
    LinearArgs a;
    a.od.shape[1] = 15;
    EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
    EXPECT_TRUE(has(moe_last_error(), "out")) << moe_last_error();
  }
  {
    LinearArgs a;
    a.xd.ndim = 3;
    EXPECT_EQ(a.forward(), MOE_ERR_SHAPE);
    EXPECT_TRUE(has(moe_last_error(), "input: expected 2 dims [N, in]")) << moe_last_error();
  }
  {
    LinearArgs a;
    a.ctx.ctx.workspace_bytes = 16;
    EXPECT_EQ(a.forward(), MOE_ERR_WORKSPACE);
  }
}

TEST(AbiPlan, Errors) {
  Tensor idx(MOE_DTYPE_I64, {4, 2});
  Plan plan(3, 8);
  Ctx ctx(moe_routing_plan_workspace_size(MOE_DEVICE_CPU, 8, 3));
  auto id = idx.desc();
  EXPECT_EQ(moe_routing_plan(ctx.get(), &id, -1, &plan.plan), MOE_ERR_SHAPE);
  EXPECT_TRUE(has(moe_last_error(), "num_experts")) << moe_last_error();
  EXPECT_EQ(moe_routing_plan(ctx.get(), &id, 3, nullptr), MOE_ERR_NULL);
  plan.plan.pair_rows.strides[0] = 2;
  EXPECT_EQ(moe_routing_plan(ctx.get(), &id, 3, &plan.plan), MOE_ERR_STRIDE);
  EXPECT_TRUE(has(moe_last_error(), "plan.pair_rows")) << moe_last_error();
}
