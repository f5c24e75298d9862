#include "autograd/gradcheck.h"

#include <cmath>

#include "autograd/tape.h"
#include "core/philox.h"

namespace minidl::autograd {
namespace {

// sum(y * w) with y read through its strides; y is float64 on the CPU.
double project(const Tensor& y, const std::vector<double>& w) {
  std::vector<double> v = y.to_vector<double>();
  double s = 0;
  for (size_t i = 0; i < v.size(); ++i) s += v[i] * w[i];
  return s;
}

// Address of element `linear` (row-major) of a strided CPU float64 tensor.
double* element(const Tensor& t, int64_t linear) {
  int64_t off = 0;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    off += (linear % t.size(d)) * t.stride(d);
    linear /= t.size(d);
  }
  return t.data_ptr<double>() + off;
}

}  // namespace

bool gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
               const std::vector<Tensor>& inputs, GradcheckOptions options) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& x = inputs[i];
    if (!x.defined() || !x.requires_grad()) continue;
    MINIDL_CHECK(x.dtype() == DType::Float64 && x.device().is_cpu(), "gradcheck: input ", i,
                 " is ", x.dtype(), " on ", x.device(), "; gradcheck needs float64 CPU tensors");
    MINIDL_CHECK(x.is_leaf(), "gradcheck: input ", i, " is not a leaf tensor");
  }
  Tensor y = fn(inputs);
  MINIDL_CHECK(y.defined() && y.dtype() == DType::Float64, "gradcheck: fn must return a float64 "
               "tensor");
  // Random projection w in [-1, 1): exercises every output element.
  std::vector<double> w(static_cast<size_t>(y.numel()));
  for (size_t k = 0; k < w.size(); ++k) w[k] = 2.0 * philox::uniform(options.seed, 0, k) - 1.0;
  if (!y.requires_grad()) {
    MINIDL_FAIL("gradcheck: the output does not require grad; no input reached it");
  }
  for (const Tensor& x : inputs)
    if (x.defined()) x.zero_grad();
  y.backward(from_vector(w, y.shape()));

  NoGradGuard no_grad;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& x = inputs[i];
    if (!x.defined() || !x.requires_grad()) continue;
    Tensor g = x.grad();
    std::vector<double> analytic =
        g.defined() ? g.to_vector<double>() : std::vector<double>(static_cast<size_t>(x.numel()), 0.0);
    for (int64_t k = 0; k < x.numel(); ++k) {
      double* p = element(x, k);
      double orig = *p;
      *p = orig + options.eps;
      double fp = project(fn(inputs), w);
      *p = orig - options.eps;
      double fm = project(fn(inputs), w);
      *p = orig;
      double numeric = (fp - fm) / (2 * options.eps);
      double a = analytic[static_cast<size_t>(k)];
      if (!(std::abs(a - numeric) <= options.atol + options.rtol * std::abs(numeric)))
        MINIDL_FAIL("gradcheck: input ", i, " (shape ", shape_str(x.shape()), ") element ", k,
                    ": analytic ", a, " vs numeric ", numeric);
    }
  }
  return true;
}

}  // namespace minidl::autograd
