// The portable dilated-attention kernels (SIMT, fp32 math), the fallback for
// both dtypes on any GPU (cuda/dilated_attention_simt.cuh).
//
// Branches run as one launch each and merge in place into fp32 (O, L)
// accumulators with the log-sum-exp rule; rows of one launch are disjoint, so
// the read-modify-write merge needs no atomics. Backward: one pass for
// D = rowsum(dO * O) - dL, then per branch a query-centric pass for dQ and a
// key-centric pass for dK/dV (each recomputes P = exp(S - L) with the global
// L), accumulating into fp32 buffers; again no atomics, so it is deterministic.
//
// Attention dropout (config.dropout, core/dilated.h) runs on these kernels for
// every dtype: each weight P = exp(S - L) (L undropped) is multiplied by
// M = keep * scale before it meets V (forward, dV), and dS = P (M dP' - D).
//
// Nested pairs (BranchPairs; kNested, a separate instantiation so that plain
// launches pay nothing): a branch's share leaves out the tiles inside the
// span of every row of a block (SpanWalk), masks the keys (queries) in each
// row's span and weighs each pair it keeps (P times the weight).
#include "cuda/dilated_attention_simt.cuh"

#include <cmath>

#include "cuda/dilated_attention_common.cuh"
#include "cuda/runtime.h"
#include "cuda/vec.cuh"

