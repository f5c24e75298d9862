// CUDA kernels of the fused neural-network functions.
//
// Short rows (up to 256 elements, or 1024 float32 / 1024 bfloat16 / 512
// float64 when the row length and pointers allow 16-byte accesses) take one
// warp per row with the row held in
// registers, so each kernel reads and writes global memory once: this is the
// char-LM's case (65 classes, width 384, tens of thousands of rows). Longer
// rows take one block per row and stream through the row (softmax uses the
// online max/sum, so it reads the input twice, the second time from cache).
// Compute is fp32 for float32/bfloat16 and fp64 for float64. Every reduction
// combines partials in a fixed order (no atomics): results are deterministic.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/scalar_math.h"
#include "cuda/nn_functional.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

using math::exp_;
using math::log_;
using math::sqrt_;

template <int N> using Int = std::integral_constant<int, N>;

constexpr int kRowWarps = 4;        // rows (warps) per block in the warp-per-row kernels
constexpr int kMaxIters = 8;        // register tile: up to 8 accesses per lane per row
constexpr int kMaxLaneElems = 32;   // and up to 32 elements per lane (no spills in the LN backward)
constexpr int kParamWarps = 8;      // warps per block in the fused layer-norm backward
constexpr int kMaxBlockThreads = 1024;  // block-per-row kernels

template <typename A> __host__ __device__ constexpr A inf() { return std::numeric_limits<A>::infinity(); }
template <typename A> __host__ __device__ constexpr A nan() { return std::numeric_limits<A>::quiet_NaN(); }

// Larger of two values, ignoring a NaN (as fmax does), so every lane agrees
// on a row's max; a NaN element still poisons the row through its exp.
template <typename A> __device__ __forceinline__ A max_(A a, A b) {
  if constexpr (std::is_same_v<A, float>) return fmaxf(a, b); else return fmax(a, b);
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block, returned to every thread; the shared buffer is free
// again on return, so a kernel may call it repeatedly.
template <typename A> __device__ __forceinline__ A block_sum(A v) {
  __shared__ A buf[32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) buf[threadIdx.x / 32] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += buf[w];
  __syncthreads();
  return total;
}

// Online softmax statistics: (m, s) stands for sum_i exp(x_i - m) = s.
template <typename A> __device__ __forceinline__ void online_add(A& m, A& s, A v) {
  if (v > m) {
    s = s * exp_(m - v) + A(1);
    m = v;
  } else if (!(v == -inf<A>())) {  // exp(-inf) adds nothing; a NaN poisons s
    s += exp_(v - m);
  }
}
template <typename A> __device__ __forceinline__ void online_merge(A& m, A& s, A m2, A s2) {
  A mn = max_(m, m2);
  A a = m == -inf<A>() ? A(0) : s * exp_(m - mn);
  A b = m2 == -inf<A>() ? A(0) : s2 * exp_(m2 - mn);
  m = mn;
  s = a + b;
}
// Merges (m, s) over the block, returned to every thread.
template <typename A> __device__ __forceinline__ void block_online(A& m, A& s) {
  __shared__ A bm[32], bs[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    online_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  if (threadIdx.x % 32 == 0) {
    bm[threadIdx.x / 32] = m;
    bs[threadIdx.x / 32] = s;
  }
  __syncthreads();
  m = -inf<A>();
  s = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) online_merge(m, s, bm[w], bs[w]);
  __syncthreads();
}

// ---- row access ----

// V consecutive elements, one 16-byte access when V > 1.
template <typename S, int V> struct alignas(sizeof(S) * V) Pack {
  S v[V];
};

template <typename S, typename A, int V>
__device__ __forceinline__ void load_vec(const S* p, A (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = static_cast<A>(p[0]);
  } else {
    Pack<S, V> pk = *reinterpret_cast<const Pack<S, V>*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = static_cast<A>(pk.v[j]);
  }
}
template <typename S, typename A, int V>
__device__ __forceinline__ void store_vec(S* p, const A (&in)[V]) {
  if constexpr (V == 1) {
    p[0] = static_cast<S>(in[0]);
  } else {
    Pack<S, V> pk;
#pragma unroll
    for (int j = 0; j < V; ++j) pk.v[j] = static_cast<S>(in[j]);
    *reinterpret_cast<Pack<S, V>*>(p) = pk;
  }
}

// The register tile of a warp-per-row kernel: lane `lane` holds elements
// (i * 32 + lane) * V + j of the row, i < K, j < V. Slots past the row's end
// read as `fill` and are never stored.
template <int V> __device__ __forceinline__ int tile_col(int i, int lane) { return (i * 32 + lane) * V; }

template <typename S, typename A, int V, int K>
__device__ __forceinline__ void load_tile(const S* row, int cols, int lane, A (&v)[K][V], A fill = A(0)) {
#pragma unroll
  for (int i = 0; i < K; ++i) {
    int c = tile_col<V>(i, lane);
    if (c < cols) {
      load_vec<S, A, V>(row + c, v[i]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[i][j] = fill;
    }
  }
}
template <typename S, typename A, int V, int K>
__device__ __forceinline__ void store_tile(S* row, int cols, int lane, const A (&v)[K][V]) {
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (tile_col<V>(i, lane) < cols) store_vec<S, A, V>(row + tile_col<V>(i, lane), v[i]);
}

__device__ __forceinline__ int64_t warp_row() {
  return blockIdx.x * int64_t(kRowWarps) + threadIdx.x / 32;
}

// ---- softmax ----

template <typename S, typename A, int V, int K>
__global__ void softmax_forward_warp(const S* x, S* y, int64_t rows, int cols, bool log) {
  int64_t row = warp_row();
  if (row >= rows) return;  // whole warps leave together
  int lane = threadIdx.x % 32;
  A v[K][V];
  load_tile<S, A, V, K>(x + row * cols, cols, lane, v, -inf<A>());
  A m = -inf<A>();
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) m = max_(m, v[i][j]);
  m = warp_max(m);
  A s = 0;
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (tile_col<V>(i, lane) < cols)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A e = exp_(v[i][j] - m);
        s += e;
        if (!log) v[i][j] = e;
      }
  s = warp_sum(s);
  A shift = m + log_(s), inv = A(1) / s;
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) v[i][j] = log ? v[i][j] - shift : v[i][j] * inv;
  store_tile<S, A, V, K>(y + row * cols, cols, lane, v);
}

