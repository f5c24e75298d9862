#pragma once
// Fused optimizer kernels (CPU): one pass over a parameter and its state.
#include "core/tensor.h"

namespace minidl {
// Hyper-parameters of one AdamW step, with the bias corrections folded in.
struct AdamWHyper {
  double lr, beta1, beta2, eps, weight_decay;
  double bias_correction1, bias_correction2;  // 1 - beta^t
};
}  // namespace minidl

namespace minidl::cpu {
// param, grad, exp_avg, exp_avg_sq: contiguous, same shape and dtype.
void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg,
                const Tensor& exp_avg_sq, const AdamWHyper& h);
}  // namespace minidl::cpu
