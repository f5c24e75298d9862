#pragma once
// Geometry shared by the dilated-attention kernels and their launchers:
// which positions a (branch, head, segment) keeps, the strided views of
// q/k/v, and one branch's launch grid.
#include <algorithm>
#include <cstdint>

#include "core/dilated.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace minidl::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The kept positions of one (branch, head, segment): core/dilated.h.
using RowSet = KeptRows;

// A (B, N, H, D) operand with the D dim contiguous.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t sb, sn, sh;
  __device__ __forceinline__ const T* row(int64_t b, int64_t pos, int64_t h) const {
    return ptr + b * sb + pos * sn + h * sh;
  }
};

// Per-launch description of one branch over the whole (B, H) grid.
struct BranchGrid {
  int64_t n;               // sequence length
  int64_t heads;           // H
  int64_t w, r;            // segment (clamped to n) and dilation
  int64_t segments;        // ceil(n / w)
  int64_t tiles_per_segment;
  int64_t dim = 0;         // head dim D (the SIMT kernels pad it to a multiple of 32)
};

// Index of kept row t of a row set in the (B, N, H) rows of a launch's
// per-row arrays (lse, delta, the accumulators' rows); t < rows.count.
__device__ __forceinline__ int64_t kept_row_index(const BranchGrid& g, int64_t batch, int64_t head,
                                                  const RowSet& rows, int64_t t) {
  return (batch * g.n + rows.base + t * rows.stride) * g.heads + head;
}

// The host's view of a (B, N, H, D) problem and of one branch's launch.
struct Shape4 {
  int64_t b, n, h, d;
};

inline Shape4 shape_of(const Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }

template <typename T>
Operand<T> operand(const Tensor& t) {
  return {static_cast<const T*>(t.raw_data()), t.stride(0), t.stride(1), t.stride(2)};
}

inline BranchGrid branch_grid(const Shape4& s, const DilatedBranch& br, int rows_per_block) {
  BranchGrid g;
  g.n = s.n;
  g.heads = s.h;
  g.w = std::min(br.segment, s.n);
  g.r = br.dilation;
  g.segments = (s.n + g.w - 1) / g.w;
  int64_t max_kept = max_kept_rows(g.w, g.r);
  g.tiles_per_segment = (max_kept + rows_per_block - 1) / rows_per_block;
  g.dim = s.d;
  return g;
}

// A branch launch's grid: x the segments' row tiles, y the heads, z the batch
// (each its own dimension: y and z stop at 65535, so B·H in one would stop
// there too).
inline dim3 grid_of(const BranchGrid& g, int64_t batch) {
  int64_t x = g.segments * g.tiles_per_segment;
  MINIDL_CHECK(x < (int64_t(1) << 31) && g.heads <= 65535 && batch <= 65535, "attention (cuda): problem too "
               "large for one launch (", x, " row tiles, ", g.heads, " heads, batch ", batch, "; at most 2^31 - 1, "
               "65535 and 65535)");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(g.heads), static_cast<unsigned>(batch));
}

// The rows one block of a branch launch (grid_of) owns: the head from
// blockIdx.y, the batch from blockIdx.z; from blockIdx.x the segment and its
// tile of rows_per_block kept rows (t0
// the first). kLatestFirst numbers the tiles from the segment's end: a
// forward's later causal tiles see more keys and start first, for a better
// tail; a backward's earliest key tiles see the most queries and go first.
struct BlockRows {
  int64_t batch, head, t0;
  RowSet rows;  // the segment's kept rows
};

template <bool kLatestFirst>
__device__ __forceinline__ BlockRows block_rows(const BranchGrid& g, int64_t rows_per_block) {
  const int64_t segment = blockIdx.x / g.tiles_per_segment;
  const int64_t in_segment = blockIdx.x % g.tiles_per_segment;
  const int64_t tile = kLatestFirst ? g.tiles_per_segment - 1 - in_segment : in_segment;
  BlockRows b;
  b.batch = blockIdx.z;
  b.head = blockIdx.y;
  b.rows = kept_rows(g.n, g.w, g.r, b.head, segment);
  b.t0 = tile * rows_per_block;
  return b;
}

// The keep bits of one branch's dropout mask, saved by the ws forward for
// the ws backward (which then draws no random numbers): one bit per (query,
// key) pair, in 64 x 64 blocks of kept rows. A row set (segment, batch, head)
// has `side` blocks a side, query block qb holding keys blocks kb <= qb when
// causal (qb (qb + 1) / 2 + kb), else all of them (qb side + kb). A block is
// 128 words, word 32 g + l being what lane l of warp g of a backward
// warpgroup tests: its keys 16 g + l / 4 and + 8 against the queries
// 8 c + 2 (l % 4) + e, c < 8, in bit 4 c + 2 (key + 8) + e (the element order
// of its S^T fragment; cuda/sm90a/dilated_attention_ws.cu).
struct DropoutBits {
  uint32_t* words = nullptr;  // null: the kernels draw the mask
  int64_t side = 0;
  bool causal = true;

