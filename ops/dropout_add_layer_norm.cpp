// The transformer's "add and norm" as one op: sum = residual + dropout(h),
// z = layer_norm(sum). Forward is one kernel (cpu/ and cuda/
// dropout_add_layer_norm) that writes both; backward one kernel that takes
// dz and the sum's other gradient and gives d residual, d h (the mask
// regenerated from the saved seed and offset, never stored) and the
// parameter gradients (per-block partial sums, then one small reduction).
// Unfused this is dropout, add and layer_norm: three kernels forward, four or
// five backward (dropout, layer norm, its reduction, the add of the sum's two
// gradients).
#include "autograd/tape.h"
#include "cpu/dropout_add_layer_norm.h"
#include "cuda/dropout_add_layer_norm.h"
#include "ops/dispatch.h"
#include "ops/last_dim.h"
#include "ops/ops.h"

namespace minidl::ops {

std::pair<Tensor, Tensor> dropout_add_layer_norm(const Tensor& h, const Tensor& residual,
                                                 const Tensor& weight, const Tensor& bias, double p,
                                                 bool training, Generator* gen, double eps) {
  const char* op = "dropout_add_layer_norm";
  detail::check_defined(op, h, "h");
  detail::Rows r = detail::last_dim_rows(op, residual);
  detail::check_same_device(op, residual, h);
  detail::check_same_dtype(op, residual, h);
  MINIDL_CHECK(h.shape() == residual.shape(), op, ": h must have the residual's shape (no broadcasting), got h ",
               detail::describe(h), " and residual ", detail::describe(residual));
  detail::check_param(op, weight, "weight", residual, r.cols);
  detail::check_param(op, bias, "bias", residual, r.cols);
  MINIDL_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  MINIDL_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  // No dropout: a threshold of 0 keeps everything and draws nothing.
  const bool drop = training && p > 0.0;
  const detail::DropoutMask mask =
      drop ? detail::reserve_dropout_mask(p, gen, residual, op) : detail::DropoutMask{0, {}, 0.0f, 1.0};
  const TensorOptions o = residual.options();
  const TensorOptions so{detail::stats_dtype(residual.dtype()), residual.device(), false};
  Tensor hc = detail::contiguous_input(h), rc = detail::contiguous_input(residual);
  Tensor w = weight.defined() ? detail::contiguous_input(weight) : Tensor();
  Tensor b = bias.defined() ? detail::contiguous_input(bias) : Tensor();
  Tensor sum = Tensor::empty(residual.shape(), o), z = Tensor::empty(residual.shape(), o);
  Tensor mean = Tensor::empty({r.rows}, so), rstd = Tensor::empty({r.rows}, so);
  if (r.rows > 0)
    MINIDL_DISPATCH(residual.device(), dropout_add_layer_norm_forward, hc, rc, mask.seed, mask.offset,
                    mask.keep_threshold, mask.scale, w, b, r.rows, r.cols, eps, sum, z, mean, rstd);
  const bool gh = autograd::needs_grad({h}), gr = autograd::needs_grad({residual}),
             gw = autograd::needs_grad({weight}), gb = autograd::needs_grad({bias});
  if (gh || gr || gw || gb) {
    autograd::record(
        op, {h, residual, weight, bias}, {sum, z},
        [ss = autograd::SavedTensor(sum, op), sw = autograd::SavedTensor(w, op), mean, rstd, mask, drop, r, gh,
         gr, gw, gb](const std::vector<Tensor>& g) {
          Tensor s = ss.get();
          const TensorOptions o = s.options();
          // Outputs that got no gradient arrive undefined (MissingGrad::Undefined):
          // a sum read only by the layer norm (the last block's) needs no zeros.
          Tensor dsum = g[0].defined() ? contiguous(g[0]) : Tensor();
          Tensor dz = g[1].defined() ? contiguous(g[1]) : zeros(s.shape(), o);
          Tensor dres = gh || gr ? Tensor::empty(s.shape(), o) : Tensor();
          Tensor dh = gh && drop ? Tensor::empty(s.shape(), o) : Tensor();  // else dh = dres
          Tensor dw = gw ? Tensor::empty({r.cols}, o) : Tensor();
          Tensor db = gb ? Tensor::empty({r.cols}, o) : Tensor();
          if (r.rows > 0) {
            MINIDL_DISPATCH(s.device(), dropout_add_layer_norm_backward, dz, dsum, s, sw.get(), mean, rstd,
                            mask.seed, mask.offset, mask.keep_threshold, mask.scale, r.rows, r.cols, dres, dh,
                            dw, db);
          } else {  // no rows: the parameter gradients are empty sums
            if (dw.defined()) zero_(dw);
            if (db.defined()) zero_(db);
          }
          return std::vector<Tensor>{gh ? (drop ? dh : dres) : Tensor(), gr ? dres : Tensor(), dw, db};
        },
        autograd::MissingGrad::Undefined);
  }
  return {sum, z};
}

}  // namespace minidl::ops
