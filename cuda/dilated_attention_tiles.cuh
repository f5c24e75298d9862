#pragma once
// Device helpers shared by the tensor-core forward kernels (mma.sync in
// cuda/dilated_attention_mma.cu, wgmma in cuda/sm90a/): tile loads, the
// dropout keep decisions, and the epilogue that stores or merges a branch.
#include "core/philox.h"
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/mma.cuh"

namespace minidl::cuda::attn {

using mma::SmemTile;

// Issues cp.async for rows [t0, t0 + Rows) of a row set into a swizzled tile.
template <int Rows, int D, int Threads>
__device__ __forceinline__ void load_tile_async(char* tile, const Operand<BFloat16>& x, int64_t batch,
                                                int64_t head, const RowSet& rows, int64_t t0) {
  using Tile = SmemTile<Rows, D>;
  for (int i = threadIdx.x; i < Rows * Tile::kChunks; i += Threads) {
    int r = i / Tile::kChunks, c = i % Tile::kChunks;
    int64_t t = t0 + r;
    bool valid = t < rows.count;
    const BFloat16* src = valid ? x.row(batch, rows.base + t * rows.stride, head) + c * 8 : x.ptr;
    mma::cp_async_16(Tile::at(tile, r, c), src, valid);
  }
}

// Keep decisions of the dropout mask (core/dilated.h) for keys t and t + 1 of
// one query row, t even: both fall in the same Philox block.
__device__ __forceinline__ void keep_pair(const BranchDropout& d, const BranchGrid& g, int64_t batch,
                                          int64_t head, int64_t pos, int64_t t, bool& k0, bool& k1) {
  uint64_t row = ((uint64_t(d.branch) * d.batch_size + batch) * g.heads + head) * g.n + pos;
  uint64_t idx = (row << 32) | uint64_t(t);
  philox::U32x4 blk = philox::block(d.mask.seed, d.mask.offset, idx >> 2);
  int lane0 = static_cast<int>(idx & 3);
  k0 = philox::to_unit_float(philox::lane(blk, lane0)) >= d.mask.keep_threshold;
  k1 = philox::to_unit_float(philox::lane(blk, lane0 + 1)) >= d.mask.keep_threshold;
}

__device__ __forceinline__ bool keep_one(const BranchDropout& d, const BranchGrid& g, int64_t batch,
                                         int64_t head, int64_t pos, int64_t t) {
  return attention_keep(d.mask, d.branch, d.batch_size, batch, g.heads, head, g.n, pos, t);
}

// Finishes the two rows (q_row, q_row + 8) a lane holds in the accumulator
// layout: sums l over the quad, then stores the normalised output and lse
// (kSingle), or writes (kWrite) or log-sum-exp merges (kMerge) them into the
// fp32 accumulators. o[dt] is 8-column chunk dt of both rows.
template <int D, MergeMode kMode>
__device__ __forceinline__ void store_branch_rows(const float (&o)[D / 8][4], const float (&m_row)[2],
                                                  const float (&l_row)[2], int64_t q_row, float scale_log2,
                                                  const BranchGrid& g, int64_t batch, int64_t head,
                                                  const RowSet& rows, float* o_acc, float* lse,
                                                  BFloat16* out) {
  constexpr int kDTiles = D / 8;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_row[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t tq = q_row + r * 8;
    const bool valid = tq < rows.count;
    const int64_t pos = rows.base + (valid ? tq : 0) * rows.stride;
    const int64_t ri = (batch * g.n + pos) * g.heads + head;
    const float lse_branch = (m_row[r] * scale_log2 + log2f(l)) * kLn2;
    const float inv_l = 1.f / l;
    if constexpr (kMode == MergeMode::kSingle) {
      if (valid) {
        BFloat16* dst = out + ri * D;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          int col = dt * 8 + 2 * (lane % 4);
          *reinterpret_cast<uint32_t*>(dst + col) =
              mma::pack_bf16(o[dt][2 * r] * inv_l, o[dt][2 * r + 1] * inv_l);
        }
        if (lane % 4 == 0) lse[ri] = lse_branch;
      }
    } else {
      float w_old = 0.f, w_new = inv_l, lse_new = lse_branch;
      if constexpr (kMode == MergeMode::kMerge) {
        float lse_old = valid ? lse[ri] : -INFINITY;
        if (lse_old != -INFINITY) {
          lse_new = fmaxf(lse_old, lse_branch) + log1pf(expf(-fabsf(lse_old - lse_branch)));
          w_old = expf(lse_old - lse_new);
          w_new = expf(lse_branch - lse_new) * inv_l;
        }
      }
      __syncwarp();  // the quad has read lse before lane 0 of it rewrites it
      if (valid) {
        float* dst = o_acc + ri * D;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          int col = dt * 8 + 2 * (lane % 4);
          float2 prev = kMode == MergeMode::kMerge ? *reinterpret_cast<float2*>(dst + col)
                                                   : make_float2(0.f, 0.f);
          *reinterpret_cast<float2*>(dst + col) = make_float2(
              w_old * prev.x + w_new * o[dt][2 * r], w_old * prev.y + w_new * o[dt][2 * r + 1]);
        }
        if (lane % 4 == 0) lse[ri] = lse_new;
      }
    }
  }
}

}  // namespace minidl::cuda::attn
