#pragma once
// ops::dropout's mask inside fused CUDA kernels (dropout_add_layer_norm,
// embedding_dropout): the same keep decisions and the same rounding as the
// dropout kernel, so a fused op gives the bits of the ops it fuses.
#include <cstdint>

#include "core/generator.h"
#include "core/philox.h"

namespace minidl::cuda {

// ops::dropout's mask: element i is kept when philox::uniform(seed, offset, i)
// >= keep_threshold. keep_threshold <= 0 keeps everything (no dropout; no
// random numbers drawn), and then scale is 1.
struct DropoutMask {
  uint64_t seed = 0;
  PhiloxOffset offset;  // read on the device: a CUDA graph replay advances it
  float keep_threshold = 0;
  double scale = 1;
};

// The value a tensor of type S would hold: the fused kernels round where the
// unfused ops store, so they give the same results as the ops composed.
template <typename S, typename A> __device__ __forceinline__ A round_to(A v) {
  return static_cast<A>(static_cast<S>(v));
}

// keep[j] for elements index .. index + V - 1 of the mask. With V a multiple
// of 4, index is too (the callers' packs are V-aligned), so each Philox block
// gives four consecutive decisions, as in the dropout kernel.
template <int V> __device__ __forceinline__ void keep_mask(const DropoutMask& m, int64_t index, bool (&keep)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      philox::U32x4 r = philox::block(m.seed, m.offset.value(), static_cast<uint64_t>(index / 4 + q));
#pragma unroll
      for (int l = 0; l < 4; ++l) keep[4 * q + l] = philox::to_unit_float(philox::lane(r, l)) >= m.keep_threshold;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      keep[j] = philox::uniform(m.seed, m.offset.value(), static_cast<uint64_t>(index + j)) >= m.keep_threshold;
  }
}

}  // namespace minidl::cuda