template <typename S, typename A, int V>
__global__ void __launch_bounds__(kMaxBlockThreads) softmax_forward_block(const S* x, S* y, int64_t cols, bool log) {
  const S* xr = x + int64_t(blockIdx.x) * cols;
  S* yr = y + int64_t(blockIdx.x) * cols;
  int64_t packs = cols / V;
  A m = -inf<A>(), s = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A v[V];
    load_vec<S, A, V>(xr + p * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) online_add(m, s, v[j]);
  }
  block_online(m, s);
  A shift = m + log_(s), inv = A(1) / s;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A v[V];
    load_vec<S, A, V>(xr + p * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = log ? v[j] - shift : exp_(v[j] - m) * inv;
    store_vec<S, A, V>(yr + p * V, v);
  }
}

template <typename S, typename A, int V, int K>
__global__ void softmax_backward_warp(const S* y, const S* dy, S* dx, int64_t rows, int cols, bool log) {
  int64_t row = warp_row();
  if (row >= rows) return;
  int lane = threadIdx.x % 32;
  A yv[K][V], gv[K][V];
  load_tile<S, A, V, K>(y + row * cols, cols, lane, yv);
  load_tile<S, A, V, K>(dy + row * cols, cols, lane, gv);
  A s = 0;  // padding slots are 0 in both tiles and add nothing
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) s += log ? gv[i][j] : gv[i][j] * yv[i][j];
  s = warp_sum(s);
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j)
      gv[i][j] = log ? gv[i][j] - exp_(yv[i][j]) * s : yv[i][j] * (gv[i][j] - s);
  store_tile<S, A, V, K>(dx + row * cols, cols, lane, gv);
}

template <typename S, typename A, int V>
__global__ void __launch_bounds__(kMaxBlockThreads) softmax_backward_block(const S* y, const S* dy, S* dx, int64_t cols, bool log) {
  int64_t base = int64_t(blockIdx.x) * cols;
  int64_t packs = cols / V;
  A s = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A yv[V], gv[V];
    load_vec<S, A, V>(y + base + p * V, yv);
    load_vec<S, A, V>(dy + base + p * V, gv);
#pragma unroll
    for (int j = 0; j < V; ++j) s += log ? gv[j] : gv[j] * yv[j];
  }
  s = block_sum(s);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A yv[V], gv[V];
    load_vec<S, A, V>(y + base + p * V, yv);
    load_vec<S, A, V>(dy + base + p * V, gv);
