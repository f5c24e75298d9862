#pragma once
// Fused optimizer kernels (CUDA); same contract as cpu/optim.h.
#include "core/tensor.h"
#include "cpu/optim.h"

namespace minidl::cuda {
void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg,
                const Tensor& exp_avg_sq, const AdamWHyper& h);
}  // namespace minidl::cuda
