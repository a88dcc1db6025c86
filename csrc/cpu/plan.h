// Routing-plan internals shared by plan.cpp, linear.cpp and experts.cpp.
#pragma once

#include <cstdint>

#include "moe_fused.h"

namespace moe {
namespace cpu {

// Every value of idx (a [N] or [T,k] int32/int64 tensor, any strides) must
// lie in [0, E). On failure: MOE_ERR_INDEX naming the tensor (its `name`, else
// `param`), the value and its position; nothing is written.
moe_status_t check_indices(const moe_tensor_t &idx, int64_t E, const char *param);

// Stable counting sort of the flattened entries p of idx by value:
// offsets[E+1], sorted[n] (p of sorted row r), rows[n] (inverse; may be null).
// cursor: scratch of E int32. idx must have passed check_indices.
void counting_sort(const moe_tensor_t &idx, int64_t E, int32_t *offsets,
                   int32_t *sorted, int32_t *rows, int32_t *cursor);

// Checks a caller-provided plan (e.g. the one given to the backward) for
// consistency, so that a corrupt plan is an error, not a wild read.
moe_status_t check_plan(const moe_plan_t &plan, int64_t E, int64_t n);

}  // namespace cpu
}  // namespace moe
