// Reductions. The reduced dims are moved last (a permuted view, made
// contiguous), so every kernel reduces rows of a (M, R) matrix.
#include <algorithm>

#include "autograd/tape.h"
#include "cpu/reduce.h"
#include "cuda/reduce.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using Grads = std::vector<Tensor>;

struct Reduction {
  std::vector<bool> reduced;  // per input dim
  Shape kept_shape;           // output shape with keepdim = true
  Shape out_shape;            // requested output shape
  int64_t rows = 1, cols = 1;
  Tensor matrix;              // (rows, cols) contiguous
};

Reduction plan(const char* op, const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  detail::check_defined(op, x, "input");
  int64_t n = x.dim();
  Reduction r;
  r.reduced.assign(n, dims.empty());
  for (int64_t d : dims) {
    int64_t w = wrap_dim(d, n, op);
    MINIDL_CHECK(!r.reduced[w] || dims.empty(), op, ": dim ", d, " given twice");
    r.reduced[w] = true;
  }
  std::vector<int64_t> order;
  for (int64_t d = 0; d < n; ++d)
    if (!r.reduced[d]) order.push_back(d);
  for (int64_t d = 0; d < n; ++d)
    if (r.reduced[d]) order.push_back(d);
  for (int64_t d = 0; d < n; ++d) {
    r.kept_shape.push_back(r.reduced[d] ? 1 : x.shape()[d]);
    if (r.reduced[d]) r.cols *= x.shape()[d];
    else r.rows *= x.shape()[d];
    if (!r.reduced[d] || keepdim) r.out_shape.push_back(r.kept_shape.back());
  }
  NoGradGuard no_grad;
  r.matrix = contiguous(permute(x, order));
  return r;
}

Tensor reduce_sum(const char* op, const Tensor& x, const std::vector<int64_t>& dims, bool keepdim,
                  bool average) {
  Reduction r = plan(op, x, dims, keepdim);
  Tensor y = Tensor::empty(r.out_shape, x.options());
  double scale = average ? 1.0 / static_cast<double>(std::max<int64_t>(r.cols, 1)) : 1.0;
  MINIDL_DISPATCH(x.device(), sum_last, r.matrix, r.rows, r.cols, scale, y);
  if (autograd::needs_grad({x})) {
    autograd::record(op, {x}, {y}, [kept = r.kept_shape, in_shape = x.shape(), scale](const Grads& g) {
      Tensor gk = reshape(g[0], kept);
      return Grads{expand(scale == 1.0 ? gk : mul(gk, scale), in_shape)};
    });
  }
  return y;
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

Tensor sum_to(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  int64_t lead = x.dim() - static_cast<int64_t>(shape.size());
  MINIDL_CHECK(lead >= 0, "sum_to: cannot reduce ", shape_str(x.shape()), " to ", shape_str(shape));
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d < lead || (shape[d - lead] == 1 && x.shape()[d] != 1)) dims.push_back(d);
  Tensor s = dims.empty() ? x : sum(x, dims, true);
  return reshape(s, shape);
}

}  // namespace minidl::ops
