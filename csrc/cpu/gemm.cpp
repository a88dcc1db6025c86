#include "cpu/gemm.h"

#include <algorithm>
#include <climits>
#include <cstring>

#ifdef MOE_FUSED_WITH_BLAS
#include <cblas.h>
#endif

namespace moe {
namespace cpu {
namespace {

template <class C>
void scale_c(int64_t M, int64_t N, C beta, C *Cm, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    C *row = Cm + i * ldc;
    if (beta == C(0)) {
      for (int64_t j = 0; j < N; ++j) row[j] = C(0);
    } else if (beta != C(1)) {
      for (int64_t j = 0; j < N; ++j) row[j] *= beta;
    }
  }
}

// Built-in loop: OpenMP over row blocks of C, K blocked, contiguous inner
// loops. Not as fast as a BLAS, same results up to summation order.
template <class C>
void gemm_loop(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, C alpha,
               const C *A, int64_t lda, const C *B, int64_t ldb, C beta, C *Cm,
               int64_t ldc) {
  constexpr int64_t MB = 32, KB = 256;
#pragma omp parallel for schedule(dynamic, 1) if (M * N * K > 32768)
  for (int64_t i0 = 0; i0 < M; i0 += MB) {
    const int64_t i1 = std::min(M, i0 + MB);
    for (int64_t i = i0; i < i1; ++i) {
      C *crow = Cm + i * ldc;
      if (beta == C(0)) {
        for (int64_t j = 0; j < N; ++j) crow[j] = C(0);
      } else if (beta != C(1)) {
        for (int64_t j = 0; j < N; ++j) crow[j] *= beta;
      }
    }
    for (int64_t p0 = 0; p0 < K; p0 += KB) {
      const int64_t p1 = std::min(K, p0 + KB);
      for (int64_t i = i0; i < i1; ++i) {
        C *crow = Cm + i * ldc;
        if (tb == Trans::N) {
          // C[i,:] += a_ip * B[p,:]
          for (int64_t p = p0; p < p1; ++p) {
            const C a = alpha * (ta == Trans::N ? A[i * lda + p] : A[p * lda + i]);
            const C *brow = B + p * ldb;
            for (int64_t j = 0; j < N; ++j) crow[j] += a * brow[j];
          }
        } else {
          // C[i,j] += dot(A[i,p0:p1], B[j,p0:p1])
          for (int64_t j = 0; j < N; ++j) {
            const C *bcol = B + j * ldb;
            C acc = C(0);
            if (ta == Trans::N) {
              const C *arow = A + i * lda;
              for (int64_t p = p0; p < p1; ++p) acc += arow[p] * bcol[p];
            } else {
              for (int64_t p = p0; p < p1; ++p) acc += A[p * lda + i] * bcol[p];
            }
            crow[j] += alpha * acc;
          }
        }
      }
    }
  }
}

[[maybe_unused]] bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

template <class C>
bool trivial(int64_t M, int64_t N, int64_t K, C beta, C *Cm, int64_t ldc) {
  if (M <= 0 || N <= 0) return true;
  if (K <= 0) {
    scale_c(M, N, beta, Cm, ldc);
    return true;
  }
  return false;
}

}  // namespace

bool gemm_uses_blas() {
#ifdef MOE_FUSED_WITH_BLAS
  return true;
#else
  return false;
#endif
}

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha,
          const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
          float *Cm, int64_t ldc) {
  if (trivial(M, N, K, beta, Cm, ldc)) return;
#ifdef MOE_FUSED_WITH_BLAS
  if (fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) &&
      fits_int(ldb) && fits_int(ldc)) {
    cblas_sgemm(CblasRowMajor, ta == Trans::N ? CblasNoTrans : CblasTrans,
                tb == Trans::N ? CblasNoTrans : CblasTrans, int(M), int(N),
                int(K), alpha, A, int(lda), B, int(ldb), beta, Cm, int(ldc));
    return;
  }
#endif
  gemm_loop<float>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc);
}

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha,
          const double *A, int64_t lda, const double *B, int64_t ldb,
          double beta, double *Cm, int64_t ldc) {
  if (trivial(M, N, K, beta, Cm, ldc)) return;
#ifdef MOE_FUSED_WITH_BLAS
  if (fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) &&
      fits_int(ldb) && fits_int(ldc)) {
    cblas_dgemm(CblasRowMajor, ta == Trans::N ? CblasNoTrans : CblasTrans,
                tb == Trans::N ? CblasNoTrans : CblasTrans, int(M), int(N),
                int(K), alpha, A, int(lda), B, int(ldb), beta, Cm, int(ldc));
    return;
  }
#endif
  gemm_loop<double>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc);
}

}  // namespace cpu
}  // namespace moe
