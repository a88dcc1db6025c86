// Argument checks of the C ABI (used by common/api.cpp before any dispatch).
// Each returns MOE_OK or sets the thread's last error (naming the argument:
// the descriptor's `name` when set, else the C parameter name) and returns
// the failing status.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "moe_fused.h"

namespace moe {
namespace check {

// The name used in messages for a tensor argument.
const char *name(const moe_tensor_t *t, const char *param);
// "[4, 6]"
std::string dims(const moe_tensor_t &t);
// "float32", "bfloat16", ... ("dtype 17" for unknown values)
const char *dtype_name(int32_t dtype);

// ctx is not NULL and its device_type is known and built.
moe_status_t context(const moe_context_t *ctx);

// t is not NULL, has `ndim` dims (`layout` documents them, e.g. "[E, 2I, H]"),
// no negative size or stride, and a data pointer unless it has no element.
moe_status_t tensor(const moe_tensor_t *t, const char *param, int ndim, const char *layout);

// t's shape equals want[0..ndim). `note` (may be NULL) says where the sizes
// come from, e.g. "E, 2I from gate_up_proj".
moe_status_t shape(const moe_tensor_t &t, const char *param, const char *layout,
                   const int64_t *want, const char *note);

// Activation dtype: float32/float16/bfloat16, float64 on the CPU only.
moe_status_t float_dtype(const moe_tensor_t &t, const char *param, int32_t device_type);
// t.dtype == want (the dtype of `ref`); also_f32: float32 is accepted too.
moe_status_t same_dtype(const moe_tensor_t &t, const char *param, int32_t want,
                        const char *ref, bool also_f32 = false);
// int32 or int64.
moe_status_t index_dtype(const moe_tensor_t &t, const char *param);
// Row-major contiguous (strides of size-1 dims are ignored).
moe_status_t contiguous(const moe_tensor_t &t, const char *param);
// An output: no stride 0 on a dim of size > 1 (elements would overlap).
moe_status_t output(const moe_tensor_t &t, const char *param);

// The three plan tensors: int32, contiguous, [E+1], [n], [n].
moe_status_t plan(const moe_plan_t *plan, int64_t num_experts, int64_t n);

// The context's workspace holds at least `need` bytes.
moe_status_t workspace(const moe_context_t &ctx, size_t need, const char *fn);

}  // namespace check
}  // namespace moe
