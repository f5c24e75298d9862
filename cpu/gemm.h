#pragma once
// CPU GEMM: C = alpha * op(A) * op(B) + beta * C, row-major, with leading
// dims, transpose flags and strided batches (BLAS's contract, row-major).
//
// Goto/BLIS structure: op(B) is packed in KC x NC panels (L3), op(A) in
// MC x KC blocks (L2), and a register-blocked AVX2/FMA micro-kernel
// (6x16 float32, 6x8 float64) runs over the packed slivers. bfloat16 inputs
// are widened to float32 while packing and accumulate in float32. OpenMP
// splits one large GEMM over its row/column blocks, or a batch of small
// ones over its matrices.
//
// beta == 0 never reads C (it may hold garbage or NaN).
#include <cstdint>

#include "core/dtype.h"
#include "core/scalar_math.h"
#include "core/tensor.h"

namespace minidl::cpu {

// op(A) is m x k: A is stored m x k (lda >= k), or k x m (lda >= m) when
// trans_a. op(B) is k x n likewise. C is m x n with ldc >= n.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, compute_t<T> alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, compute_t<T> beta, T* c, int64_t ldc);

// `batch` GEMMs; matrix i of A starts at a + i * stride_a (stride 0 repeats
// one matrix), likewise B and C. C matrices must not overlap.
template <typename T>
void gemm_strided_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                          compute_t<T> alpha, const T* a, int64_t lda, int64_t stride_a,
                          const T* b, int64_t ldb, int64_t stride_b, compute_t<T> beta, T* c,
                          int64_t ldc, int64_t stride_c, int64_t batch);

// The kernel behind ops::matmul: out = a @ b for every batch index.
// a is (..., M, K), b (..., K, N), out (..., M, N) contiguous, all with the
// same batch dims (stride 0 where broadcast). Each matrix of a is stored as
// described by trans_a / lda (see gemm), likewise b; a's and b's strides of
// their last two dims are not consulted.
void matmul(const Tensor& a, bool trans_a, int64_t lda, const Tensor& b, bool trans_b,
            int64_t ldb, const Tensor& out);

}  // namespace minidl::cpu
