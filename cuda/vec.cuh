#pragma once
// 16-byte vector access for CUDA kernels: V consecutive elements loaded or
// stored as one Pack (one 128-bit instruction when sizeof(S) * V == 16),
// converted to or from the compute type A.
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "core/scalar_math.h"
#include "core/tensor.h"

namespace minidl::cuda {

template <int N> using Int = std::integral_constant<int, N>;

// Elements of S per 16 bytes.
template <typename S> constexpr int kVec = 16 / static_cast<int>(sizeof(S));

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
    p[0] = from_compute<S>(in[0]);
  } else {
    Pack<S, V> pk;
#pragma unroll
    for (int j = 0; j < V; ++j) pk.v[j] = from_compute<S>(in[j]);
    *reinterpret_cast<Pack<S, V>*>(p) = pk;
  }
}

// True when every defined tensor's first element is 16-byte aligned.
inline bool aligned16(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined() && reinterpret_cast<uintptr_t>(t->raw_data()) % 16 != 0) return false;
  return true;
}

}  // namespace minidl::cuda
