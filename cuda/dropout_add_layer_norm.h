#pragma once
// CUDA launchers of ops::dropout_add_layer_norm, with the contract of
// cpu/dropout_add_layer_norm.h (the same mask, the same roundings): one
// kernel forward; backward one kernel for the row gradients and the
// parameter-gradient partial sums, then their reduction.
#include "core/generator.h"
#include "core/tensor.h"

namespace minidl::cuda {

void dropout_add_layer_norm_forward(const Tensor& h, const Tensor& residual, uint64_t seed,
                                    PhiloxOffset offset, float keep_threshold, double scale,
                                    const Tensor& weight, const Tensor& bias, int64_t rows,
                                    int64_t cols, double eps, const Tensor& sum, const Tensor& z,
                                    const Tensor& mean, const Tensor& rstd);
void dropout_add_layer_norm_backward(const Tensor& dz, const Tensor& dsum, const Tensor& sum,
                                     const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                                     uint64_t seed, PhiloxOffset offset, float keep_threshold,
                                     double scale, int64_t rows, int64_t cols,
                                     const Tensor& dresidual, const Tensor& dh,
                                     const Tensor& dweight, const Tensor& dbias);

}  // namespace minidl::cuda
