// Dilated attention on CUDA: launchers plus the portable (SIMT, fp32 math)
// kernels, the fallback for both dtypes (float32 runs on TF32 tensor cores on
// sm_80+, like float32 matmuls; MINIDL_ATTENTION_KERNEL=simt keeps it here).
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
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string_view>

#include "cuda/dilated_attention.h"
#include "cuda/dilated_attention_common.cuh"
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/elementwise.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

using namespace attn;

constexpr int kThreads = 128;  // per block
constexpr int kTile = 32;      // keys (forward, dQ) or queries (dK/dV) staged per step

// A group of kTpr = D/32 consecutive lanes owns one row; lane `part` of the
// group holds dims part, part + kTpr, ... (interleaved, so the lanes of a
// group hit different shared-memory banks).
template <int D>
struct Split {
  static constexpr int kTpr = D / 32;
  static constexpr int kRows = kThreads / kTpr;
  static __device__ __forceinline__ int dim(int i, int part) { return i * kTpr + part; }
  static __device__ __forceinline__ float reduce(float x) {
#pragma unroll
    for (int off = 1; off < kTpr; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
  }
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

struct BlockWork {
  int64_t batch, head, t0;
  RowSet rows;
};

__device__ __forceinline__ BlockWork block_work(const BranchGrid& g, int rows_per_block) {
  int64_t bh = blockIdx.y;
  int64_t segment = blockIdx.x / g.tiles_per_segment;
  int64_t tile = blockIdx.x % g.tiles_per_segment;
  BlockWork w;
  w.batch = bh / g.heads;
  w.head = bh % g.heads;
  w.rows = kept_rows(g.n, g.w, g.r, w.head, segment);
  w.t0 = tile * rows_per_block;
  return w;
}

__device__ __forceinline__ int64_t row_index(const BranchGrid& g, int64_t b, int64_t pos, int64_t h) {
  return (b * g.n + pos) * g.heads + h;
}

// The dropout mask of one branch launch: element (query pos, key index t) of
// (b, h) is attention_keep(d, branch, batch, b, heads, h, n, pos, t).
struct DropoutGrid {
  AttentionDropout d;
  int64_t branch = 0, batch = 0;
  MINIDL_HD bool enabled() const { return d.enabled(); }
  // The mask row of query position pos.
  __device__ __forceinline__ uint64_t row(const BranchGrid& g, int64_t b, int64_t h, int64_t pos) const {
    return attention_mask_row(branch, batch, b, g.heads, h, g.n, pos);
  }
  // M for key index t of mask row `row`, drawing from `bits`: the Philox block
  // of t's 16-key group, which the caller refreshes when t % 16 == 0 (factor
  // reads only t & 15).
  __device__ __forceinline__ void refresh(philox::U32x4& bits, uint64_t row, int64_t t) const {
    bits = attention_dropout_block(d, row, static_cast<uint64_t>(t));
  }
  __device__ __forceinline__ float factor(const philox::U32x4& bits, int64_t t) const {
    return attention_keep_in_block(bits, static_cast<uint64_t>(t), d.threshold) ? d.scale : 0.f;
  }
  // M for key index t from its word of the group's block (word (t & 7) >> 1).
  __device__ __forceinline__ float factor_from_word(uint32_t word, int64_t t) const {
    return attention_keep_byte(word, static_cast<int>(((t >> 3) & 1) * 2 + (t & 1)), d.threshold) ? d.scale
                                                                                                 : 0.f;
  }
};

template <typename T, int D, bool kCausal>
__global__ __launch_bounds__(kThreads) void forward_simt(Operand<T> q, Operand<T> k, Operand<T> v,
                                                         BranchGrid g, float scale_log2,
                                                         DropoutGrid drop,
                                                         float* __restrict__ o_acc,
                                                         float* __restrict__ lse) {
  using S = Split<D>;
  __shared__ float ks[kTile][D], vs[kTile][D];
  BlockWork w = block_work(g, S::kRows);
  if (w.t0 >= w.rows.count) return;  // uniform across the block
  const int part = threadIdx.x % S::kTpr;
  const int64_t t = w.t0 + threadIdx.x / S::kTpr;
  const bool active = t < w.rows.count;
  const int64_t pos = w.rows.base + (active ? t : w.t0) * w.rows.stride;
  const bool dropping = drop.enabled();
  const uint64_t drop_row = drop.row(g, w.batch, w.head, pos);
  philox::U32x4 bits{};

  float qr[32], o[32];
  load_row<T, D>(q.row(w.batch, pos, w.head), scale_log2, qr, g.dim);
#pragma unroll
  for (int i = 0; i < 32; ++i) o[i] = 0;
  float m = -INFINITY, l = 0;
  const int64_t key_end = kCausal ? min(w.t0 + S::kRows, w.rows.count) : w.rows.count;
  for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
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
      bool visible = active && tk < w.rows.count && (!kCausal || tk <= t);
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
  if (!active) return;
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

// delta[row] = sum_d dO * O - dL (dL optional): one group of lanes per row.
template <typename T, int D>
__global__ void backward_delta(const T* __restrict__ out, const T* __restrict__ grad_out,
                               const float* __restrict__ grad_lse, float* __restrict__ delta,
                               int64_t rows, int64_t d) {
  using S = Split<D>;
  int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / S::kTpr;
  int part = threadIdx.x % S::kTpr;
  float acc = 0;
  if (row < rows) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      int c = S::dim(i, part);
      if (c < d) acc += to_float(out[row * d + c]) * to_float(grad_out[row * d + c]);
    }
  }
  acc = S::reduce(acc);
  if (row < rows && part == 0) delta[row] = acc - (grad_lse ? grad_lse[row] : 0.f);
}

template <typename T, int D, bool kCausal>
__global__ __launch_bounds__(kThreads) void backward_dq_simt(
    Operand<T> q, Operand<T> k, Operand<T> v, Operand<T> dout, const float* __restrict__ lse,
    const float* __restrict__ delta, BranchGrid g, float scale, DropoutGrid drop,
    float* __restrict__ dq_acc) {
  using S = Split<D>;
  __shared__ float ks[kTile][D], vs[kTile][D];
  BlockWork w = block_work(g, S::kRows);
  if (w.t0 >= w.rows.count) return;
  const int part = threadIdx.x % S::kTpr;
  const int64_t t = w.t0 + threadIdx.x / S::kTpr;
  const bool active = t < w.rows.count;
  const int64_t pos = w.rows.base + (active ? t : w.t0) * w.rows.stride;
  const int64_t ri = row_index(g, w.batch, pos, w.head);
  const bool dropping = drop.enabled();
  const uint64_t drop_row = drop.row(g, w.batch, w.head, pos);
  philox::U32x4 bits{};

  float qr[32], dor[32], dq[32];
  load_row<T, D>(q.row(w.batch, pos, w.head), scale * kLog2e, qr, g.dim);
  load_row<T, D>(dout.row(w.batch, pos, w.head), 1.f, dor, g.dim);
#pragma unroll
  for (int i = 0; i < 32; ++i) dq[i] = 0;
  const float l2 = active ? lse[ri] * kLog2e : 0.f;
  const float dp_row = active ? delta[ri] : 0.f;
  const int64_t key_end = kCausal ? min(w.t0 + S::kRows, w.rows.count) : w.rows.count;
  for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
    __syncthreads();
    stage_rows<T, D>(k, v, w.batch, w.head, w.rows, k0, ks, vs, g.dim);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      float s = 0, dp = 0;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        int d = S::dim(i, part);
        s += qr[i] * ks[j][d];
        dp += dor[i] * vs[j][d];
      }
      s = S::reduce(s);
      dp = S::reduce(dp);
      int64_t tk = k0 + j;
      bool visible = active && tk < w.rows.count && (!kCausal || tk <= t);
      float ds;
      if (dropping) {  // dS = P (M dP' - D)
        if ((j & 15) == 0) drop.refresh(bits, drop_row, tk);
        ds = visible ? exp2f(s - l2) * (drop.factor(bits, j) * dp - dp_row) : 0.f;  // as j: k0 % 16 == 0
      } else {
        ds = visible ? exp2f(s - l2) * (dp - dp_row) : 0.f;
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

template <typename T, int D, bool kCausal>
__global__ __launch_bounds__(kThreads) void backward_dkv_simt(
    Operand<T> q, Operand<T> k, Operand<T> v, Operand<T> dout, const float* __restrict__ lse,
    const float* __restrict__ delta, BranchGrid g, float scale, DropoutGrid drop,
    float* __restrict__ dk_acc, float* __restrict__ dv_acc) {
  using S = Split<D>;
  // Dropout: the block's keys form kGroups 16-key groups (t0 is a multiple of
  // 16); keep_words[j][4 * group + word] is one Philox block per (staged
  // query, group), drawn once for the block instead of once per element.
  constexpr int kGroups = S::kRows / 16;
  __shared__ float qs[kTile][D], dos[kTile][D];
  __shared__ float l2s[kTile], dps[kTile];
  __shared__ uint32_t keep_words[kTile][4 * kGroups];
  BlockWork w = block_work(g, S::kRows);
  if (w.t0 >= w.rows.count) return;
  const int part = threadIdx.x % S::kTpr;
  const int64_t t = w.t0 + threadIdx.x / S::kTpr;  // this group's key row
  const bool active = t < w.rows.count;
  const int64_t pos = w.rows.base + (active ? t : w.t0) * w.rows.stride;
  const bool dropping = drop.enabled();
  const int key_word = 4 * static_cast<int>((t - w.t0) / 16) + static_cast<int>((t & 7) >> 1);

  float kr[32], vr[32], dk[32], dv[32];
  load_row<T, D>(k.row(w.batch, pos, w.head), scale * kLog2e, kr, g.dim);
  load_row<T, D>(v.row(w.batch, pos, w.head), 1.f, vr, g.dim);
#pragma unroll
  for (int i = 0; i < 32; ++i) dk[i] = dv[i] = 0;
  // Causal: only queries at or after the block's first key see it.
  const int64_t q_begin = kCausal ? (w.t0 / kTile) * kTile : 0;
  for (int64_t q0 = q_begin; q0 < w.rows.count; q0 += kTile) {
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
        drop.refresh(bits, drop.row(g, w.batch, w.head, w.rows.base + tq * w.rows.stride), w.t0 + 16 * group);
        keep_words[j][4 * group] = bits.x;
        keep_words[j][4 * group + 1] = bits.y;
        keep_words[j][4 * group + 2] = bits.z;
        keep_words[j][4 * group + 3] = bits.w;
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      float s = 0, dp = 0;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        int d = S::dim(i, part);
        s += kr[i] * qs[j][d];
        dp += vr[i] * dos[j][d];
      }
      s = S::reduce(s);
      dp = S::reduce(dp);
      int64_t tq = q0 + j;
      bool visible = active && tq < w.rows.count && (!kCausal || tq >= t);
      float p = visible ? exp2f(s - l2s[j]) : 0.f;
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

// ---- launch helpers ----

struct Shape4 {
  int64_t b, n, h, d;
};

Shape4 shape_of(const Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }

template <typename T>
Operand<T> operand(const Tensor& t) {
  return {static_cast<const T*>(t.raw_data()), t.stride(0), t.stride(1), t.stride(2)};
}

BranchGrid branch_grid(const Shape4& s, const DilatedBranch& br, int rows_per_block) {
  BranchGrid g;
  g.n = s.n;
  g.heads = s.h;
  g.w = std::min(br.segment, s.n);
  g.r = br.dilation;
  g.segments = (s.n + g.w - 1) / g.w;
  int64_t max_kept = (g.w + g.r - 1) / g.r;
  g.tiles_per_segment = (max_kept + rows_per_block - 1) / rows_per_block;
  g.dim = s.d;
  return g;
}

// Branch i (its index in config.branches, as the user listed them) of the
// dropout mask; disabled when config.dropout is.
DropoutGrid dropout_grid(const DilatedAttentionConfig& config, size_t branch, const Shape4& s) {
  DropoutGrid drop;
  drop.d = config.dropout;
  drop.branch = static_cast<int64_t>(branch);
  drop.batch = s.b;
  return drop;
}

dim3 grid_of(const BranchGrid& g, const Shape4& s) {
  int64_t x = g.segments * g.tiles_per_segment;
  MINIDL_CHECK(x < (int64_t(1) << 31) && s.b * s.h <= 65535, "dilated_attention: problem too large "
               "for one launch (", x, " row tiles, ", s.b * s.h, " batch-heads)");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(s.b * s.h));
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

Tensor fp32_buffer(const Tensor& like) {
  return Tensor::empty(like.shape(), {DType::Float32, like.device(), false});
}

void zero(const Tensor& t) { MINIDL_CUDA_CHECK(cudaMemsetAsync(t.raw_data(), 0, t.nbytes(), stream())); }

// The tensor-core kernels' view of branch `branch` (its index in
// config.branches) of the dropout mask.
BranchDropout branch_dropout(const DilatedAttentionConfig& config, size_t branch, const Shape4& s) {
  BranchDropout drop;
  drop.mask = config.dropout;
  drop.branch = static_cast<int64_t>(branch);
  drop.batch_size = s.b;
  return drop;
}

// float32 runs on the TF32 kernels only when every operand's rows are 16-byte
// aligned (views at odd offsets run SIMT); bfloat16 needs no check here.
bool tf32_takes(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* dout = nullptr) {
  if (q.dtype() != DType::Float32) return true;
  for (const Tensor* t : {&q, &k, &v, dout})
    if (t && !tf32_rows_aligned(operand<float>(*t))) return false;
  return true;
}

#if MINIDL_WGMMA
// The order in which the ws backward runs a config's branches when one of
// them keeps every row (dilation 1): the others first, as listed, then that
// one, which finishes every row's dK and dV in the gradients' dtype, so that
// no dK/dV accumulator is zeroed or converted. Empty when no branch keeps
// every row. (The forward runs that branch first: finishing with it measured
// slower, docs/kernel-notes.md.)
std::vector<size_t> finishing_order(const DilatedAttentionConfig& config) {
  const auto& branches = config.branches;
  const auto dense = std::find_if(branches.begin(), branches.end(), [](const DilatedBranch& b) { return b.dilation == 1; });
  if (dense == branches.end()) return {};
  const size_t last = static_cast<size_t>(dense - branches.begin());
  std::vector<size_t> order;
  for (size_t i = 0; i < branches.size(); ++i)
    if (i != last) order.push_back(i);
  order.push_back(last);
  return order;
}
#endif

// bfloat16 on tensor cores. A branch with dilation 1 keeps every row, so
// running it first lets it overwrite the accumulators (no init pass); a lone
// such branch (vanilla attention) writes the bf16 output directly. `order`
// holds indices into config.branches: the dropout mask of a branch is keyed by
// its index there, not by its place in the launch order.
void forward_tensor_cores(AttentionKernel kernel, const Tensor& q, const Tensor& k, const Tensor& v,
                          const DilatedAttentionConfig& config, const Tensor& out, const Tensor& lse) {
  Shape4 s = shape_of(q);
  std::vector<size_t> order(config.branches.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto dense = std::find_if(order.begin(), order.end(),
                            [&](size_t i) { return config.branches[i].dilation == 1; });
  if (dense != order.end()) std::rotate(order.begin(), dense, dense + 1);
  const bool covers = config.branches[order.front()].dilation == 1;
  const float scale_log2 = static_cast<float>(config.scale) * kLog2e;
  auto* lse_ptr = static_cast<float*>(lse.raw_data());
  if (q.dtype() == DType::Float32) {  // TF32: the float32 output is its own accumulator
    if (!covers) {
      zero(out);
      unary(UnaryOp::Fill, lse, -INFINITY, lse);
    }
    for (size_t i = 0; i < order.size(); ++i) {
      BranchGrid g = branch_grid(s, config.branches[order[i]], kMmaRows);
      grid_of(g, s);
      forward_tf32(operand<float>(q), operand<float>(k), operand<float>(v), g, s.b, s.d, config.causal,
                   scale_log2, branch_dropout(config, order[i], s),
                   i == 0 && covers ? MergeMode::kWrite : MergeMode::kMerge, static_cast<float*>(out.raw_data()),
                   lse_ptr);
    }
    return;
  }
  auto* out_ptr = static_cast<BFloat16*>(out.raw_data());
  Operand<BFloat16> qo = operand<BFloat16>(q), ko = operand<BFloat16>(k), vo = operand<BFloat16>(v);
  if (order.size() == 1 && covers) {
    BranchGrid g = branch_grid(s, config.branches[0], kMmaRows);
    grid_of(g, s);  // size check
    forward_mma(kernel, qo, ko, vo, g, s.b, s.d, config.causal, scale_log2, branch_dropout(config, 0, s),
                MergeMode::kSingle, nullptr, lse_ptr, out_ptr);
    return;
  }
  Tensor o_acc = fp32_buffer(out);
  if (!covers) {
    zero(o_acc);
    unary(UnaryOp::Fill, lse, -INFINITY, lse);
  }
  for (size_t i = 0; i < order.size(); ++i) {
    BranchGrid g = branch_grid(s, config.branches[order[i]], kMmaRows);
    grid_of(g, s);
    forward_mma(kernel, qo, ko, vo, g, s.b, s.d, config.causal, scale_log2,
                branch_dropout(config, order[i], s),
                i == 0 && covers ? MergeMode::kWrite : MergeMode::kMerge,
                static_cast<float*>(o_acc.raw_data()), lse_ptr, out_ptr);
  }
  copy(o_acc, out);
}

}  // namespace

const char* attention_kernel_name(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kSimt: return "simt";
    case AttentionKernel::kMmaSync: return "mma";
    case AttentionKernel::kWgmma: return "wgmma";
    case AttentionKernel::kWarpSpecialized: return "ws";
  }
  return "?";
}

namespace {

constexpr AttentionKernel kAllKernels[] = {AttentionKernel::kSimt, AttentionKernel::kMmaSync,
                                           AttentionKernel::kWgmma, AttentionKernel::kWarpSpecialized};

// MINIDL_ATTENTION_KERNEL, read at every call so that a test can switch it.
AttentionKernel kernel_cap() {
  const char* e = std::getenv("MINIDL_ATTENTION_KERNEL");
  if (!e || !*e) return AttentionKernel::kWarpSpecialized;
  for (AttentionKernel k : kAllKernels)
    if (std::string_view(e) == attention_kernel_name(k)) return k;
  MINIDL_FAIL("MINIDL_ATTENTION_KERNEL='", e, "' is not a kernel version (simt, mma, wgmma, ws)");
}

// Whether `kernel` implements `pass` for this problem on the current device.
bool handles(AttentionKernel kernel, DType dtype, int64_t d, AttentionPass pass) {
#if MINIDL_WGMMA
  const bool hopper = compute_capability() == 90;  // the sm_90a kernels are built and can run
#else
  const bool hopper = false;
#endif
  const bool forward = pass == AttentionPass::kForward;
  switch (kernel) {
    case AttentionKernel::kSimt: return true;
    case AttentionKernel::kMmaSync:  // float32 as TF32 (mma.sync m16n8k8, sm_80+)
      return mma_head_dim(d) && (dtype == DType::BFloat16 || (dtype == DType::Float32 && compute_capability() >= 80));
    case AttentionKernel::kWgmma: return forward && hopper && dtype == DType::BFloat16 && d == 64;
    case AttentionKernel::kWarpSpecialized:  // (views it cannot map run the older kernels)
      return hopper && dtype == DType::BFloat16 && d == 64;
  }
  return false;
}

}  // namespace

AttentionKernel choose_attention_kernel(DType dtype, int64_t head_dim, AttentionPass pass) {
  const AttentionKernel cap = kernel_cap();
  AttentionKernel chosen = AttentionKernel::kSimt;
  for (AttentionKernel k : kAllKernels)
    if (k <= cap && handles(k, dtype, head_dim, pass)) chosen = k;
  return chosen;
}

void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const DilatedAttentionConfig& config, const Tensor& out,
                               const Tensor& lse) {
  const char* op = "dilated_attention (cuda)";
  Shape4 s = shape_of(q);
  const AttentionKernel kernel =
      choose_attention_kernel(q.dtype(), s.d, AttentionPass::kForward);
  if (s.b * s.n * s.h > 0 && kernel != AttentionKernel::kSimt && tf32_takes(q, k, v)) {
    forward_tensor_cores(kernel, q, k, v, config, out, lse);
    return;
  }
  Tensor o_acc = out.dtype() == DType::Float32 ? out : fp32_buffer(out);
  zero(o_acc);
  unary(UnaryOp::Fill, lse, -INFINITY, lse);
  if (s.b * s.n * s.h == 0) return;
  float scale_log2 = static_cast<float>(config.scale) * kLog2e;
  visit_kernel_types(op, q.dtype(), s.d, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    for (size_t i = 0; i < config.branches.size(); ++i) {
      BranchGrid g = branch_grid(s, config.branches[i], Split<D>::kRows);
      auto kernel = config.causal ? forward_simt<T, D, true> : forward_simt<T, D, false>;
      kernel<<<grid_of(g, s), kThreads, 0, stream()>>>(operand<T>(q), operand<T>(k), operand<T>(v),
                                                         g, scale_log2, dropout_grid(config, i, s),
                                                         static_cast<float*>(o_acc.raw_data()),
                                                         static_cast<float*>(lse.raw_data()));
      MINIDL_CUDA_LAUNCH_CHECK();
    }
  });
  if (o_acc.impl() != out.impl()) copy(o_acc, out);
}