namespace minidl::cuda::attn {
namespace {

constexpr int kThreads = 128;  // per block
constexpr int kTile = 32;      // keys (forward, dQ) or queries (dK/dV) staged per step

// The sum of x over each aligned group of kLanes consecutive lanes (a power of two).
template <int kLanes>
__device__ __forceinline__ float lanes_sum(float x) {
#pragma unroll
  for (int off = 1; off < kLanes; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// A group of kTpr = D/32 consecutive lanes owns one row; lane `part` of the
// group holds dims part, part + kTpr, ... (interleaved, so the lanes of a
// group hit different shared-memory banks).
template <int D>
struct Split {
  static constexpr int kTpr = D / 32;
  static constexpr int kRows = kThreads / kTpr;
  static __device__ __forceinline__ int dim(int i, int part) { return i * kTpr + part; }
  static __device__ __forceinline__ float reduce(float x) { return lanes_sum<kTpr>(x); }
};

// Loads this lane's dims of a row of `d` elements (padding dims read 0).
template <typename T, int D>
__device__ __forceinline__ void load_row(const T* src, float scale, float (&dst)[32], int64_t d) {
  const int part = threadIdx.x % Split<D>::kTpr;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    int c = Split<D>::dim(i, part);
    dst[i] = c < d ? to_float(src[c]) * scale : 0.f;
  }
}

// Stages rows [t0, t0 + kTile) of a row set of `a` (and `b`) into shared
// memory as fp32; rows past `count` and padding dims (>= d) are zero.
template <typename T, int D>
__device__ __forceinline__ void stage_rows(const Operand<T>& a, const Operand<T>& b, int64_t batch,
                                           int64_t head, const RowSet& rows, int64_t t0,
                                           float (*as)[D], float (*bs)[D], int64_t d) {
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
    int j = idx / D, c = idx % D;
    int64_t t = t0 + j;
    float x = 0, y = 0;
    if (t < rows.count && c < d) {
      int64_t pos = rows.base + t * rows.stride;
      x = to_float(a.row(batch, pos, head)[c]);
      y = to_float(b.row(batch, pos, head)[c]);
    }
    as[j][c] = x;
    bs[j][c] = y;
  }
}

// The backward's two products of a row with staged row j, summed over the
// lane group that owns the row: (x . a, y . b), x and y this lane's dims.
template <int D>
__device__ __forceinline__ float2 dot_pair(const float (&x)[32], const float (&a)[D], const float (&y)[32],
                                           const float (&b)[D], int part) {
  float s = 0, t = 0;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int d = Split<D>::dim(i, part);
    s += x[i] * a[d];
    t += y[i] * b[d];
  }
  return make_float2(Split<D>::reduce(s), Split<D>::reduce(t));
}

__device__ __forceinline__ int64_t row_index(const BranchGrid& g, int64_t b, int64_t pos, int64_t h) {
  return (b * g.n + pos) * g.heads + h;
}

// The SIMT kernels' view of one branch launch's dropout mask (BranchDropout).
struct DropoutGrid {
  BranchDropout b;
  explicit DropoutGrid(const BranchDropout& drop) : b(drop) {}
  MINIDL_HD bool enabled() const { return b.mask.enabled(); }
  // The graph offset read once per kernel (resolved_dropout).
  __device__ __forceinline__ void resolve() {
    if (enabled()) b.mask = resolved_dropout<true>(b.mask);
  }
  // The mask row of query position pos.
  __device__ __forceinline__ uint64_t row(int64_t batch, int64_t h, int64_t pos) const {
    return dropout_rows(b, batch, h).at(static_cast<uint64_t>(pos));
  }
  // M for key index t of mask row `row`, drawing from `bits`: the Philox block
  // of t's 16-key group, which the caller refreshes when t % 16 == 0 (factor
  // reads only t & 15).
  __device__ __forceinline__ void refresh(philox::U32x4& bits, uint64_t row, int64_t t) const {
    bits = attention_dropout_block(b.mask, row, static_cast<uint64_t>(t));
  }
  __device__ __forceinline__ float factor(const philox::U32x4& bits, int64_t t) const {
    return attention_keep_in_block(bits, static_cast<uint64_t>(t), b.mask.threshold) ? b.mask.scale : 0.f;
  }
  // M for key index t from its word of the group's block (word (t & 7) >> 1).
  __device__ __forceinline__ float factor_from_word(uint32_t word, int64_t t) const {
    const int byte = static_cast<int>(((t >> 3) & 1) * 2 + (t & 1));
    return attention_keep_byte(word, byte, b.mask.threshold) ? b.mask.scale : 0.f;
  }
};

// A row's share of nested pairs: the other side's rows [lo, hi) (its span)
// are left out; cls and cls_row give pair_weight's classes.
struct RowPairs {
  int64_t lo, hi;
  uint32_t cls;
  int cls_row;
  __device__ RowPairs(const BranchPairs& p, int64_t head, int64_t t)
      : lo(span_lo_of(p, t)), hi(p.span > 0 ? lo + p.span : 0), cls(p.classes[head % 8]),
        cls_row(static_cast<int>((cls >> (4 * (t & 7))) & 15u)) {}
  __device__ __forceinline__ bool keeps(int64_t other) const { return other < lo || other >= hi; }
  __device__ __forceinline__ float weight(int64_t other) const { return pair_weight(cls, cls_row, other); }
};

template <typename T, int D, bool kCausal, bool kNested>
__global__ __launch_bounds__(kThreads) void forward_simt_kernel(Operand<T> q, Operand<T> k, Operand<T> v,
                                                         BranchGrid g, float scale_log2,
                                                         DropoutGrid drop, BranchPairs pairs,
                                                         float* __restrict__ o_acc,
                                                         float* __restrict__ lse) {
  using S = Split<D>;
  __shared__ float ks[kTile][D], vs[kTile][D];
  drop.resolve();
  const BlockRows w = block_rows<false>(g, S::kRows);
  if (w.t0 >= w.rows.count) return;  // uniform across the block
  const int part = threadIdx.x % S::kTpr;
  const int64_t t = w.t0 + threadIdx.x / S::kTpr;
  const bool active = t < w.rows.count;
  const int64_t pos = w.rows.base + (active ? t : w.t0) * w.rows.stride;
  const bool dropping = drop.enabled();
  const uint64_t drop_row = drop.row(w.batch, w.head, pos);
  philox::U32x4 bits{};
  const RowPairs own(pairs, w.head, t);

  float qr[32], o[32];
  load_row<T, D>(q.row(w.batch, pos, w.head), scale_log2, qr, g.dim);
#pragma unroll
  for (int i = 0; i < 32; ++i) o[i] = 0;
  float m = -INFINITY, l = 0;
  const SpanWalk<kTile> walk = key_walk<S::kRows, kTile, kCausal, kNested>(pairs, w.t0, w.rows.count);
  for (int jt = 0; jt < walk.n; ++jt) {
    const int64_t k0 = walk.row(jt);  // a multiple of 16, for the dropout groups
    __syncthreads();
    stage_rows<T, D>(k, v, w.batch, w.head, w.rows, k0, ks, vs, g.dim);
    __syncthreads();
    float s[kTile];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      float acc = 0;
#pragma unroll
      for (int i = 0; i < 32; ++i) acc += qr[i] * ks[j][S::dim(i, part)];
      acc = S::reduce(acc);
      int64_t tk = k0 + j;
      bool visible = active && tk < w.rows.count && (!kCausal || tk <= t) && (!kNested || own.keeps(tk));
      s[j] = visible ? acc : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    float m_new = fmaxf(m, tile_max);
    if (m_new == -INFINITY) continue;
    float corr = exp2f(m - m_new);
    l *= corr;
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i] *= corr;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      float p = exp2f(s[j] - m_new);
      if constexpr (kNested) p *= own.weight(k0 + j);
      l += p;  // the softmax sum (hence L) is that of the undropped weights
      if (dropping) {
        if ((j & 15) == 0) drop.refresh(bits, drop_row, k0 + j);
        p *= drop.factor(bits, j);  // k0 is a multiple of 16: key k0 + j is place j & 15 of its group
      }
#pragma unroll
      for (int i = 0; i < 32; ++i) o[i] += p * vs[j][S::dim(i, part)];
    }
    m = m_new;
  }
  // Merge (O_i, L_i) of this branch into the accumulators.
  const int64_t ri = row_index(g, w.batch, pos, w.head);
  float l_old = active ? lse[ri] : 0.f;
  __syncwarp();  // every lane of the group has read lse before part 0 rewrites it
  if (!active || l == 0.f) return;  // l == 0: the row has no pair of its own here
  float l_branch = (m + log2f(l)) * kLn2;
  float l_new = l_old == -INFINITY ? l_branch
                                   : fmaxf(l_old, l_branch) + log1pf(expf(-fabsf(l_old - l_branch)));
  float w_old = expf(l_old - l_new);
  float w_branch = expf(l_branch - l_new) / l;
  float* dst = o_acc + ri * g.dim;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    int c = S::dim(i, part);
    if (c < g.dim) dst[c] = w_old * dst[c] + w_branch * o[i];
  }
  if (part == 0) lse[ri] = l_new;
}

