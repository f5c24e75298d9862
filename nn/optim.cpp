#include "nn/optim.h"

#include <cmath>
#include <sstream>
#include <unordered_set>

#include "autograd/grad_mode.h"
#include "nn/layers.h"
#include "ops/ops.h"

namespace minidl::nn {

// ---- Optimizer ----

Optimizer::Optimizer(std::vector<ParamGroup> groups, double lr, std::string name)
    : name_(std::move(name)), groups_(std::move(groups)), lr_(lr) {
  std::unordered_set<const TensorImpl*> seen;
  for (size_t g = 0; g < groups_.size(); ++g) {
    for (size_t i = 0; i < groups_[g].params.size(); ++i) {
      const Tensor& p = groups_[g].params[i];
      MINIDL_CHECK(p.defined() && p.is_leaf() && p.requires_grad(), name_, ": parameter ", i,
                   " of group ", g, " must be a leaf tensor that requires grad");
      MINIDL_CHECK(seen.insert(p.impl()).second, name_, ": parameter ", i, " of group ", g,
                   " appears more than once across the parameter groups");
    }
  }
}

void Optimizer::init_state() {
  NoGradGuard no_grad;
  const size_t n_state = state_names().size();
  state_.assign(groups_.size(), {});
  for (size_t g = 0; g < groups_.size(); ++g)
    for (const Tensor& p : groups_[g].params) {
      std::vector<Tensor> s;
      for (size_t k = 0; k < n_state; ++k) s.push_back(ops::zeros(p.shape(), p.options()));
      state_[g].push_back(std::move(s));
    }
}

void Optimizer::zero_grad() {
  for (const ParamGroup& group : groups_)
    for (const Tensor& p : group.params) p.zero_grad();
}

void Optimizer::step() {
  NoGradGuard no_grad;
  ++step_count_;
  for (size_t g = 0; g < groups_.size(); ++g)
    for (size_t i = 0; i < groups_[g].params.size(); ++i) {
      const Tensor& p = groups_[g].params[i];
      Tensor grad = p.grad();
      if (!grad.defined()) continue;
      bool state_here = state_[g][i].empty() || state_[g][i][0].device() == p.device();
      MINIDL_CHECK(grad.device() == p.device() && grad.dtype() == p.dtype() && state_here, name_,
                   ".step: parameter ", i, " of group ", g, " is ", p.dtype(), " on ", p.device(),
                   ", its gradient ", grad.dtype(), " on ", grad.device(), ", its state on ",
                   state_here ? p.device() : state_[g][i][0].device(),
                   "; all must match (move the model before building the optimizer)");
      update(g, i, p, grad);
    }
}

StateDict Optimizer::state_dict() const {
  StateDict dict;
  dict.insert("step", from_vector(std::vector<double>{static_cast<double>(step_count_)}, {}));
  const std::vector<std::string> names = state_names();
  for (size_t g = 0; g < state_.size(); ++g)
    for (size_t i = 0; i < state_[g].size(); ++i)
      for (size_t k = 0; k < names.size(); ++k)
        dict.insert(std::to_string(g) + "." + std::to_string(i) + "." + names[k], state_[g][i][k]);
  return dict;
}

void Optimizer::load_state_dict(const StateDict& dict) {
  std::vector<std::string> problems;
  const std::vector<std::string> names = state_names();
  for (size_t g = 0; g < state_.size(); ++g)
    for (size_t i = 0; i < state_[g].size(); ++i)
      for (size_t k = 0; k < names.size(); ++k) {
        std::string key = std::to_string(g) + "." + std::to_string(i) + "." + names[k];
        const Tensor* src = dict.find(key);
        if (src == nullptr) problems.push_back("missing '" + key + "'");
        else if (src->shape() != state_[g][i][k].shape())
          problems.push_back(::minidl::detail::concat("'", key, "' has shape ", shape_str(src->shape()),
                                                      ", expected ",
                                                      shape_str(state_[g][i][k].shape())));
      }
  const Tensor* step = dict.find("step");
  if (step == nullptr) problems.push_back("missing 'step'");
  else if (step->numel() != 1) problems.push_back("'step' is not a scalar");
  if (!problems.empty()) {
    std::ostringstream msg;
    msg << name_ << ".load_state_dict: the state dict does not match the optimizer:";
    for (size_t i = 0; i < problems.size(); ++i) msg << (i ? ", " : " ") << problems[i];
    throw Error(msg.str());
  }
  NoGradGuard no_grad;
  step_count_ = static_cast<int64_t>(step->item<double>());
  for (size_t g = 0; g < state_.size(); ++g)
    for (size_t i = 0; i < state_[g].size(); ++i)
      for (size_t k = 0; k < names.size(); ++k)
        ops::copy_(state_[g][i][k],
                   dict.at(std::to_string(g) + "." + std::to_string(i) + "." + names[k]));
}

// ---- AdamW ----

void adamw_update_(const Tensor& param, const Tensor& grad, const Tensor& exp_avg,
                   const Tensor& exp_avg_sq, const AdamWStep& h) {
  // Fused: one kernel reads param, grad and both moments once.
  Tensor g = grad.is_contiguous() ? grad : grad.contiguous();
  ops::adamw_step_(param, g, exp_avg, exp_avg_sq, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay,
                   h.step);
}

namespace {
void check_adamw(const AdamWOptions& o) {
  MINIDL_CHECK(o.lr >= 0 && o.eps > 0 && o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1,
               "AdamW: invalid options lr ", o.lr, ", betas (", o.beta1, ", ", o.beta2, "), eps ",
               o.eps, "; need lr >= 0, betas in [0, 1), eps > 0");
}
}  // namespace

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions options)
    : Optimizer(std::move(groups), options.lr, "AdamW"), options_(options) {
  check_adamw(options_);
  init_state();
}

