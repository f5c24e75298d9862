#include "nn/optim.h"

#include <map>
#include <optional>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "autograd/grad_mode.h"
#include "nn/layers.h"
#include "ops/ops.h"

namespace minidl::nn {

// ---- Optimizer ----

Optimizer::Optimizer(std::vector<ParamGroup> groups, double lr, std::string name)
    : name_(std::move(name)), groups_(std::move(groups)), lr_(lr) {
  std::unordered_set<const TensorImpl*> seen;
  std::optional<Device> device;
  for (size_t g = 0; g < groups_.size(); ++g) {
    for (size_t i = 0; i < groups_[g].params.size(); ++i) {
      const Tensor& p = groups_[g].params[i];
      MINIDL_CHECK(p.defined() && p.is_leaf() && p.requires_grad(), name_, ": parameter ", i,
                   " of group ", g, " must be a leaf tensor that requires grad");
      MINIDL_CHECK(seen.insert(p.impl()).second, name_, ": parameter ", i, " of group ", g,
                   " appears more than once across the parameter groups");
      if (!device) device = p.device();
      MINIDL_CHECK(p.device() == *device, name_, ": parameter ", i, " of group ", g, " is on ",
                   p.device(), ", earlier ones on ", *device, "; all must share one device");
    }
    copies_.emplace_back(groups_[g].params.size());
  }
  const TensorOptions f64{DType::Float64, device.value_or(Device::cpu()), false};
  lr_tensor_ = ops::full({}, lr, f64);
  step_ = ops::zeros({}, f64);
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

void Optimizer::set_lr(double lr) {
  if (lr == lr_) return;
  lr_ = lr;
  NoGradGuard no_grad;
  ops::fill_(lr_tensor_, lr);
}

void Optimizer::set_compute_copies(const std::vector<Tensor>& params,
                                   const std::vector<Tensor>& copies) {
  MINIDL_CHECK(params.size() == copies.size(), name_, ".set_compute_copies: ", params.size(),
               " parameters and ", copies.size(), " copies");
  std::unordered_map<const TensorImpl*, std::pair<size_t, size_t>> where;
  for (size_t g = 0; g < groups_.size(); ++g)
    for (size_t i = 0; i < groups_[g].params.size(); ++i) where[groups_[g].params[i].impl()] = {g, i};
  for (size_t k = 0; k < params.size(); ++k) {
    auto it = where.find(params[k].impl());
    MINIDL_CHECK(it != where.end(), name_, ".set_compute_copies: parameter ", k,
                 " is not one of this optimizer's parameters");
    const Tensor& p = params[k];
    const Tensor& c = copies[k];
    MINIDL_CHECK(c.defined() && c.dtype() == DType::BFloat16 && c.shape() == p.shape() &&
                     c.device() == p.device() && c.is_contiguous(),
                 name_, ".set_compute_copies: copy ", k, " is ",
                 c.defined() ? ::minidl::detail::concat(c.dtype(), " ", shape_str(c.shape()), " on ",
                                                        c.device())
                             : std::string("undefined"),
                 ", expected a contiguous bfloat16 tensor of shape ", shape_str(p.shape()), " on ",
                 p.device());
    copies_[it->second.first][it->second.second] = c;
  }
}

void Optimizer::zero_grad() {
  for (const ParamGroup& group : groups_)
    for (const Tensor& p : group.params) p.zero_grad();
}

void Optimizer::step() {
  NoGradGuard no_grad;
  std::vector<Item> items;
  for (size_t g = 0; g < groups_.size(); ++g)
    for (size_t i = 0; i < groups_[g].params.size(); ++i) {
      const Tensor& p = groups_[g].params[i];
      Tensor grad = p.grad();
      if (!grad.defined()) continue;
      const bool state_here = state_[g][i].empty() || state_[g][i][0].device() == p.device();
      MINIDL_CHECK(grad.device() == p.device() && p.device() == device() && state_here, name_,
                   ".step: parameter ", i, " of group ", g, " is on ", p.device(), ", its gradient on ",
                   grad.device(), ", its state on ",
                   state_here ? p.device() : state_[g][i][0].device(), " and the optimizer on ",
                   device(), "; all must match (move the model before building the optimizer)");
      items.push_back({g, i, p, grad, copies_[g][i]});
    }
  ++step_count_;
  apply(items);
}

StateDict Optimizer::state_dict() const {
  StateDict dict;
  dict.insert("step", step_);
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
  ops::fill_(step_, static_cast<double>(step_count_));
  for (size_t g = 0; g < state_.size(); ++g)
    for (size_t i = 0; i < state_[g].size(); ++i)
      for (size_t k = 0; k < names.size(); ++k)
        ops::copy_(state_[g][i][k],
                   dict.at(std::to_string(g) + "." + std::to_string(i) + "." + names[k]));
}

// ---- AdamW ----

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

void AdamW::apply(const std::vector<Item>& items) {
  std::vector<Tensor> params, grads, exp_avgs, exp_avg_sqs, copies;
  std::vector<double> weight_decays;
  for (const Item& item : items) {
    const std::vector<Tensor>& s = state(item.group, item.index);
    params.push_back(item.param);
    grads.push_back(item.grad);
    exp_avgs.push_back(s[0]);
    exp_avg_sqs.push_back(s[1]);
    copies.push_back(item.copy);
    weight_decays.push_back(param_groups()[item.group].weight_decay);
  }
  ops::adamw_step_(params, grads, exp_avgs, exp_avg_sqs, copies, weight_decays, lr_tensor(),
                   step_tensor(), options_.beta1, options_.beta2, options_.eps);
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

void SGD::apply(const std::vector<Item>& items) {
  // The step counter and lr are read from device memory, as AdamW's kernel
  // reads them, so that the replays of a captured CUDA graph advance the
  // counter and see set_lr's values. The update runs in the parameter's dtype
  // (float32 for bfloat16 parameters, written back rounded once).
  const Tensor& step = step_tensor();
  ops::copy_(step, ops::add(step, 1.0));
  const Tensor neg_lr = ops::neg(lr_tensor());
  // buf = keep buf + take g: (0, 1) on the first step (the buffer starts as
  // the gradient, PyTorch's rule), else (momentum, 1 - dampening).
  Tensor keep, take;
  if (options_.momentum != 0) {
    const TensorOptions f64 = step.options();
    const Tensor first = ops::eq(step, ops::ones({}, f64));
    keep = ops::where(first, ops::zeros({}, f64), ops::full({}, options_.momentum, f64));
    take = ops::where(first, ops::ones({}, f64), ops::full({}, 1.0 - options_.dampening, f64));
  }
  std::map<std::pair<const Tensor*, DType>, Tensor> cast;  // a float64 scalar in a parameter's dtype
  auto in = [&](const Tensor& scalar, DType dtype) -> const Tensor& {
    Tensor& s = cast[{&scalar, dtype}];
    if (!s.defined()) s = ops::to(scalar, dtype);
    return s;
  };
  for (const Item& item : items) {
    const Tensor& param = item.param;
    const DType work = param.dtype() == DType::BFloat16 ? DType::Float32 : param.dtype();
    auto as_work = [&](const Tensor& t) { return t.dtype() == work ? t : ops::to(t, work); };
    const double wd = param_groups()[item.group].weight_decay;
    const Tensor p = as_work(param);
    Tensor g = as_work(item.grad);
    if (wd != 0) g = ops::add(g, ops::mul(p, wd));
    if (options_.momentum != 0) {
      const Tensor& buf = state(item.group, item.index)[0];
      const Tensor b = ops::add(ops::mul(as_work(buf), in(keep, work)), ops::mul(g, in(take, work)));
      ops::copy_(buf, b);
      g = options_.nesterov ? ops::add(g, ops::mul(b, options_.momentum)) : b;
    }
    const Tensor update = ops::mul(g, in(neg_lr, work));
    if (work == param.dtype()) {
      ops::add_(param, update);
    } else {
      ops::copy_(param, ops::add(p, update));
    }
    if (item.copy.defined()) ops::copy_(item.copy, param);
  }
}

// ---- clip_grad_norm_ ----

Tensor clip_grad_norm_(const std::vector<Tensor>& params, double max_norm) {
  MINIDL_CHECK(max_norm > 0, "clip_grad_norm_: max_norm must be positive, got ", max_norm);
  NoGradGuard no_grad;
  std::vector<Tensor> grads;
  for (const Tensor& p : params) {
    Tensor g = p.grad();
    if (!g.defined()) continue;
    if (!g.is_contiguous()) {
      g = g.contiguous();
      p.set_grad(g);
    }
    grads.push_back(g);
  }
  if (grads.empty())
    return ops::zeros({}, {DType::Float32, params.empty() ? Device::cpu() : params[0].device()});
  return ops::clip_by_global_norm_(grads, max_norm);
}

}  // namespace minidl::nn
