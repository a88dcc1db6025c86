// Helpers of the C++ unit tests: host tensors of any dtype and strides,
// random fills, and naive double-precision references of the ops.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/dtype.h"
#include "moe_fused.h"

namespace moe_test {

inline size_t dtype_size(int32_t dt) {
  switch (dt) {
    case MOE_DTYPE_F16:
    case MOE_DTYPE_BF16: return 2;
    case MOE_DTYPE_F32:
    case MOE_DTYPE_I32: return 4;
    default: return 8;
  }
}

// A host tensor: storage plus a (possibly strided) view of it.
struct Tensor {
  int32_t dtype = MOE_DTYPE_F32;
  std::vector<int64_t> shape, strides;
  std::vector<unsigned char> mem;
  std::string name;

  Tensor() = default;
  // Contiguous row-major.
  Tensor(int32_t dt, std::vector<int64_t> shp) : dtype(dt), shape(std::move(shp)) {
    strides.assign(shape.size(), 1);
    int64_t s = 1;
    for (int d = int(shape.size()) - 1; d >= 0; --d) {
      strides[d] = s;
      s *= std::max<int64_t>(shape[d], 1);
    }
    mem.assign(size_t(std::max<int64_t>(s, 1)) * dtype_size(dt), 0);
  }
  // The view of the last two dims transposed in memory (like
  // w.transpose(-1,-2).contiguous().transpose(-1,-2) in torch).
  static Tensor transposed_last2(int32_t dt, std::vector<int64_t> shp) {
    std::vector<int64_t> sw = shp;
    std::swap(sw[sw.size() - 1], sw[sw.size() - 2]);
    Tensor t(dt, sw);
    t.shape = shp;
    std::swap(t.strides[t.strides.size() - 1], t.strides[t.strides.size() - 2]);
    return t;
  }
  // Row-padded: the last-but-one stride is `pad` elements larger.
  static Tensor padded(int32_t dt, std::vector<int64_t> shp, int64_t pad) {
    std::vector<int64_t> big = shp;
    big.back() += pad;
    Tensor t(dt, big);
    t.shape = shp;
    return t;
  }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  int64_t offset(int64_t flat) const {
    int64_t off = 0;
    for (int d = int(shape.size()) - 1; d >= 0; --d) {
      off += (flat % shape[d]) * strides[d];
      flat /= shape[d];
    }
    return off;
  }
  double get(int64_t flat) const {
    const int64_t o = offset(flat);
    if (dtype == MOE_DTYPE_I32) return reinterpret_cast<const int32_t *>(mem.data())[o];
    if (dtype == MOE_DTYPE_I64) return double(reinterpret_cast<const int64_t *>(mem.data())[o]);
    return moe::cpu::load_scalar(mem.data(), dtype, o);
  }
  void set(int64_t flat, double v) {
    const int64_t o = offset(flat);
    if (dtype == MOE_DTYPE_I32) reinterpret_cast<int32_t *>(mem.data())[o] = int32_t(v);
    else if (dtype == MOE_DTYPE_I64) reinterpret_cast<int64_t *>(mem.data())[o] = int64_t(v);
    else moe::cpu::store_scalar(mem.data(), dtype, o, v);
  }
  std::vector<double> values() const {
    std::vector<double> v(static_cast<size_t>(numel()));
    for (int64_t i = 0; i < numel(); ++i) v[size_t(i)] = get(i);
    return v;
  }
  void fill_bytes(unsigned char b) { std::fill(mem.begin(), mem.end(), b); }
  moe_tensor_t desc() const {
    moe_tensor_t t{};
    t.data = const_cast<unsigned char *>(mem.data());
    t.dtype = dtype;
    t.ndim = int32_t(shape.size());
    for (size_t d = 0; d < shape.size(); ++d) {
      t.shape[d] = shape[d];
      t.strides[d] = strides[d];
    }
    t.name = name.empty() ? nullptr : name.c_str();
    return t;
  }
};

inline void fill_normal(Tensor &t, std::mt19937 &rng, double scale = 1.0) {
  std::normal_distribution<double> nd(0.0, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, nd(rng));
}

// A CPU context with its own workspace buffer.
struct Ctx {
  std::vector<unsigned char> ws;
  moe_context_t ctx{};
  explicit Ctx(size_t bytes) : ws(bytes) {
    ctx.device_type = MOE_DEVICE_CPU;
    ctx.workspace = bytes ? ws.data() : nullptr;
    ctx.workspace_bytes = bytes;
  }
  const moe_context_t *get() const { return &ctx; }
};

// The three plan tensors.
struct Plan {
  Tensor off, sorted, rows;
  moe_plan_t plan{};
  Plan(int64_t E, int64_t n)
      : off(MOE_DTYPE_I32, {E + 1}), sorted(MOE_DTYPE_I32, {n}), rows(MOE_DTYPE_I32, {n}) {
    refresh();
  }
  void refresh() { plan = moe_plan_t{off.desc(), sorted.desc(), rows.desc()}; }
  int32_t at(const Tensor &t, int64_t i) const {
    return reinterpret_cast<const int32_t *>(t.mem.data())[i];
  }
};

// max |a - b| / max(1e-30, max |b|) over matching vectors.
inline double rel_err(const std::vector<double> &a, const std::vector<double> &b) {
  double m = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::fabs(a[i] - b[i]));
    ref = std::max(ref, std::fabs(b[i]));
  }
  return m / std::max(ref, 1e-30);
}

