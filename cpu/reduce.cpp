#include "cpu/reduce.h"

#include "core/scalar_math.h"
#include "cpu/parallel.h"

namespace minidl::cpu {

void sum_last(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out) {
  visit_dtype(in.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = double;  // accumulate in double: exact enough for every dtype, cheap on CPU
    const S* x = static_cast<const S*>(in.raw_data());
    S* y = static_cast<S*>(out.raw_data());
    parallel_for(rows, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(cols, 1)),
                 [&](int64_t lo, int64_t hi) {
                   for (int64_t m = lo; m < hi; ++m) {
                     const S* row = x + m * cols;
                     A acc = 0;
                     for (int64_t r = 0; r < cols; ++r) acc += static_cast<A>(row[r]);
                     y[m] = static_cast<S>(static_cast<compute_t<S>>(acc * scale));
                   }
                 });
  });
}

}  // namespace minidl::cpu