void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                const Tensor& grad_lse, const DilatedAttentionConfig& config,
                                const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const char* op = "dilated_attention backward (cuda)";
  Shape4 s = shape_of(q);
  bool fp32 = q.dtype() == DType::Float32;
  int64_t rows = s.b * s.n * s.h;
  float scale = static_cast<float>(config.scale);
#if MINIDL_WGMMA
  // The ws kernels, when a branch keeps every row (vanilla attention, or
  // dilation 1 among the branches): that branch runs last and writes dK and
  // dV once in bf16 (rows of any stride: e.g. the parts of one fused q/k/v
  // gradient), adding what the others left in fp32 accumulators for the rows
  // they wrote (a byte per row marks them); only dQ (reduced across key blocks)
  // needs a zeroed accumulator.
  auto rows_of_heads = [&](const Tensor& t) {  // (B, N, H, D) with each position's H x D block dense
    return t.stride(3) == 1 && t.stride(2) == s.d && t.stride(0) == s.n * t.stride(1) && t.stride(1) % 2 == 0;
  };
  const std::vector<size_t> finish = finishing_order(config);
  if (rows > 0 && !fp32 && !finish.empty() &&
      choose_attention_kernel(q.dtype(), s.d, AttentionPass::kBackward) ==
          AttentionKernel::kWarpSpecialized &&
      out.is_contiguous() && grad_out.is_contiguous() && rows_of_heads(dk) && dk.strides() == dv.strides()) {
    const Operand<BFloat16> qo = operand<BFloat16>(q), ko = operand<BFloat16>(k), vo = operand<BFloat16>(v),
                            go = operand<BFloat16>(grad_out);
    if (ws_takes(qo, ko, vo, branch_grid(s, config.branches[0], kMmaRows), s.b, &go)) {
      Tensor dq_acc = fp32_buffer(dq);
      zero(dq_acc);
      Tensor dk_acc, dv_acc, written;  // for the branches before the last
      if (finish.size() > 1) {
        dk_acc = fp32_buffer(dk);
        dv_acc = fp32_buffer(dv);
        written = Tensor::empty({(rows + 3) / 4}, {DType::Int32, q.device(), false});  // a byte per row
        zero(written);
      }
      auto ptr = [](const Tensor& t) { return t.defined() ? static_cast<float*>(t.raw_data()) : nullptr; };
      Tensor delta = Tensor::empty({s.b, s.n, s.h}, {DType::Float32, q.device(), false});
      backward_delta<BFloat16, 64><<<static_cast<unsigned>((rows * Split<64>::kTpr + 255) / 256), 256, 0, stream()>>>(
          static_cast<const BFloat16*>(out.raw_data()), static_cast<const BFloat16*>(grad_out.raw_data()),
          grad_lse.defined() ? static_cast<const float*>(grad_lse.raw_data()) : nullptr,
          static_cast<float*>(delta.raw_data()), rows, s.d);
      MINIDL_CUDA_LAUNCH_CHECK();
      for (size_t i = 0; i < finish.size(); ++i) {
        const BranchGrid g = branch_grid(s, config.branches[finish[i]], kMmaRows);
        grid_of(g, s);  // size check
        const bool last = i + 1 == finish.size();
        backward_ws(qo, ko, vo, go, static_cast<const float*>(lse.raw_data()),
                    static_cast<const float*>(delta.raw_data()), g, s.b, config.causal, scale,
                    branch_dropout(config, finish[i], s), static_cast<float*>(dq_acc.raw_data()), ptr(dk_acc),
                    ptr(dv_acc), last ? static_cast<BFloat16*>(dk.raw_data()) : nullptr,
                    last ? static_cast<BFloat16*>(dv.raw_data()) : nullptr, dk.stride(1),
                    written.defined() ? static_cast<uint8_t*>(written.raw_data()) : nullptr);
      }
      copy(dq_acc, dq);
      return;
    }
  }
