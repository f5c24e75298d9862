// Reductions. The reduced dims are moved last (a permuted view, made
// contiguous), so every kernel reduces rows of a (M, R) matrix; a sum whose
// reduced dims already lead a contiguous input (bias gradients, sum_to)
// reduces the columns of the input in place instead of transposing it.
#include <algorithm>
#include <limits>

#include "autograd/tape.h"
#include "cpu/reduce.h"
#include "cuda/reduce.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

struct Reduction {
  std::vector<bool> reduced;   // per input dim
  std::vector<int64_t> order;  // kept dims first, then reduced dims
  Shape kept_shape;            // output shape with keepdim = true
  Shape out_shape;             // requested output shape
  int64_t rows = 1, cols = 1;  // kept and reduced element counts
  Tensor matrix;               // (rows, cols) contiguous; (cols, rows) when leading
  bool leading = false;        // the reduced dims lead a contiguous input
};

// True when, ignoring dims of size 1, every reduced dim comes before every
// kept dim: a contiguous input is then already a (reduced, kept) matrix.
bool reduced_dims_lead(const Tensor& x, const std::vector<bool>& reduced) {
  bool seen_kept = false;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.shape()[d] == 1) continue;
    if (!reduced[d]) seen_kept = true;
    else if (seen_kept) return false;
  }
  return true;
}

Reduction plan(const char* op, const Tensor& x, const std::vector<int64_t>& dims, bool keepdim,
               bool allow_leading = false) {
  detail::check_defined(op, x, "input");
  int64_t n = x.dim();
  Reduction r;
  NoGradGuard no_grad;
  if (n == 0) {  // a scalar: dim 0 / -1 name the scalar itself
    for (int64_t d : dims) wrap_dim(d, n, op);
    r.matrix = contiguous(x);
    return r;
  }
  r.reduced.assign(n, dims.empty());
  for (int64_t d : dims) {
    int64_t w = wrap_dim(d, n, op);
    MINIDL_CHECK(!r.reduced[w] || dims.empty(), op, ": dim ", d, " given twice");
    r.reduced[w] = true;
  }
  for (int64_t d = 0; d < n; ++d)
    if (!r.reduced[d]) r.order.push_back(d);
  for (int64_t d = 0; d < n; ++d)
    if (r.reduced[d]) r.order.push_back(d);
  for (int64_t d = 0; d < n; ++d) {
    r.kept_shape.push_back(r.reduced[d] ? 1 : x.shape()[d]);
    if (r.reduced[d]) r.cols *= x.shape()[d];
    else r.rows *= x.shape()[d];
    if (!r.reduced[d] || keepdim) r.out_shape.push_back(r.kept_shape.back());
  }
  if (allow_leading && r.rows > 1 && r.cols > 1 && x.is_contiguous() &&
      reduced_dims_lead(x, r.reduced)) {
    r.leading = true;
    r.matrix = x;
  } else {
    r.matrix = contiguous(permute(x, r.order));
  }
  return r;
}

// A contiguous (rows, cols) gradient in the permuted order of `r`, returned
// to the input's layout.
Tensor unpermute(const Tensor& g, const std::vector<int64_t>& order, const Shape& in_shape) {
  if (in_shape.empty()) return reshape(g, in_shape);
  Shape permuted;
  std::vector<int64_t> inverse(order.size());
  bool identity = true;
  for (size_t i = 0; i < order.size(); ++i) {
    permuted.push_back(in_shape[static_cast<size_t>(order[i])]);
    inverse[static_cast<size_t>(order[i])] = static_cast<int64_t>(i);
    identity = identity && order[i] == static_cast<int64_t>(i);
  }
  Tensor v = reshape(g, permuted);
  return identity ? v : contiguous(permute(v, inverse));
}

