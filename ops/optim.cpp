// Multi-tensor optimizer steps: in place, never recorded (like the other
// in-place ops they bump the storage versions they write).
#include "autograd/grad_mode.h"
#include "cpu/optim.h"
#include "cuda/optim.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {

namespace {

void check_scalar_f64(const char* op, const Tensor& t, const char* name, Device device) {
  detail::check_defined(op, t, name);
  MINIDL_CHECK(t.dtype() == DType::Float64 && t.numel() == 1 && t.device() == device, op, ": ", name,
               " must be a float64 scalar on ", device, ", got ", detail::describe(t));
}

}  // namespace

void adamw_step_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                 const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                 const std::vector<Tensor>& copies, const std::vector<double>& weight_decays,
                 const Tensor& lr, const Tensor& step, double beta1, double beta2, double eps) {
  const char* op = "adamw_step_";
  const size_t n = params.size();
  MINIDL_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                   weight_decays.size() == n && (copies.empty() || copies.size() == n),
               op, ": ", n, " params, ", grads.size(), " grads, ", exp_avgs.size(), " exp_avgs, ",
               exp_avg_sqs.size(), " exp_avg_sqs, ", copies.size(), " copies, ", weight_decays.size(),
               " weight decays; expected one of each per param (copies may be empty)");
  detail::check_defined(op, step, "step");
  const Device device = step.device();
  check_scalar_f64(op, step, "step", device);
  check_scalar_f64(op, lr, "lr", device);
  std::vector<AdamWTensors> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    detail::check_defined(op, p, "param");
    MINIDL_CHECK(p.device() == device && p.is_contiguous() && is_floating(p.dtype()), op, ": param ",
                 i, " is ", detail::describe(p), "; expected a contiguous floating tensor on ", device);
    for (const Tensor* s : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      detail::check_defined(op, *s, "state");
      MINIDL_CHECK(s->device() == device && s->dtype() == p.dtype() && s->shape() == p.shape() &&
                       s->is_contiguous(),
                   op, ": state of param ", i, " is ", detail::describe(*s), ", expected contiguous ",
                   detail::describe(p));
    }
    const Tensor& g = grads[i];
    detail::check_defined(op, g, "grad");
    MINIDL_CHECK(g.device() == device && g.shape() == p.shape() &&
                     (g.dtype() == p.dtype() || g.dtype() == DType::BFloat16 ||
                      g.dtype() == DType::Float32),
                 op, ": grad of param ", i, " (", detail::describe(p), ") is ", detail::describe(g),
                 "; expected its shape and device, and its dtype, bfloat16 or float32");
    Tensor copy = copies.empty() ? Tensor() : copies[i];
    if (copy.defined())
      MINIDL_CHECK(copy.device() == device && copy.dtype() == DType::BFloat16 &&
                       copy.shape() == p.shape() && copy.is_contiguous(),
                   op, ": copy of param ", i, " (", detail::describe(p), ") is ",
                   detail::describe(copy), "; expected a contiguous bfloat16 tensor of its shape");
    items.push_back({p, g.is_contiguous() ? g : g.contiguous(), exp_avgs[i], exp_avg_sqs[i], copy,
                     weight_decays[i]});
  }
  MINIDL_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1 && eps > 0, op, ": betas (", beta1,
               ", ", beta2, ") and eps ", eps, "; need betas in [0, 1) and eps > 0");
  NoGradGuard no_grad;
  MINIDL_DISPATCH(device, adamw_step, items, lr, step, AdamWHyper{beta1, beta2, eps});
  step.bump_version();
  for (const AdamWTensors& t : items)
    for (const Tensor* w : {&t.param, &t.exp_avg, &t.exp_avg_sq, &t.copy})
      if (w->defined()) w->bump_version();
}

Tensor clip_by_global_norm_(const std::vector<Tensor>& grads, double max_norm) {
  const char* op = "clip_by_global_norm_";
  MINIDL_CHECK(max_norm > 0, op, ": max_norm must be positive, got ", max_norm);
  bool any_double = false;
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    detail::check_defined(op, g, "gradient");
    detail::check_floating(op, g);
    detail::check_same_device(op, grads[0], g);
    MINIDL_CHECK(g.is_contiguous(), op, ": gradient ", i, " (", detail::describe(g),
                 ") must be contiguous");
    any_double |= g.dtype() == DType::Float64;
  }
  const DType acc = any_double ? DType::Float64 : DType::Float32;
  if (grads.empty()) return zeros({}, {acc, Device::cpu()});
  NoGradGuard no_grad;
  Tensor norm = Tensor::empty({}, {acc, grads[0].device()});
  MINIDL_DISPATCH(norm.device(), clip_by_global_norm, grads, max_norm, norm);
  for (const Tensor& g : grads) g.bump_version();
  return norm;
}

}  // namespace minidl::ops