#pragma unroll
    for (int j = 0; j < V; ++j) gv[j] = log ? gv[j] - exp_(yv[j]) * s : yv[j] * (gv[j] - s);
    store_vec<S, A, V>(dx + base + p * V, gv);
  }
}

// ---- cross entropy ----

// Row loss lse - x[target] (0 when ignored, NaN for an out-of-range target).
template <typename S, typename A>
__device__ __forceinline__ A row_nll(const S* xr, int64_t target, int64_t cols, int64_t ignore, A lse) {
  if (target == ignore) return A(0);
  if (target < 0 || target >= cols) return nan<A>();
  return lse - static_cast<A>(xr[target]);
}

template <typename S, typename A, int V, int K>
__global__ void cross_entropy_forward_warp(const S* x, const int32_t* targets, int64_t rows, int cols,
                                           int64_t ignore, A* row_loss, A* lse) {
  int64_t row = warp_row();
  if (row >= rows) return;
  int lane = threadIdx.x % 32;
  const S* xr = x + row * cols;
  A v[K][V];
  load_tile<S, A, V, K>(xr, cols, lane, v, -inf<A>());
  A m = -inf<A>();
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) m = max_(m, v[i][j]);
  m = warp_max(m);
  A s = 0;
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (tile_col<V>(i, lane) < cols)
#pragma unroll
      for (int j = 0; j < V; ++j) s += exp_(v[i][j] - m);
  s = warp_sum(s);
  if (lane == 0) {
    A l = m + log_(s);
    lse[row] = l;
    row_loss[row] = row_nll<S, A>(xr, targets[row], cols, ignore, l);
  }
}

template <typename S, typename A, int V>
__global__ void __launch_bounds__(kMaxBlockThreads) cross_entropy_forward_block(const S* x, const int32_t* targets, int64_t cols,
                                            int64_t ignore, A* row_loss, A* lse) {
  int64_t row = blockIdx.x;
  const S* xr = x + row * cols;
  A m = -inf<A>(), s = 0;
  for (int64_t p = threadIdx.x; p < cols / V; p += blockDim.x) {
    A v[V];
    load_vec<S, A, V>(xr + p * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) online_add(m, s, v[j]);
  }
  block_online(m, s);
  if (threadIdx.x == 0) {
    A l = m + log_(s);
    lse[row] = l;
    row_loss[row] = row_nll<S, A>(xr, targets[row], cols, ignore, l);
  }
}

// One block: mean of the row losses over the rows that count, in a fixed order.
template <typename S, typename A>
__global__ void __launch_bounds__(1024) cross_entropy_finalize(const A* row_loss, const int32_t* targets, int64_t rows,
                                       int64_t ignore, S* loss, A* count) {
  A sum = 0, n = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    sum += row_loss[r];
    n += targets[r] != ignore ? A(1) : A(0);
  }
  sum = block_sum(sum);
  n = block_sum(n);
  if (threadIdx.x == 0) {
    count[0] = n;
    loss[0] = static_cast<S>(n > 0 ? sum / n : A(0));
  }
}

// Gradient scale grad / count for a row, NaN for an out-of-range target.
template <typename S, typename A>
__device__ __forceinline__ A row_scale(const S* grad, const A* count, int64_t target, int64_t cols) {
  if (target < 0 || target >= cols) return nan<A>();
  A n = count[0];
  return n > 0 ? static_cast<A>(grad[0]) / n : A(0);
}

template <typename S, typename A, int V, int K>
__global__ void cross_entropy_backward_warp(const S* grad, const A* count, const S* x,
                                            const int32_t* targets, const A* lse, int64_t rows,
                                            int cols, int64_t ignore, S* dx) {
  int64_t row = warp_row();
  if (row >= rows) return;
  int lane = threadIdx.x % 32;
  int64_t t = targets[row];
  A v[K][V];
  if (t == ignore) {
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) v[i][j] = A(0);
  } else {
    A scale = row_scale(grad, count, t, cols), l = lse[row];
    load_tile<S, A, V, K>(x + row * cols, cols, lane, v);
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A p = exp_(v[i][j] - l);
        v[i][j] = scale * (tile_col<V>(i, lane) + j == t ? p - A(1) : p);
      }
  }
  store_tile<S, A, V, K>(dx + row * cols, cols, lane, v);
}

