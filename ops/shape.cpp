// Views (reshape/view, permute, transpose, slice, narrow, expand, squeeze,
// unsqueeze) share storage with their input; contiguous, clone and to()
// copy. All are differentiable.
#include <algorithm>
#include <numeric>
#include <string>

#include "autograd/tape.h"
#include "core/allocator.h"
#include "cpu/elementwise.h"
#include "cuda/elementwise.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using Grads = std::vector<Tensor>;

// Strides for viewing `x` as `shape` without a copy, if possible (the
// classic "split/merge compatible dims" rule); empty when impossible.
std::optional<Shape> view_strides(const Tensor& x, const Shape& shape) {
  if (x.is_contiguous()) return contiguous_strides(shape);
  const Shape& old_shape = x.shape();
  const Shape& old_strides = x.strides();
  Shape strides(shape.size());
  int64_t view_d = static_cast<int64_t>(shape.size()) - 1;
  int64_t chunk_base_stride = old_strides.empty() ? 1 : old_strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = static_cast<int64_t>(old_shape.size()) - 1; d >= 0; --d) {
    tensor_numel *= old_shape[d];
    if (d == 0 || (old_shape[d - 1] != 1 && old_strides[d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
        strides[view_d] = view_numel * chunk_base_stride;
        view_numel *= shape[view_d];
        --view_d;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (d > 0) {
        chunk_base_stride = old_strides[d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  if (view_d != -1) return std::nullopt;
  return strides;
}

Shape infer_shape(const Shape& shape, int64_t n, const char* op) {
  Shape out = shape;
  int64_t infer = -1;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] == -1) {
      MINIDL_CHECK(infer < 0, op, ": only one dim may be -1 in ", shape_str(shape));
      infer = static_cast<int64_t>(i);
      out[i] = 1;  // while the known sizes are multiplied
    } else {
      MINIDL_CHECK(out[i] >= 0, op, ": invalid size ", out[i], " in ", shape_str(shape));
    }
  }
  int64_t known = checked_numel(out, op);
  if (infer >= 0) {
    MINIDL_CHECK(known > 0 && n % known == 0, op, ": cannot infer -1 in ", shape_str(shape),
                 " for ", n, " elements");
    out[static_cast<size_t>(infer)] = n / known;
  }
  MINIDL_CHECK(checked_numel(out, op) == n, op, ": shape ", shape_str(shape), " does not match ",
               n, " elements");
  return out;
}

// A view of x with a backward that maps the gradient back with `back`.
template <typename Back>
Tensor make_view(const char* name, const Tensor& x, const Shape& shape, const Shape& strides,
                 int64_t offset, Back back) {
  Tensor y = x.as_strided(shape, strides, offset, name);
  if (autograd::needs_grad({x}))
    autograd::record(name, {x}, {y}, [back](const Grads& g) { return Grads{back(g[0])}; });
  return y;
}

}  // namespace

Tensor view(const Tensor& x, const Shape& shape_in) {
  detail::check_defined("view", x, "input");
  Shape shape = infer_shape(shape_in, x.numel(), "view");
  auto strides = view_strides(x, shape);
  MINIDL_CHECK(strides.has_value(), "view: cannot view ", detail::describe(x), " with strides ",
               shape_str(x.strides()), " as ", shape_str(shape), " without a copy; use reshape");
  Shape in_shape = x.shape();
  return make_view("view", x, shape, *strides, x.offset(),
                   [in_shape](const Tensor& g) { return reshape(g, in_shape); });
}

Tensor reshape(const Tensor& x, const Shape& shape_in) {
  detail::check_defined("reshape", x, "input");
  Shape shape = infer_shape(shape_in, x.numel(), "reshape");
  if (view_strides(x, shape)) return view(x, shape);
  return view(contiguous(x), shape);
}

Tensor permute(const Tensor& x, const std::vector<int64_t>& dims) {
  detail::check_defined("permute", x, "input");
  int64_t n = x.dim();
  MINIDL_CHECK(static_cast<int64_t>(dims.size()) == n, "permute: ", dims.size(),
               " dims given for a tensor of ", n, " dims");
  Shape shape(n), strides(n);
  std::vector<int64_t> inverse(n, -1);
  for (int64_t i = 0; i < n; ++i) {
    int64_t d = wrap_dim(dims[i], n, "permute");
    MINIDL_CHECK(inverse[d] < 0, "permute: dim ", dims[i], " repeated");
    inverse[d] = i;
    shape[i] = x.shape()[d];
    strides[i] = x.strides()[d];
  }
  return make_view("permute", x, shape, strides, x.offset(),
                   [inverse](const Tensor& g) { return permute(g, inverse); });
}

Tensor transpose(const Tensor& x, int64_t dim0, int64_t dim1) {
  detail::check_defined("transpose", x, "input");
  int64_t d0 = wrap_dim(dim0, x.dim(), "transpose"), d1 = wrap_dim(dim1, x.dim(), "transpose");
  if (x.dim() == 0) return x;  // transpose(0, 0) of a scalar: nothing to swap
  std::vector<int64_t> dims(x.dim());
  std::iota(dims.begin(), dims.end(), 0);
  std::swap(dims[d0], dims[d1]);
  return permute(x, dims);
}

Tensor slice(const Tensor& x, int64_t dim, int64_t start, int64_t end, int64_t step) {
  detail::check_defined("slice", x, "input");
  MINIDL_CHECK(x.dim() > 0, "slice: cannot slice a zero-dimensional tensor");
  int64_t d = wrap_dim(dim, x.dim(), "slice");
  int64_t size = x.shape()[d];
  MINIDL_CHECK(step >= 1, "slice: step must be >= 1, got ", step);
  if (start < 0) start += size;
  if (end < 0) end += size;
  start = std::clamp<int64_t>(start, 0, size);
  end = std::clamp<int64_t>(end, start, size);
  Shape shape = x.shape(), strides = x.strides();
  shape[d] = end == start ? 0 : (end - start - 1) / step + 1;  // no overflow for any step
  // With two or more elements kept, step < size, so the stride stays inside the storage.
  if (shape[d] > 1) strides[d] *= step;
  Shape in_shape = x.shape();
  return make_view("slice", x, shape, strides, x.offset() + start * x.strides()[d],
                   [in_shape, d, start, end, step](const Tensor& g) {
                     // The whole dim (e.g. all position embeddings): no zeros, no copy.
                     if (start == 0 && end == in_shape[d] && (step == 1 || end <= 1)) return g;
                     Tensor full_grad = zeros(in_shape, g.options());
                     copy_(slice(full_grad, d, start, end, step), g);
                     return full_grad;
                   });
}

Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length) {
  detail::check_defined("narrow", x, "input");
  MINIDL_CHECK(x.dim() > 0, "narrow: cannot narrow a zero-dimensional tensor");
  int64_t d = wrap_dim(dim, x.dim(), "narrow");
  int64_t end = 0;
  bool fits = checked_add(start, length, &end);
  MINIDL_CHECK(start >= 0 && length >= 0 && fits && end <= x.shape()[d], "narrow: range [", start,
               ", ", fits ? std::to_string(end) : minidl::detail::concat(start, " + ", length),
               ") is outside dim ", dim, " of size ", x.shape()[d]);
  return slice(x, d, start, end);
}