// delta[row] = sum_d dO * O - dL (dL optional): kDeltaLanes lanes per row,
// each loading V elements of O and of dO at a time (16 bytes where the rows
// allow: the pass is bound by memory, and 2-byte loads issue 8x the
// requests). It also zeroes the rows of the dQ accumulator (optional; same
// layout as O), which saves the backward a memset launch.
constexpr int kDeltaLanes = 8;

template <typename T, int V>
__global__ void backward_delta_kernel(const T* __restrict__ out, const T* __restrict__ grad_out,
                                      const float* __restrict__ grad_lse, float* __restrict__ delta,
                                      float* __restrict__ dq_zero, int64_t rows, int64_t d) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kDeltaLanes;
  const int part = threadIdx.x % kDeltaLanes;
  float acc = 0;
  if (row < rows)
    for (int64_t c = part * V; c < d; c += kDeltaLanes * V) {
      float o[V], g[V];
      load_vec<T, float, V>(out + row * d + c, o);
      load_vec<T, float, V>(grad_out + row * d + c, g);
#pragma unroll
      for (int e = 0; e < V; ++e) acc += o[e] * g[e];
    }
  if (dq_zero) {  // the block's rows are one contiguous span, zeroed by consecutive threads
    const int64_t first = blockIdx.x * int64_t(blockDim.x / kDeltaLanes);
    const int64_t count = (min(rows, first + blockDim.x / kDeltaLanes) - first) * d;
    constexpr int kZ = V > 1 ? 4 : 1;  // d % V == 0 keeps every row's span float4-aligned
    const float zero[kZ] = {};
    for (int64_t i = threadIdx.x * int64_t(kZ); i < count; i += blockDim.x * int64_t(kZ))
      store_vec<float, float, kZ>(dq_zero + first * d + i, zero);
  }
  acc = lanes_sum<kDeltaLanes>(acc);
  if (row < rows && part == 0) delta[row] = acc - (grad_lse ? grad_lse[row] : 0.f);
}

