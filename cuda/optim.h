#pragma once
// Multi-tensor optimizer kernels (CUDA); same contract as cpu/optim.h. Each
// call is a few launches whatever the number of tensors, and never waits on
// the host: lr, the step counter and the clip coefficient stay in device memory.
#include <vector>

#include "core/tensor.h"
#include "cpu/optim.h"

namespace minidl::cuda {
void adamw_step(const std::vector<AdamWTensors>& params, const Tensor& lr, const Tensor& step,
                const AdamWHyper& h);
void clip_by_global_norm(const std::vector<Tensor>& grads, double max_norm, const Tensor& norm);
}  // namespace minidl::cuda