AdamW::AdamW(std::vector<Tensor> params, AdamWOptions options)
    : AdamW(std::vector<ParamGroup>{{std::move(params), options.weight_decay}}, options) {}

void AdamW::update(size_t group, size_t index, const Tensor& param, const Tensor& grad) {
  std::vector<Tensor>& s = state(group, index);
  adamw_update_(param, grad, s[0], s[1],
                {lr(), options_.beta1, options_.beta2, options_.eps,
                 param_groups()[group].weight_decay, step_count()});
}

std::vector<ParamGroup> weight_decay_groups(const Module& model, double weight_decay) {
  std::unordered_set<const TensorImpl*> decayed;
  for (const auto& [prefix, module] : model.named_modules())
    if (dynamic_cast<const Linear*>(module) != nullptr)
      for (const auto& [name, p] : module->named_parameters(false))
        if (p.dim() >= 2) decayed.insert(p.impl());
  ParamGroup decay{{}, weight_decay}, no_decay{{}, 0.0};
  for (const Tensor& p : model.parameters())
    (decayed.count(p.impl()) ? decay : no_decay).params.push_back(p);
  return {decay, no_decay};
}

// ---- SGD ----

SGD::SGD(std::vector<ParamGroup> groups, SGDOptions options)
    : Optimizer(std::move(groups), options.lr, "SGD"), options_(options) {
  MINIDL_CHECK(options_.lr >= 0 && options_.momentum >= 0,
               "SGD: lr and momentum must be non-negative, got lr ", options_.lr, ", momentum ",
               options_.momentum);
  MINIDL_CHECK(!options_.nesterov || (options_.momentum > 0 && options_.dampening == 0),
               "SGD: nesterov needs momentum > 0 and dampening 0");
  init_state();
}

SGD::SGD(std::vector<Tensor> params, SGDOptions options)
    : SGD(std::vector<ParamGroup>{{std::move(params), options.weight_decay}}, options) {}

void SGD::update(size_t group, size_t index, const Tensor& param, const Tensor& grad) {
  const double wd = param_groups()[group].weight_decay;
  Tensor g = wd != 0 ? ops::add(grad, ops::mul(param, wd)) : grad;
  if (options_.momentum != 0) {
    const Tensor& buf = state(group, index)[0];
    if (step_count() == 1) {
      ops::copy_(buf, g);
    } else {
      ops::mul_(buf, options_.momentum);
      ops::add_(buf, g, 1.0 - options_.dampening);
    }
    g = options_.nesterov ? ops::add(g, ops::mul(buf, options_.momentum)) : buf;
  }
  ops::add_(param, g, -lr());
}

// ---- clip_grad_norm_ ----

Tensor clip_grad_norm_(const std::vector<Tensor>& params, double max_norm) {
  MINIDL_CHECK(max_norm > 0, "clip_grad_norm_: max_norm must be positive, got ", max_norm);
  NoGradGuard no_grad;
  std::vector<Tensor> grads;
  bool any_double = false;
  for (const Tensor& p : params) {
    Tensor g = p.grad();
    if (!g.defined()) continue;
    if (!grads.empty())
      MINIDL_CHECK(g.device() == grads[0].device(), "clip_grad_norm_: gradients on ", g.device(),
                   " and ", grads[0].device(), "; all must share a device");
    any_double |= g.dtype() == DType::Float64;
    grads.push_back(g);
  }
  const DType acc = any_double ? DType::Float64 : DType::Float32;
  if (grads.empty()) return ops::zeros({}, {acc, params.empty() ? Device::cpu() : params[0].device()});

  // Sum of squares, accumulated in float32 (float64) whatever the grad dtype.
  Tensor total;
  for (const Tensor& g : grads) {
    Tensor g_acc = ops::to(g, acc);
    Tensor sq = ops::sum(ops::mul(g_acc, g_acc));
    total = total.defined() ? ops::add(total, sq) : sq;
  }
  Tensor norm = ops::sqrt(total);
  // coef = min(1, max_norm / (norm + 1e-6)) = 1 - relu(1 - ratio), on device.
  Tensor ratio = ops::mul(ops::pow(ops::add(norm, 1e-6), -1.0), max_norm);
  Tensor coef = ops::add(ops::neg(ops::relu(ops::add(ops::neg(ratio), 1.0))), 1.0);
  for (const Tensor& g : grads) ops::copy_(g, ops::mul(g, ops::to(coef, g.dtype())));
  return norm;
}

}  // namespace minidl::nn
