#pragma once
// Fused CUDA dilated attention (forward and backward). q, k, v are
// (B, N, H, D) with the D dim contiguous (other strides free, e.g. views of
// one QKV projection); out, grad_out, dq, dk, dv are contiguous (B, N, H, D)
// and lse, grad_lse contiguous float32 (B, N, H). Branch segments are
// clamped to N. Inputs float32 or bfloat16 (fp32 accumulation). Same
// contract as cpu/dilated_attention.h.
#include "core/dilated.h"
#include "core/tensor.h"

namespace minidl::cuda {

// Writes out (same dtype as q) and lse (-inf where a row is kept nowhere).
void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const DilatedAttentionConfig& config, const Tensor& out,
                               const Tensor& lse);

// grad_lse may be undefined (no gradient flows into lse). Writes dq, dk, dv
// (same shapes/dtype as q, k, v; contiguous; fully overwritten).
void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                const Tensor& grad_lse, const DilatedAttentionConfig& config,
                                const Tensor& dq, const Tensor& dk, const Tensor& dv);

}  // namespace minidl::cuda
