#pragma once
// CPU dilated attention (forward and backward); same contract as
// cuda/dilated_attention.h (see docs/dilated-attention.md).
//
// Layout: q, k, v, out, grad_out are (B, N, H, D) with the D dim contiguous
// (other strides free: q/k/v may be views of one (B, N, 3, H, D) projection).
// out, dq, dk, dv are contiguous and fully overwritten. lse is (B, N, H),
// contiguous, and float32, except for float64 inputs where it is float64 so
// that the float64 path is exact enough for finite-difference gradchecks (the
// CUDA side never sees float64). grad_lse, when defined, has lse's shape and
// dtype (any strides). Inputs float32, float64 or bfloat16; accumulation in
// float (double for float64). Segments larger than N are clamped to N here as
// well, so the functions are safe to call with an unclamped config.
//
// config.dropout (core/dilated.h), when enabled, masks the attention
// probabilities: out_p = sum_j P_pj M_pj v_j with P_pj = exp(s_pj - L_p), L
// the undropped log-sum-exp (lse is unchanged) and M_pj = keep_pj * scale.
// The backward regenerates the mask from the config (pass the same one) and
// takes `out` to be the dropped output: D_p = dO_p . O_p - dL_p,
// dS = P (M dP' - D), dV += (P M)^T dO. Disabled, results are bit-identical
// to the functions without dropout.
//
// Two implementations with the identical contract:
//  - dilated_attention_forward/backward: the fast path (the default; what the
//    op dispatches to). Per (branch, b, h, segment) a dense attention over the
//    kept rows, addressed in place, tiled over queries and keys with an online
//    softmax; branches merge into (O, L) by the log-sum-exp rule. Backward is
//    FlashAttention-2 style with the global L and D = rowsum(dO * O) - grad_lse.
//  - *_reference: enumerates, for each (b, h, p), the (branch, key) pairs of
//    the union directly and evaluates the formulas in double; slow, obviously
//    right, used by tests.
#include "core/dilated.h"
#include "core/tensor.h"

namespace minidl::cpu {

// Writes out (dtype of q) and lse (-inf and out = 0 where a row is kept nowhere).
void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const DilatedAttentionConfig& config, const Tensor& out,
                               const Tensor& lse);

// grad_lse may be undefined (no gradient flows into lse). Writes dq, dk, dv.
void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                const Tensor& grad_lse, const DilatedAttentionConfig& config,
                                const Tensor& dq, const Tensor& dk, const Tensor& dv);

// The CUDA backend's overloads (cuda/dilated_attention.h): the CPU draws
// attention dropout's mask in both passes, so it keeps no dropout bits.
inline void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const DilatedAttentionConfig& config, const Tensor& out, const Tensor& lse,
                                      Tensor* dropout_bits) {
  if (dropout_bits) *dropout_bits = Tensor();
  dilated_attention_forward(q, k, v, config, out, lse);
}
inline void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                       const Tensor& lse, const Tensor& grad_out, const Tensor& grad_lse,
                                       const DilatedAttentionConfig& config, const Tensor& dq, const Tensor& dk,
                                       const Tensor& dv, const Tensor& /*dropout_bits: none on the CPU*/) {
  dilated_attention_backward(q, k, v, out, lse, grad_out, grad_lse, config, dq, dk, dv);
}

void dilated_attention_forward_reference(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const DilatedAttentionConfig& config, const Tensor& out,
                                         const Tensor& lse);

void dilated_attention_backward_reference(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const Tensor& out, const Tensor& lse,
                                          const Tensor& grad_out, const Tensor& grad_lse,
                                          const DilatedAttentionConfig& config, const Tensor& dq,
                                          const Tensor& dk, const Tensor& dv);

}  // namespace minidl::cpu
