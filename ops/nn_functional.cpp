// Fused neural-network functions over the last dim: softmax, log_softmax,
// cross_entropy (log-softmax + NLL in one pass), layer_norm. Each forward is
// one kernel (cpu/nn_functional, cuda/nn_functional) over a contiguous
// (rows, cols) matrix and saves only what its fused backward kernel needs:
// softmax its output, cross_entropy the logits and per-row logsumexp,
// layer_norm the input with per-row mean and rstd.
#include "autograd/tape.h"
#include "cpu/nn_functional.h"
#include "cuda/nn_functional.h"
#include "ops/dispatch.h"
#include "ops/last_dim.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

using detail::check_param;
using detail::contiguous_input;
using detail::last_dim_rows;
using detail::Rows;
using detail::stats_dtype;

Tensor softmax_impl(const char* op, const Tensor& x, bool log) {
  Rows r = last_dim_rows(op, x);
  Tensor y = Tensor::empty(x.shape(), x.options());
  if (r.rows > 0) MINIDL_DISPATCH(x.device(), softmax_forward, contiguous_input(x), r.rows, r.cols, log, y);
  if (autograd::needs_grad({x})) {
    autograd::record(op, {x}, {y}, [sy = SavedTensor(y, op), r, log](const Grads& g) {
      Tensor dy = contiguous(g[0]);
      Tensor dx = Tensor::empty(dy.shape(), dy.options());
      if (r.rows > 0) MINIDL_DISPATCH(dy.device(), softmax_backward, sy.get(), dy, r.rows, r.cols, log, dx);
      return Grads{dx};
    });
  }
  return y;
}

}  // namespace

Tensor softmax(const Tensor& x) { return softmax_impl("softmax", x, false); }
Tensor log_softmax(const Tensor& x) { return softmax_impl("log_softmax", x, true); }

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  const char* op = "cross_entropy";
  detail::check_defined(op, logits, "logits");
  detail::check_defined(op, targets, "targets");
  detail::check_floating(op, logits);
  MINIDL_CHECK(logits.dim() == 2 && logits.size(1) > 0, op,
               ": expected logits of shape (N, C) with C > 0, got ", detail::describe(logits));
  MINIDL_CHECK(targets.dtype() == DType::Int32, op, ": targets must be int32 class indices, got ",
               detail::describe(targets));
  int64_t rows = logits.size(0), cols = logits.size(1);
  MINIDL_CHECK(targets.dim() == 1 && targets.size(0) == rows, op, ": targets must have shape [", rows,
               "] to match logits ", detail::describe(logits), ", got ", detail::describe(targets));
  detail::check_same_device(op, logits, targets);
  DType sd = stats_dtype(logits.dtype());
  Tensor x = contiguous_input(logits), t = contiguous(targets);
  Tensor loss = Tensor::empty({}, logits.options());
  Tensor lse = Tensor::empty({rows}, {sd, logits.device(), false});
  Tensor count = Tensor::empty({}, {sd, logits.device(), false});
  // CUDA does not check targets on the host (that would need a sync): an
  // out-of-range target makes the loss and its row's gradient NaN instead.
  MINIDL_DISPATCH(logits.device(), cross_entropy_forward, x, t, rows, cols, ignore_index, loss, lse,
                  count);
  if (autograd::needs_grad({logits})) {
    autograd::record(op, {logits}, {loss},
                     [sx = SavedTensor(x, op), st = SavedTensor(t, op), lse, count, rows, cols,
                      ignore_index](const Grads& g) {
                       Tensor x = sx.get();
                       Tensor dx = Tensor::empty(x.shape(), x.options());
                       MINIDL_DISPATCH(x.device(), cross_entropy_backward, contiguous(g[0]), x, st.get(),
                                       lse, count, rows, cols, ignore_index, dx);
                       return Grads{dx};
                     });
  }
  return loss;
}

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  const char* op = "layer_norm";
  Rows r = last_dim_rows(op, x);
  check_param(op, weight, "weight", x, r.cols);
  check_param(op, bias, "bias", x, r.cols);
  MINIDL_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  DType sd = stats_dtype(x.dtype());
  Tensor xc = contiguous_input(x);
  Tensor y = Tensor::empty(x.shape(), x.options());
  Tensor mean = Tensor::empty({r.rows}, {sd, x.device(), false});
  Tensor rstd = Tensor::empty({r.rows}, {sd, x.device(), false});
  Tensor w = weight.defined() ? contiguous_input(weight) : Tensor();
  Tensor b = bias.defined() ? contiguous_input(bias) : Tensor();
  if (r.rows > 0)
    MINIDL_DISPATCH(x.device(), layer_norm_forward, xc, w, b, r.rows, r.cols, eps, y, mean, rstd);
  bool gx = autograd::needs_grad({x}), gw = autograd::needs_grad({weight}),
       gb = autograd::needs_grad({bias});
  if (gx || gw || gb) {
    autograd::record(op, {x, weight, bias}, {y},
                     [sx = SavedTensor(xc, op), sw = SavedTensor(w, op), mean, rstd, r, gx, gw,
                      gb](const Grads& g) {
                       Tensor dy = contiguous(g[0]);
                       Tensor xs = sx.get();
                       TensorOptions o = xs.options();
                       Tensor dx = gx ? Tensor::empty(xs.shape(), o) : Tensor();
                       Tensor dw = gw ? Tensor::empty({r.cols}, o) : Tensor();
                       Tensor db = gb ? Tensor::empty({r.cols}, o) : Tensor();
                       if (r.rows > 0) {
                         MINIDL_DISPATCH(xs.device(), layer_norm_backward, dy, xs, sw.get(), mean, rstd,
                                         r.rows, r.cols, dx, dw, db);
                       } else {  // no rows: the parameter gradients are empty sums
                         if (dw.defined()) zero_(dw);
                         if (db.defined()) zero_(db);
                       }
                       return Grads{dx, dw, db};
                     });
  }
  return y;
}

}  // namespace minidl::ops
