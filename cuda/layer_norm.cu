// CUDA layer norm over the last dim, forward and backward (launchers
// declared in cuda/nn_functional.h). The backward computes dx per row and the
// weight/bias gradients from per-block partial column sums, combined in a
// fixed order (no atomics).
#include <algorithm>
#include <cstdint>

#include "core/scalar_math.h"
#include "cuda/nn_functional.h"
#include "cuda/reductions.cuh"
#include "cuda/row_kernels.cuh"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

using namespace rows;
using math::exp_;
using math::log_;
using math::sqrt_;

constexpr int kParamWarps = 8;  // warps per block in the fused layer-norm backward

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

}  // namespace

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
