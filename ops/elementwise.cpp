// Elementwise ops with NumPy broadcasting. Forward runs one kernel from
// cpu/elementwise or cuda/elementwise; backward is written with ops and
// reduces broadcast dims with sum_to.
#include <algorithm>
#include <cstdlib>
#include <utility>
#include <vector>

#include "autograd/tape.h"
#include "cpu/elementwise.h"
#include "cuda/elementwise.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

Tensor unary_forward(const char* name, UnaryOp op, const Tensor& x, double p = 0) {
  detail::check_defined(name, x, "input");
  detail::check_floating(name, x);
  Tensor out = Tensor::empty(x.shape(), x.options());
  MINIDL_DISPATCH(x.device(), unary, op, x, p, out);
  return out;
}

Tensor binary_forward(const char* name, BinaryOp op, const Tensor& a, const Tensor& b) {
  detail::check_defined(name, a, "first input");
  detail::check_defined(name, b, "second input");
  detail::check_same_device(name, a, b);
  detail::check_same_dtype(name, a, b);
  detail::check_floating(name, a);
  Shape shape = broadcast_shapes(a.shape(), b.shape(), name);
  Tensor out = Tensor::empty(shape, a.options());
  NoGradGuard no_grad;  // the expands are internal views
  MINIDL_DISPATCH(a.device(), binary, op, expand(a, shape), expand(b, shape), out);
  return out;
}

// Records a unary op whose gradient is grad_fn(upstream grad, x, y).
template <typename GradFn>
Tensor unary_op(const char* name, UnaryOp op, const Tensor& x, double p, GradFn grad_fn) {
  Tensor y = unary_forward(name, op, x, p);
  if (autograd::needs_grad({x})) {
    autograd::record(name, {x}, {y},
                     [sx = SavedTensor(x, name), sy = SavedTensor(y, name), grad_fn](const Grads& g) {
                       return Grads{grad_fn(g[0], sx, sy)};
                     });
  }
  return y;
}

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor y = binary_forward("add", BinaryOp::Add, a, b);
  if (autograd::needs_grad({a, b})) {
    autograd::record("add", {a, b}, {y}, [sa = a.shape(), sb = b.shape()](const Grads& g) {
      return Grads{sum_to(g[0], sa), sum_to(g[0], sb)};
    });
  }
  return y;
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor y = binary_forward("sub", BinaryOp::Sub, a, b);
  if (autograd::needs_grad({a, b})) {
    autograd::record("sub", {a, b}, {y}, [sa = a.shape(), sb = b.shape()](const Grads& g) {
      return Grads{sum_to(g[0], sa), sum_to(neg(g[0]), sb)};
    });
  }
  return y;
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor y = binary_forward("mul", BinaryOp::Mul, a, b);
  bool ga = autograd::needs_grad({a}), gb = autograd::needs_grad({b});
  if (ga || gb) {
    // Save only the factor each needed gradient uses.
    autograd::record("mul", {a, b}, {y},
                     [sa = gb ? SavedTensor(a, "mul") : SavedTensor(),
                      sb = ga ? SavedTensor(b, "mul") : SavedTensor(), sha = a.shape(),
                      shb = b.shape()](const Grads& g) {
                       return Grads{sb.defined() ? sum_to(mul(g[0], sb.get()), sha) : Tensor(),
                                    sa.defined() ? sum_to(mul(g[0], sa.get()), shb) : Tensor()};
                     });
  }
  return y;
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor y = binary_forward("div", BinaryOp::Div, a, b);
  if (autograd::needs_grad({a, b})) {
    autograd::record("div", {a, b}, {y},
                     [sb = SavedTensor(b, "div"), sy = SavedTensor(y, "div"), sha = a.shape(),
                      shb = b.shape()](const Grads& g) {
                       Tensor b_ = sb.get();
                       Tensor ga = div(g[0], b_);
                       return Grads{sum_to(ga, sha), sum_to(neg(mul(ga, sy.get())), shb)};
                     });
  }
  return y;
}

Tensor add(const Tensor& a, double s) {
  return unary_op("add", UnaryOp::AddScalar, a, s,
                  [](const Tensor& g, const SavedTensor&, const SavedTensor&) { return g; });
}

Tensor mul(const Tensor& a, double s) {
  return unary_op("mul", UnaryOp::MulScalar, a, s,
                  [s](const Tensor& g, const SavedTensor&, const SavedTensor&) { return mul(g, s); });
}

