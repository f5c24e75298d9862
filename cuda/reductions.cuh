#pragma once
// Warp and block reductions shared by the CUDA kernels (reduce.cu,
// softmax.cu, cross_entropy.cu, layer_norm.cu), and the online softmax
// statistics. Every combination order is fixed: results are deterministic.
// Block helpers need blockDim.x to be a multiple of 32 and every thread of the
// block to call them.
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/scalar_math.h"

namespace minidl::cuda {

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
    s = s * math::exp_(m - v) + A(1);
    m = v;
  } else if (!(v == -inf<A>())) {  // exp(-inf) adds nothing; a NaN poisons s
    s += math::exp_(v - m);
  }
}
template <typename A> __device__ __forceinline__ void online_merge(A& m, A& s, A m2, A s2) {
  A mn = max_(m, m2);
  A a = m == -inf<A>() ? A(0) : s * math::exp_(m - mn);
  A b = m2 == -inf<A>() ? A(0) : s2 * math::exp_(m2 - mn);
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

}  // namespace minidl::cuda