  __host__ __device__ int64_t blocks_per_row_set() const { return causal ? side * (side + 1) / 2 : side * side; }
  // First word of block (qb, kb) of row set `row_set` (segment B H + batch H + head).
  __host__ __device__ int64_t word(int64_t row_set, int64_t qb, int64_t kb) const {
    return (row_set * blocks_per_row_set() + (causal ? qb * (qb + 1) / 2 : qb * side) + kb) * 128;
  }
  // Blocks a side for a branch: its longest row set, ceil(w / r) rows.
  static int64_t side_for(const BranchGrid& g) { return (max_kept_rows(g.w, g.r) + 63) / 64; }
  static int64_t words_for(const BranchGrid& g, int64_t batch, bool causal) {
    return DropoutBits{nullptr, side_for(g), causal}.word(g.segments * batch * g.heads, 0, 0);
  }
};

// Attention dropout of one branch launch: the config's mask parameters plus
// what the element index needs (core/dilated.h).
struct BranchDropout {
  AttentionDropout mask;
  AttentionMaskLayout rows;  // the branch's mask rows (its index in the config, B, H, N, the frame)
  uint64_t kept_step = 1;    // rows.step * r: from one kept row to the next (launch-uniform, resolved here)
  DropoutBits bits;          // the ws kernels: saved keep bits (written forward, read backward)
};

// Branch `branch` (its index in config.branches, as the user listed them, not
// its place in the launch order) of the dropout mask, its frame resolved for
// the problem; disabled when config.dropout is.
inline BranchDropout branch_dropout(const DilatedAttentionConfig& config, size_t branch, const Shape4& s) {
  BranchDropout drop;
  drop.mask = config.dropout;
  drop.rows = attention_mask_layout(config.dropout, static_cast<int64_t>(branch), s.b, s.h, s.n);
  drop.kept_step = drop.rows.step * static_cast<uint64_t>(config.branches[branch].dilation);
  return drop;
}

// The mask parameters with the Philox offset read once: in a captured graph
// it is a device word, which offset_now() would load again at every draw.
template <bool kDropout>
__device__ __forceinline__ AttentionDropout resolved_dropout(AttentionDropout d) {
  if constexpr (kDropout) {
    d.offset = d.offset_now();
    d.offset_base = nullptr;
  }
  return d;
}

// Mask rows of this branch launch's (batch, head): position p is row at(p).
__device__ __forceinline__ AttentionMaskRows dropout_rows(const BranchDropout& d, int64_t batch, int64_t head) {
  return d.rows.rows(static_cast<uint64_t>(batch), static_cast<uint64_t>(head));
}

// Mask rows of one row set's kept rows (rows.stride is the branch's r): kept
// row t is row at(t).
__device__ __forceinline__ AttentionMaskRows dropout_kept_rows(const BranchDropout& d, int64_t batch, int64_t head,
                                                               const KeptRows& rows) {
  return {dropout_rows(d, batch, head).at(static_cast<uint64_t>(rows.base)), d.kept_step};
}

// ---- Nested pairs (core/dilated.h, BranchPairs): a branch computes only
// the pairs that no smaller branch holds, each weighted by the branches
// holding it.
//
// A block owns rows [own_first, own_last] of a row set of `count` rows
// (queries in the forward, keys in the backward) and walks the other side's
// rows [first, end) in tiles of kTile rows, tile i starting at row
// first + i kTile. A pair inside one span belongs to a smaller branch: with
// kNested, the tiles inside the span of every row the block owns are left
// out of the walk, and the tiles that reach into the span of one of its
// rows are masked per element (SpanCols). Without, every tile is walked.
template <int kTile>
struct SpanWalk {
  int64_t first = 0;
  int n = 0;                           // tiles walked
  int skip_first = 0, skipped = 0;     // tiles [skip_first, skip_first + skipped) are left out
  int64_t reach_lo = 0, reach_hi = 0;  // the rows of the spans of the block's rows
  // The first row of the j-th tile walked.
  __device__ __forceinline__ int64_t row(int j) const {
    return first + int64_t(j < skip_first ? j : j + skipped) * kTile;
  }
  // Whether the tile of rows [t, t + kTile) reaches into a span of the block's rows.
  __device__ __forceinline__ bool reaches(int64_t t) const { return t < reach_hi && t + kTile > reach_lo; }
};

