#pragma once
// The portable dilated-attention kernels (SIMT, fp32 math): float32 and
// bfloat16, any head dim up to 128, any GPU; internal to
// cuda/dilated_attention.cu, which falls back to them where no tensor-core
// version takes a problem (and MINIDL_ATTENTION_KERNEL=simt keeps them).
#include <vector>

#include "core/dilated.h"
#include "core/tensor.h"

namespace minidl::cuda::attn {

// Every branch of `config`, its share of the pairs in `pairs` (config
// order; plain: all its pairs), merged into the fp32 accumulators o_acc
// (B, N, H, D contiguous, zeroed) and lse (filled with -inf).
void forward_simt(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                  const DilatedAttentionConfig& config, const std::vector<BranchPairs>& pairs, const Tensor& o_acc,
                  const Tensor& lse);

// delta = rowsum(dO * O) - dL per (b, pos, head) row (grad_lse may be
// undefined); out and grad_out contiguous, in q's dtype. Every backward's first pass.
// dq_zero (optional): an fp32 accumulator laid out as out, zeroed on the way.
void backward_delta(const char* op, const Tensor& out, const Tensor& grad_out, const Tensor& grad_lse,
                    const Tensor& delta, const Tensor& dq_zero = Tensor());

// Every branch's dQ, dK and dV (its share of `pairs`, as forward_simt's)
// added into the fp32 accumulators (B, N, H, D contiguous, zeroed), from the
// global lse and delta.
void backward_simt(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& grad_out, const Tensor& lse,
                   const Tensor& delta, const DilatedAttentionConfig& config, const std::vector<BranchPairs>& pairs,
                   const Tensor& dq_acc, const Tensor& dk_acc, const Tensor& dv_acc);

}  // namespace minidl::cuda::attn
