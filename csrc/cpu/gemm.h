// The one internal matrix-product interface of the CPU backend.
// Row-major: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C,
// op(X) = X (Trans::N, X stored [rows, ld]) or X^T (Trans::T).
// Through cblas_sgemm/dgemm when built with MOE_FUSED_WITH_BLAS, else a
// blocked OpenMP loop. K == 0 gives C = beta * C (zeros for beta == 0).
#pragma once

#include <cstdint>

namespace moe {
namespace cpu {

enum class Trans { N, T };

inline Trans flip(Trans t) { return t == Trans::N ? Trans::T : Trans::N; }

void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha,
          const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
          float *C, int64_t ldc);
void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha,
          const double *A, int64_t lda, const double *B, int64_t ldb,
          double beta, double *C, int64_t ldc);

// True when GEMMs go through a BLAS library.
bool gemm_uses_blas();

}  // namespace cpu
}  // namespace moe
