#pragma once
// The CUDA layer-norm kernels and their launchers, shared by layer_norm.cu
// (ops::layer_norm) and dropout_add_layer_norm.cu, which runs the same
// kernels with a fused prologue (the row is residual + dropout(h), written
// out as it is read) and epilogue (the row gradient plus the sum's other
// gradient is d residual, and its masked copy d h). The backward computes dx
// per row and the weight/bias gradients from per-block partial column sums,
// combined in a fixed order (no atomics): deterministic.
#include <algorithm>
#include <cstdint>

#include "core/generator.h"
#include "core/philox.h"
#include "core/scalar_math.h"
#include "cuda/dropout_mask.cuh"
#include "cuda/reductions.cuh"
#include "cuda/row_kernels.cuh"
#include "cuda/runtime.h"

namespace minidl::cuda::layer_norm_detail {

using namespace rows;
using math::sqrt_;

constexpr int kParamWarps = 8;  // warps per block in the fused layer-norm backward

// Forward prologue: the layer norm's input row is sum = residual + dropout(h),
// stored to `sum` (the op's first output) as it is made.
template <typename S> struct ResidualIn {
  const S* h = nullptr;
  const S* residual = nullptr;
  S* sum = nullptr;
  DropoutMask mask;
};

// Backward epilogue: the layer-norm input gradient g plus dsum (the sum's
// gradient from its other users; null when it has none) is d residual,
// written to dx; dh = mask * scale * that, written when dh is not null.
template <typename S> struct ResidualGrad {
  const S* dsum = nullptr;
  S* dh = nullptr;
  DropoutMask mask;
};

// v = residual + dropout(h) at elements index .. index + V - 1, also stored to in.sum.
template <typename S, typename A, int V>
__device__ __forceinline__ void residual_in_vec(const ResidualIn<S>& in, int64_t index, A (&v)[V]) {
  A hv[V];
  load_vec<S, A, V>(in.h + index, hv);
  load_vec<S, A, V>(in.residual + index, v);
  if (in.mask.keep_threshold > 0) {
    bool keep[V];
    keep_mask<V>(in.mask, index, keep);
    A scale = static_cast<A>(in.mask.scale);
#pragma unroll
    for (int j = 0; j < V; ++j) hv[j] = keep[j] ? round_to<S>(hv[j] * scale) : A(0);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = round_to<S>(v[j] + hv[j]);
  store_vec<S, A, V>(in.sum + index, v);
}

// Stores d residual = g + dsum to dx and its masked copy to dh, at elements
// index .. index + V - 1 (g: the layer norm's input gradient).
template <typename S, typename A, int V>
__device__ __forceinline__ void residual_grad_vec(const ResidualGrad<S>& rg, int64_t index, A (&g)[V], S* dx) {
#pragma unroll
  for (int j = 0; j < V; ++j) g[j] = round_to<S>(g[j]);
  if (rg.dsum) {
    A d[V];
    load_vec<S, A, V>(rg.dsum + index, d);
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = round_to<S>(g[j] + d[j]);
  }
  if (dx) store_vec<S, A, V>(dx + index, g);
  if (!rg.dh) return;
  bool keep[V];
  if (rg.mask.keep_threshold > 0) {
    keep_mask<V>(rg.mask, index, keep);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) keep[j] = true;
  }
  A scale = static_cast<A>(rg.mask.scale), dh[V];
#pragma unroll
  for (int j = 0; j < V; ++j) dh[j] = keep[j] ? g[j] * scale : A(0);
  store_vec<S, A, V>(rg.dh + index, dh);
}

template <typename S, typename A, int V, int K, bool kFused>
__global__ void layer_norm_forward_warp(const S* x, const S* w, const S* b, S* y, A* mean, A* rstd,
                                        int64_t rows, int cols, A eps, ResidualIn<S> in) {
  int64_t row = warp_row();
  if (row >= rows) return;
  int lane = threadIdx.x % 32;
  A v[K][V];
  if constexpr (kFused) {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      int c = tile_col<V>(i, lane);
      if (c < cols) {
        residual_in_vec<S, A, V>(in, row * cols + c, v[i]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[i][j] = A(0);
      }
    }
  } else {
    load_tile<S, A, V, K>(x + row * cols, cols, lane, v);
  }
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

// Block per row; fused, the first pass makes and stores the sum and the
// later passes read it back (each thread its own packs).
template <typename S, typename A, int V, bool kFused>
__global__ void __launch_bounds__(kMaxBlockThreads)
    layer_norm_forward_block(const S* x, const S* w, const S* b, S* y, A* mean, A* rstd, int64_t cols, A eps,
                             ResidualIn<S> in) {
  int64_t row = blockIdx.x;
  const S* xr = (kFused ? in.sum : x) + row * cols;
  S* yr = y + row * cols;
  int64_t packs = cols / V;
  A s = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    A v[V];
    if constexpr (kFused) residual_in_vec<S, A, V>(in, row * cols + p * V, v);
    else load_vec<S, A, V>(xr + p * V, v);
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

// The parameter gradients from the grid's partial rows without a second
// launch, in sum_partials' order (so the same bits): row p of the partials
// belongs to group p mod kParamGroups; the last block of a group to finish
// sums the group's rows in order into row parts + group, and the last group
// to finish adds the group sums in order and writes dweight/dbias (either may
// be null). Needs room for parts + kParamGroups rows in each partial.
constexpr int kParamGroups = 32;
static __device__ unsigned int g_param_group_arrivals[kParamGroups];
static __device__ unsigned int g_param_groups_done;

template <typename A, typename S>
__device__ void finish_param_grads(A* partial_dw, A* partial_db, S* dweight, S* dbias, int64_t parts, int cols) {
  const int64_t group = blockIdx.x % kParamGroups;
  const auto members = static_cast<unsigned>((parts - group + kParamGroups - 1) / kParamGroups);
  if (!last_block_to_arrive(&g_param_group_arrivals[group], members)) return;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    A sw = 0, sb = 0;
    // Unrolled: many loads in flight (the tail of the kernel); the adds keep their order.
#pragma unroll 8
    for (int64_t p = group; p < parts; p += kParamGroups) {
      sw += __ldcg(partial_dw + p * cols + c);
      sb += __ldcg(partial_db + p * cols + c);
    }
    partial_dw[(parts + group) * cols + c] = sw;
    partial_db[(parts + group) * cols + c] = sb;
  }
  const auto groups = static_cast<unsigned>(parts < kParamGroups ? parts : kParamGroups);
  if (!last_block_to_arrive(&g_param_groups_done, groups)) return;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    A sw = __ldcg(partial_dw + parts * cols + c), sb = __ldcg(partial_db + parts * cols + c);
#pragma unroll
    for (int k = 1; k < kParamGroups; ++k) {  // empty groups add the zero sum_partials adds
      sw += k < static_cast<int>(groups) ? __ldcg(partial_dw + (parts + k) * cols + c) : A(0);
      sb += k < static_cast<int>(groups) ? __ldcg(partial_db + (parts + k) * cols + c) : A(0);
    }
    if (dweight) dweight[c] = static_cast<S>(sw);
    if (dbias) dbias[c] = static_cast<S>(sb);
  }
}

// dx for one row (when dx is given; fused, through the residual epilogue)
// and, per block, partial dweight/dbias: each warp walks rows warp, warp +
// all warps, ... keeping its column sums in registers; the block adds its
// warps' sums warp by warp in shared memory and writes row blockIdx.x of
// partial_dw / partial_db (cols each).
template <typename S, typename A, int V, int K, bool kFused>
__global__ void layer_norm_backward_warp(const S* dy, const S* x, const S* w, const A* mean,
                                         const A* rstd, S* dx, A* partial_dw, A* partial_db, S* dweight,
                                         S* dbias, int64_t rows, int cols, ResidualGrad<S> rg) {
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
  bool row_grads = dx || (kFused && rg.dh);
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
    if (!row_grads) continue;
    A mean_g = warp_sum(sum_g) * inv_cols, mean_gx = warp_sum(sum_gx) * inv_cols;
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int j = 0; j < V; ++j) g[i][j] = rs * (g[i][j] * wv[i][j] - mean_g - xv[i][j] * mean_gx);
    if constexpr (kFused) {
#pragma unroll
      for (int i = 0; i < K; ++i) {
        int c = tile_col<V>(i, lane);
        if (c < cols) residual_grad_vec<S, A, V>(rg, row * cols + c, g[i], dx);
      }
    } else {
      store_tile<S, A, V, K>(dx + row * cols, cols, lane, g);
    }
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
  finish_param_grads<A, S>(partial_dw, partial_db, dweight, dbias, gridDim.x, cols);
}