Tensor reduce_sum(const char* op, const Tensor& x, const std::vector<int64_t>& dims, bool keepdim,
                  bool average) {
  // An int32 mean would truncate (PyTorch refuses it too); int32 sums wrap (from_compute).
  if (average) detail::check_floating(op, x);
  Reduction r = plan(op, x, dims, keepdim, /*allow_leading=*/true);
  Tensor y = Tensor::empty(r.out_shape, x.options());
  double scale = average ? 1.0 / static_cast<double>(std::max<int64_t>(r.cols, 1)) : 1.0;
  if (r.leading) MINIDL_DISPATCH(x.device(), sum_first, r.matrix, r.cols, r.rows, scale, y);
  else MINIDL_DISPATCH(x.device(), sum_last, r.matrix, r.rows, r.cols, scale, y);
  if (autograd::needs_grad({x})) {
    autograd::record(op, {x}, {y}, [kept = r.kept_shape, in_shape = x.shape(), scale](const Grads& g) {
      Tensor gk = reshape(g[0], kept);
      return Grads{expand(scale == 1.0 ? gk : mul(gk, scale), in_shape)};
    });
  }
  return y;
}

// Max over `dims` (one dim, or all when empty): values (unless !want_values)
// and int32 indices into the reduced extent; the gradient goes to the first
// maximum of each row.
std::pair<Tensor, Tensor> reduce_max(const char* op, const Tensor& x, const std::vector<int64_t>& dims,
                                     bool keepdim, bool want_values) {
  Reduction r = plan(op, x, dims, keepdim);
  MINIDL_CHECK(r.cols > 0, op, ": cannot reduce over zero elements (input ", detail::describe(x),
               dims.empty() ? "" : minidl::detail::concat(", dim ", dims[0]), ")");
  MINIDL_CHECK(r.cols <= std::numeric_limits<int32_t>::max(), op, ": ", r.cols,
               " elements per reduction do not fit the int32 indices (input ", detail::describe(x), ")");
  Tensor values = want_values ? Tensor::empty(r.out_shape, x.options()) : Tensor();
  Tensor indices = Tensor::empty(r.out_shape, {DType::Int32, x.device(), false});
  MINIDL_DISPATCH(x.device(), max_last, r.matrix, r.rows, r.cols, values, indices);
  if (want_values && is_floating(x.dtype()) && autograd::needs_grad({x})) {
    // Only the values are an output of the node: indices carry no gradient.
    autograd::record(op, {x}, {values},
                     [si = SavedTensor(indices, op), order = r.order, in_shape = x.shape(),
                      rows = r.rows, cols = r.cols](const Grads& g) {
                       Tensor grad = contiguous(g[0]);
                       Tensor grad_in = Tensor::empty({rows, cols}, grad.options());
                       MINIDL_DISPATCH(grad.device(), max_last_backward, grad, si.get(), rows, cols,
                                       grad_in);
                       return Grads{unpermute(grad_in, order, in_shape)};
                     });
  }
  return {values, indices};
}

}  // namespace

Tensor sum(const Tensor& x) { return reduce_sum("sum", x, {}, false, false); }
Tensor sum(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  MINIDL_CHECK(!dims.empty(), "sum: empty dim list; use sum(x) for a full reduction");
  return reduce_sum("sum", x, dims, keepdim, false);
}
Tensor mean(const Tensor& x) { return reduce_sum("mean", x, {}, false, true); }
Tensor mean(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  MINIDL_CHECK(!dims.empty(), "mean: empty dim list; use mean(x) for a full reduction");
  return reduce_sum("mean", x, dims, keepdim, true);
}

std::pair<Tensor, Tensor> max(const Tensor& x, int64_t dim, bool keepdim) {
  return reduce_max("max", x, {dim}, keepdim, true);
}
Tensor max(const Tensor& x) { return reduce_max("max", x, {}, false, true).first; }
Tensor argmax(const Tensor& x, int64_t dim, bool keepdim) {
  return reduce_max("argmax", x, {dim}, keepdim, false).second;
}

Tensor sum_to(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  int64_t lead = x.dim() - static_cast<int64_t>(shape.size());
  MINIDL_CHECK(lead >= 0, "sum_to: cannot reduce ", shape_str(x.shape()), " to ", shape_str(shape));
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (d >= lead)
      MINIDL_CHECK(shape[d - lead] == x.shape()[d] || shape[d - lead] == 1, "sum_to: cannot reduce ",
                   shape_str(x.shape()), " to ", shape_str(shape));
    if (d < lead || (shape[d - lead] == 1 && x.shape()[d] != 1)) dims.push_back(d);
  }
  Tensor s = dims.empty() ? x : sum(x, dims, true);
  return reshape(s, shape);
}

}  // namespace minidl::ops