template <typename S, typename A, int V>
__global__ void __launch_bounds__(kMaxBlockThreads) cross_entropy_backward_block(const S* grad, const A* count, const S* x,
                                             const int32_t* targets, const A* lse, int64_t cols,
                                             int64_t ignore, S* dx) {
  int64_t row = blockIdx.x;
  int64_t t = targets[row];
  bool ignored = t == ignore;
  A scale = ignored ? A(0) : row_scale(grad, count, t, cols), l = lse[row];
  for (int64_t p = threadIdx.x; p < cols / V; p += blockDim.x) {
    A v[V];
    if (!ignored) load_vec<S, A, V>(x + row * cols + p * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A e = ignored ? A(0) : exp_(v[j] - l);
      v[j] = ignored ? A(0) : scale * (p * V + j == t ? e - A(1) : e);
    }
    store_vec<S, A, V>(dx + row * cols + p * V, v);
  }
}

// ---- layer norm ----

template <typename S, typename A, int V, int K>
__global__ void layer_norm_forward_warp(const S* x, const S* w, const S* b, S* y, A* mean, A* rstd,
                                        int64_t rows, int cols, A eps) {
  int64_t row = warp_row();
  if (row >= rows) return;
  int lane = threadIdx.x % 32;
  A v[K][V];
  load_tile<S, A, V, K>(x + row * cols, cols, lane, v);
  A s = 0;
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) s += v[i][j];
  A mu = warp_sum(s) / A(cols);
  A q = 0;  // two passes over registers: no cancellation for rows with a large mean
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (tile_col<V>(i, lane) < cols)
#pragma unroll
      for (int j = 0; j < V; ++j) q += (v[i][j] - mu) * (v[i][j] - mu);
  A rs = A(1) / sqrt_(warp_sum(q) / A(cols) + eps);
  S* yr = y + row * cols;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    int c = tile_col<V>(i, lane);
    if (c >= cols) continue;
    A wv[V], bv[V], o[V];
    if (w) load_vec<S, A, V>(w + c, wv);
    if (b) load_vec<S, A, V>(b + c, bv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      o[j] = (v[i][j] - mu) * rs;
      if (w) o[j] *= wv[j];
      if (b) o[j] += bv[j];
    }
    store_vec<S, A, V>(yr + c, o);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

template <typename S, typename A, int V>
__global__ void __launch_bounds__(kMaxBlockThreads) layer_norm_forward_block(const S* x, const S* w, const S* b, S* y, A* mean, A* rstd,
                                         int64_t cols, A eps) {
  int64_t row = blockIdx.x;
  const S* xr = x + row * cols;
  S* yr = y + row * cols;
  int64_t packs = cols / V;
  A s = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A v[V];
    load_vec<S, A, V>(xr + p * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) s += v[j];
  }
  A mu = block_sum(s) / A(cols);
  A q = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A v[V];
    load_vec<S, A, V>(xr + p * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) q += (v[j] - mu) * (v[j] - mu);
  }
  A rs = A(1) / sqrt_(block_sum(q) / A(cols) + eps);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A v[V], wv[V], bv[V];
    load_vec<S, A, V>(xr + p * V, v);
    if (w) load_vec<S, A, V>(w + p * V, wv);
    if (b) load_vec<S, A, V>(b + p * V, bv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] = (v[j] - mu) * rs;
      if (w) v[j] *= wv[j];
      if (b) v[j] += bv[j];
    }
    store_vec<S, A, V>(yr + p * V, v);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx for one row (when dx is given) and, per block, partial dweight/dbias:
// each warp walks rows warp, warp + all warps, ... keeping its column sums
// in registers; the block adds its warps' sums warp by warp in shared memory
// and writes row blockIdx.x of partial_dw / partial_db (cols each).
template <typename S, typename A, int V, int K>
__global__ void layer_norm_backward_warp(const S* dy, const S* x, const S* w, const A* mean,
                                         const A* rstd, S* dx, A* partial_dw, A* partial_db,
                                         int64_t rows, int cols) {
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);  // [2][cols]: dweight, dbias
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A wv[K][V], dw[K][V], db[K][V];
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) {
      wv[i][j] = A(1);
      dw[i][j] = db[i][j] = A(0);
    }
  if (w) load_tile<S, A, V, K>(w, cols, lane, wv);
  A inv_cols = A(1) / A(cols);
  for (int64_t row = blockIdx.x * int64_t(kParamWarps) + warp; row < rows;
       row += int64_t(gridDim.x) * kParamWarps) {
    A g[K][V], xv[K][V];
    load_tile<S, A, V, K>(dy + row * cols, cols, lane, g);  // padding: g = 0 adds nothing below
    load_tile<S, A, V, K>(x + row * cols, cols, lane, xv);
    A mu = mean[row], rs = rstd[row];
    A sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A xhat = (xv[i][j] - mu) * rs;
        xv[i][j] = xhat;
        dw[i][j] += g[i][j] * xhat;
        db[i][j] += g[i][j];
        A gw = g[i][j] * wv[i][j];
        sum_g += gw;
        sum_gx += gw * xhat;
      }
    if (!dx) continue;
    A mean_g = warp_sum(sum_g) * inv_cols, mean_gx = warp_sum(sum_gx) * inv_cols;
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) g[i][j] = rs * (g[i][j] * wv[i][j] - mean_g - xv[i][j] * mean_gx);
    store_tile<S, A, V, K>(dx + row * cols, cols, lane, g);
  }
  if (!partial_dw) return;  // uniform over the grid
  for (int k = 0; k < kParamWarps; ++k) {
    if (warp == k) {
#pragma unroll
      for (int i = 0; i < K; ++i) {
        int c = tile_col<V>(i, lane);
        if (c >= cols) continue;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          smem[c + j] = k == 0 ? dw[i][j] : smem[c + j] + dw[i][j];
          smem[cols + c + j] = k == 0 ? db[i][j] : smem[cols + c + j] + db[i][j];
        }
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    partial_dw[int64_t(blockIdx.x) * cols + c] = smem[c];
    partial_db[int64_t(blockIdx.x) * cols + c] = smem[cols + c];
  }
}

template <typename S, typename A, int V>
__global__ void __launch_bounds__(kMaxBlockThreads) layer_norm_backward_block(const S* dy, const S* x, const S* w, const A* mean,
                                          const A* rstd, S* dx, int64_t cols) {
  int64_t base = int64_t(blockIdx.x) * cols;
  int64_t packs = cols / V;
  A mu = mean[blockIdx.x], rs = rstd[blockIdx.x];
  A sum_g = 0, sum_gx = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A g[V], xv[V], wv[V];
    load_vec<S, A, V>(dy + base + p * V, g);
    load_vec<S, A, V>(x + base + p * V, xv);
    if (w) load_vec<S, A, V>(w + p * V, wv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A gw = w ? g[j] * wv[j] : g[j];
      sum_g += gw;
      sum_gx += gw * (xv[j] - mu) * rs;
    }
  }
  A mean_g = block_sum(sum_g) / A(cols), mean_gx = block_sum(sum_gx) / A(cols);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A g[V], xv[V], wv[V];
    load_vec<S, A, V>(dy + base + p * V, g);
    load_vec<S, A, V>(x + base + p * V, xv);
    if (w) load_vec<S, A, V>(w + p * V, wv);
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = rs * ((w ? g[j] * wv[j] : g[j]) - mean_g - (xv[j] - mu) * rs * mean_gx);
    store_vec<S, A, V>(dx + base + p * V, g);
  }
}

// dweight/dbias partials for long rows: a 32-column x row-chunk tile per
// block, thread (tx, ty) walking rows ty, ty + 8, ... of column tx.
constexpr int kColTile = 32, kColRows = 8;