template <typename S, typename A, int V, bool kFused>
__global__ void __launch_bounds__(kMaxBlockThreads)
    layer_norm_backward_block(const S* dy, const S* x, const S* w, const A* mean, const A* rstd, S* dx,
                              int64_t cols, ResidualGrad<S> rg) {
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
    if constexpr (kFused) residual_grad_vec<S, A, V>(rg, base + p * V, g, dx);
    else store_vec<S, A, V>(dx + base + p * V, g);
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

// The fused tensors of dropout_add_layer_norm (undefined for layer_norm).
struct ResidualInTensors {
  Tensor h, residual, sum;
  DropoutMask mask;
};
struct ResidualGradTensors {
  Tensor dsum, dh;
  DropoutMask mask;
};

// y = layer_norm(x) (mean, rstd per row); fused, x is the sum made from
// in.h and in.residual, and is undefined here.
template <bool kFused>
void forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t rows, int64_t cols, double eps,
             const Tensor& y, const Tensor& mean, const Tensor& rstd, const ResidualInTensors& fused = {}) {
  if (rows == 0) return;
  visit_floating(y.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* xp = cptr<S>(x);
    const S* wp = cptr<S>(weight);
    const S* bp = cptr<S>(bias);
    S* yp = mptr<S>(y);
    A* mp = mptr<A>(mean);
    A* rp = mptr<A>(rstd);
    ResidualIn<S> in{cptr<S>(fused.h), cptr<S>(fused.residual), mptr<S>(fused.sum), fused.mask};
    bool aligned = aligned16({&x, &weight, &bias, &y, &fused.h, &fused.residual, &fused.sum});
    bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
      layer_norm_forward_warp<S, A, decltype(vec)::value, decltype(iters)::value, kFused>
          <<<warp_row_blocks(rows), kRowWarps * 32, 0, stream()>>>(xp, wp, bp, yp, mp, rp, rows,
                                                                   static_cast<int>(cols), A(eps), in);
    });
    if (!warp) {
      with_block_vec<S>(cols, aligned, [&](auto vec) {
        layer_norm_forward_block<S, A, decltype(vec)::value, kFused>
            <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(xp, wp, bp, yp, mp, rp,
                                                                                    cols, A(eps), in);
      });
    }
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

