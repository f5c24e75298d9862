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

// The attention kernel versions, oldest first; docs/kernel-notes.md has each
// one's design and figures. Every version computes the same function.
enum class AttentionKernel {
  kSimt,     // portable fp32 math: both dtypes, any head dim up to 128, any GPU
  kMmaSync,  // tensor cores (mma.sync), head dims 32/64/128: bf16, and float32 as TF32 on sm_80+
  kWgmma,    // Hopper (sm_90a) warpgroup MMA forward, head dim 64
  kWarpSpecialized,  // Hopper: TMA producer warp + consumer warpgroups (FlashAttention-3 structure)
};
enum class AttentionPass { kForward, kBackward };

// "simt", "mma", "wgmma", "ws": the names MINIDL_ATTENTION_KERNEL takes.
const char* attention_kernel_name(AttentionKernel kernel);

// The kernel that runs one pass of a problem on the current device: the
// newest version that handles its dtype and head dim (every version takes
// attention dropout), no newer than
// the one MINIDL_ATTENTION_KERNEL names when it is set (tests and benchmarks
// use it to run every version). An unknown name is an error.
AttentionKernel choose_attention_kernel(DType dtype, int64_t head_dim, AttentionPass pass);

// Writes out (same dtype as q) and lse (-inf where a row is kept nowhere).
void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const DilatedAttentionConfig& config, const Tensor& out,
                               const Tensor& lse);
// The same, handing out attention dropout's mask in *dropout_bits for the
// backward: the ws forward keeps the bits it draws (one per attended pair,
// int32 words on the device: about 2 GB for the benchmarks' 1M-token,
// 8-head LongNet problem; docs/dilated-attention.md). It is left undefined
// without dropout, with the other kernels, where the ws kernel does not take
// the problem (e.g. views whose batch stride is not N row strides), and where
// the bits would take more than 1/16 of the device's memory: the backward
// then draws the mask again.
void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const DilatedAttentionConfig& config, const Tensor& out, const Tensor& lse,
                               Tensor* dropout_bits);

// grad_lse may be undefined (no gradient flows into lse). Writes dq, dk, dv
// (same shapes/dtype as q, k, v; contiguous; fully overwritten).
void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                const Tensor& grad_lse, const DilatedAttentionConfig& config,
                                const Tensor& dq, const Tensor& dk, const Tensor& dv);
// dropout_bits: what the forward handed out. The ws backward reads it; without
// it (undefined) the backward draws the mask again.
void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                const Tensor& grad_lse, const DilatedAttentionConfig& config,
                                const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                const Tensor& dropout_bits);

}  // namespace minidl::cuda
