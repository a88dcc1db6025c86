// Internal helpers of the CPU backend: workspace carving, strided tensor
// access, weight operands for the GEMM interface, row gathers and scatters.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/dtype.h"
#include "cpu/gemm.h"
#include "moe_fused.h"

namespace moe {
namespace cpu {

constexpr size_t kAlign = 256;

inline size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Carves 256-byte aligned sub-buffers out of the caller's workspace. With a
// null base it only measures (used by the *_workspace_size queries), so the
// query and the compute call share one layout function.
class Arena {
 public:
  explicit Arena(void *base) : base_(static_cast<char *>(base)) {
    if (base_) {
      uintptr_t p = reinterpret_cast<uintptr_t>(base_);
      base_ = reinterpret_cast<char *>((p + kAlign - 1) / kAlign * kAlign);
    }
  }
  template <class T> T *take(int64_t n) {
    const size_t bytes = align_up(size_t(n > 0 ? n : 0) * sizeof(T));
    T *p = base_ ? reinterpret_cast<T *>(base_ + used_) : nullptr;
    used_ += bytes;
    return p;
  }
  size_t used() const { return used_; }
  // Bytes a caller must provide: the sub-buffers plus slack for aligning an
  // arbitrary base pointer; 0 when nothing is needed.
  size_t required() const { return used_ ? used_ + kAlign : 0; }

