#pragma once
// cuBLAS GEMM behind ops::matmul; the same contract as cpu::matmul
// (cpu/gemm.h): out (..., M, N) contiguous = a (..., M, K) @ b (..., K, N),
// same batch dims (stride 0 where broadcast), each matrix of a and b stored
// as trans/ld describe. float32 runs on TF32 tensor cores, bfloat16 in and
// out with float32 accumulation, float64 in float64. Asynchronous on
// cuda::stream().
#include <cstdint>

#include "core/tensor.h"

namespace minidl::cuda {

void matmul(const Tensor& a, bool trans_a, int64_t lda, const Tensor& b, bool trans_b,
            int64_t ldb, const Tensor& out);

}  // namespace minidl::cuda