template <typename S, typename A>
__global__ void layer_norm_param_grad_cols(const S* dy, const S* x, const A* mean, const A* rstd,
                                           int64_t rows, int64_t cols, int64_t rows_per_chunk,
                                           A* partial_dw, A* partial_db) {
  __shared__ A sw[kColRows][kColTile + 1], sb[kColRows][kColTile + 1];
  int tx = threadIdx.x, ty = threadIdx.y;
  int64_t c = int64_t(blockIdx.x) * kColTile + tx;
  int64_t r0 = int64_t(blockIdx.y) * rows_per_chunk;
  int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A aw = 0, ab = 0;
  if (c < cols) {
    for (int64_t r = r0 + ty; r < r1; r += kColRows) {
      A g = static_cast<A>(dy[r * cols + c]);
      aw += g * (static_cast<A>(x[r * cols + c]) - mean[r]) * rstd[r];
      ab += g;
    }
  }
  sw[ty][tx] = aw;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && c < cols) {
    for (int k = 1; k < kColRows; ++k) {
      aw += sw[k][tx];
      ab += sb[k][tx];
    }
    partial_dw[int64_t(blockIdx.y) * cols + c] = aw;
    partial_db[int64_t(blockIdx.y) * cols + c] = ab;
  }
}

// out_y[c] = sum_p partial_y[p, c] for y = blockIdx.y in {dweight, dbias};
// a null output is skipped.
template <typename A, typename S>
__global__ void __launch_bounds__(1024) sum_partials(const A* partial_dw, const A* partial_db, S* dw, S* db, int64_t parts,
                             int64_t cols) {
  __shared__ A buf[32][33];
  const A* partial = blockIdx.y == 0 ? partial_dw : partial_db;
  S* out = blockIdx.y == 0 ? dw : db;
  if (!out) return;  // uniform over the block
  int tx = threadIdx.x, ty = threadIdx.y;
  int64_t c = int64_t(blockIdx.x) * 32 + tx;
  A acc = 0;
  if (c < cols) {
#pragma unroll 4
    for (int64_t p = ty; p < parts; p += 32) acc += partial[p * cols + c];
  }
  buf[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < cols) {
    for (int k = 1; k < 32; ++k) acc += buf[k][tx];
    out[c] = static_cast<S>(acc);
  }
}

// ---- launch helpers ----

template <typename F> void visit_floating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    case DType::BFloat16: f(BFloat16{}); return;
    default: MINIDL_FAIL("nn_functional (cuda): expected a floating dtype, got ", dtype);
  }
}

bool aligned16(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined() && reinterpret_cast<uintptr_t>(t->raw_data()) % 16 != 0) return false;
  return true;
}

template <typename S> constexpr int kVec = 16 / static_cast<int>(sizeof(S));

// Calls f(Int<V>, Int<K>) with the register tile for rows of `cols`
// elements (V-wide accesses when the row length and pointers allow, K
// accesses per lane); returns false when rows are too long for one warp.
template <typename S, typename F> bool with_warp_tile(int64_t cols, bool aligned, F&& f) {
  auto pick = [&](auto vec) -> bool {
    constexpr int V = decltype(vec)::value;
    constexpr int max_iters = kMaxLaneElems / V < kMaxIters ? kMaxLaneElems / V : kMaxIters;
    int64_t iters = (cols + 32 * V - 1) / (32 * V);
    if (iters <= 1) return f(vec, Int<1>{}), true;
    if (iters <= 2) return f(vec, Int<2>{}), true;
    if constexpr (max_iters >= 4)
      if (iters <= 4) return f(vec, Int<4>{}), true;
    if constexpr (max_iters >= 8)
      if (iters <= 8) return f(vec, Int<8>{}), true;
    return false;
  };
  if (aligned && cols % kVec<S> == 0 && pick(Int<kVec<S>>{})) return true;
  return pick(Int<1>{});
}

// Calls f(Int<V>) for a block-per-row kernel.
template <typename S, typename F> void with_block_vec(int64_t cols, bool aligned, F&& f) {
  if (aligned && cols % kVec<S> == 0) f(Int<kVec<S>>{});
  else f(Int<1>{});
}

unsigned warp_row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps); }
int row_block_threads(int64_t cols) { return cols >= 8192 ? kMaxBlockThreads : cols >= 2048 ? 512 : 256; }

template <typename T> const T* cptr(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.raw_data()) : nullptr;
}
template <typename T> T* mptr(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.raw_data()) : nullptr;
}

}  // namespace

