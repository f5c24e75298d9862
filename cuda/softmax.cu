// CUDA softmax and log-softmax over the last dim, forward and backward
// (launchers declared in cuda/nn_functional.h). Rows that fit one warp's
// registers take a warp per row and touch global memory once; longer rows
// take a block per row with the online max/sum (cuda/row_kernels.cuh).
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

// ---- softmax ----

template <typename S, typename A, int V, int K>
__global__ void softmax_forward_warp(const S* x, S* y, int64_t rows, int cols, bool log) {
  int64_t row = warp_row();
  if (row >= rows) return;  // whole warps leave together
  int lane = threadIdx.x % 32;
  A v[K][V];
  load_tile<S, A, V, K>(x + row * cols, cols, lane, v, -inf<A>());
  A m, s;
  warp_row_max_sum(v, cols, lane, !log, m, s);
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
  A m, s;
  block_row_max_sum<S, A, V>(xr, cols, m, s);
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

}  // namespace minidl::cuda