// dx (when defined; fused, through the residual epilogue), dweight, dbias of
// layer_norm(x) from dy.
template <bool kFused>
void backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
              int64_t rows, int64_t cols, const Tensor& dx, const Tensor& dweight, const Tensor& dbias,
              const ResidualGradTensors& fused = {}) {
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
    ResidualGrad<S> rg{cptr<S>(fused.dsum), mptr<S>(fused.dh), fused.mask};
    bool row_grads = dxp || rg.dh;
    bool params = dweight.defined() || dbias.defined();
    TensorOptions stats = mean.options();
    int64_t sms = multiprocessor_count();
    bool aligned = aligned16({&dy, &x, &weight, &dx, &fused.dsum, &fused.dh});
    Tensor partial_dw, partial_db;  // (parts, cols) column sums, reduced at the end
    int64_t parts = 0;
    bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
      constexpr int V = decltype(vec)::value, K = decltype(iters)::value;
      // A persistent grid when the parameter sums are wanted (few partial rows
      // to add up), a block per kParamWarps rows otherwise.
      auto kernel = layer_norm_backward_warp<S, A, V, K, kFused>;
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
        // Partial rows, then the group sums of finish_param_grads.
        partial_dw = Tensor::empty({blocks + kParamGroups, cols}, stats);
        partial_db = Tensor::empty({blocks + kParamGroups, cols}, stats);
      }
      kernel<<<static_cast<unsigned>(blocks), kParamWarps * 32, smem, stream()>>>(
          gp, xp, wp, mp, rp, dxp, mptr<A>(partial_dw), mptr<A>(partial_db), mptr<S>(dweight), mptr<S>(dbias),
          rows, static_cast<int>(cols), rg);
      MINIDL_CUDA_LAUNCH_CHECK();
    });
    if (!warp) {
      if (row_grads) {
        with_block_vec<S>(cols, aligned, [&](auto vec) {
          layer_norm_backward_block<S, A, decltype(vec)::value, kFused>
              <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(gp, xp, wp, mp, rp, dxp,
                                                                                      cols, rg);
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
    if (params && !warp) {  // the warp kernel finished the sums itself
      dim3 grid(static_cast<unsigned>((cols + 31) / 32), 2);
      sum_partials<A, S><<<grid, dim3(32, 32), 0, stream()>>>(cptr<A>(partial_dw), cptr<A>(partial_db),
                                                              mptr<S>(dweight), mptr<S>(dbias), parts, cols);
      MINIDL_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace minidl::cuda::layer_norm_detail
