#pragma once
// CUDA launchers of the fused neural-network functions (one kernel file per
// primitive: softmax.cu, cross_entropy.cu, layer_norm.cu); same contract as
// cpu/nn_functional.h, except that cross_entropy_forward does not check the
// targets on the host (that would need a sync): a target outside [0, cols)
// that is not ignore_index makes the loss, and its row's gradient, NaN.
#include "core/tensor.h"

namespace minidl::cuda {

void softmax_forward(const Tensor& x, int64_t rows, int64_t cols, bool log, const Tensor& y);
void softmax_backward(const Tensor& y, const Tensor& dy, int64_t rows, int64_t cols, bool log,
                      const Tensor& dx);
void cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t rows, int64_t cols,
                           int64_t ignore_index, const Tensor& loss, const Tensor& lse,
                           const Tensor& count);
void cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, const Tensor& count, int64_t rows, int64_t cols,
                            int64_t ignore_index, const Tensor& dlogits);
void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t rows,
                        int64_t cols, double eps, const Tensor& y, const Tensor& mean,
                        const Tensor& rstd);
void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, int64_t rows, int64_t cols,
                         const Tensor& dx, const Tensor& dweight, const Tensor& dbias);

}  // namespace minidl::cuda