#endif
  // Accumulators: the outputs themselves when float32 and contiguous, else
  // fp32 buffers copied into them at the end (bf16, or strided views such as
  // the parts of one fused q/k/v gradient).
  auto accumulator = [&](const Tensor& t) { return fp32 && t.is_contiguous() ? t : fp32_buffer(t); };
  Tensor dq_acc = accumulator(dq), dk_acc = accumulator(dk), dv_acc = accumulator(dv);
  zero(dq_acc);
  zero(dk_acc);
  zero(dv_acc);
  if (rows == 0) return;
  MINIDL_CHECK(out.is_contiguous() && grad_out.is_contiguous(), op,
               ": out and grad_out must be contiguous");
  Tensor delta = Tensor::empty({s.b, s.n, s.h}, {DType::Float32, q.device(), false});
  visit_kernel_types(op, q.dtype(), s.d, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    using S = Split<D>;
    unsigned blocks = static_cast<unsigned>((rows * S::kTpr + 255) / 256);
    backward_delta<T, D><<<blocks, 256, 0, stream()>>>(
        static_cast<const T*>(out.raw_data()), static_cast<const T*>(grad_out.raw_data()),
        grad_lse.defined() ? static_cast<const float*>(grad_lse.raw_data()) : nullptr,
        static_cast<float*>(delta.raw_data()), rows, s.d);
    MINIDL_CUDA_LAUNCH_CHECK();
    const float* l = static_cast<const float*>(lse.raw_data());
    const float* dl = static_cast<const float*>(delta.raw_data());
    if constexpr (std::is_same_v<T, BFloat16>) {
      const AttentionKernel kernel =
          choose_attention_kernel(q.dtype(), s.d, AttentionPass::kBackward);
      if (kernel != AttentionKernel::kSimt) {  // tensor cores
        for (size_t i = 0; i < config.branches.size(); ++i) {
          BranchGrid g = branch_grid(s, config.branches[i], kMmaRows);
          grid_of(g, s);
          backward_mma(kernel, operand<T>(q), operand<T>(k), operand<T>(v), operand<T>(grad_out), l, dl, g,
                       s.b, s.d, config.causal, scale, branch_dropout(config, i, s),
                       static_cast<float*>(dq_acc.raw_data()),
                       static_cast<float*>(dk_acc.raw_data()), static_cast<float*>(dv_acc.raw_data()));
        }
        return;
      }
    }
    if constexpr (std::is_same_v<T, float>) {  // TF32 tensor cores
      if (choose_attention_kernel(q.dtype(), s.d, AttentionPass::kBackward) !=
              AttentionKernel::kSimt &&
          tf32_takes(q, k, v, &grad_out)) {
        for (size_t i = 0; i < config.branches.size(); ++i) {
          BranchGrid g = branch_grid(s, config.branches[i], kMmaRows);
          grid_of(g, s);
          backward_tf32(operand<T>(q), operand<T>(k), operand<T>(v), operand<T>(grad_out), l, dl, g, s.b, s.d,
                        config.causal, scale, branch_dropout(config, i, s), static_cast<float*>(dq_acc.raw_data()),
                        static_cast<float*>(dk_acc.raw_data()), static_cast<float*>(dv_acc.raw_data()));
        }
        return;
      }
    }
    {
      for (size_t i = 0; i < config.branches.size(); ++i) {
        BranchGrid g = branch_grid(s, config.branches[i], S::kRows);
        dim3 grid = grid_of(g, s);
        const DropoutGrid drop = dropout_grid(config, i, s);
        auto dq_kernel = config.causal ? backward_dq_simt<T, D, true> : backward_dq_simt<T, D, false>;
        dq_kernel<<<grid, kThreads, 0, stream()>>>(operand<T>(q), operand<T>(k), operand<T>(v),
                                                   operand<T>(grad_out), l, dl, g, scale, drop,
                                                   static_cast<float*>(dq_acc.raw_data()));
        MINIDL_CUDA_LAUNCH_CHECK();
        auto dkv_kernel = config.causal ? backward_dkv_simt<T, D, true> : backward_dkv_simt<T, D, false>;
        dkv_kernel<<<grid, kThreads, 0, stream()>>>(operand<T>(q), operand<T>(k), operand<T>(v),
                                                    operand<T>(grad_out), l, dl, g, scale, drop,
                                                    static_cast<float*>(dk_acc.raw_data()),
                                                    static_cast<float*>(dv_acc.raw_data()));
        MINIDL_CUDA_LAUNCH_CHECK();
      }
    }
  });
  for (auto [acc, grad] : {std::pair{dq_acc, dq}, std::pair{dk_acc, dk}, std::pair{dv_acc, dv}})
    if (acc.impl() != grad.impl()) copy(acc, grad);
}

}  // namespace minidl::cuda
