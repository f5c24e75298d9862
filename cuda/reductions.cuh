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

// The N sums over i < n of load(i, v) (which sets v[0..N-1] for element i)
// exactly as a block of kAs threads gets each with block_sum (thread t adding
// i = t, t + kAs, ... in turn), computed by a block of any size up to kAs
// (blockDim.x a multiple of 32): a kernel's last block can finish what a
// separate kAs-thread launch did, to the same bits. The loads of a stride
// are unrolled (the adds keep their order), so one block keeps many in
// flight. Returned to every thread.
template <int kAs, int N, typename A, typename Load>
__device__ __forceinline__ void strided_sums_as(int64_t n, Load&& load, A (&total)[N]) {
  static_assert(kAs % 32 == 0 && kAs <= 1024, "strided_sums_as: kAs must be a multiple of 32, at most 1024");
  __shared__ A warps[N][kAs / 32];
  const int lane = threadIdx.x % 32;
  for (int w = threadIdx.x / 32; w < kAs / 32; w += blockDim.x / 32) {  // uniform per warp
    A v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = 0;
#pragma unroll 8
    for (int64_t i = w * 32 + lane; i < n; i += kAs) {
      A x[N];
      load(i, x);
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] += x[k];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = warp_sum(v[k]);
      if (lane == 0) warps[k][w] = v[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    total[k] = 0;
    for (int w = 0; w < kAs / 32; ++w) total[k] += warps[k][w];
  }
  __syncthreads();
}

// Grid completion without a second launch: every thread of each of the
// `expected` blocks calls this after the block's writes; it returns true in
// exactly one block, the last to arrive, which may then read the others'
// writes (through L2: __ldcg, they are not in its L1) and finish the work in
// a fixed order (deterministic). The counter is zero again when it returns,
// ready for the next launch: counters are static __device__ words (zero at
// load), so launches that share one must not overlap (minidl's kernels run in
// order on one stream per device), and a host function whose several launches
// count into one word enqueues them under lock_device_queue() (host threads
// sharing a device would interleave them).
__device__ __forceinline__ bool last_block_to_arrive(unsigned int* counter, unsigned int expected) {
  __shared__ bool last;
  __threadfence();  // this block's writes reach every SM before it counts itself
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    last = atomicAdd(counter, 1u) + 1u == expected;
    if (last) atomicExch(counter, 0u);
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
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
