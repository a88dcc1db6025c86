// moe_fused._torch_ops: the hot calls of the experts layer and of moe_fused_linear (allocate
// the outputs and the workspace, describe the tensors, call the C ABI) in C++ instead of Python.
//
// Why: on the H100 machine's host the Python between moe_experts() and the C forward's
// first launch took ~250 us a call (bench/results/host_stages_session15_h100.txt), all of
// it GPU idle at the start of a step; these functions do that work in a few microseconds.
// They are an optional fast path: built only where CMake finds torch (they are bound to the
// torch version they were compiled against; the loader in _lib.py checks it before import),
// and ops.py falls back to its ctypes path when they are absent, disabled
// (MOE_FUSED_TORCH_OPS=0) or return kFallback.
//
// The C entry points come as addresses from the library ctypes loaded (init()), so both
// paths call the same copy of libmoe_fused (one error state, one set of caches); this module
// links torch only. Argument checks stay where they were: moe_experts() checks first (its
// one-expression check by experts_args_ok below, the naming checks in Python when that
// fails), and the C library validates every descriptor again, naming the argument; a
// failing status is returned, and Python raises it with moe_last_error() (_lib.check).
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <cstdint>

#include "moe_fused.h"

namespace py = pybind11;

namespace {

// Returned instead of a moe_status_t when the Python path must run the call (degenerate
// sizes, a dtype no descriptor has): it handles those with the messages of its own.
constexpr int kFallback = -1;

using ForwardFn = decltype(&moe_experts_forward);
using BackwardFn = decltype(&moe_experts_backward);
using ForwardWsFn = decltype(&moe_experts_forward_workspace_size);
using BackwardWsFn = decltype(&moe_experts_backward_workspace_size);
using PlanWsFn = decltype(&moe_routing_plan_workspace_size);
using LinearFn = decltype(&moe_linear_forward);
using LinearBackwardFn = decltype(&moe_linear_backward);
using LinearWsFn = decltype(&moe_linear_workspace_size);

struct Entry {
  ForwardFn forward = nullptr;
  BackwardFn backward = nullptr;
  ForwardWsFn forward_ws = nullptr;
  BackwardWsFn backward_ws = nullptr;
  PlanWsFn plan_ws = nullptr;
  LinearFn linear = nullptr;
  LinearBackwardFn linear_backward = nullptr;
  LinearWsFn linear_ws = nullptr;
} g_entry;

void init(uintptr_t forward, uintptr_t backward, uintptr_t forward_ws, uintptr_t backward_ws,
          uintptr_t plan_ws, uintptr_t linear, uintptr_t linear_backward, uintptr_t linear_ws) {
  TORCH_CHECK(forward && backward && forward_ws && backward_ws && plan_ws && linear &&
                  linear_backward && linear_ws,
              "moe_fused._torch_ops.init: a NULL entry point");
  g_entry.forward = reinterpret_cast<ForwardFn>(forward);
  g_entry.backward = reinterpret_cast<BackwardFn>(backward);
  g_entry.forward_ws = reinterpret_cast<ForwardWsFn>(forward_ws);
  g_entry.backward_ws = reinterpret_cast<BackwardWsFn>(backward_ws);
  g_entry.plan_ws = reinterpret_cast<PlanWsFn>(plan_ws);
  g_entry.linear = reinterpret_cast<LinearFn>(linear);
  g_entry.linear_backward = reinterpret_cast<LinearBackwardFn>(linear_backward);
  g_entry.linear_ws = reinterpret_cast<LinearWsFn>(linear_ws);
}

int moe_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MOE_DTYPE_F32;
    case at::kHalf: return MOE_DTYPE_F16;
    case at::kBFloat16: return MOE_DTYPE_BF16;
    case at::kDouble: return MOE_DTYPE_F64;
    case at::kInt: return MOE_DTYPE_I32;
    case at::kLong: return MOE_DTYPE_I64;
    default: return -1;
  }
}

// A descriptor of t (which must outlive the call); false when none can describe it.
bool describe(const at::Tensor &t, const char *name, moe_tensor_t *d) {
  const int dt = moe_dtype(t.scalar_type());
  const int64_t nd = t.dim();
  if (dt < 0 || nd < 1 || nd > MOE_MAX_DIMS) return false;
  *d = moe_tensor_t{};
  d->data = t.data_ptr();
  d->dtype = dt;
  d->ndim = int32_t(nd);
  for (int64_t i = 0; i < nd; ++i) {
    d->shape[i] = t.size(i);
    d->strides[i] = t.stride(i);
  }
  d->name = name;
  return true;
}