Tensor expand(const Tensor& x, const Shape& shape) {
  detail::check_defined("expand", x, "input");
  if (x.shape() == shape) return x;
  MINIDL_CHECK(shape.size() >= x.shape().size(), "expand: cannot expand ", shape_str(x.shape()),
               " to fewer dims ", shape_str(shape));
  checked_numel(shape, "expand");  // negative sizes, element counts beyond int64
  size_t lead = shape.size() - x.shape().size();
  Shape strides(shape.size(), 0);
  for (size_t i = 0; i < x.shape().size(); ++i) {
    int64_t s = x.shape()[i];
    MINIDL_CHECK(s == shape[lead + i] || s == 1, "expand: cannot expand ", shape_str(x.shape()),
                 " to ", shape_str(shape));
    strides[lead + i] = s == 1 && shape[lead + i] != 1 ? 0 : x.strides()[i];
  }
  Shape in_shape = x.shape();
  return make_view("expand", x, shape, strides, x.offset(),
                   [in_shape](const Tensor& g) { return sum_to(g, in_shape); });
}

Tensor unsqueeze(const Tensor& x, int64_t dim) {
  detail::check_defined("unsqueeze", x, "input");
  int64_t d = wrap_dim(dim, x.dim() + 1, "unsqueeze");
  Shape shape = x.shape(), strides = x.strides();
  int64_t stride = d < x.dim() ? x.strides()[d] * x.shape()[d] : 1;
  shape.insert(shape.begin() + d, 1);
  strides.insert(strides.begin() + d, stride);
  return make_view("unsqueeze", x, shape, strides, x.offset(),
                   [d](const Tensor& g) { return squeeze(g, d); });
}

Tensor squeeze(const Tensor& x, int64_t dim) {
  detail::check_defined("squeeze", x, "input");
  int64_t d = wrap_dim(dim, x.dim(), "squeeze");
  if (x.dim() == 0 || x.shape()[d] != 1) return x;
  Shape shape = x.shape(), strides = x.strides();
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return make_view("squeeze", x, shape, strides, x.offset(),
                   [d](const Tensor& g) { return unsqueeze(g, d); });
}

Tensor clone(const Tensor& x) {
  detail::check_defined("clone", x, "input");
  Tensor y = Tensor::empty(x.shape(), x.options());
  MINIDL_DISPATCH(x.device(), copy, x, y);
  if (autograd::needs_grad({x}))
    autograd::record("clone", {x}, {y}, [](const Grads& g) { return Grads{g[0]}; });
  return y;
}

Tensor contiguous(const Tensor& x) {
  detail::check_defined("contiguous", x, "input");
  return x.is_contiguous() ? x : clone(x);
}

Tensor to(const Tensor& x, DType dtype) {
  detail::check_defined("to", x, "input");
  if (x.dtype() == dtype) return x;
  Tensor y = Tensor::empty(x.shape(), {dtype, x.device(), false});
  MINIDL_DISPATCH(x.device(), copy, x, y);
  if (is_floating(dtype) && autograd::needs_grad({x})) {
    DType from = x.dtype();
    autograd::record("to", {x}, {y}, [from](const Grads& g) { return Grads{to(g[0], from)}; });
  }
  return y;
}

Tensor to(const Tensor& x, Device device) {
  detail::check_defined("to", x, "input");
  if (x.device() == device) return x;
  Tensor src = contiguous(x);
  Tensor y = Tensor::empty(x.shape(), {x.dtype(), device, false});
  backend::copy_bytes(y.raw_data(), device, src.raw_data(), src.device(), src.nbytes());
  if (autograd::needs_grad({src})) {
    Device from = x.device();
    autograd::record("to", {src}, {y}, [from](const Grads& g) { return Grads{to(g[0], from)}; });
  }
  return y;
}

}  // namespace minidl::ops
