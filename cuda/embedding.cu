// out[r] = dropout(weight[indices[r]] + positions[r mod T]): a language
// model's input embedding in one kernel (ops::embedding_dropout).
#include <type_traits>

#include "core/scalar_math.h"
#include "cuda/dropout_mask.cuh"
#include "cuda/embedding.h"
#include "cuda/runtime.h"
#include "cuda/vec.cuh"

namespace minidl::cuda {
namespace {

constexpr int kThreads = 256;

// A thread per V-element pack of out (V divides cols). The sum is rounded to
// S where the add kernel stores it, and dropped as the dropout kernel drops.
template <typename S, int V>
__global__ void embedding_dropout_kernel(const S* weight, const int32_t* indices, const S* positions, S* out,
                                         int64_t rows, int64_t cols, int64_t vocab, int64_t T, DropoutMask m) {
  using A = compute_t<S>;
  const int64_t row_packs = cols / V, packs = rows * row_packs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / row_packs, c = (i - r * row_packs) * V;
    const int32_t id = indices[r];
    A v[V];
    if (id >= 0 && id < vocab) {
      load_vec<S, A, V>(weight + id * cols + c, v);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = A(0);
    }
    if (positions) {
      A p[V];
      load_vec<S, A, V>(positions + (r % T) * cols + c, p);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = round_to<S>(v[j] + p[j]);
    }
    if (m.keep_threshold > 0) {
      bool keep[V];
      keep_mask<V>(m, r * cols + c, keep);
      const A scale = static_cast<A>(m.scale);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = keep[j] ? v[j] * scale : A(0);
    }
    store_vec<S, A, V>(out + r * cols + c, v);
  }
}

}  // namespace

void embedding_dropout_forward(const Tensor& weight, const Tensor& indices, const Tensor& positions,
                               uint64_t seed, PhiloxOffset offset, float keep_threshold, double scale,
                               const Tensor& out) {
  const int64_t rows = indices.numel(), cols = weight.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t T = positions.defined() ? positions.size(0) : 1;
  const DropoutMask mask{seed, offset, keep_threshold, scale};
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    if constexpr (std::is_same_v<S, int32_t>) {
      MINIDL_FAIL("embedding_dropout (cuda): int32 weights are not supported");
    } else {
      const S* w = static_cast<const S*>(weight.raw_data());
      const S* pos = positions.defined() ? static_cast<const S*>(positions.raw_data()) : nullptr;
      S* o = static_cast<S*>(out.raw_data());
      const int32_t* idx = indices.data_ptr<int32_t>();
      auto launch = [&](auto vec) {
        constexpr int V = decltype(vec)::value;
        embedding_dropout_kernel<S, V><<<grid_for(rows * (cols / V), kThreads), kThreads, 0, stream()>>>(
            w, idx, pos, o, rows, cols, weight.size(0), T, mask);
      };
      constexpr int V = kVec<S>;
      if (cols % V == 0 && aligned16({&weight, &positions, &out})) launch(Int<V>{});
      else launch(Int<1>{});
      MINIDL_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace minidl::cuda