template <typename T, int D, bool kCausal, bool kNested>
__global__ __launch_bounds__(kThreads) void backward_dq_simt(
    Operand<T> q, Operand<T> k, Operand<T> v, Operand<T> dout, const float* __restrict__ lse,
    const float* __restrict__ delta, BranchGrid g, float scale, DropoutGrid drop, BranchPairs pairs,
    float* __restrict__ dq_acc) {
  using S = Split<D>;
  __shared__ float ks[kTile][D], vs[kTile][D];
  drop.resolve();
  const BlockRows w = block_rows<false>(g, S::kRows);
  if (w.t0 >= w.rows.count) return;
  const int part = threadIdx.x % S::kTpr;
  const int64_t t = w.t0 + threadIdx.x / S::kTpr;
  const bool active = t < w.rows.count;
  const int64_t pos = w.rows.base + (active ? t : w.t0) * w.rows.stride;
  const int64_t ri = row_index(g, w.batch, pos, w.head);
  const bool dropping = drop.enabled();
  const uint64_t drop_row = drop.row(w.batch, w.head, pos);
  philox::U32x4 bits{};
  const RowPairs own(pairs, w.head, t);

  float qr[32], dor[32], dq[32];
  load_row<T, D>(q.row(w.batch, pos, w.head), scale * kLog2e, qr, g.dim);
  load_row<T, D>(dout.row(w.batch, pos, w.head), 1.f, dor, g.dim);
#pragma unroll
  for (int i = 0; i < 32; ++i) dq[i] = 0;
  const float l2 = active ? lse[ri] * kLog2e : 0.f;
  const float dp_row = active ? delta[ri] : 0.f;
  const SpanWalk<kTile> walk = key_walk<S::kRows, kTile, kCausal, kNested>(pairs, w.t0, w.rows.count);
  for (int jt = 0; jt < walk.n; ++jt) {
    const int64_t k0 = walk.row(jt);
    __syncthreads();
    stage_rows<T, D>(k, v, w.batch, w.head, w.rows, k0, ks, vs, g.dim);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      const auto [s, dp] = dot_pair<D>(qr, ks[j], dor, vs[j], part);
      int64_t tk = k0 + j;
      bool visible = active && tk < w.rows.count && (!kCausal || tk <= t) && (!kNested || own.keeps(tk));
      const float p = visible ? exp2f(s - l2) * (kNested ? own.weight(tk) : 1.f) : 0.f;
      float ds;
      if (dropping) {  // dS = P (M dP' - D)
        if ((j & 15) == 0) drop.refresh(bits, drop_row, tk);
        ds = p * (drop.factor(bits, j) * dp - dp_row);  // as j: k0 % 16 == 0
      } else {
        ds = p * (dp - dp_row);
      }
#pragma unroll
      for (int i = 0; i < 32; ++i) dq[i] += ds * ks[j][S::dim(i, part)];
    }
  }
  if (!active) return;
  float* dst = dq_acc + ri * g.dim;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    int c = S::dim(i, part);
    if (c < g.dim) dst[c] += scale * dq[i];
  }
}

