// CPU linear: the blocked GEMM (cpu/gemm.h), then one threaded pass over the
// rows for the epilogue; column sums through cpu::sum_first.
#include "cpu/linear.h"

#include <algorithm>
#include <type_traits>

#include "core/scalar_math.h"
#include "cpu/gemm.h"
#include "cpu/parallel.h"
#include "cpu/reduce.h"

namespace minidl::cpu {
namespace {

template <typename F> void visit_floating(const char* op, DType dtype, F&& f) {
  visit_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    if constexpr (std::is_same_v<S, int32_t>) MINIDL_FAIL(op, ": int32 is not supported");
    else f(tag);
  });
}

template <typename T> const T* cptr(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.raw_data()) : nullptr;
}
template <typename T> T* mptr(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.raw_data()) : nullptr;
}

// body(row) over rows [0, rows) of `cols` elements, threaded by rows.
template <typename Body> void for_rows(int64_t rows, int64_t cols, Body body) {
  parallel_for(rows, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(cols, 1)),
               [&](int64_t lo, int64_t hi) {
                 for (int64_t r = lo; r < hi; ++r) body(r);
               });
}

}  // namespace

void linear_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                    const Tensor& gelu_input, const Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  visit_floating("cpu::linear_forward", out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const bool gelu = gelu_input.defined();
    S* sum = mptr<S>(gelu ? gelu_input : out);
    gemm<S>(false, true, m, n, k, C(1), cptr<S>(x), k, cptr<S>(weight), k, C(0), sum, n);
    if (!gelu && !bias.defined()) return;
    const S* b = cptr<S>(bias);
    S* y = mptr<S>(out);
    for_rows(m, n, [&](int64_t r) {
      S* pre = sum + r * n;
      S* yr = y + r * n;
      for (int64_t j = 0; j < n; ++j) {
        C v = static_cast<C>(pre[j]) + (b ? static_cast<C>(b[j]) : C(0));
        pre[j] = static_cast<S>(v);
        // GELU of the unrounded sum, as cuBLASLt's epilogue computes it.
        if (gelu) yr[j] = static_cast<S>(math::gelu(v));
      }
    });
  });
}

void linear_weight_grad(const Tensor& grad, const Tensor& x, const Tensor& grad_weight,
                        const Tensor& grad_bias) {
  const int64_t m = grad.size(0), n = grad.size(1);
  if (grad_weight.defined()) {
    const int64_t k = x.size(1);
    visit_floating("cpu::linear_weight_grad", grad.dtype(), [&](auto tag) {
      using S = decltype(tag);
      using C = compute_t<S>;
      // grad^T x: grad is stored M x N, so op(A) = grad^T reads it transposed.
      gemm<S>(true, false, n, k, m, C(1), cptr<S>(grad), n, cptr<S>(x), k, C(0),
              mptr<S>(grad_weight), k);
    });
  }
  if (grad_bias.defined()) sum_first(grad, m, n, 1.0, grad_bias);
}

void linear_input_grad(const Tensor& grad, const Tensor& weight, const Tensor& gelu_input,
                       const Tensor& grad_x, const Tensor& grad_bias) {
  const int64_t m = grad.size(0), n = grad.size(1), k = weight.size(1);
  visit_floating("cpu::linear_input_grad", grad.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    S* dx = mptr<S>(grad_x);
    gemm<S>(false, false, m, k, n, C(1), cptr<S>(grad), n, cptr<S>(weight), k, C(0), dx, k);
    if (!gelu_input.defined()) return;
    const S* pre = cptr<S>(gelu_input);
    for_rows(m, k, [&](int64_t r) {
      for (int64_t j = r * k; j < (r + 1) * k; ++j)
        dx[j] = static_cast<S>(static_cast<C>(dx[j]) * math::gelu_grad(static_cast<C>(pre[j])));
    });
  });
  if (grad_bias.defined()) sum_first(grad_x, m, k, 1.0, grad_bias);
}

}  // namespace minidl::cpu
