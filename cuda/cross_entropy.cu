// CUDA cross-entropy (fused log-softmax + NLL), forward and backward
// (launchers declared in cuda/nn_functional.h). Row statistics as in
// softmax.cu; the mean over counted rows is taken by the row kernel's last
// block in a fixed order, so the loss is deterministic.
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

// ---- cross entropy ----

// Row loss lse - x[target] (0 when ignored, NaN for an out-of-range target).
template <typename S, typename A>
__device__ __forceinline__ A row_nll(const S* xr, int64_t target, int64_t cols, int64_t ignore, A lse) {
  if (target == ignore) return A(0);
  if (target < 0 || target >= cols) return nan<A>();
  return lse - static_cast<A>(xr[target]);
}

// The mean of the row losses over the rows that count, written by the last
// block of the row kernel to finish, in the order of a 1024-thread block
// (deterministic).
static __device__ unsigned int g_rows_done;

template <typename S, typename A>
__device__ void finish_mean(const A* row_loss, const int32_t* targets, int64_t rows, int64_t ignore, S* loss,
                            A* count) {
  if (!last_block_to_arrive(&g_rows_done, gridDim.x)) return;
  A sums[2];  // the row losses and the rows that count, in one pass
  strided_sums_as<1024>(
      rows,
      [&](int64_t r, A (&v)[2]) {
        v[0] = __ldcg(row_loss + r);
        v[1] = targets[r] != ignore ? A(1) : A(0);
      },
      sums);
  if (threadIdx.x == 0) {
    count[0] = sums[1];
    loss[0] = static_cast<S>(sums[1] > 0 ? sums[0] / sums[1] : A(0));
  }
}

template <typename S, typename A, int V, int K>
__device__ __forceinline__ void cross_entropy_row_warp(const S* x, const int32_t* targets, int64_t row, int cols,
                                                       int64_t ignore, A* row_loss, A* lse) {
  int lane = threadIdx.x % 32;
  const S* xr = x + row * cols;
  A v[K][V];
  load_tile<S, A, V, K>(xr, cols, lane, v, -inf<A>());
  A m, s;
  warp_row_max_sum(v, cols, lane, false, m, s);
  if (lane == 0) {
    A l = m + log_(s);
    lse[row] = l;
    row_loss[row] = row_nll<S, A>(xr, targets[row], cols, ignore, l);
  }
}

template <typename S, typename A, int V, int K>
__global__ void cross_entropy_forward_warp(const S* x, const int32_t* targets, int64_t rows, int cols,
                                           int64_t ignore, A* row_loss, A* lse, S* loss, A* count) {
  const int64_t row = warp_row();
  if (row < rows) cross_entropy_row_warp<S, A, V, K>(x, targets, row, cols, ignore, row_loss, lse);
  finish_mean(row_loss, targets, rows, ignore, loss, count);
}

template <typename S, typename A, int V>
__global__ void __launch_bounds__(kMaxBlockThreads) cross_entropy_forward_block(const S* x, const int32_t* targets,
                                                                                int64_t rows, int64_t cols, int64_t ignore,
                                                                                A* row_loss, A* lse, S* loss, A* count) {
  int64_t row = blockIdx.x;
  const S* xr = x + row * cols;
  A m, s;
  block_row_max_sum<S, A, V>(xr, cols, m, s);
  if (threadIdx.x == 0) {
    A l = m + log_(s);
    lse[row] = l;
    row_loss[row] = row_nll<S, A>(xr, targets[row], cols, ignore, l);
  }
  finish_mean(row_loss, targets, rows, ignore, loss, count);
}

// No rows: the loss and the count are 0.
template <typename S, typename A> __global__ void cross_entropy_empty(S* loss, A* count) {
  count[0] = A(0);
  loss[0] = S(0.0f);
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

}  // namespace

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
    S* loss_p = mptr<S>(loss);
    A* count_p = mptr<A>(count);
    if (rows > 0) {  // the row kernel's last block also writes the mean
      bool aligned = aligned16({&logits});
      bool warp = with_warp_tile<S>(cols, aligned, [&](auto vec, auto iters) {
        cross_entropy_forward_warp<S, A, decltype(vec)::value, decltype(iters)::value>
            <<<warp_row_blocks(rows), kRowWarps * 32, 0, stream()>>>(xp, tp, rows, static_cast<int>(cols),
                                                                     ignore_index, rp, lp, loss_p, count_p);
      });
      if (!warp) {
        with_block_vec<S>(cols, aligned, [&](auto vec) {
          cross_entropy_forward_block<S, A, decltype(vec)::value>
              <<<static_cast<unsigned>(rows), row_block_threads(cols), 0, stream()>>>(
                  xp, tp, rows, cols, ignore_index, rp, lp, loss_p, count_p);
        });
      }
    } else {
      cross_entropy_empty<S, A><<<1, 1, 0, stream()>>>(loss_p, count_p);
    }
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

}  // namespace minidl::cuda
