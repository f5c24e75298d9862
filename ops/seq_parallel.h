#pragma once
// Sequence-parallel dilated attention (LongNet's distributed algorithm; see
// docs/dilated-attention.md, "Sequence parallel").
#include <cstdint>
#include <utility>
#include <vector>

#include "core/dilated.h"
#include "core/tensor.h"
#include "dist/communicator.h"

namespace minidl::ops {

// How a sequence of N tokens is split over the ranks of a communicator: rank
// p holds chunk_sizes[p] consecutive tokens (any sizes >= 0, even 0), chunks
// in rank order, so rank p's chunk starts at chunk_sizes[0] + ... +
// chunk_sizes[p - 1] and N is their sum.
struct SequenceLayout {
  std::vector<int64_t> chunk_sizes;  // one per rank

  // The even split of n tokens over `ranks` ranks: rank p holds
  // floor((p+1)·n/ranks) - floor(p·n/ranks) tokens (sizes differ by at most 1).
  static SequenceLayout even(int64_t n, int ranks);
  // Where rank p's chunk starts (the sum of the sizes before it).
  int64_t start(int p) const;
};

// Rank p of comm.size() holds the contiguous chunk [start_p, start_p + n_p) of
// a sequence of N tokens: q, k, v are this rank's (B, n_p, H, D) rows, chunks
// in rank order (SequenceLayout). Every rank passes the same config, B, H, D
// and dtype. Returns this rank's rows of ops::dilated_attention's (out, lse)
// for the whole sequence (branch segments are global positions; segments are
// clamped to N, scale 0 means 1/sqrt(D)), and is differentiable: backward
// returns dq, dk, dv of the local rows, the gradients of keys and values
// another rank gathered coming back by reduce-scatter. Every rank must run
// the forward and the backward (they are collective), and comm must outlive
// the backward. config.dropout (attention dropout, its frame the default)
// drops exactly the single-device op's weights: every rank's pieces draw the
// whole problem's mask (core/dilated.h, AttentionMaskFrame), so ranks that
// pass the same seed and offset give the op's results with dropout too.
//
// CPU tensors (float64, float32, bfloat16; computed in float64), or CUDA
// tensors (float32, bfloat16: the CUDA attention kernels in that dtype, the
// union-softmax merge and gradient sums in float32) with a communicator that
// moves device memory: the in-process backend (virtual ranks sharing one
// GPU) or NCCL.
//
// The plan of a layout (a sub-communicator per spanning segment, the row
// maps, uploaded on CUDA) is built by the first call that meets it
// (collective, with host waits on CUDA) and kept with comm
// (dist::Communicator::attachment) for later calls. The sub-communicators
// are kept with comm too, by their ranks (a contiguous range): a plan whose
// segments have ranks an earlier plan's have reuses them instead of
// splitting comm again (while a kept plan uses them). Without `layout`, each call first
// exchanges the ranks' chunk sizes (an all-gather; on CUDA a host wait) to
// learn the layout. With `layout` (the caller knows it, e.g.
// SequenceLayout::even) nothing is exchanged: a call whose plan is kept
// communicates only the attention's own collectives and never waits on the
// host, so it can be captured in a CUDA graph (nn/cuda_graph.h); the graph
// replays the plan's row maps and sub-communicators, so a plan a capture used
// is kept for the communicator's life (the others: the last 8 layouts); the
// ranks must capture alike, or their caches part ways. Every rank must
// pass the same layout (or every rank none). The call that builds a layout's
// plan checks, on every rank, that every rank's layout has comm.size() sizes
// and that they are the ranks' q lengths (one all-gather), so a wrong layout
// makes all ranks throw together; a later call reusing the plan checks only
// its own rank (its q length), and a rank passing another layout then may
// wait forever in a collective. Other checks are rank-local too (inputs,
// config), as for every collective op: a rank that throws leaves the others
// waiting on NCCL.
std::pair<Tensor, Tensor> seq_parallel_dilated_attention(const Tensor& q, const Tensor& k,
                                                         const Tensor& v,
                                                         const DilatedAttentionConfig& config,
                                                         dist::Communicator& comm);
std::pair<Tensor, Tensor> seq_parallel_dilated_attention(const Tensor& q, const Tensor& k,
                                                         const Tensor& v,
                                                         const DilatedAttentionConfig& config,
                                                         dist::Communicator& comm,
                                                         const SequenceLayout& layout);

// config.dropout for drop probability p in [0, 1), as ops::dilated_attention
// draws it: disabled for p == 0, else one offset reserved from gen
// (default_generator() when null; one bound to a device offset needs CUDA q).
AttentionDropout attention_dropout(double p, Generator* gen, const Tensor& q);

}  // namespace minidl::ops
