// Fused optimizer steps: in place, never recorded (like the other in-place
// ops they bump the storage version).
#include <cmath>

#include "autograd/grad_mode.h"
#include "cpu/optim.h"
#include "cuda/optim.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {

void adamw_step_(const Tensor& param, const Tensor& grad, const Tensor& exp_avg,
                 const Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                 double weight_decay, int64_t step) {
  const char* op = "adamw_step_";
  for (const Tensor* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    detail::check_defined(op, *t, "tensor");
    detail::check_same_device(op, param, *t);
    detail::check_same_dtype(op, param, *t);
    MINIDL_CHECK(t->shape() == param.shape() && t->is_contiguous(), op,
                 ": param, grad and state must be contiguous with one shape, got ",
                 detail::describe(param), " and ", detail::describe(*t));
  }
  detail::check_floating(op, param);
  MINIDL_CHECK(step >= 1, op, ": step counts from 1, got ", step);
  NoGradGuard no_grad;
  AdamWHyper h{lr, beta1, beta2, eps, weight_decay, 1 - std::pow(beta1, double(step)),
               1 - std::pow(beta2, double(step))};
  MINIDL_DISPATCH(param.device(), adamw_step, param, grad, exp_avg, exp_avg_sq, h);
  for (const Tensor* t : {&param, &exp_avg, &exp_avg_sq}) t->bump_version();
}

}  // namespace minidl::ops
