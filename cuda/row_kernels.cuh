#pragma once
// Shared machinery of the row-wise CUDA kernels (softmax.cu,
// cross_entropy.cu, layer_norm.cu): rows short enough for one warp's
// registers (up to 256 elements, or 1024 float32 / 1024 bfloat16 / 512
// float64 when the row length and pointers allow 16-byte accesses) take one
// warp per row and touch global memory once; longer rows take one block per
// row. Compute is fp32 for float32/bfloat16 and fp64 for float64.
#include <cstdint>

#include "core/tensor.h"
#include "cuda/reductions.cuh"
#include "cuda/vec.cuh"

namespace minidl::cuda::rows {

constexpr int kRowWarps = 4;        // rows (warps) per block in the warp-per-row kernels
constexpr int kMaxIters = 8;        // register tile: up to 8 accesses per lane per row
constexpr int kMaxLaneElems = 32;   // and up to 32 elements per lane (no spills in the LN backward)
constexpr int kMaxBlockThreads = 1024;  // block-per-row kernels

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

// A row's softmax statistics over a warp's register tile loaded with fill
// -inf: m its max, s the sum of exp(v - m), both returned to every lane;
// with keep_exp, v becomes exp(v - m) (the slots past the row's end keep -inf).
template <typename A, int V, int K>
__device__ __forceinline__ void warp_row_max_sum(A (&v)[K][V], int cols, int lane, bool keep_exp, A& m, A& s) {
  m = -inf<A>();
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) m = max_(m, v[i][j]);
  m = warp_max(m);
  s = 0;
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (tile_col<V>(i, lane) < cols)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A e = math::exp_(v[i][j] - m);
        s += e;
        if (keep_exp) v[i][j] = e;
      }
  s = warp_sum(s);
}

// The same for a block per row (the online max/sum over V-wide packs),
// returned to every thread.
template <typename S, typename A, int V>
__device__ __forceinline__ void block_row_max_sum(const S* row, int64_t cols, A& m, A& s) {
  m = -inf<A>();
  s = 0;
  for (int64_t p = threadIdx.x; p < cols / V; p += blockDim.x) {
    A v[V];
    load_vec<S, A, V>(row + p * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) online_add(m, s, v[j]);
  }
  block_online(m, s);
}

__device__ __forceinline__ int64_t warp_row() {
  return blockIdx.x * int64_t(kRowWarps) + threadIdx.x / 32;
}

template <typename F> void visit_floating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    case DType::BFloat16: f(BFloat16{}); return;
    default: MINIDL_FAIL("nn_functional (cuda): expected a floating dtype, got ", dtype);
  }
}

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

// grid.x of a launch of `blocks` blocks: the hardware takes at most 2^31 - 1,
// and a larger count cast to unsigned would run part of the rows, silently.
inline unsigned grid_x(int64_t blocks, const char* kernel) {
  MINIDL_CHECK(blocks <= 0x7fffffff, kernel, ": ", blocks,
               " blocks, more than a CUDA grid holds (2^31 - 1): too many rows for this kernel");
  return static_cast<unsigned>(blocks);
}
inline unsigned warp_row_blocks(int64_t rows) { return grid_x((rows + kRowWarps - 1) / kRowWarps, "row kernel"); }
inline int row_block_threads(int64_t cols) { return cols >= 8192 ? kMaxBlockThreads : cols >= 2048 ? 512 : 256; }

template <typename T> const T* cptr(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.raw_data()) : nullptr;
}
template <typename T> T* mptr(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.raw_data()) : nullptr;
}

}  // namespace minidl::cuda::rows
