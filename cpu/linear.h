#pragma once
// The GEMMs behind ops::linear and ops::mlp with their epilogues (bias, GELU,
// bias gradient, GELU derivative). Every matrix is row-major and contiguous:
// x (M, K), weight (N, K), grad (M, N). Optional tensors may be undefined.
// cuda/linear.h has the same contract.
#include "core/tensor.h"

namespace minidl::cpu {

// out (M, N) = x weight^T + bias. With gelu_input defined, gelu_input gets
// that sum and out = gelu(sum) (tanh approximation).
void linear_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                    const Tensor& gelu_input, const Tensor& out);
// grad_weight (N, K) = grad^T x, in weight's own layout; grad_bias (N) =
// column sums of grad.
void linear_weight_grad(const Tensor& grad, const Tensor& x, const Tensor& grad_weight,
                        const Tensor& grad_bias);
// grad_x (M, K) = grad weight. With gelu_input (M, K) defined (x was
// gelu(gelu_input)) the result is the gradient of gelu_input instead:
// (grad weight) * gelu'(gelu_input); grad_bias (K) = its column sums.
void linear_input_grad(const Tensor& grad, const Tensor& weight, const Tensor& gelu_input,
                       const Tensor& grad_x, const Tensor& grad_bias);

}  // namespace minidl::cpu
