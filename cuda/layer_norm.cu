// CUDA layer norm over the last dim, forward and backward (launchers
// declared in cuda/nn_functional.h; the kernels, shared with the fused
// dropout_add_layer_norm.cu, are in cuda/layer_norm.cuh).
#include "cuda/layer_norm.cuh"
#include "cuda/nn_functional.h"

namespace minidl::cuda {

void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t rows,
                        int64_t cols, double eps, const Tensor& y, const Tensor& mean,
                        const Tensor& rstd) {
  layer_norm_detail::forward<false>(x, weight, bias, rows, cols, eps, y, mean, rstd);
}

void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, int64_t rows, int64_t cols,
                         const Tensor& dx, const Tensor& dweight, const Tensor& dbias) {
  layer_norm_detail::backward<false>(dy, x, weight, mean, rstd, rows, cols, dx, dweight, dbias);
}

}  // namespace minidl::cuda