Tensor pow(const Tensor& a, double e) {
  return unary_op("pow", UnaryOp::PowScalar, a, e,
                  [e](const Tensor& g, const SavedTensor& x, const SavedTensor&) {
                    // x^0 is constant: 0, not g * x^-1 * 0 (NaN where x = 0).
                    if (e == 0) return zeros_like(g);
                    return mul(mul(g, pow(x.get(), e - 1)), e);
                  });
}

Tensor neg(const Tensor& a) {
  return unary_op("neg", UnaryOp::Neg, a, 0,
                  [](const Tensor& g, const SavedTensor&, const SavedTensor&) { return neg(g); });
}

Tensor exp(const Tensor& a) {
  return unary_op("exp", UnaryOp::Exp, a, 0,
                  [](const Tensor& g, const SavedTensor&, const SavedTensor& y) {
                    return mul(g, y.get());
                  });
}

Tensor log(const Tensor& a) {
  return unary_op("log", UnaryOp::Log, a, 0,
                  [](const Tensor& g, const SavedTensor& x, const SavedTensor&) {
                    return div(g, x.get());
                  });
}

Tensor tanh(const Tensor& a) {
  return unary_op("tanh", UnaryOp::Tanh, a, 0,
                  [](const Tensor& g, const SavedTensor&, const SavedTensor& y) {
                    Tensor t = y.get();
                    return mul(g, add(neg(mul(t, t)), 1.0));  // g (1 - y^2)
                  });
}

Tensor sqrt(const Tensor& a) {
  return unary_op("sqrt", UnaryOp::Sqrt, a, 0,
                  [](const Tensor& g, const SavedTensor&, const SavedTensor& y) {
                    return div(mul(g, 0.5), y.get());
                  });
}

Tensor relu(const Tensor& a) {
  return unary_op("relu", UnaryOp::Relu, a, 0,
                  [](const Tensor& g, const SavedTensor&, const SavedTensor& y) {
                    return binary_forward("relu backward", BinaryOp::ReluBackward, g, y.get());
                  });
}

Tensor gelu(const Tensor& a) {
  return unary_op("gelu", UnaryOp::Gelu, a, 0,
                  [](const Tensor& g, const SavedTensor& x, const SavedTensor&) {
                    return binary_forward("gelu backward", BinaryOp::GeluBackward, g, x.get());
                  });
}

Tensor sigmoid(const Tensor& a) {
  return unary_op("sigmoid", UnaryOp::Sigmoid, a, 0,
                  [](const Tensor& g, const SavedTensor&, const SavedTensor& y) {
                    Tensor s = y.get();
                    return mul(g, mul(s, add(neg(s), 1.0)));  // g s (1 - s)
                  });
}

Tensor gt(const Tensor& a, const Tensor& b) { return binary_forward("gt", BinaryOp::Gt, a, b); }
Tensor lt(const Tensor& a, const Tensor& b) { return binary_forward("lt", BinaryOp::Lt, a, b); }
Tensor eq(const Tensor& a, const Tensor& b) { return binary_forward("eq", BinaryOp::Eq, a, b); }

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  const char* name = "where";
  detail::check_defined(name, cond, "condition");
  detail::check_same_device(name, cond, a);
  detail::check_same_device(name, a, b);
  detail::check_same_dtype(name, a, b);
  Shape shape = broadcast_shapes(broadcast_shapes(cond.shape(), a.shape(), name), b.shape(), name);
  Tensor out = Tensor::empty(shape, a.options());
  {
    NoGradGuard no_grad;
    MINIDL_DISPATCH(a.device(), where, expand(cond, shape), expand(a, shape), expand(b, shape), out);
  }
  if (autograd::needs_grad({a, b})) {
    autograd::record(name, {a, b}, {out},
                     [sc = SavedTensor(cond, name), sha = a.shape(), shb = b.shape()](const Grads& g) {
                       Tensor zero = zeros({}, g[0].options());
                       Tensor c = sc.get();
                       return Grads{sum_to(where(c, g[0], zero), sha), sum_to(where(c, zero, g[0]), shb)};
                     });
  }
  return out;
}

Tensor masked_fill(const Tensor& x, const Tensor& mask, double value) {
  return where(mask, full({}, value, x.options()), x);
}

// ---- in-place ----