inline double tol_for(int32_t dt) {
  switch (dt) {
    case MOE_DTYPE_F64: return 1e-12;
    case MOE_DTYPE_F32: return 2e-5;
    case MOE_DTYPE_F16: return 5e-3;
    default: return 3e-2;  // bf16
  }
}

// ---- double-precision references ------------------------------------------

struct ExpertsRef {
  std::vector<double> out, dx, ds, dW1, dW2;
};

inline double silu(double g) { return g / (1.0 + std::exp(-g)); }

// x [T,H], idx [T,k], s [T,k], W1 [E,2I,H], W2 [E,H,I], dout [T,H].
inline ExpertsRef experts_ref(int64_t T, int64_t k, int64_t H, int64_t I, int64_t E,
                              const std::vector<double> &x, const std::vector<double> &idx,
                              const std::vector<double> &s, const std::vector<double> &W1,
                              const std::vector<double> &W2, const std::vector<double> &dout) {
  ExpertsRef R;
  R.out.assign(size_t(T * H), 0);
  R.dx.assign(size_t(T * H), 0);
  R.ds.assign(size_t(T * k), 0);
  R.dW1.assign(size_t(E * 2 * I * H), 0);
  R.dW2.assign(size_t(E * H * I), 0);
  std::vector<double> h(static_cast<size_t>(2 * I)), a(static_cast<size_t>(I)), dA(static_cast<size_t>(I)), dh(static_cast<size_t>(2 * I));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = int64_t(idx[size_t(t * k + j)]);
      const double sw = s[size_t(t * k + j)];
      const double *w1 = W1.data() + e * 2 * I * H;
      const double *w2 = W2.data() + e * H * I;
      const double *xt = x.data() + t * H;
      const double *go = dout.data() + t * H;
      for (int64_t r = 0; r < 2 * I; ++r) {
        double acc = 0;
        for (int64_t c = 0; c < H; ++c) acc += w1[r * H + c] * xt[c];
        h[size_t(r)] = acc;
      }
      for (int64_t i = 0; i < I; ++i) a[size_t(i)] = silu(h[size_t(i)]) * h[size_t(I + i)];
      for (int64_t r = 0; r < H; ++r) {
        double acc = 0;
        for (int64_t i = 0; i < I; ++i) acc += w2[r * I + i] * a[size_t(i)];
        R.out[size_t(t * H + r)] += sw * acc;
      }
      // backward
      double dsv = 0;
      for (int64_t i = 0; i < I; ++i) {
        double acc = 0;
        for (int64_t r = 0; r < H; ++r) acc += w2[r * I + i] * go[r];
        dA[size_t(i)] = acc;
        dsv += acc * a[size_t(i)];
      }
      R.ds[size_t(t * k + j)] = dsv;
      for (int64_t r = 0; r < H; ++r)
        for (int64_t i = 0; i < I; ++i)
          R.dW2[size_t(e * H * I + r * I + i)] += sw * go[r] * a[size_t(i)];
      for (int64_t i = 0; i < I; ++i) {
        const double g = h[size_t(i)], u = h[size_t(I + i)];
        const double sg = 1.0 / (1.0 + std::exp(-g));
        const double da = sw * dA[size_t(i)];
        dh[size_t(i)] = da * u * sg * (1.0 + g * (1.0 - sg));
        dh[size_t(I + i)] = da * g * sg;
      }
      for (int64_t r = 0; r < 2 * I; ++r)
        for (int64_t c = 0; c < H; ++c) {
          R.dW1[size_t(e * 2 * I * H + r * H + c)] += dh[size_t(r)] * xt[c];
          R.dx[size_t(t * H + c)] += w1[r * H + c] * dh[size_t(r)];
        }
    }
  }
  return R;
}

}  // namespace moe_test