// The first row of row t's span (0 for plain pairs). In 32 bits: a 64-bit
// division is a call, whose saved registers spill (the per-branch kernels
// take nested pairs for fewer than 2^32 positions: branch_pairs).
__device__ __forceinline__ int64_t span_lo_of(const BranchPairs& p, int64_t t) {
  if (p.span == 0) return 0;
  const auto span = static_cast<uint32_t>(p.span);
  return static_cast<int64_t>(static_cast<uint32_t>(t) / span * span);
}

template <int kTile, bool kNested>
__device__ __forceinline__ SpanWalk<kTile> span_walk(const BranchPairs& p, int64_t own_first, int64_t own_last,
                                                     int64_t first, int64_t end, int64_t count) {
  SpanWalk<kTile> w;
  w.first = first;
  const int n_tiles = static_cast<int>((end - first + kTile - 1) / kTile);
  w.n = n_tiles;
  if (!kNested || p.span == 0) return w;
  const int64_t lo = span_lo_of(p, own_first), last_lo = span_lo_of(p, own_last);
  w.reach_lo = lo;
  w.reach_hi = last_lo + p.span;
  if (lo != last_lo) return w;  // the block's rows lie in two spans: every tile is walked
  // Tile i lies inside [lo, lo + span) when it starts there and every row
  // of it that exists (< count) ends there.
  const int64_t i_lo = lo <= first ? 0 : (lo - first + kTile - 1) / kTile;
  const int64_t i_hi = lo + p.span >= count ? n_tiles : (lo + p.span - first) / kTile;
  if (i_hi > i_lo && i_lo < n_tiles) {
    w.skip_first = static_cast<int>(i_lo);
    w.skipped = static_cast<int>((i_hi < n_tiles ? i_hi : n_tiles) - i_lo);
    w.n -= w.skipped;
  }
  return w;
}

// A query-major block's walk over key tiles (the forwards, SIMT's dQ pass):
// it owns query rows [t0, t0 + kBr) of `count` and sees keys [0, count),
// causal only those up to its last row.
template <int kBr, int kBc, bool kCausal, bool kNested>
__device__ __forceinline__ SpanWalk<kBc> key_walk(const BranchPairs& p, int64_t t0, int64_t count) {
  const int64_t own_end = t0 + kBr < count ? t0 + kBr : count;
  return span_walk<kBc, kNested>(p, t0, own_end - 1, 0, kCausal ? own_end : count, count);
}

// A key-major block's walk over query tiles (the dK/dV passes): it owns key
// rows [t0, t0 + kBk) of `count` and sees queries [0, count), causal only
// those from the query tile holding its first row on.
template <int kBk, int kTile, bool kCausal, bool kNested>
__device__ __forceinline__ SpanWalk<kTile> query_walk(const BranchPairs& p, int64_t t0, int64_t count) {
  const int64_t own_end = t0 + kBk < count ? t0 + kBk : count;
  return span_walk<kTile, kNested>(p, t0, own_end - 1, kCausal ? t0 / kTile * kTile : 0, count, count);
}

// The columns [lo, hi) of a tile starting at row t that lie in the span
// starting at row span_lo (span_start of one of the block's rows).
struct SpanCols {
  int lo = 0, hi = 0;
  __device__ __forceinline__ bool excludes(int col) const { return col >= lo && col < hi; }
};

template <int kTile>
__device__ __forceinline__ SpanCols span_cols(const BranchPairs& p, int64_t span_lo, int64_t t) {
  if (p.span == 0) return {};
  const int64_t lo = span_lo - t, hi = lo + p.span;
  auto clamp = [](int64_t x) { return static_cast<int>(x < 0 ? 0 : x > kTile ? kTile : x); };
  return {clamp(lo), clamp(hi)};
}

// The span columns of an mma fragment's two rows, row0 and row0 + 8, in the
// tile starting at row t.
template <int kTile>
__device__ __forceinline__ void fragment_span_cols(SpanCols (&own)[2], const BranchPairs& p, int64_t row0, int64_t t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) own[r] = span_cols<kTile>(p, span_lo_of(p, row0 + r * 8), t);
}

// The weight of pair (tq, tk) (BranchPairs::weight) from cls =
// classes[head % 8] and tq's class cq, both found once per row.
__device__ __forceinline__ float pair_weight(uint32_t cls, int cq, int64_t tk) {
  const int ck = static_cast<int>((cls >> (4 * (tk & 7))) & 15u);
  return static_cast<float>(1 + (cq < ck ? cq : ck));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(BFloat16 x) { return static_cast<float>(x); }

}  // namespace minidl::cuda::attn
