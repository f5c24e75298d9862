#include "cpu/reduce.h"

#include <algorithm>
#include <vector>

#include "core/scalar_math.h"
#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {

// Rows handled per task so that one task touches about kParallelGrain elements.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(cols, 1)); }

// NaN-propagating "a is a better max than b"; ties keep the earlier index.
template <typename C> bool greater_or_nan(C a, C b) {
  if constexpr (std::is_floating_point_v<C>) {
    if (a != a) return b == b;  // NaN beats every number, not an earlier NaN
  }
  return a > b;
}

}  // namespace

void sum_last(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out) {
  visit_dtype(in.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = double;  // accumulate in double: exact enough for every dtype, cheap on CPU
    const S* x = static_cast<const S*>(in.raw_data());
    S* y = static_cast<S*>(out.raw_data());
    parallel_for(rows, row_grain(cols), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        const S* row = x + m * cols;
        A acc = 0;
        for (int64_t r = 0; r < cols; ++r) acc += static_cast<A>(row[r]);
        y[m] = from_compute<S>(static_cast<compute_t<S>>(acc * scale));
      }
    });
  });
}

void sum_first(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out) {
  visit_dtype(in.dtype(), [&](auto tag) {
    using S = decltype(tag);
    const S* x = static_cast<const S*>(in.raw_data());
    S* y = static_cast<S*>(out.raw_data());
    if (cols >= 4096) {  // wide rows: each thread owns a column range and walks every row
      parallel_for(cols, 1024, [&](int64_t lo, int64_t hi) {
        std::vector<double> acc(static_cast<size_t>(hi - lo), 0.0);
        for (int64_t r = 0; r < rows; ++r) {
          const S* row = x + r * cols;
          for (int64_t c = lo; c < hi; ++c) acc[static_cast<size_t>(c - lo)] += static_cast<double>(row[c]);
        }
        for (int64_t c = lo; c < hi; ++c)
          y[c] = from_compute<S>(static_cast<compute_t<S>>(acc[static_cast<size_t>(c - lo)] * scale));
      });
      return;
    }
    // Chunks of whole rows, each summed into its own double partial row (so
    // memory is read in order), then the partials are added in chunk order:
    // the result does not depend on the thread count.
    int64_t chunk_rows = row_grain(cols);
    int64_t chunks = std::max<int64_t>(1, (rows + chunk_rows - 1) / chunk_rows);
    std::vector<double> partial(static_cast<size_t>(chunks * cols), 0.0);
    parallel_for(chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        double* acc = partial.data() + k * cols;
        int64_t r_end = std::min(rows, (k + 1) * chunk_rows);
        for (int64_t r = k * chunk_rows; r < r_end; ++r) {
          const S* row = x + r * cols;
          for (int64_t c = 0; c < cols; ++c) acc[c] += static_cast<double>(row[c]);
        }
      }
    });
    parallel_for(cols, kParallelGrain / std::max<int64_t>(chunks, 1) + 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        double acc = 0;
        for (int64_t k = 0; k < chunks; ++k) acc += partial[static_cast<size_t>(k * cols + c)];
        y[c] = from_compute<S>(static_cast<compute_t<S>>(acc * scale));
      }
    });
  });
}

void max_last(const Tensor& in, int64_t rows, int64_t cols, const Tensor& values,
              const Tensor& indices) {
  visit_dtype(in.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* x = static_cast<const S*>(in.raw_data());
    S* v = values.defined() ? static_cast<S*>(values.raw_data()) : nullptr;
    int32_t* ix = static_cast<int32_t*>(indices.raw_data());
    parallel_for(rows, row_grain(cols), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        const S* row = x + m * cols;
        C best = static_cast<C>(row[0]);
        int64_t at = 0;
        for (int64_t r = 1; r < cols; ++r) {
          C c = static_cast<C>(row[r]);
          if (greater_or_nan(c, best)) {
            best = c;
            at = r;
          }
        }
        if (v) v[m] = row[at];
        ix[m] = static_cast<int32_t>(at);
      }
    });
  });
}

void max_last_backward(const Tensor& grad, const Tensor& indices, int64_t rows, int64_t cols,
                       const Tensor& grad_in) {
  visit_dtype(grad.dtype(), [&](auto tag) {
    using S = decltype(tag);
    const S* g = static_cast<const S*>(grad.raw_data());
    const int32_t* ix = static_cast<const int32_t*>(indices.raw_data());
    S* out = static_cast<S*>(grad_in.raw_data());
    parallel_for(rows, row_grain(cols), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        S* row = out + m * cols;
        std::fill(row, row + cols, static_cast<S>(compute_t<S>(0)));
        row[ix[m]] = g[m];
      }
    });
  });
}

}  // namespace minidl::cpu
