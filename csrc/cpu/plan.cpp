// Routing plan on the CPU: histogram, exclusive scan, stable scatter of the
// (token, slot) pairs p = t*k + j into expert order, inverse permutation.
#include "cpu/plan.h"

#include <cinttypes>
#include <cstring>

#include "common/backend.h"
#include "common/errors.h"
#include "cpu/util.h"

namespace moe {
namespace cpu {

namespace {

// Calls f(p, value) for every entry in flattened (row-major) order; stops
// and returns false as soon as f returns false.
template <class I, class F>
bool for_each_index(const moe_tensor_t &idx, F &&f) {
  const I *d = data_as<const I>(idx);
  if (idx.ndim == 1) {
    const int64_t n = idx.shape[0], s = idx.strides[0];
    for (int64_t i = 0; i < n; ++i)
      if (!f(i, int64_t(d[i * s]))) return false;
    return true;
  }
  const int64_t T = idx.shape[0], k = idx.shape[1];
  const int64_t s0 = idx.strides[0], s1 = idx.strides[1];
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j)
      if (!f(t * k + j, int64_t(d[t * s0 + j * s1]))) return false;
  return true;
}

template <class F> bool visit(const moe_tensor_t &idx, F &&f) {
  if (idx.dtype == MOE_DTYPE_I64) return for_each_index<int64_t>(idx, f);
  return for_each_index<int32_t>(idx, f);
}

const char *name_or(const moe_tensor_t &t, const char *param) {
  return t.name ? t.name : param;
}

}  // namespace

moe_status_t check_indices(const moe_tensor_t &idx, int64_t E, const char *param) {
  int64_t bad_p = -1, bad_v = 0;
  visit(idx, [&](int64_t p, int64_t v) {
    if (v < 0 || v >= E) {
      bad_p = p;
      bad_v = v;
      return false;
    }
    return true;
  });
  if (bad_p < 0) return MOE_OK;
  if (idx.ndim == 1)
    return set_error(MOE_ERR_INDEX,
                     "%s: value %" PRId64 " at [%" PRId64 "] is outside [0, %" PRId64 ")",
                     name_or(idx, param), bad_v, bad_p, E);
  const int64_t k = idx.shape[1];
  return set_error(MOE_ERR_INDEX,
                   "%s: value %" PRId64 " at [%" PRId64 ",%" PRId64
                   "] is outside [0, %" PRId64 ")",
                   name_or(idx, param), bad_v, bad_p / k, bad_p % k, E);
}

void counting_sort(const moe_tensor_t &idx, int64_t E, int32_t *offsets,
                   int32_t *sorted, int32_t *rows, int32_t *cursor) {
  std::memset(offsets, 0, size_t(E + 1) * sizeof(int32_t));
  visit(idx, [&](int64_t, int64_t v) {
    ++offsets[v + 1];
    return true;
  });
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  if (E > 0) std::memcpy(cursor, offsets, size_t(E) * sizeof(int32_t));
  visit(idx, [&](int64_t p, int64_t v) {
    const int32_t r = cursor[v]++;
    sorted[r] = int32_t(p);
    if (rows) rows[p] = r;
    return true;
  });
}

moe_status_t check_plan(const moe_plan_t &plan, int64_t E, int64_t n) {
  const int32_t *off = data_as<const int32_t>(plan.expert_offsets);
  const int32_t *sorted = data_as<const int32_t>(plan.sorted_pairs);
  const int32_t *rows = data_as<const int32_t>(plan.pair_rows);
  const char *off_name = name_or(plan.expert_offsets, "plan.expert_offsets");
  if (off[0] != 0 || off[E] != n)
    return set_error(MOE_ERR_INDEX,
                     "%s: must start at 0 and end at %" PRId64 " (T*k), got %d and %d",
                     off_name, n, off[0], off[E]);
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] < off[e])
      return set_error(MOE_ERR_INDEX, "%s: decreases at [%" PRId64 "] (%d > %d)",
                       off_name, e, off[e], off[e + 1]);
  for (int64_t r = 0; r < n; ++r) {
    const int32_t p = sorted[r];
    if (p < 0 || p >= n)
      return set_error(MOE_ERR_INDEX,
                       "%s: value %d at [%" PRId64 "] is outside [0, %" PRId64 ")",
                       name_or(plan.sorted_pairs, "plan.sorted_pairs"), p, r, n);
    if (rows[p] != r)
      return set_error(MOE_ERR_INDEX,
                       "%s: not the inverse of sorted_pairs at pair %d (%d, expected %" PRId64 ")",
                       name_or(plan.pair_rows, "plan.pair_rows"), p, rows[p], r);
  }
  return MOE_OK;
}

size_t routing_plan_workspace_size(int64_t /*num_pairs*/, int64_t num_experts) {
  Arena a(nullptr);
  a.take<int32_t>(num_experts);
  return a.required();
}

moe_status_t routing_plan(const moe_context_t &ctx, const moe_tensor_t &top_k_index,
                          int64_t num_experts, const moe_plan_t &plan) {
  moe_status_t st = check_indices(top_k_index, num_experts, "top_k_index");
  if (st != MOE_OK) return st;
  Arena a(ctx.workspace);
  int32_t *cursor = a.take<int32_t>(num_experts);
  counting_sort(top_k_index, num_experts, data_as<int32_t>(plan.expert_offsets),
                data_as<int32_t>(plan.sorted_pairs), data_as<int32_t>(plan.pair_rows),
                cursor);
  return MOE_OK;
}

}  // namespace cpu
}  // namespace moe
