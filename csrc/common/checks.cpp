#include "common/checks.h"

#include <cinttypes>
#include <climits>

#include "common/errors.h"

namespace moe {
namespace check {

const char *name(const moe_tensor_t *t, const char *param) {
  return (t && t->name && t->name[0]) ? t->name : param;
}

std::string dims(const moe_tensor_t &t) {
  std::string s = "[";
  const int nd = (t.ndim >= 0 && t.ndim <= MOE_MAX_DIMS) ? t.ndim : 0;
  for (int d = 0; d < nd; ++d) {
    if (d) s += ", ";
    s += std::to_string(t.shape[d]);
  }
  return s + "]";
}

static std::string dims_of(const int64_t *v, int n) {
  std::string s = "[";
  for (int d = 0; d < n; ++d) {
    if (d) s += ", ";
    s += std::to_string(v[d]);
  }
  return s + "]";
}

const char *dtype_name(int32_t dtype) {
  switch (dtype) {
    case MOE_DTYPE_F32: return "float32";
    case MOE_DTYPE_F16: return "float16";
    case MOE_DTYPE_BF16: return "bfloat16";
    case MOE_DTYPE_F64: return "float64";
    case MOE_DTYPE_I32: return "int32";
    case MOE_DTYPE_I64: return "int64";
    default: return "an unknown dtype";
  }
}

moe_status_t context(const moe_context_t *ctx) {
  if (!ctx) return set_error(MOE_ERR_NULL, "ctx: is NULL");
  if (ctx->device_type == MOE_DEVICE_CPU) return MOE_OK;
  if (ctx->device_type == MOE_DEVICE_CUDA) {
#ifdef MOE_FUSED_WITH_CUDA
    if (ctx->device_index < 0)
      return set_error(MOE_ERR_DEVICE, "ctx.device_index: %d is not a CUDA ordinal",
                       ctx->device_index);
    return MOE_OK;
#else
    return set_error(MOE_ERR_UNSUPPORTED,
                     "ctx.device_type: CUDA was requested but this build of libmoe_fused "
                     "has no CUDA path (rebuild with nvcc available, MOE_FUSED_CUDA=ON)");
#endif
  }
  return set_error(MOE_ERR_DEVICE, "ctx.device_type: unknown device type %d",
                   ctx->device_type);
}

moe_status_t tensor(const moe_tensor_t *t, const char *param, int ndim, const char *layout) {
  if (!t) return set_error(MOE_ERR_NULL, "%s: tensor descriptor is NULL", param);
  const char *nm = name(t, param);
  if (t->ndim < 1 || t->ndim > MOE_MAX_DIMS)
    return set_error(MOE_ERR_SHAPE, "%s: expected %d dims %s, got ndim = %d", nm, ndim,
                     layout, t->ndim);
  if (t->ndim != ndim)
    return set_error(MOE_ERR_SHAPE, "%s: expected %d dims %s, got %d dims %s", nm, ndim,
                     layout, t->ndim, dims(*t).c_str());
  bool empty = false;
  for (int d = 0; d < ndim; ++d) {
    if (t->shape[d] < 0)
      return set_error(MOE_ERR_SHAPE, "%s: negative size in shape %s", nm, dims(*t).c_str());
    if (t->shape[d] == 0) empty = true;
  }
  for (int d = 0; d < ndim; ++d)
    if (t->strides[d] < 0)
      return set_error(MOE_ERR_STRIDE, "%s: negative stride %" PRId64 " on dim %d", nm,
                       t->strides[d], d);
  if (!t->data && !empty) return set_error(MOE_ERR_NULL, "%s: data pointer is NULL", nm);
  return MOE_OK;
}

moe_status_t shape(const moe_tensor_t &t, const char *param, const char *layout,
                   const int64_t *want, const char *note) {
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] != want[d]) {
      return set_error(MOE_ERR_SHAPE, "%s: expected shape %s = %s, got %s%s%s%s",
                       name(&t, param), layout, dims_of(want, t.ndim).c_str(),
                       dims(t).c_str(), note ? " (" : "", note ? note : "", note ? ")" : "");
    }
  }
  return MOE_OK;
}

