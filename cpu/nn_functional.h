#pragma once
// CPU kernels of the fused neural-network functions (ops/nn_functional.cpp).
// Every tensor is contiguous; x-like tensors are (rows, cols) matrices whose
// rows are the last dim of the op's input. Per-row statistics (lse, mean,
// rstd) and the cross-entropy count are in the compute type: float32 for
// float32/bfloat16 inputs, float64 for float64.
#include "core/tensor.h"

namespace minidl::cpu {

// y = softmax(x) or log_softmax(x) along each row.
void softmax_forward(const Tensor& x, int64_t rows, int64_t cols, bool log, const Tensor& y);
// dx from the forward output y and the upstream gradient dy:
// softmax: y (dy - sum(dy y)); log_softmax: dy - exp(y) sum(dy).
void softmax_backward(const Tensor& y, const Tensor& dy, int64_t rows, int64_t cols, bool log,
                      const Tensor& dx);

// loss (a scalar of the logits' dtype) = mean over rows whose target is not
// ignore_index of lse[m] - logits[m, target[m]]; 0 when every row is ignored.
// Also writes lse (rows) and count (a scalar: the rows that count). Throws
// when a target is outside [0, cols) and is not ignore_index.
void cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t rows, int64_t cols,
                           int64_t ignore_index, const Tensor& loss, const Tensor& lse,
                           const Tensor& count);
// dlogits = grad * (softmax(logits) - onehot(target)) / count on rows that
// count, 0 on ignored rows; grad is the loss's scalar gradient.
void cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, const Tensor& count, int64_t rows, int64_t cols,
                            int64_t ignore_index, const Tensor& dlogits);

// y = (x - mean) * rstd * weight + bias per row, rstd = 1 / sqrt(var + eps)
// (biased variance); weight and bias (cols) may be undefined. Writes mean
// and rstd (rows) for the backward.
void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t rows,
                        int64_t cols, double eps, const Tensor& y, const Tensor& mean,
                        const Tensor& rstd);
// dx, dweight = sum_rows dy * xhat, dbias = sum_rows dy; each output is
// written only when defined. weight may be undefined (no affine).
void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, int64_t rows, int64_t cols,
                         const Tensor& dx, const Tensor& dweight, const Tensor& dbias);

}  // namespace minidl::cpu
