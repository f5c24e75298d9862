#pragma once
// cuBLASLt GEMMs with epilogues behind ops::linear and ops::mlp; the same
// contract as cpu/linear.h. float32 (TF32) and bfloat16 (fp32 accumulation)
// run as one cuBLASLt call each: forward with the BIAS / GELU_AUX(_BIAS)
// epilogue, weight gradient with BGRADB, input gradient with DGELU(_BGRAD).
// Cases cuBLASLt has no kernel for (float64, a GELU width that is not a
// multiple of 8) run the cuBLAS GEMM and separate kernels instead. Every call
// uses the explicit workspace of cuda/runtime.h (no hidden allocation), is
// asynchronous on cuda::stream() and never syncs.
#include <vector>

#include "core/tensor.h"

namespace minidl::cuda {

void linear_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                    const Tensor& gelu_input, const Tensor& out);
void linear_weight_grad(const Tensor& grad, const Tensor& x, const Tensor& grad_weight,
                        const Tensor& grad_bias);
void linear_input_grad(const Tensor& grad, const Tensor& weight, const Tensor& gelu_input,
                       const Tensor& grad_x, const Tensor& grad_bias);

// Weight gradients of several same-shaped layers (grad (M, N), x (M, K),
// grad_weight (N, K), grad_bias (N) or undefined; one dtype, every tensor
// contiguous) as one cuBLASLt pointer-array batched GEMM and, with biases,
// one column-sum kernel for all of them: a few launches instead of one GEMM,
// its split-K and bias-gradient kernels per layer. false (no GEMM launched)
// where cuBLASLt has no batched kernel for the shape, or a problem has no
// weight gradient: the caller then runs linear_weight_grad per problem. More
// than 32 problems run as batches of at most 32.
struct WeightGradProblem {
  Tensor grad, x, grad_weight, grad_bias;
};
bool linear_weight_grads(const std::vector<WeightGradProblem>& problems);
// How many batched GEMMs linear_weight_grads has run (tests tell the batched
// path from the per-problem fallback).
int64_t linear_batched_calls();

// How many float32/bfloat16 calls cuBLASLt refused (and the cuBLAS path ran
// instead) since start-up; tests assert the fused path ran.
int64_t linear_fallbacks();
// How many cuBLASLt candidates MINIDL_GEMM_ALGO=single or timed has captured
// and counted so far (a test checks that tuning ran, not only its results).
int64_t gemm_candidates_captured();

}  // namespace minidl::cuda