template <typename T, int D, bool kCausal, bool kNested>
__global__ __launch_bounds__(kThreads) void backward_dkv_simt(
    Operand<T> q, Operand<T> k, Operand<T> v, Operand<T> dout, const float* __restrict__ lse,
    const float* __restrict__ delta, BranchGrid g, float scale, DropoutGrid drop, BranchPairs pairs,
    float* __restrict__ dk_acc, float* __restrict__ dv_acc) {
  using S = Split<D>;
  // Dropout: the block's keys form kGroups 16-key groups (t0 is a multiple of
  // 16); keep_words[j][4 * group + word] is one Philox block per (staged
  // query, group), drawn once for the block instead of once per element.
  constexpr int kGroups = S::kRows / 16;
  __shared__ float qs[kTile][D], dos[kTile][D];
  __shared__ float l2s[kTile], dps[kTile];
  __shared__ uint32_t keep_words[kTile][4 * kGroups];
  drop.resolve();
  const BlockRows w = block_rows<false>(g, S::kRows);
  if (w.t0 >= w.rows.count) return;
  const int part = threadIdx.x % S::kTpr;
  const int64_t t = w.t0 + threadIdx.x / S::kTpr;  // this group's key row
  const bool active = t < w.rows.count;
  const int64_t pos = w.rows.base + (active ? t : w.t0) * w.rows.stride;
  const bool dropping = drop.enabled();
  const int key_word = 4 * static_cast<int>((t - w.t0) / 16) + static_cast<int>((t & 7) >> 1);
  const RowPairs own(pairs, w.head, t);  // the weight is symmetric

  float kr[32], vr[32], dk[32], dv[32];
  load_row<T, D>(k.row(w.batch, pos, w.head), scale * kLog2e, kr, g.dim);
  load_row<T, D>(v.row(w.batch, pos, w.head), 1.f, vr, g.dim);
#pragma unroll
  for (int i = 0; i < 32; ++i) dk[i] = dv[i] = 0;
  // Causal: only queries at or after the block's first key see it.
  const SpanWalk<kTile> walk = query_walk<S::kRows, kTile, kCausal, kNested>(pairs, w.t0, w.rows.count);
  for (int jt = 0; jt < walk.n; ++jt) {
    const int64_t q0 = walk.row(jt);
    __syncthreads();
    stage_rows<T, D>(q, dout, w.batch, w.head, w.rows, q0, qs, dos, g.dim);
    if (threadIdx.x < kTile) {
      int64_t tq = q0 + threadIdx.x;
      float l2 = INFINITY, dp = 0;  // +inf makes P = 0 for padding rows
      if (tq < w.rows.count) {
        int64_t ri = row_index(g, w.batch, w.rows.base + tq * w.rows.stride, w.head);
        l2 = lse[ri] * kLog2e;
        dp = delta[ri];
      }
      l2s[threadIdx.x] = l2;
      dps[threadIdx.x] = dp;
    }
    if (dropping) {
      for (int i = threadIdx.x; i < kTile * kGroups; i += kThreads) {
        const int j = i / kGroups, group = i % kGroups;
        const int64_t tq = q0 + j < w.rows.count ? q0 + j : 0;
        philox::U32x4 bits;
        drop.refresh(bits, drop.row(w.batch, w.head, w.rows.base + tq * w.rows.stride), w.t0 + 16 * group);
        keep_words[j][4 * group] = bits.x;
        keep_words[j][4 * group + 1] = bits.y;
        keep_words[j][4 * group + 2] = bits.z;
        keep_words[j][4 * group + 3] = bits.w;
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      const auto [s, dp] = dot_pair<D>(kr, qs[j], vr, dos[j], part);
      int64_t tq = q0 + j;
      bool visible = active && tq < w.rows.count && (!kCausal || tq >= t) && (!kNested || own.keeps(tq));
      float p = visible ? exp2f(s - l2s[j]) * (kNested ? own.weight(tq) : 1.f) : 0.f;
      float ds;
      if (dropping && visible) {  // this thread's key t in query tq's mask row
        float m = drop.factor_from_word(keep_words[j][key_word], t);
        ds = p * (m * dp - dps[j]);
        p *= m;  // dV takes P M
      } else {
        ds = p * (dp - dps[j]);
      }
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        int d = S::dim(i, part);
        dv[i] += p * dos[j][d];
        dk[i] += ds * qs[j][d];
      }
    }
  }
  if (!active) return;
  const int64_t ri = row_index(g, w.batch, pos, w.head);
  float* dkr = dk_acc + ri * g.dim;
  float* dvr = dv_acc + ri * g.dim;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    int c = S::dim(i, part);
    if (c < g.dim) {
      dkr[c] += scale * dk[i];
      dvr[c] += dv[i];
    }
  }
}

// The kernel instantiated for (causal, nested), given in that order: (true,
// true), (true, false), (false, true), (false, false).
template <typename K>
K pick(bool causal, bool nested, K causal_nested, K causal_plain, K full_nested, K full_plain) {
  return causal ? (nested ? causal_nested : causal_plain) : (nested ? full_nested : full_plain);
}

// Calls f(T{}, std::integral_constant<int, D>{}) for the tensor's dtype and
// the head dim padded to the SIMT kernels' width (32, 64 or 128).
template <typename F>
void visit_kernel_types(const char* op, DType dtype, int64_t d, F&& f) {
  auto with_dim = [&](auto tag) {
    if (d <= 32) return f(tag, std::integral_constant<int, 32>{});
    if (d <= 64) return f(tag, std::integral_constant<int, 64>{});
    if (d <= 128) return f(tag, std::integral_constant<int, 128>{});
    MINIDL_FAIL(op, ": head dim ", d, " is not supported on CUDA (at most 128)");
  };
  if (dtype == DType::Float32) return with_dim(float{});
  if (dtype == DType::BFloat16) return with_dim(BFloat16{});
  MINIDL_FAIL(op, ": dtype ", dtype, " is not supported on CUDA (float32, bfloat16)");
}

}  // namespace