 private:
  char *base_;
  size_t used_ = 0;
};

// Number of elements of a tensor.
inline int64_t numel(const moe_tensor_t &t) {
  int64_t n = 1;
  for (int d = 0; d < t.ndim; ++d) n *= t.shape[d];
  return n;
}

template <class T> inline T *data_as(const moe_tensor_t &t) {
  return static_cast<T *>(t.data);
}

// A logical R x K matrix inside memory: M(r,k) = trans ? p[k*ld + r] : p[r*ld + k].
template <class C> struct MatRef {
  const C *p;
  int64_t ld;
  bool trans;
  // cblas flag and ld to use this matrix (or its transpose) as an operand.
  Trans as_op(bool transpose) const {
    return (trans != transpose) ? Trans::T : Trans::N;
  }
};

// Copies a strided R x K matrix of element type T into contiguous C [R, K].
template <class T, class C>
void load_matrix(C *dst, const T *src, int64_t R, int64_t K, int64_t sr,
                 int64_t sk) {
  if (sk == 1) {
#pragma omp parallel for schedule(static) if (R * K > 65536)
    for (int64_t r = 0; r < R; ++r) {
      const T *s = src + r * sr;
      C *d = dst + r * K;
      for (int64_t k = 0; k < K; ++k) d[k] = to_c<C>(s[k]);
    }
  } else if (sr == 1) {
    // Transposed view: walk the source contiguously, in tiles.
    constexpr int64_t B = 64;
#pragma omp parallel for schedule(static) if (R * K > 65536)
    for (int64_t k0 = 0; k0 < K; k0 += B) {
      const int64_t k1 = std::min(K, k0 + B);
      for (int64_t r0 = 0; r0 < R; r0 += B) {
        const int64_t r1 = std::min(R, r0 + B);
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t r = r0; r < r1; ++r) dst[r * K + k] = to_c<C>(src[k * sk + r]);
      }
    }
  } else {
#pragma omp parallel for schedule(static) if (R * K > 65536)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) dst[r * K + k] = to_c<C>(src[r * sr + k * sk]);
  }
}

// Writes contiguous C [R, K] into a strided R x K matrix of element type T.
template <class T, class C>
void store_matrix(T *dst, int64_t sr, int64_t sk, const C *src, int64_t R,
                  int64_t K) {
#pragma omp parallel for schedule(static) if (R * K > 65536)
  for (int64_t r = 0; r < R; ++r) {
    T *d = dst + r * sr;
    const C *s = src + r * K;
    if (sk == 1) {
      for (int64_t k = 0; k < K; ++k) d[k] = from_c<T>(s[k]);
    } else {
      for (int64_t k = 0; k < K; ++k) d[k * sk] = from_c<T>(s[k]);
    }
  }
}

template <class T>
void zero_matrix(T *dst, int64_t sr, int64_t sk, int64_t R, int64_t K) {
  const T z = from_c<T>(0.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) dst[r * sr + k * sk] = z;
}

// Normalised strides of a logical R x K matrix: strides of size-1 dims
// do not matter, so they are replaced by the contiguous ones.
inline void norm_strides(int64_t R, int64_t K, int64_t &sr, int64_t &sk) {
  if (K <= 1) sk = 1;
  if (R <= 1) sr = std::max<int64_t>(K, 1);
}

// Weight operand of expert e of a [E, R, K] tensor: used in place when its
// element type is the compute type and one of its two inner strides is 1;
// else converted into `scratch` (R*K compute elements).
template <class T, class C>
MatRef<C> weight_operand(const moe_tensor_t &w, int64_t e, C *scratch) {
  const int64_t R = w.shape[1], K = w.shape[2];
  int64_t sr = w.strides[1], sk = w.strides[2];
  norm_strides(R, K, sr, sk);
  const T *base = data_as<const T>(w) + e * w.strides[0];
  if (std::is_same<T, C>::value) {
    const C *p = reinterpret_cast<const C *>(base);
    if (sk == 1 && sr >= std::max<int64_t>(K, 1)) return {p, sr, false};
    if (sr == 1 && sk >= std::max<int64_t>(R, 1)) return {p, sk, true};
  }
  load_matrix<T, C>(scratch, base, R, K, sr, sk);
  return {scratch, std::max<int64_t>(K, 1), false};
}

// Destination of a GEMM into expert e of a [E, R, K] output tensor.
template <class C> struct OutRef {
  C *p;
  int64_t ld;
  bool trans;
  bool direct;  // false: the product goes to scratch, then store_matrix
};

template <class T, class C>
OutRef<C> weight_output(const moe_tensor_t &w, int64_t e, C *scratch) {
  const int64_t R = w.shape[1], K = w.shape[2];
  int64_t sr = w.strides[1], sk = w.strides[2];
  norm_strides(R, K, sr, sk);
  T *base = data_as<T>(w) + e * w.strides[0];
  if (std::is_same<T, C>::value) {
    C *p = reinterpret_cast<C *>(base);
    if (sk == 1 && sr >= std::max<int64_t>(K, 1)) return {p, sr, false, true};
    if (sr == 1 && sk >= std::max<int64_t>(R, 1)) return {p, sk, true, true};
  }
  return {scratch, std::max<int64_t>(K, 1), false, false};
}

// out = op(A) op(B) + beta * out, written to an OutRef (a transposed output
// is computed as op(B)^T op(A)^T).
template <class C>
void gemm_into(const OutRef<C> &o, Trans ta, Trans tb, int64_t M, int64_t N,
               int64_t K, const C *A, int64_t lda, const C *B, int64_t ldb, C beta = C(0)) {
  if (o.trans)
    gemm(flip(tb), flip(ta), N, M, K, C(1), B, ldb, A, lda, beta, o.p, o.ld);
  else
    gemm(ta, tb, M, N, K, C(1), A, lda, B, ldb, beta, o.p, o.ld);
}

// Finishes an OutRef: converts the scratch product into expert e of w.
template <class T, class C>
void finish_output(const OutRef<C> &o, const moe_tensor_t &w, int64_t e) {
  if (o.direct) return;
  const int64_t R = w.shape[1], K = w.shape[2];
  int64_t sr = w.strides[1], sk = w.strides[2];
  norm_strides(R, K, sr, sk);
  store_matrix<T, C>(data_as<T>(w) + e * w.strides[0], sr, sk, o.p, R, K);
}

template <class T>
void zero_expert(const moe_tensor_t &w, int64_t e) {
  const int64_t R = w.shape[1], K = w.shape[2];
  int64_t sr = w.strides[1], sk = w.strides[2];
  norm_strides(R, K, sr, sk);
  T *base = data_as<T>(w) + e * w.strides[0];
  if (sk == 1 && sr == K) {
    std::memset(static_cast<void *>(base), 0, size_t(R * K) * sizeof(T));
    return;
  }
  zero_matrix<T>(base, sr, sk, R, K);
}

// Row r of a [rows, n] strided tensor converted into dst[0..n).
template <class T, class C>
inline void load_row(C *dst, const T *src, int64_t n, int64_t stride) {
  if (stride == 1) {
    if (std::is_same<T, C>::value) {
      std::memcpy(static_cast<void *>(dst), static_cast<const void *>(src), size_t(n) * sizeof(C));
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = to_c<C>(src[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_c<C>(src[i * stride]);
  }
}

template <class T, class C>
inline void store_row(T *dst, int64_t stride, const C *src, int64_t n) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = from_c<T>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = from_c<T>(src[i]);
  }
}

}  // namespace cpu
}  // namespace moe
