#pragma once
// Multi-tensor optimizer kernels (CPU). cuda/optim.h has the same contract;
// ops/optim.cpp validates the arguments before calling either.
#include <math.h>

#include <vector>

#include "core/macros.h"
#include "core/tensor.h"

namespace minidl {

// One parameter of a multi-tensor AdamW step, all contiguous with one shape.
// param, exp_avg, exp_avg_sq share a dtype (float32, float64 or bfloat16);
// grad has the param's dtype, bfloat16 or float32; copy is undefined or a
// bfloat16 tensor that receives the updated parameter (the compute copy of
// mixed precision).
struct AdamWTensors {
  Tensor param, grad, exp_avg, exp_avg_sq, copy;
  double weight_decay;
};

struct AdamWHyper {
  double beta1, beta2, eps;
};

// The per-step constants of an AdamW update, computed in float64 by both
// backends from lr and step as they stand in memory when the step runs:
//   p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps).
struct AdamWScalars {
  double decay, step_size, inv_sqrt_bc2;
};
MINIDL_HD inline AdamWScalars adamw_scalars(double lr, double step, double beta1, double beta2,
                                            double weight_decay) {
  return {1 - lr * weight_decay, lr / (1 - pow(beta1, step)), 1 / sqrt(1 - pow(beta2, step))};
}

// min(1, max_norm / (norm + 1e-6)); a NaN norm gives NaN, so a diverged
// step shows in the parameters instead of being clipped away.
template <typename A> MINIDL_HD inline A clip_coefficient(A norm, A max_norm) {
  A ratio = max_norm / (norm + A(1e-6));
  return ratio >= A(1) ? A(1) : ratio;
}

}  // namespace minidl

namespace minidl::cpu {

// Advances the float64 scalar `step` by one, then updates every parameter with
// the float64 scalar `lr` and bias corrections 1 - beta^step (both read from
// the tensors, as the CUDA kernels do).
void adamw_step(const std::vector<AdamWTensors>& params, const Tensor& lr, const Tensor& step,
                const AdamWHyper& h);

// Writes the global L2 norm of `grads` (contiguous, floating) into the scalar
// `norm` (float32 or float64, the accumulation type) and scales every gradient
// in place by min(1, max_norm / (norm + 1e-6)).
void clip_by_global_norm(const std::vector<Tensor>& grads, double max_norm, const Tensor& norm);

}  // namespace minidl::cpu