namespace {
void check_inplace(const char* op, const Tensor& dst) {
  detail::check_defined(op, dst, "destination");
  MINIDL_CHECK(!(autograd::grad_enabled() && dst.requires_grad()), op,
               ": in-place write to a tensor that requires grad (", detail::describe(dst),
               "); wrap it in NoGradGuard");
}

// A destination that computes from its old values (add_, mul_) or takes a
// source's element by element (copy_) cannot hold one memory location at
// several elements (a dim of stride 0: an expanded view): each would be
// written in turn, from the others' results (and concurrently, by threads).
void check_no_internal_overlap(const char* op, const Tensor& dst) {
  if (dst.is_contiguous()) return;  // the common case, and one that cannot overlap
  for (int64_t d = 0; d < dst.dim(); ++d)
    MINIDL_CHECK(dst.shape()[d] <= 1 || dst.strides()[d] != 0, op, ": the destination (", detail::describe(dst),
                 ") has several elements at one memory location (dim ", d,
                 " has stride 0: an expanded view); write into a tensor of its own");
  // Other self-overlapping views (as_strided windows): with the dims taken
  // by growing |stride|, each stride must pass the reach of the ones before.
  // Every slice, transpose or permute of a tensor of its own passes; a few
  // layouts that do not overlap fail too, and are refused with the rest.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size)
  for (int64_t d = 0; d < dst.dim(); ++d)
    if (dst.shape()[d] > 1) dims.push_back({std::abs(dst.strides()[d]), dst.shape()[d]});
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    MINIDL_CHECK(stride > reach, op, ": the destination (", detail::describe(dst), ", strides ",
                 shape_str(dst.strides()), ") may have several elements at one memory location (a view made by "
                 "as_strided); write into a tensor of its own");
    reach += (size - 1) * stride;
  }
}

// The source of copy_ / add_ broadcasts to the destination's shape.
void check_broadcasts_to(const char* op, const Tensor& src, const Tensor& dst) {
  const bool ok = src.dim() <= dst.dim() && broadcast_shapes(src.shape(), dst.shape(), op) == dst.shape();
  MINIDL_CHECK(ok, op, ": the source's shape ", shape_str(src.shape()), " does not broadcast to the destination's ",
               shape_str(dst.shape()));
}

// `src`, or a copy of it when it shares memory with `dst` as another view
// (a shifted slice of the same tensor): element-wise writes would otherwise
// read sources they already overwrote. The same view is read and written
// element by element in step, and needs no copy.
Tensor unaliased(const Tensor& src, const Tensor& dst) {
  if (src.storage() != dst.storage() || src.numel() == 0 || dst.numel() == 0) return src;
  if (src.offset() == dst.offset() && src.shape() == dst.shape() && src.strides() == dst.strides()) return src;
  auto span = [](const Tensor& t) {  // [first, last] element of storage the view reaches
    int64_t lo = t.offset(), hi = t.offset();
    for (int64_t d = 0; d < t.dim(); ++d)
      (t.strides()[d] < 0 ? lo : hi) += (t.shape()[d] - 1) * t.strides()[d];
    return std::pair<int64_t, int64_t>{lo, hi};
  };
  const auto [s0, s1] = span(src);
  const auto [d0, d1] = span(dst);
  return s1 < d0 || d1 < s0 ? src : clone(src);
}
}  // namespace

void copy_(const Tensor& dst, const Tensor& src) {
  check_inplace("copy_", dst);
  detail::check_defined("copy_", src, "source");
  check_no_internal_overlap("copy_", dst);
  check_broadcasts_to("copy_", src, dst);
  NoGradGuard no_grad;
  Tensor s = src.device() == dst.device() ? unaliased(src, dst) : to(src, dst.device());
  MINIDL_DISPATCH(dst.device(), copy, expand(s, dst.shape()), dst);
  dst.bump_version();
}

void fill_(const Tensor& dst, double value) {
  check_inplace("fill_", dst);
  MINIDL_DISPATCH(dst.device(), unary, UnaryOp::Fill, dst, value, dst);
  dst.bump_version();
}

void zero_(const Tensor& dst) { fill_(dst, 0.0); }

void add_(const Tensor& dst, const Tensor& src, double alpha) {
  check_inplace("add_", dst);
  detail::check_same_device("add_", dst, src);
  detail::check_same_dtype("add_", dst, src);
  check_no_internal_overlap("add_", dst);
  check_broadcasts_to("add_", src, dst);
  MINIDL_CHECK(alpha == 1.0 || is_floating(dst.dtype()), "add_: alpha ", alpha, " needs a floating-point tensor, got ",
               dst.dtype());
  NoGradGuard no_grad;
  Tensor s = alpha == 1.0 ? unaliased(src, dst) : mul(src, alpha);
  MINIDL_DISPATCH(dst.device(), binary, BinaryOp::Add, dst, expand(s, dst.shape()), dst);
  dst.bump_version();
}

void mul_(const Tensor& dst, double s) {
  check_inplace("mul_", dst);
  check_no_internal_overlap("mul_", dst);
  MINIDL_DISPATCH(dst.device(), unary, UnaryOp::MulScalar, dst, s, dst);
  dst.bump_version();
}

}  // namespace minidl::ops
