#include <algorithm>
#include <type_traits>

#include "cuda/indexing.h"
#include "cuda/runtime.h"
#include "cuda/vec.cuh"

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

// Concatenation as rows: input k holds columns [end[k-1], end[k]) of each
// of the `outer` rows of out (row stride `stride`), and is itself a
// contiguous (outer, end[k] - end[k-1]) matrix. A thread per V-element pack;
// V divides every input's width and keeps every row start aligned.
struct CatTable {
  const void* src[kMaxCatInputs];
  int64_t end[kMaxCatInputs];
  int count;
};

template <typename S, int V>
__global__ void cat_kernel(const __grid_constant__ CatTable t, S* out, int64_t outer, int64_t stride) {
  const int64_t cols = t.end[t.count - 1], row_packs = cols / V, packs = outer * row_packs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i / row_packs, j = (i - o * row_packs) * V;
    int k = 0;
    while (j >= t.end[k]) ++k;
    const int64_t begin = k ? t.end[k - 1] : 0;
    const S* src = static_cast<const S*>(t.src[k]) + o * (t.end[k] - begin) + (j - begin);
    *reinterpret_cast<Pack<S, V>*>(out + o * stride + j) = *reinterpret_cast<const Pack<S, V>*>(src);
  }
}

}  // namespace

void cat(const std::vector<Tensor>& inputs, int64_t dim, const Tensor& out) {
  if (out.numel() == 0) return;
  const DimSplit l = split_around(out.shape(), dim);
  const int64_t stride = l.size * l.inner;
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    // The widest pack that divides every width and keeps every row start aligned.
    int v = kVec<S>;
    auto fits = [&](const void* p, int64_t w) {
      return w % v == 0 && reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(v) * sizeof(S)) == 0;
    };
    int64_t start = 0;
    for (const Tensor& t : inputs) {
      const int64_t w = t.size(dim) * l.inner;
      while (v > 1 && !(fits(t.raw_data(), w) && fits(static_cast<const S*>(out.raw_data()) + start, stride))) v /= 2;
      start += w;
    }
    start = 0;
    // Launches take up to kMaxCatInputs non-empty inputs each; `next` is the
    // first input the last launch did not take (empty ones are skipped).
    for (size_t next = 0; next < inputs.size();) {
      CatTable table{};
      int64_t cols = 0;
      for (; next < inputs.size() && table.count < kMaxCatInputs; ++next) {
        const int64_t w = inputs[next].size(dim) * l.inner;
        if (w == 0) continue;
        cols += w;
        table.src[table.count] = inputs[next].raw_data();
        table.end[table.count++] = cols;
      }
      if (cols == 0) continue;
      S* dst = static_cast<S*>(out.raw_data()) + start;
      const unsigned blocks = grid_for(l.outer * cols / v, 256);
      switch (v) {
        case 8: cat_kernel<S, 8><<<blocks, 256, 0, stream()>>>(table, dst, l.outer, stride); break;
        case 4: cat_kernel<S, 4><<<blocks, 256, 0, stream()>>>(table, dst, l.outer, stride); break;
        case 2: cat_kernel<S, 2><<<blocks, 256, 0, stream()>>>(table, dst, l.outer, stride); break;
        default: cat_kernel<S, 1><<<blocks, 256, 0, stream()>>>(table, dst, l.outer, stride); break;
      }
      MINIDL_CUDA_LAUNCH_CHECK();
      start += cols;
    }
  });
}

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
