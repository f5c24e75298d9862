// CUDA dropout + residual add + layer norm: the layer-norm kernels of
// cuda/layer_norm.cuh with their fused prologue and epilogue.
#include "cuda/dropout_add_layer_norm.h"
#include "cuda/layer_norm.cuh"

namespace minidl::cuda {

void dropout_add_layer_norm_forward(const Tensor& h, const Tensor& residual, uint64_t seed,
                                    PhiloxOffset offset, float keep_threshold, double scale,
                                    const Tensor& weight, const Tensor& bias, int64_t rows,
                                    int64_t cols, double eps, const Tensor& sum, const Tensor& z,
                                    const Tensor& mean, const Tensor& rstd) {
  layer_norm_detail::forward<true>(Tensor(), weight, bias, rows, cols, eps, z, mean, rstd,
                                   {h, residual, sum, {seed, offset, keep_threshold, scale}});
}

void dropout_add_layer_norm_backward(const Tensor& dz, const Tensor& dsum, const Tensor& sum,
                                     const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                                     uint64_t seed, PhiloxOffset offset, float keep_threshold,
                                     double scale, int64_t rows, int64_t cols,
                                     const Tensor& dresidual, const Tensor& dh,
                                     const Tensor& dweight, const Tensor& dbias) {
  layer_norm_detail::backward<true>(dz, sum, weight, mean, rstd, rows, cols, dresidual, dweight, dbias,
                                    {dsum, dh, {seed, offset, keep_threshold, scale}});
}

}  // namespace minidl::cuda
