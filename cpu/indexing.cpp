#include "cpu/indexing.h"

#include <algorithm>

#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {

}  // namespace

void index_select(const Tensor& x, int64_t dim, const Tensor& indices, const Tensor& out) {
  DimSplit l = split_around(x.shape(), dim);
  int64_t n = indices.numel();
  const int32_t* idx = indices.data_ptr<int32_t>();
  visit_dtype(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    const S* src = static_cast<const S*>(x.raw_data());
    S* dst = static_cast<S*>(out.raw_data());
    // One task per output row (o, k): a contiguous copy of `inner` elements.
    int64_t rows = l.outer * n;
    int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(l.inner, 1));
    parallel_for(rows, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        int64_t o = r / n, k = r % n;
        const S* from = src + (o * l.size + idx[k]) * l.inner;
        std::copy(from, from + l.inner, dst + r * l.inner);
      }
    });
  });
}

void index_add(const Tensor& grad_out, int64_t dim, const Tensor& indices, const Tensor& grad_x) {
  DimSplit l = split_around(grad_x.shape(), dim);
  int64_t n = indices.numel();
  const int32_t* idx = indices.data_ptr<int32_t>();
  visit_dtype(grad_out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    if constexpr (std::is_same_v<S, int32_t>) {
      MINIDL_FAIL("index_add: int32 gradients are not supported");
    } else {
      using Acc = std::conditional_t<std::is_same_v<S, BFloat16>, float, S>;
      const S* g = static_cast<const S*>(grad_out.raw_data());
      Acc* acc = grad_x.data_ptr<Acc>();
      // Threads own disjoint (o, i) lanes of grad_x, so no two write the same
      // element; each lane walks all n indices.
      int64_t lanes = l.outer * l.inner;
      int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(n, 1));
      parallel_for(lanes, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t o = lo / l.inner; o * l.inner < hi; ++o) {
          int64_t i0 = std::max(lo, o * l.inner) - o * l.inner;
          int64_t i1 = std::min(hi, (o + 1) * l.inner) - o * l.inner;
          for (int64_t k = 0; k < n; ++k) {
            Acc* to = acc + (o * l.size + idx[k]) * l.inner;
            const S* from = g + (o * n + k) * l.inner;
            for (int64_t i = i0; i < i1; ++i) to[i] += static_cast<Acc>(from[i]);
          }
        }
      });
    }
  });
}

}  // namespace minidl::cpu