void softmax_forward(const Tensor& x, int64_t rows, int64_t cols, bool log, const Tensor& y) {
  if (rows == 0) return;
  visit_floating(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* xp = cptr<S>(x);
    S* yp = mptr<S>(y);
    bool aligned = aligned16({&x, &y});
    bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
      softmax_forward_warp<S, A, decltype(vec)::value, decltype(iters)::value>
          <<<warp_row_blocks(rows), kRowWarps * 32, 0, stream()>>>(xp, yp, rows, static_cast<int>(cols), log);
    });
    if (!warp) {
      with_block_vec<S>(cols, aligned, [&](auto vec) {
        softmax_forward_block<S, A, decltype(vec)::value>
            <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(xp, yp, cols, log);
      });
    }
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void softmax_backward(const Tensor& y, const Tensor& dy, int64_t rows, int64_t cols, bool log,
                      const Tensor& dx) {
  if (rows == 0) return;
  visit_floating(y.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* yp = cptr<S>(y);
    const S* gp = cptr<S>(dy);
    S* dp = mptr<S>(dx);
    bool aligned = aligned16({&y, &dy, &dx});
    bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
      softmax_backward_warp<S, A, decltype(vec)::value, decltype(iters)::value>
          <<<warp_row_blocks(rows), kRowWarps * 32, 0, stream()>>>(yp, gp, dp, rows, static_cast<int>(cols), log);
    });
    if (!warp) {
      with_block_vec<S>(cols, aligned, [&](auto vec) {
        softmax_backward_block<S, A, decltype(vec)::value>
            <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(yp, gp, dp, cols, log);
      });
    }
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t rows, int64_t cols,
                           int64_t ignore_index, const Tensor& loss, const Tensor& lse,
                           const Tensor& count) {
  visit_floating(logits.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* xp = cptr<S>(logits);
    const int32_t* tp = cptr<int32_t>(targets);
    A* lp = mptr<A>(lse);
    Tensor row_loss = Tensor::empty({std::max<int64_t>(rows, 1)}, lse.options());
    A* rp = mptr<A>(row_loss);
    if (rows > 0) {
      bool aligned = aligned16({&logits});
      bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
        cross_entropy_forward_warp<S, A, decltype(vec)::value, decltype(iters)::value>
            <<<warp_row_blocks(rows), kRowWarps * 32, 0, stream()>>>(xp, tp, rows, static_cast<int>(cols),
                                                                     ignore_index, rp, lp);
      });
      if (!warp) {
        with_block_vec<S>(cols, aligned, [&](auto vec) {
          cross_entropy_forward_block<S, A, decltype(vec)::value>
              <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(xp, tp, cols,
                                                                                      ignore_index, rp, lp);
        });
      }
      MINIDL_CUDA_LAUNCH_CHECK();
    }
    cross_entropy_finalize<S, A><<<1, 1024, 0, stream()>>>(rp, tp, rows, ignore_index, mptr<S>(loss),
                                                          mptr<A>(count));
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, const Tensor& count, int64_t rows, int64_t cols,
                            int64_t ignore_index, const Tensor& dlogits) {
  if (rows == 0) return;
  visit_floating(logits.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* gp = cptr<S>(grad);
    const A* np = cptr<A>(count);
    const S* xp = cptr<S>(logits);
    const int32_t* tp = cptr<int32_t>(targets);
    const A* lp = cptr<A>(lse);
    S* dp = mptr<S>(dlogits);
    bool aligned = aligned16({&logits, &dlogits});
    bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
      cross_entropy_backward_warp<S, A, decltype(vec)::value, decltype(iters)::value>
          <<<warp_row_blocks(rows), kRowWarps * 32, 0, stream()>>>(gp, np, xp, tp, lp, rows,
                                                                   static_cast<int>(cols), ignore_index, dp);
    });
    if (!warp) {
      with_block_vec<S>(cols, aligned, [&](auto vec) {
        cross_entropy_backward_block<S, A, decltype(vec)::value>
            <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(gp, np, xp, tp, lp, cols,
                                                                                    ignore_index, dp);
      });
    }
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t rows,
                        int64_t cols, double eps, const Tensor& y, const Tensor& mean,
                        const Tensor& rstd) {
  if (rows == 0) return;
  visit_floating(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* xp = cptr<S>(x);
    const S* wp = cptr<S>(weight);
    const S* bp = cptr<S>(bias);
    S* yp = mptr<S>(y);
    A* mp = mptr<A>(mean);
    A* rp = mptr<A>(rstd);
    bool aligned = aligned16({&x, &weight, &bias, &y});
    bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
      layer_norm_forward_warp<S, A, decltype(vec)::value, decltype(iters)::value>
          <<<warp_row_blocks(rows), kRowWarps * 32, 0, stream()>>>(xp, wp, bp, yp, mp, rp, rows,
                                                                   static_cast<int>(cols), A(eps));
    });
    if (!warp) {
      with_block_vec<S>(cols, aligned, [&](auto vec) {
        layer_norm_forward_block<S, A, decltype(vec)::value>
            <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(xp, wp, bp, yp, mp, rp,
                                                                                    cols, A(eps));
      });
    }
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, int64_t rows, int64_t cols,
                         const Tensor& dx, const Tensor& dweight, const Tensor& dbias) {
  if (rows == 0) return;
  visit_floating(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* gp = cptr<S>(dy);
    const S* xp = cptr<S>(x);
    const S* wp = cptr<S>(weight);
    const A* mp = cptr<A>(mean);
    const A* rp = cptr<A>(rstd);
    S* dxp = mptr<S>(dx);
    bool params = dweight.defined() || dbias.defined();
    TensorOptions stats = mean.options();
    int64_t sms = multiprocessor_count();
    bool aligned = aligned16({&dy, &x, &weight, &dx});
    Tensor partial_dw, partial_db;  // (parts, cols) column sums, reduced at the end
    int64_t parts = 0;
    bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
      constexpr int V = decltype(vec)::value, K = decltype(iters)::value;
      // A persistent grid when the parameter sums are wanted (few partial rows
      // to add up), a block per kParamWarps rows otherwise.
      auto kernel = layer_norm_backward_warp<S, A, V, K>;
      size_t smem = params ? 2 * static_cast<size_t>(cols) * sizeof(A) : 0;
      int64_t blocks = (rows + kParamWarps - 1) / kParamWarps;
      if (params) {
        // One wave of resident blocks (the wide tiles use many registers).
        static int per_sm = [&] {
          int n = 0;
          MINIDL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kParamWarps * 32, smem));
          return std::max(n, 1);
        }();
        blocks = std::min<int64_t>(blocks, per_sm * sms);
        parts = blocks;
        partial_dw = Tensor::empty({parts, cols}, stats);
        partial_db = Tensor::empty({parts, cols}, stats);
      }
      kernel<<<static_cast<unsigned>(blocks), kParamWarps * 32, smem, stream()>>>(
          gp, xp, wp, mp, rp, dxp, mptr<A>(partial_dw), mptr<A>(partial_db), rows, static_cast<int>(cols));
      MINIDL_CUDA_LAUNCH_CHECK();
    });
    if (!warp) {
      if (dxp) {
        with_block_vec<S>(cols, aligned, [&](auto vec) {
          layer_norm_backward_block<S, A, decltype(vec)::value>
              <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(gp, xp, wp, mp, rp, dxp,
                                                                                      cols);
        });
        MINIDL_CUDA_LAUNCH_CHECK();
      }
      if (params) {
        int64_t tiles = (cols + kColTile - 1) / kColTile;
        int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((4 * sms + tiles - 1) / tiles, rows / 64));
        int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
        parts = (rows + rows_per_chunk - 1) / rows_per_chunk;
        partial_dw = Tensor::empty({parts, cols}, stats);
        partial_db = Tensor::empty({parts, cols}, stats);
        dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(parts));
        layer_norm_param_grad_cols<S, A><<<grid, dim3(kColTile, kColRows), 0, stream()>>>(
            gp, xp, mp, rp, rows, cols, rows_per_chunk, mptr<A>(partial_dw), mptr<A>(partial_db));
        MINIDL_CUDA_LAUNCH_CHECK();
      }
    }
    if (params) {
      dim3 grid(static_cast<unsigned>((cols + 31) / 32), 2);
      sum_partials<A, S><<<grid, dim3(32, 32), 0, stream()>>>(cptr<A>(partial_dw), cptr<A>(partial_db),
                                                              mptr<S>(dweight), mptr<S>(dbias), parts, cols);
      MINIDL_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace minidl::cuda
