// CUDA reductions. Rows (the last dim) are reduced by one warp per row when
// they are short and one block per row otherwise; a few very long rows are
// split over several blocks (partial sums, then a second pass) so a full
// reduction uses the whole GPU. Columns (sum over leading dims) are reduced
// in place by 32-column tiles, without transposing. Every result is
// deterministic: partials are combined in a fixed order, never by atomics.
#include <algorithm>

#include "core/scalar_math.h"
#include "cuda/reduce.h"
#include "cuda/reductions.cuh"
#include "cuda/row_kernels.cuh"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

constexpr int kWarpRowsMaxCols = 256;  // up to here a warp per row beats a block per row
constexpr int kWarpsPerBlock = 8;

// ---- sums ----

template <typename In, typename Out, typename A>
__global__ void sum_rows_warp(const In* x, Out* y, int64_t rows, int64_t cols, A scale) {
  int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  int lane = threadIdx.x % 32;
  const In* xr = x + row * cols;
  A acc = 0;
  for (int64_t c = lane; c < cols; c += 32) acc += static_cast<A>(xr[c]);
  acc = warp_sum(acc);
  if (lane == 0) y[row] = from_compute<Out>(acc * scale);
}

// Block (row, split) sums elements [split * chunk, (split + 1) * chunk) of
// its row into y[row * splits + split].
template <typename In, typename Out, typename A>
__global__ void sum_rows_block(const In* x, Out* y, int64_t cols, int64_t chunk, A scale) {
  const In* xr = x + int64_t(blockIdx.x) * cols;
  int64_t begin = int64_t(blockIdx.y) * chunk;
  int64_t end = begin + chunk < cols ? begin + chunk : cols;
  A acc = 0;
#pragma unroll 4
  for (int64_t c = begin + threadIdx.x; c < end; c += blockDim.x) acc += static_cast<A>(xr[c]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) y[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = from_compute<Out>(acc * scale);
}

template <typename In, typename Out, typename A>
void launch_sum_rows(const In* x, Out* y, int64_t rows, int64_t cols, double scale) {
  if (cols <= kWarpRowsMaxCols) {
    int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    sum_rows_warp<In, Out, A><<<rows::grid_x(blocks, "sum"), kWarpsPerBlock * 32, 0, stream()>>>(
        x, y, rows, cols, A(scale));
  } else {
    int threads = cols >= 8192 ? 1024 : cols >= 2048 ? 512 : 256;
    sum_rows_block<In, Out, A><<<dim3(rows::grid_x(rows, "sum"), 1), threads, 0, stream()>>>(
        x, y, cols, cols, A(scale));
  }
  MINIDL_CUDA_LAUNCH_CHECK();
}

// Tile (32 columns) x (row chunk): thread (tx, ty) walks rows ty, ty + 8, ...
// of column tx; y[chunk, col] gets the chunk's sum.
constexpr int kColTile = 32, kColRows = 8;

template <typename In, typename Out, typename A>
__global__ void sum_cols(const In* x, Out* y, int64_t rows, int64_t cols, int64_t rows_per_chunk,
                         A scale) {
  __shared__ A partial[kColRows][kColTile + 1];
  int tx = threadIdx.x, ty = threadIdx.y;
  int64_t c = int64_t(blockIdx.x) * kColTile + tx;
  int64_t r0 = int64_t(blockIdx.y) * rows_per_chunk;
  int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A acc = 0;
  if (c < cols) {
#pragma unroll 4
    for (int64_t r = r0 + ty; r < r1; r += kColRows) acc += static_cast<A>(x[r * cols + c]);
  }
  partial[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < cols) {
    for (int k = 1; k < kColRows; ++k) acc += partial[k][tx];
    y[int64_t(blockIdx.y) * cols + c] = from_compute<Out>(acc * scale);
  }
}

template <typename In, typename Out, typename A>
void launch_sum_cols(const In* x, Out* y, int64_t rows, int64_t cols, int64_t chunks, double scale) {
  int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  dim3 grid(static_cast<unsigned>((cols + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  sum_cols<In, Out, A><<<grid, dim3(kColTile, kColRows), 0, stream()>>>(x, y, rows, cols,
                                                                        rows_per_chunk, A(scale));
  MINIDL_CUDA_LAUNCH_CHECK();
}

// ---- max / argmax ----

// (a, ia) beats (b, ib): larger value, NaN over numbers, earlier index on
// ties; index -1 marks "no element yet".
template <typename C> __device__ __forceinline__ bool beats(C a, int ia, C b, int ib) {
  if (ib < 0) return ia >= 0;
  if (ia < 0) return false;
  bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

template <typename C> __device__ __forceinline__ void warp_argmax(C& v, int& i) {
  for (int o = 16; o > 0; o >>= 1) {
    C ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (beats(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

template <typename S, typename C>
__device__ __forceinline__ void scan_row(const S* xr, int64_t cols, int start, int step, C& v, int& i) {
  v = C(0);
  i = -1;
  for (int64_t c = start; c < cols; c += step) {
    C e = static_cast<C>(xr[c]);
    if (beats(e, static_cast<int>(c), v, i)) {
      v = e;
      i = static_cast<int>(c);
    }
  }
}

template <typename S, typename C>
__global__ void max_rows_warp(const S* x, S* values, int32_t* indices, int64_t rows, int64_t cols) {
  int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  int lane = threadIdx.x % 32;
  C v;
  int i;
  scan_row(x + row * cols, cols, lane, 32, v, i);
  warp_argmax(v, i);
  if (lane == 0) {
    if (values) values[row] = static_cast<S>(v);
    indices[row] = i;
  }
}

template <typename S, typename C>
__global__ void max_rows_block(const S* x, S* values, int32_t* indices, int64_t cols) {
  __shared__ C warp_v[32];
  __shared__ int warp_i[32];
  int64_t row = blockIdx.x;
  C v;
  int i;
  scan_row(x + row * cols, cols, threadIdx.x, blockDim.x, v, i);
  warp_argmax(v, i);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_v[warp] = v;
    warp_i[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    bool have = lane < static_cast<int>(blockDim.x / 32);
    v = have ? warp_v[lane] : C(0);
    i = have ? warp_i[lane] : -1;
    warp_argmax(v, i);
    if (lane == 0) {
      if (values) values[row] = static_cast<S>(v);
      indices[row] = i;
    }
  }
}

template <typename S>
__global__ void max_backward_kernel(const S* grad, const int32_t* indices, S* grad_in, int64_t n,
                                    int64_t cols) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    int64_t m = k / cols;
    grad_in[k] = k - m * cols == indices[m] ? grad[m] : static_cast<S>(compute_t<S>(0));
  }
}

}  // namespace

void sum_last(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out) {
  if (rows == 0) return;
  visit_dtype(in.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* x = static_cast<const S*>(in.raw_data());
    S* y = static_cast<S*>(out.raw_data());
    int64_t sms = multiprocessor_count();
    if (rows < sms && cols >= 65536) {
      // Few long rows: split each over several blocks, then sum the partials.
      int64_t splits = std::min<int64_t>((cols + 16383) / 16384, (4 * sms + rows - 1) / rows);
      int64_t chunk = (cols + splits - 1) / splits;
      splits = (cols + chunk - 1) / chunk;
      Tensor partial = Tensor::empty({rows, splits}, {dtype_of<A>(), in.device(), false});
      A* p = static_cast<A*>(partial.raw_data());
      sum_rows_block<S, A, A><<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(splits)), 1024,
                                0, stream()>>>(x, p, cols, chunk, A(1));
      MINIDL_CUDA_LAUNCH_CHECK();
      launch_sum_rows<A, S, A>(p, y, rows, splits, scale);
    } else {
      launch_sum_rows<S, S, A>(x, y, rows, cols, scale);
    }
  });
}

void sum_first(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out) {
  if (cols == 0) return;
  visit_dtype(in.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const S* x = static_cast<const S*>(in.raw_data());
    S* y = static_cast<S*>(out.raw_data());
    // Enough row chunks to fill the GPU, each at least 64 rows deep.
    int64_t tiles = (cols + kColTile - 1) / kColTile;
    int64_t chunks = std::max<int64_t>(
        1, std::min<int64_t>((4 * multiprocessor_count() + tiles - 1) / tiles, rows / 64));
    if (chunks == 1) {
      launch_sum_cols<S, S, A>(x, y, rows, cols, 1, scale);
      return;
    }
    int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    Tensor partial = Tensor::empty({chunks, cols}, {dtype_of<A>(), in.device(), false});
    A* p = static_cast<A*>(partial.raw_data());
    launch_sum_cols<S, A, A>(x, p, rows, cols, chunks, 1.0);
    launch_sum_cols<A, S, A>(p, y, chunks, cols, 1, scale);
  });
}

void max_last(const Tensor& in, int64_t rows, int64_t cols, const Tensor& values,
              const Tensor& indices) {
  if (rows == 0) return;
  visit_dtype(in.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* x = static_cast<const S*>(in.raw_data());
    S* v = values.defined() ? static_cast<S*>(values.raw_data()) : nullptr;
    int32_t* ix = static_cast<int32_t*>(indices.raw_data());
    if (cols <= kWarpRowsMaxCols) {
      int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
      max_rows_warp<S, C><<<rows::grid_x(blocks, "max"), kWarpsPerBlock * 32, 0, stream()>>>(
          x, v, ix, rows, cols);
    } else {
      int threads = cols >= 8192 ? 1024 : cols >= 2048 ? 512 : 256;
      max_rows_block<S, C><<<rows::grid_x(rows, "max"), threads, 0, stream()>>>(x, v, ix, cols);
    }
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void max_last_backward(const Tensor& grad, const Tensor& indices, int64_t rows, int64_t cols,
                       const Tensor& grad_in) {
  int64_t n = rows * cols;
  if (n == 0) return;
  visit_dtype(grad.dtype(), [&](auto tag) {
    using S = decltype(tag);
    max_backward_kernel<S><<<grid_for(n, 256), 256, 0, stream()>>>(
        static_cast<const S*>(grad.raw_data()), static_cast<const int32_t*>(indices.raw_data()),
        static_cast<S*>(grad_in.raw_data()), n, cols);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace minidl::cuda
