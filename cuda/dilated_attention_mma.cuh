#pragma once
// Tensor-core kernels for one dilated-attention branch: bfloat16 (mma.sync,
// and the Hopper kernels in cuda/sm90a/) and float32 on TF32 (mma.sync);
// internal to cuda/dilated_attention.cu.
#include "core/dilated.h"
#include "cuda/dilated_attention.h"
#include "cuda/dilated_attention_common.cuh"

namespace minidl::cuda::attn {

// How a forward launch stores its branch result.
enum class MergeMode {
  kWrite,   // first branch covering every row: overwrite the fp32 accumulators
  kMerge,   // combine with the accumulators by log-sum-exp
  kSingle,  // the only branch: write the bf16 output and lse directly
  kFinish,  // the last branch, keeping every row: merge with the accumulators
            // (rows with lse -inf hold nothing yet), write the bf16 output and lse
            // of the rows it has pairs for (ws only)
};

constexpr int kMmaWarps = 4;  // warps per block of the mma.sync kernels (bf16 and TF32)
constexpr int kMmaRows = 64;  // backward: key rows per block (4 warps x 16)

// head dims the tensor-core path handles
inline bool mma_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128; }

// The tensor-core forward of one branch with `kernel` (kMmaSync, or a Hopper
// version that choose_attention_kernel allowed). `pairs`: the branch's share
// of the pairs nested branches share (nested_pairs; rows with none of their
// own get lse -inf, weight 0 in a merge); by default all its pairs, each of
// weight 1. A share runs mma.sync.
void forward_mma(AttentionKernel kernel, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                 const Operand<BFloat16>& v, const BranchGrid& g, int64_t batch, int64_t d, bool causal,
                 float scale_log2, const BranchDropout& dropout, MergeMode mode, float* o_acc, float* lse,
                 BFloat16* out, const BranchPairs& pairs = {});

// The Hopper forward (cuda/sm90a/, built when sm_90 is a target): head dim 64
// on a device of compute capability 9.0; the same contract as forward_mma.
#if MINIDL_WGMMA
// The warp-specialised Hopper kernels (TMA producer, consumer warpgroups):
// they take q/k/v (and dout) whose batch stride is N row strides and whose
// rows are 16-byte aligned (ws_takes). The same contracts as forward_mma and
// backward_mma otherwise.
bool ws_takes(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
              const BranchGrid& g, int64_t batch, const Operand<BFloat16>* dout = nullptr);
// Whether forward_mma runs this branch on the ws forward (the one forward
// that can keep attention dropout's bits for the backward): the same for
// every branch of a problem, since ws_takes looks at strides and N only.
inline bool ws_forward_runs(AttentionKernel kernel, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                            const Operand<BFloat16>& v, const BranchGrid& g, int64_t batch) {
  return kernel == AttentionKernel::kWarpSpecialized && (g.dim == 64 || g.dim == 128) && ws_takes(q, k, v, g, batch);
}
// dK and dV go into dk_acc / dv_acc: added where kv_written marks the row
// (one byte per (b, position, head), set here for every row written), else
// written; without kv_written, always added (zeroed accumulators). With dk_out
// and dv_out (bf16; position p's H x D block at p * out_row_stride) the launch
// finishes them instead: it writes dK and dV there once, plus the
// accumulators' values where kv_written marks the row (none without it). That is for the last
// branch, one keeping every row: vanilla attention, or the dilation-1 branch of
// a dilated config, which then needs no zeroed or converted dK/dV accumulators
// (keys it has no pair for are not written: a lone share zeroes dK and dV first).
void backward_ws(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                 const Operand<BFloat16>& dout, const float* lse, const float* delta, const BranchGrid& g,
                 int64_t batch, bool causal, float scale, const BranchDropout& dropout, float* dq_acc,
                 float* dk_acc, float* dv_acc, BFloat16* dk_out = nullptr, BFloat16* dv_out = nullptr,
                 int64_t out_row_stride = 0, uint8_t* kv_written = nullptr, const BranchPairs& pairs = {});
// Head dim (g.dim) 64 or 128, forward and backward. With attention dropout the
// backward reads the mask from dropout.bits (the forward's), which the forward
// writes when it has them (dropout.bits.words), else it keeps none and the
// backward draws the mask again. `pairs`:
// the branch's share of the pairs nested branches share (ws_nested_pairs
// says when they take it); by default all its pairs, each of weight 1.
void forward_ws(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                const BranchGrid& g, int64_t batch, bool causal, float scale_log2, const BranchDropout& dropout,
                MergeMode mode, float* o_acc, float* lse, BFloat16* out, const BranchPairs& pairs = {});
// The branches' shares of the pairs they share (sharing_pairs: nested
// branches without dropout or with dropout per pair, or a sequence-parallel
// piece's given shares) as the ws kernels take them: each span a whole number
// of the kernels' 128-row tiles (or past every row set: no pairs of its own).
// One per branch (config order); plain ones (all its pairs, weight 1)
// otherwise.
std::vector<BranchPairs> ws_nested_pairs(const DilatedAttentionConfig& config, int64_t n);
void forward_wgmma(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                   const BranchGrid& g, int64_t batch, bool causal, float scale_log2,
                   const BranchDropout& dropout, MergeMode mode, float* o_acc, float* lse,
                   BFloat16* out);
#endif

// Adds this branch's dQ (atomically), dK and dV (rows of one launch are
// disjoint) into the fp32 accumulators. lse and delta are the global
// per-row values (B, N, H); delta = rowsum(dO * O) - dL.
// `kernel`: kMmaSync, or the Hopper version choose_attention_kernel allowed.
// `pairs`: as forward_mma's.
void backward_mma(AttentionKernel kernel, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                  const Operand<BFloat16>& v, const Operand<BFloat16>& dout, const float* lse, const float* delta,
                  const BranchGrid& g, int64_t batch, int64_t d, bool causal, float scale,
                  const BranchDropout& dropout, float* dq_acc, float* dk_acc, float* dv_acc,
                  const BranchPairs& pairs = {});

// float32 on TF32 tensor cores (mma.sync m16n8k8, sm_80+; head dims 32, 64,
// 128): the contracts of forward_mma (mode kWrite or kMerge only: o_acc may be
// the float32 output itself) and backward_mma. The rows of every operand must
// be 16-byte aligned (rows_aligned).
void forward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v, const BranchGrid& g,
                  int64_t batch, int64_t d, bool causal, float scale_log2, const BranchDropout& dropout,
                  MergeMode mode, float* o_acc, float* lse, const BranchPairs& pairs = {});
void backward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v,
                   const Operand<float>& dout, const float* lse, const float* delta, const BranchGrid& g,
                   int64_t batch, int64_t d, bool causal, float scale, const BranchDropout& dropout, float* dq_acc,
                   float* dk_acc, float* dv_acc, const BranchPairs& pairs = {});

// Whether every row of x starts on a 16-byte boundary: the tensor-core
// kernels load rows by 16-byte cp.async (or TMA), float32 and bfloat16 alike.
template <typename T>
inline bool rows_aligned(const Operand<T>& x) {
  constexpr int64_t kPer = 16 / sizeof(T);  // elements in 16 bytes
  return reinterpret_cast<uintptr_t>(x.ptr) % 16 == 0 && x.sb % kPer == 0 && x.sn % kPer == 0 && x.sh % kPer == 0;
}

}  // namespace minidl::cuda::attn
