#pragma once
// Sequence-parallel dilated attention (LongNet's distributed algorithm; see
// docs/dilated-attention.md, "Sequence parallel").
#include <utility>

#include "core/dilated.h"
#include "core/tensor.h"
#include "dist/communicator.h"

namespace minidl::ops {

// Rank p of comm.size() holds the contiguous chunk [start_p, start_p + n_p) of
// a sequence of N tokens: q, k, v are this rank's (B, n_p, H, D) rows, chunks
// in rank order (start_p = n_0 + ... + n_{p-1}); any sizes, e.g.
// n_p = floor((p+1)·N/P) - floor(p·N/P). Every rank passes the same config,
// B, H, D and dtype. Returns this rank's rows of ops::dilated_attention's
// (out, lse) for the whole sequence (branch segments are global positions;
// segments are clamped to N, scale 0 means 1/sqrt(D)), and is differentiable:
// backward returns dq, dk, dv of the local rows, the gradients of keys and
// values another rank gathered coming back by reduce-scatter. Every rank must
// run the forward and the backward (they are collective), and comm must
// outlive the backward. No attention dropout (the mask is keyed by global
// positions, not implemented here yet).
//
// CPU tensors (float64, float32, bfloat16; computed in float64), or CUDA
// tensors (float32, bfloat16: the CUDA attention kernels in that dtype, the
// union-softmax merge and gradient sums in float32) with a communicator that
// moves device memory: the in-process backend (virtual ranks sharing one
// GPU) or NCCL. Each call exchanges the ranks' chunk sizes first (on CUDA a
// host wait); the plan of that layout (a split of comm per spanning
// segment, the row maps, uploaded on CUDA) is built by the first call that
// meets it and kept with comm (dist::Communicator::attachment) for later
// ones, the last 8 layouts.
std::pair<Tensor, Tensor> seq_parallel_dilated_attention(const Tensor& q, const Tensor& k,
                                                         const Tensor& v,
                                                         const DilatedAttentionConfig& config,
                                                         dist::Communicator& comm);

}  // namespace minidl::ops
