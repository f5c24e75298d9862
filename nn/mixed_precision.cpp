#include "nn/mixed_precision.h"

#include "autograd/grad_mode.h"
#include "nn/optim.h"
#include "ops/ops.h"

namespace minidl::nn {

namespace {

// Parameters of `master` and `compute` pair up by name and shape.
void check_same_architecture(const Module& master, const Module& compute) {
  const NamedTensors m = master.named_parameters(), c = compute.named_parameters();
  MINIDL_CHECK(m.size() == c.size(), "MixedPrecision: the master ", master.type_name(), " has ",
               m.size(), " parameters, the compute ", compute.type_name(), " ", c.size(),
               "; pass two instances of one architecture");
  for (size_t i = 0; i < m.size(); ++i) {
    MINIDL_CHECK(m[i].first == c[i].first && m[i].second.shape() == c[i].second.shape(),
                 "MixedPrecision: parameter ", i, " is '", m[i].first, "' ",
                 shape_str(m[i].second.shape()), " in the master, '", c[i].first, "' ",
                 shape_str(c[i].second.shape()), " in the compute model; pass two instances of "
                 "one architecture");
    MINIDL_CHECK(m[i].second.dtype() == DType::Float32, "MixedPrecision: master parameter '",
                 m[i].first, "' is ", m[i].second.dtype(), "; the masters must be float32");
  }
}

}  // namespace

MixedPrecision::MixedPrecision(std::shared_ptr<Module> master, std::shared_ptr<Module> compute)
    : master_(std::move(master)), compute_(std::move(compute)) {
  MINIDL_CHECK(master_ && compute_ && master_ != compute_,
               "MixedPrecision: needs two distinct modules, the float32 master and its compute copy");
  check_same_architecture(*master_, *compute_);
  master_params_ = master_->parameters();
  const Device device = master_params_.empty() ? Device::cpu() : master_params_[0].device();
  compute_->to(device);
  compute_->to(DType::BFloat16);
  compute_params_ = compute_->parameters();
  sync_compute();
}

void MixedPrecision::attach(Optimizer& optimizer) const {
  optimizer.set_compute_copies(master_params_, compute_params_);
}

void MixedPrecision::gradients_to_masters() const {
  NoGradGuard no_grad;
  for (size_t i = 0; i < master_params_.size(); ++i) {
    const Tensor g = compute_params_[i].grad();
    if (!g.defined()) continue;
    const Tensor acc = master_params_[i].grad();
    master_params_[i].set_grad(acc.defined() ? ops::add(acc, ops::to(g, acc.dtype())) : g);
    compute_params_[i].zero_grad();
  }
}

void MixedPrecision::sync_compute() const {
  NoGradGuard no_grad;
  const StateDict from = master_->state_dict(), to = compute_->state_dict();
  for (const auto& [name, t] : from) ops::copy_(to.at(name), t);
}

}  // namespace minidl::nn