// The packed plan [sorted_pairs n | pair_rows n | expert_offsets E+1] (_lib.packed_plan_values).
moe_plan_t describe_plan(const at::Tensor &buf, int64_t E, int64_t n) {
  auto *base = static_cast<int32_t *>(buf.data_ptr());
  auto vec = [](int32_t *p, int64_t len, const char *name) {
    moe_tensor_t d{};
    d.data = p;
    d.dtype = MOE_DTYPE_I32;
    d.ndim = 1;
    d.shape[0] = len;
    d.strides[0] = 1;
    d.name = name;
    return d;
  };
  return moe_plan_t{vec(base + 2 * n, E + 1, "expert_offsets"), vec(base, n, "sorted_pairs"),
                    vec(base + n, n, "pair_rows")};
}

// Scratch of nbytes (256-byte aligned) for one call on dev, kept alive by *keep. CUDA:
// torch's caching allocator (stream-ordered: no sync). CPU: a grow-only buffer per thread
// (a fresh large CPU allocation is page-faulted in on every call), as _lib._workspace.
void *workspace(const at::Device &dev, size_t nbytes, at::Tensor *keep) {
  if (nbytes == 0) return nullptr;
  const int64_t want = int64_t(nbytes) + 256;
  if (dev.is_cpu()) {
    thread_local at::Tensor cpu;
    if (!cpu.defined() || cpu.numel() < want) {
      cpu = at::Tensor();  // the old one first
      cpu = at::empty({want}, at::TensorOptions().dtype(at::kByte));
    }
    *keep = cpu;
  } else {
    *keep = at::empty({want}, at::TensorOptions().dtype(at::kByte).device(dev));
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(keep->data_ptr());
  return reinterpret_cast<void *>((base + 255) & ~uintptr_t(255));
}

moe_context_t context(const at::Device &dev, void *ws, size_t nbytes, uint64_t flags) {
  moe_context_t c{};
  if (dev.is_cuda()) {
    c.device_type = MOE_DEVICE_CUDA;
    c.device_index = dev.index();
    // torch's current stream on dev (the caller's: graph capture and stream order hold)
    c.stream = c10::impl::getDeviceGuardImpl(dev.type())->getStream(dev).native_handle();
  } else {
    c.device_type = MOE_DEVICE_CPU;
  }
  c.workspace = ws;
  c.workspace_bytes = ws ? nbytes : 0;
  c.flags = flags;
  return c;
}

// MOE_FLAG_ONE_WINDOW when x [T, H] with k slots is at most window_max bytes of rows
// (ops._window_flag; window_max < 0: never).
uint64_t window_flag(const at::Tensor &x, int64_t k, int64_t window_max) {
  if (!x.is_cuda() || window_max < 0) return 0;
  return x.numel() * k * int64_t(x.element_size()) <= window_max ? MOE_FLAG_ONE_WINDOW : 0;
}

bool supported_device(const at::Tensor &x) { return x.is_cpu() || x.is_cuda(); }

// Runs a C call without the GIL, as ctypes calls run: the CPU path computes the whole layer
// inside it, and other Python threads (data loading) must not wait on that.
template <class F>
int without_gil(F &&call) {
  py::gil_scoped_release release;
  return int(call());
}

// (out, h, plan, status) of moe_experts_forward, or (None, None, None, kFallback).
py::tuple experts_forward(const at::Tensor &x_in, const at::Tensor &idx_in,
                          const at::Tensor &w_in, const at::Tensor &w1, const at::Tensor &w2,
                          bool need_h, uint64_t flags, int64_t window_max) {
  TORCH_CHECK(g_entry.forward, "moe_fused._torch_ops: init() was not called");
  if (!supported_device(x_in) || x_in.dim() != 2 || idx_in.dim() != 2 || w1.dim() != 3 ||
      moe_dtype(x_in.scalar_type()) < 0)
    return py::make_tuple(py::none(), py::none(), py::none(), kFallback);
  const int64_t T = x_in.size(0), H = x_in.size(1), k = idx_in.size(1);
  const int64_t E = w1.size(0), two_i = w1.size(1), I = two_i / 2, n = T * k;
  if (n == 0 || I == 0 || H == 0)
    return py::make_tuple(py::none(), py::none(), py::none(), kFallback);
  const at::Device dev = x_in.device();
  c10::DeviceGuard guard(dev);
  const auto opts = x_in.options();
  at::Tensor out = at::empty({T, H}, opts);
  at::Tensor h = at::empty({need_h ? n : 0, two_i}, opts);
  at::Tensor plan = at::empty({2 * n + E + 1}, opts.dtype(at::kInt));
  const at::Tensor x = x_in.contiguous(), idx = idx_in.contiguous(), w = w_in.contiguous();

  flags |= window_flag(x, k, window_max);
  const int32_t dev_type = dev.is_cuda() ? MOE_DEVICE_CUDA : MOE_DEVICE_CPU;
  const int32_t dt = moe_dtype(x.scalar_type());
  const size_t nbytes = std::max(
      g_entry.forward_ws(dev_type, dt, T, k, H, I, E, need_h ? flags : flags | MOE_FLAG_FORWARD_NO_H),
      g_entry.plan_ws(dev_type, n, E));
  at::Tensor keep;
  void *ws = workspace(dev, nbytes, &keep);
  const moe_context_t ctx = context(dev, ws, nbytes, flags);

  moe_tensor_t dx, didx, dw, dw1, dw2, dh, dout;
  if (!describe(x, "hidden_states", &dx) || !describe(idx, "top_k_index", &didx) ||
      !describe(w, "top_k_weights", &dw) || !describe(w1, "gate_up_proj", &dw1) ||
      !describe(w2, "down_proj", &dw2) || !describe(out, "out", &dout) ||
      (need_h && !describe(h, "h", &dh)))
    return py::make_tuple(py::none(), py::none(), py::none(), kFallback);
  const moe_plan_t p = describe_plan(plan, E, n);
  const int st = without_gil([&] {
    return g_entry.forward(&ctx, &dx, &didx, &dw, &dw1, &dw2, &p, need_h ? &dh : nullptr, &dout);
  });
  return py::make_tuple(out, h, plan, st);
}

// (dx, dw, dw1, dw2, status) of moe_experts_backward (a gradient not asked for: None), or
// four Nones and kFallback.
py::tuple experts_backward(const at::Tensor &g_in, const at::Tensor &x_in,
                           const at::Tensor &w_in, const at::Tensor &w1, const at::Tensor &w2,
                           const at::Tensor &plan, const at::Tensor &h, bool n_x, bool n_w,
                           bool n_w1, bool n_w2, uint64_t flags, int64_t window_max) {
  TORCH_CHECK(g_entry.backward, "moe_fused._torch_ops: init() was not called");
  const py::tuple fallback = py::make_tuple(py::none(), py::none(), py::none(), py::none(), kFallback);
  if (!supported_device(x_in) || x_in.dim() != 2 || w_in.dim() != 2 || w1.dim() != 3 ||
      moe_dtype(x_in.scalar_type()) < 0 || !(n_x || n_w || n_w1 || n_w2))
    return fallback;
  const int64_t T = x_in.size(0), H = x_in.size(1), k = w_in.size(1);
  const int64_t E = w1.size(0), I = w1.size(1) / 2;
  if (T * k == 0 || I == 0 || H == 0) return fallback;
  if (plan.scalar_type() != at::kInt || plan.dim() != 1 || plan.stride(0) != 1 ||
      plan.numel() != 2 * T * k + E + 1)
    return fallback;  // the Python path raises, naming the plan
  const at::Device dev = x_in.device();
  c10::DeviceGuard guard(dev);
  auto alloc = [](const at::Tensor &t, bool need) {
    return need ? at::empty_like(t, at::MemoryFormat::Contiguous) : at::Tensor();
  };
  at::Tensor gx = alloc(x_in, n_x), gw = alloc(w_in, n_w), gw1 = alloc(w1, n_w1),
             gw2 = alloc(w2, n_w2);
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous();

  flags |= window_flag(x, k, window_max);
  const uint32_t want = (n_x ? MOE_GRAD_HIDDEN_STATES : 0) | (n_w ? MOE_GRAD_TOP_K_WEIGHTS : 0) |
                        (n_w1 ? MOE_GRAD_GATE_UP_PROJ : 0) | (n_w2 ? MOE_GRAD_DOWN_PROJ : 0);
  const int32_t dev_type = dev.is_cuda() ? MOE_DEVICE_CUDA : MOE_DEVICE_CPU;
  const size_t nbytes =
      g_entry.backward_ws(dev_type, moe_dtype(x.scalar_type()), T, k, H, I, E, want, flags);
  at::Tensor keep;
  void *ws = workspace(dev, nbytes, &keep);
  const moe_context_t ctx = context(dev, ws, nbytes, flags);

  moe_tensor_t dg, dx, dw, dw1, dw2, dh, o_x, o_w, o_w1, o_w2;
  if (!describe(g, "grad_out", &dg) || !describe(x, "hidden_states", &dx) ||
      !describe(w, "top_k_weights", &dw) || !describe(w1, "gate_up_proj", &dw1) ||
      !describe(w2, "down_proj", &dw2) || !describe(h, "h", &dh) ||
      (n_x && !describe(gx, "grad_hidden_states", &o_x)) ||
      (n_w && !describe(gw, "grad_top_k_weights", &o_w)) ||
      (n_w1 && !describe(gw1, "grad_gate_up_proj", &o_w1)) ||
      (n_w2 && !describe(gw2, "grad_down_proj", &o_w2)))
    return fallback;
  const moe_plan_t p = describe_plan(plan, E, T * k);
  const int st = without_gil([&] {
    return g_entry.backward(&ctx, &dg, &dx, &dw, &dw1, &dw2, &p, &dh, n_x ? &o_x : nullptr,
                            n_w ? &o_w : nullptr, n_w1 ? &o_w1 : nullptr, n_w2 ? &o_w2 : nullptr);
  });
  auto result = [](const at::Tensor &t) { return t.defined() ? py::cast(t) : py::none(); };
  return py::make_tuple(result(gx), result(gw), result(gw1), result(gw2), st);
}

// ops._experts_args_ok in C++ (the same conditions; ~1/8 of its host time): true exactly
// when the five arguments are tensors that every check of ops._check_experts accepts.
// Symbolic sizes (torch.compile's fake tensors) answer false: the Python checks take those.
bool experts_args_ok(py::handle x_h, py::handle idx_h, py::handle w_h, py::handle w1_h,
                     py::handle w2_h) {
  for (py::handle h : {x_h, idx_h, w_h, w1_h, w2_h})
    if (!THPVariable_Check(h.ptr())) return false;
  const at::Tensor &x = THPVariable_Unpack(x_h.ptr()), &idx = THPVariable_Unpack(idx_h.ptr()),
                   &w = THPVariable_Unpack(w_h.ptr()), &w1 = THPVariable_Unpack(w1_h.ptr()),
                   &w2 = THPVariable_Unpack(w2_h.ptr());
  for (const at::Tensor *t : {&x, &idx, &w, &w1, &w2})
    if (t->unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return false;
  if (x.dim() != 2 || idx.dim() != 2 || w1.dim() != 3 || w.dim() != 2 || w2.dim() != 3)
    return false;
  const at::Device d = x.device();
  if (idx.device() != d || w.device() != d || w1.device() != d || w2.device() != d) return false;
  const at::ScalarType dt = x.scalar_type();
  const bool float_ok =
      dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble;
  const bool index_ok = idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong;
  if (!float_ok || !index_ok || w1.scalar_type() != dt || w2.scalar_type() != dt ||
      (w.scalar_type() != dt && w.scalar_type() != at::kFloat))
    return false;
  const int64_t E = w1.size(0), two_i = w1.size(1), H = w1.size(2);
  return idx.size(0) == x.size(0) && w.sizes() == idx.sizes() && H == x.size(1) &&
         two_i % 2 == 0 && w2.size(0) == E && w2.size(1) == H && w2.size(2) == two_i / 2;
}

// (out, status) of moe_linear_forward, or (None, kFallback).
py::tuple linear_forward(const at::Tensor &x_in, const at::Tensor &weight,
                         const at::Tensor &sel_in, uint64_t flags) {
  TORCH_CHECK(g_entry.linear, "moe_fused._torch_ops: init() was not called");
  if (!supported_device(x_in) || x_in.dim() != 2 || weight.dim() != 3)
    return py::make_tuple(py::none(), kFallback);
  const int64_t N = x_in.size(0), in_f = x_in.size(1), E = weight.size(0), out_f = weight.size(1);
  if (N == 0 || out_f == 0 || in_f == 0) return py::make_tuple(py::none(), kFallback);
  const at::Device dev = x_in.device();
  c10::DeviceGuard guard(dev);
  at::Tensor out = at::empty({N, out_f}, x_in.options());
  const at::Tensor x = x_in.contiguous(), sel = sel_in.contiguous();
  const int32_t dev_type = dev.is_cuda() ? MOE_DEVICE_CUDA : MOE_DEVICE_CPU;
  const size_t nbytes = g_entry.linear_ws(dev_type, N, E, in_f, out_f);
  at::Tensor keep;
  void *ws = workspace(dev, nbytes, &keep);
  const moe_context_t ctx = context(dev, ws, nbytes, flags);
  moe_tensor_t dx, dw, dsel, dout;
  if (!describe(x, "input", &dx) || !describe(weight, "weight", &dw) ||
      !describe(sel, "selected_experts", &dsel) || !describe(out, "out", &dout))
    return py::make_tuple(py::none(), kFallback);
  const int st = without_gil([&] { return g_entry.linear(&ctx, &dx, &dw, &dsel, &dout); });
  return py::make_tuple(out, st);
}

// (grad_input, grad_weight, status) of moe_linear_backward (not asked for: None), or
// (None, None, kFallback).
py::tuple linear_backward(const at::Tensor &g_in, const at::Tensor &x_in,
                          const at::Tensor &weight, const at::Tensor &sel_in, bool n_x, bool n_w,
                          uint64_t flags) {
  TORCH_CHECK(g_entry.linear_backward, "moe_fused._torch_ops: init() was not called");
  const py::tuple fallback = py::make_tuple(py::none(), py::none(), kFallback);
  if (!supported_device(x_in) || x_in.dim() != 2 || weight.dim() != 3 || !(n_x || n_w))
    return fallback;
  const int64_t N = x_in.size(0), in_f = x_in.size(1), E = weight.size(0), out_f = weight.size(1);
  if (N == 0 || out_f == 0 || in_f == 0) return fallback;
  const at::Device dev = x_in.device();
  c10::DeviceGuard guard(dev);
  at::Tensor gx = n_x ? at::empty(x_in.sizes(), x_in.options()) : at::Tensor();
  at::Tensor gw = n_w ? at::empty(weight.sizes(), weight.options()) : at::Tensor();
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous(), sel = sel_in.contiguous();
  const int32_t dev_type = dev.is_cuda() ? MOE_DEVICE_CUDA : MOE_DEVICE_CPU;
  const size_t nbytes = g_entry.linear_ws(dev_type, N, E, in_f, out_f);
  at::Tensor keep;
  void *ws = workspace(dev, nbytes, &keep);
  const moe_context_t ctx = context(dev, ws, nbytes, flags);
  moe_tensor_t dg, dx, dw, dsel, o_x, o_w;
  if (!describe(g, "grad_out", &dg) || !describe(x, "input", &dx) ||
      !describe(weight, "weight", &dw) || !describe(sel, "selected_experts", &dsel) ||
      (n_x && !describe(gx, "grad_input", &o_x)) || (n_w && !describe(gw, "grad_weight", &o_w)))
    return fallback;
  const int st = without_gil([&] {
    return g_entry.linear_backward(&ctx, &dg, &dx, &dw, &dsel, n_x ? &o_x : nullptr,
                                   n_w ? &o_w : nullptr);
  });
  auto result = [](const at::Tensor &t) { return t.defined() ? py::cast(t) : py::none(); };
  return py::make_tuple(result(gx), result(gw), st);
}

}  // namespace

PYBIND11_MODULE(MOE_TORCH_OPS_MODULE, m) {
  m.doc() = "moe_fused's experts calls in C++ (optional fast path; see csrc/torch/torch_ops.cpp)";
  m.attr("FALLBACK") = kFallback;
  m.attr("TORCH_VERSION") = MOE_TORCH_VERSION;
  m.def("init", &init);
  m.def("experts_args_ok", &experts_args_ok);
  m.def("experts_forward", &experts_forward);
  m.def("experts_backward", &experts_backward);
  m.def("linear_forward", &linear_forward);
  m.def("linear_backward", &linear_backward);
}