void forward_simt(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                  const DilatedAttentionConfig& config, const std::vector<BranchPairs>& pairs, const Tensor& o_acc,
                  const Tensor& lse) {
  const Shape4 s = shape_of(q);
  const float scale_log2 = static_cast<float>(config.scale) * kLog2e;
  visit_kernel_types(op, q.dtype(), s.d, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    for (size_t i = 0; i < config.branches.size(); ++i) {
      BranchGrid g = branch_grid(s, config.branches[i], Split<D>::kRows);
      if (pairs[i].shares_all(max_kept_rows(g.w, g.r))) continue;  // nothing of its own
      auto kernel = pick(config.causal, !pairs[i].plain(), forward_simt_kernel<T, D, true, true>,
                         forward_simt_kernel<T, D, true, false>, forward_simt_kernel<T, D, false, true>,
                         forward_simt_kernel<T, D, false, false>);
      kernel<<<grid_of(g, s.b), kThreads, 0, stream()>>>(operand<T>(q), operand<T>(k), operand<T>(v),
                                                         g, scale_log2, DropoutGrid(branch_dropout(config, i, s)),
                                                         pairs[i], static_cast<float*>(o_acc.raw_data()),
                                                         static_cast<float*>(lse.raw_data()));
      MINIDL_CUDA_LAUNCH_CHECK();
    }
  });
}

void backward_delta(const char* op, const Tensor& out, const Tensor& grad_out, const Tensor& grad_lse,
                    const Tensor& delta, const Tensor& dq_zero) {
  const Shape4 s = shape_of(out);
  const int64_t rows = s.b * s.n * s.h;
  visit_kernel_types(op, out.dtype(), s.d, [&](auto tag, auto) {
    using T = decltype(tag);
    const bool vector = s.d % kVec<T> == 0 && aligned16({&out, &grad_out, &dq_zero});
    const unsigned blocks = static_cast<unsigned>((rows * kDeltaLanes + 255) / 256);
    auto kernel = vector ? backward_delta_kernel<T, kVec<T>> : backward_delta_kernel<T, 1>;
    kernel<<<blocks, 256, 0, stream()>>>(
        static_cast<const T*>(out.raw_data()), static_cast<const T*>(grad_out.raw_data()),
        grad_lse.defined() ? static_cast<const float*>(grad_lse.raw_data()) : nullptr,
        static_cast<float*>(delta.raw_data()),
        dq_zero.defined() ? static_cast<float*>(dq_zero.raw_data()) : nullptr, rows, s.d);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void backward_simt(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& grad_out, const Tensor& lse,
                   const Tensor& delta, const DilatedAttentionConfig& config, const std::vector<BranchPairs>& pairs,
                   const Tensor& dq_acc, const Tensor& dk_acc, const Tensor& dv_acc) {
  const Shape4 s = shape_of(q);
  const float scale = static_cast<float>(config.scale);
  const float* l = static_cast<const float*>(lse.raw_data());
  const float* dl = static_cast<const float*>(delta.raw_data());
  visit_kernel_types("dilated_attention backward (cuda)", q.dtype(), s.d, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    for (size_t i = 0; i < config.branches.size(); ++i) {
      BranchGrid g = branch_grid(s, config.branches[i], Split<D>::kRows);
      dim3 grid = grid_of(g, s.b);
      if (pairs[i].shares_all(max_kept_rows(g.w, g.r))) continue;  // nothing of its own
      const DropoutGrid drop(branch_dropout(config, i, s));
      const bool nested = !pairs[i].plain();
      auto dq_kernel = pick(config.causal, nested, backward_dq_simt<T, D, true, true>, backward_dq_simt<T, D, true, false>,
                            backward_dq_simt<T, D, false, true>, backward_dq_simt<T, D, false, false>);
      dq_kernel<<<grid, kThreads, 0, stream()>>>(operand<T>(q), operand<T>(k), operand<T>(v),
                                                 operand<T>(grad_out), l, dl, g, scale, drop, pairs[i],
                                                 static_cast<float*>(dq_acc.raw_data()));
      MINIDL_CUDA_LAUNCH_CHECK();
      auto dkv_kernel = pick(config.causal, nested, backward_dkv_simt<T, D, true, true>,
                             backward_dkv_simt<T, D, true, false>, backward_dkv_simt<T, D, false, true>,
                             backward_dkv_simt<T, D, false, false>);
      dkv_kernel<<<grid, kThreads, 0, stream()>>>(operand<T>(q), operand<T>(k), operand<T>(v),
                                                  operand<T>(grad_out), l, dl, g, scale, drop, pairs[i],
                                                  static_cast<float*>(dk_acc.raw_data()),
                                                  static_cast<float*>(dv_acc.raw_data()));
      MINIDL_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace minidl::cuda::attn
