#include <type_traits>

#include "cuda/indexing.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

constexpr int kThreads = 256;

struct Layout {
  int64_t outer = 1, size = 1, inner = 1;
};

Layout layout_around(const Shape& shape, int64_t dim) {
  Layout l;
  for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
    if (d < dim) l.outer *= shape[d];
    else if (d == dim) l.size = shape[d];
    else l.inner *= shape[d];
  }
  return l;
}

// One thread per output element e = (o, k, i).
template <typename S>
__global__ void index_select_kernel(const S* x, const int32_t* idx, S* out, int64_t total,
                                    int64_t n, int64_t size, int64_t inner) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = e % inner, row = e / inner;
    int64_t k = row % n, o = row / n;
    int32_t r = idx[k];
    out[e] = (r >= 0 && r < size) ? x[(o * size + r) * inner + i] : S(0.0f);
  }
}

template <typename S, typename Acc>
__global__ void index_add_kernel(const S* g, const int32_t* idx, Acc* acc, int64_t total,
                                 int64_t n, int64_t size, int64_t inner) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = e % inner, row = e / inner;
    int64_t k = row % n, o = row / n;
    int32_t r = idx[k];
    if (r >= 0 && r < size) atomicAdd(acc + (o * size + r) * inner + i, static_cast<Acc>(g[e]));
  }
}

}  // namespace

void index_select(const Tensor& x, int64_t dim, const Tensor& indices, const Tensor& out) {
  int64_t total = out.numel();
  if (total == 0) return;
  Layout l = layout_around(x.shape(), dim);
  visit_dtype(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    index_select_kernel<S><<<grid_for(total, kThreads), kThreads, 0, stream()>>>(
        static_cast<const S*>(x.raw_data()), indices.data_ptr<int32_t>(),
        static_cast<S*>(out.raw_data()), total, indices.numel(), l.size, l.inner);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void index_add(const Tensor& grad_out, int64_t dim, const Tensor& indices, const Tensor& grad_x) {
  int64_t total = grad_out.numel();
  if (total == 0) return;
  Layout l = layout_around(grad_x.shape(), dim);
  visit_dtype(grad_out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    if constexpr (std::is_same_v<S, int32_t>) {
      MINIDL_FAIL("index_add: int32 gradients are not supported");
    } else {
      using Acc = std::conditional_t<std::is_same_v<S, BFloat16>, float, S>;
      index_add_kernel<S, Acc><<<grid_for(total, kThreads), kThreads, 0, stream()>>>(
          static_cast<const S*>(grad_out.raw_data()), indices.data_ptr<int32_t>(),
          grad_x.data_ptr<Acc>(), total, indices.numel(), l.size, l.inner);
      MINIDL_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace minidl::cuda