moe_status_t float_dtype(const moe_tensor_t &t, const char *param, int32_t device_type) {
  const int32_t dt = t.dtype;
  if (dt == MOE_DTYPE_F32 || dt == MOE_DTYPE_F16 || dt == MOE_DTYPE_BF16) return MOE_OK;
  if (dt == MOE_DTYPE_F64) {
    if (device_type == MOE_DEVICE_CPU) return MOE_OK;
    return set_error(MOE_ERR_DTYPE, "%s: float64 is supported on the CPU only",
                     name(&t, param));
  }
  return set_error(MOE_ERR_DTYPE,
                   "%s: expected a float dtype (float32, float16, bfloat16%s), got %s",
                   name(&t, param), device_type == MOE_DEVICE_CPU ? " or float64" : "",
                   dtype_name(dt));
}

moe_status_t same_dtype(const moe_tensor_t &t, const char *param, int32_t want,
                        const char *ref, bool also_f32) {
  if (t.dtype == want || (also_f32 && t.dtype == MOE_DTYPE_F32)) return MOE_OK;
  if (also_f32 && want != MOE_DTYPE_F32)
    return set_error(MOE_ERR_DTYPE, "%s: expected %s (the dtype of %s) or float32, got %s",
                     name(&t, param), dtype_name(want), ref, dtype_name(t.dtype));
  return set_error(MOE_ERR_DTYPE, "%s: expected %s (the dtype of %s), got %s",
                   name(&t, param), dtype_name(want), ref, dtype_name(t.dtype));
}

moe_status_t index_dtype(const moe_tensor_t &t, const char *param) {
  if (t.dtype == MOE_DTYPE_I32 || t.dtype == MOE_DTYPE_I64) return MOE_OK;
  return set_error(MOE_ERR_DTYPE, "%s: expected int32 or int64 indices, got %s",
                   name(&t, param), dtype_name(t.dtype));
}

moe_status_t contiguous(const moe_tensor_t &t, const char *param) {
  int64_t expect = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] > 1 && t.strides[d] != expect) {
      std::string st = "[";
      for (int i = 0; i < t.ndim; ++i) {
        if (i) st += ", ";
        st += std::to_string(t.strides[i]);
      }
      st += "]";
      return set_error(MOE_ERR_STRIDE,
                       "%s: must be contiguous (row-major), got shape %s with strides %s",
                       name(&t, param), dims(t).c_str(), st.c_str());
    }
    expect *= t.shape[d] > 0 ? t.shape[d] : 1;
  }
  return MOE_OK;
}

moe_status_t output(const moe_tensor_t &t, const char *param) {
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] > 1 && t.strides[d] == 0)
      return set_error(MOE_ERR_STRIDE,
                       "%s: stride 0 on dim %d (size %" PRId64
                       ") would make output elements overlap",
                       name(&t, param), d, t.shape[d]);
  return MOE_OK;
}

static moe_status_t plan_tensor(const moe_tensor_t &t, const char *param, int64_t len,
                                const char *layout) {
  moe_status_t st = tensor(&t, param, 1, layout);
  if (st != MOE_OK) return st;
  if (t.dtype != MOE_DTYPE_I32)
    return set_error(MOE_ERR_DTYPE, "%s: expected int32, got %s", name(&t, param),
                     dtype_name(t.dtype));
  if ((st = shape(t, param, layout, &len, nullptr)) != MOE_OK) return st;
  return contiguous(t, param);
}

moe_status_t plan(const moe_plan_t *p, int64_t num_experts, int64_t n) {
  if (!p) return set_error(MOE_ERR_NULL, "plan: is NULL");
  moe_status_t st;
  if ((st = plan_tensor(p->expert_offsets, "plan.expert_offsets", num_experts + 1,
                        "[E+1]")) != MOE_OK)
    return st;
  if ((st = plan_tensor(p->sorted_pairs, "plan.sorted_pairs", n, "[T*k]")) != MOE_OK)
    return st;
  return plan_tensor(p->pair_rows, "plan.pair_rows", n, "[T*k]");
}

moe_status_t workspace(const moe_context_t &ctx, size_t need, const char *fn) {
  if (need == 0) return MOE_OK;
  if (!ctx.workspace)
    return set_error(MOE_ERR_WORKSPACE,
                     "ctx.workspace: is NULL but %s needs %zu bytes (see its "
                     "*_workspace_size query)",
                     fn, need);
  if (ctx.workspace_bytes < need)
    return set_error(MOE_ERR_WORKSPACE,
                     "ctx.workspace_bytes: %zu bytes given, %s needs %zu (see its "
                     "*_workspace_size query)",
                     ctx.workspace_bytes, fn, need);
  return MOE_OK;
}

}  // namespace check
}  // namespace moe
