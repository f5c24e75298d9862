#include <algorithm>
#include <type_traits>

#include "cuda/indexing.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

// Both kernels walk the (outer * n) rows of the gathered side, each row a
// contiguous run of `inner` elements: threadIdx.y picks the row, threadIdx.x
// strides along it, so the row's index is looked up (and the 64-bit row
// arithmetic done) once per row rather than once per element.
struct RowLaunch {
  dim3 block, grid;
};

RowLaunch row_launch(int64_t rows, int64_t inner) {
  unsigned tx = static_cast<unsigned>(std::min<int64_t>(256, (inner + 31) / 32 * 32));
  unsigned ty = 256 / tx;
  int64_t blocks = std::min<int64_t>((rows + ty - 1) / ty, 65535LL * 32);
  return {dim3(tx, ty), dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)))};
}

template <typename S>
__global__ void index_select_kernel(const S* x, const int32_t* idx, S* out, int64_t rows, int64_t n,
                                    int64_t size, int64_t inner) {
  for (int64_t row = blockIdx.x * int64_t(blockDim.y) + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    int64_t k = row % n, o = row / n;
    int32_t r = idx[k];
    bool valid = r >= 0 && r < size;
    const S* src = x + (o * size + (valid ? r : 0)) * inner;
    S* dst = out + row * inner;
    for (int64_t i = threadIdx.x; i < inner; i += blockDim.x) dst[i] = valid ? src[i] : S(0.0f);
  }
}

template <typename S, typename Acc>
__global__ void index_add_kernel(const S* g, const int32_t* idx, Acc* acc, int64_t rows, int64_t n,
                                 int64_t size, int64_t inner) {
  for (int64_t row = blockIdx.x * int64_t(blockDim.y) + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    int64_t k = row % n, o = row / n;
    int32_t r = idx[k];
    if (r < 0 || r >= size) continue;
    const S* src = g + row * inner;
    Acc* dst = acc + (o * size + r) * inner;
    for (int64_t i = threadIdx.x; i < inner; i += blockDim.x) atomicAdd(dst + i, static_cast<Acc>(src[i]));
  }
}

}  // namespace

void index_select(const Tensor& x, int64_t dim, const Tensor& indices, const Tensor& out) {
  if (out.numel() == 0) return;
  DimSplit l = split_around(x.shape(), dim);
  int64_t n = indices.numel(), rows = l.outer * n;
  RowLaunch launch = row_launch(rows, l.inner);
  visit_dtype(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    index_select_kernel<S><<<launch.grid, launch.block, 0, stream()>>>(
        static_cast<const S*>(x.raw_data()), indices.data_ptr<int32_t>(),
        static_cast<S*>(out.raw_data()), rows, n, l.size, l.inner);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void index_add(const Tensor& grad_out, int64_t dim, const Tensor& indices, const Tensor& grad_x) {
  if (grad_out.numel() == 0) return;
  DimSplit l = split_around(grad_x.shape(), dim);
  int64_t n = indices.numel(), rows = l.outer * n;
  RowLaunch launch = row_launch(rows, l.inner);
  visit_dtype(grad_out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    if constexpr (std::is_same_v<S, int32_t>) {
      MINIDL_FAIL("index_add: int32 gradients are not supported");
    } else {
      using Acc = std::conditional_t<std::is_same_v<S, BFloat16>, float, S>;
      index_add_kernel<S, Acc><<<launch.grid, launch.block, 0, stream()>>>(
          static_cast<const S*>(grad_out.raw_data()), indices.data_ptr<int32_t>(),
          grad_x.data_ptr<Acc>(), rows, n, l.size, l.inner);
      MINIDL_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace minidl::cuda
