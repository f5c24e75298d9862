#pragma once
// Optimizers (libtorch names): parameter groups, zero_grad(), step(),
// set_lr(), a state dict for resume; AdamW and SGD with momentum; and
// clip_grad_norm_. Steps run under NoGradGuard with in-place ops and never
// read a value back to the host, so a training step stays sync-free; the
// learning rate and step counter also live in device memory.
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "nn/module.h"
#include "nn/state_dict.h"

namespace minidl::nn {

struct ParamGroup {
  std::vector<Tensor> params;
  double weight_decay = 0;
};

class Optimizer {
 public:
  // All parameters must share one device (build the optimizer after moving
  // the model); lr_tensor() and step_tensor() are created there.
  Optimizer(std::vector<ParamGroup> groups, double lr, std::string name);
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // Drops every parameter's gradient (set to none).
  void zero_grad();
  // One update of every parameter that has a gradient. The gradient may be
  // bfloat16 on a float32 parameter (mixed precision); no host sync.
  void step();

  // The learning rate of the next steps; when it changes, one small kernel
  // writes it into lr_tensor().
  void set_lr(double lr);
  double lr() const { return lr_; }
  // The loaded state's step count (0 if none) plus the steps step() took since.
  int64_t step_count() const { return step_count_; }
  const std::vector<ParamGroup>& param_groups() const { return groups_; }
  Device device() const { return step_.device(); }
  // The learning rate and step counter as float64 scalars on device(): the
  // fused kernels read them from memory (a captured CUDA graph then sees new
  // values without new kernel arguments), and step() advances the counter
  // there.
  const Tensor& lr_tensor() const { return lr_tensor_; }
  const Tensor& step_tensor() const { return step_; }

  // Mixed precision: copies[i] (bfloat16, shape of params[i]) is the compute
  // copy of parameter params[i]; every update of the parameter also writes its
  // new value into the copy (AdamW does it in its fused kernel). Replaces
  // earlier copies of the same parameters.
  void set_compute_copies(const std::vector<Tensor>& params, const std::vector<Tensor>& copies);

  // "step" (the float64 scalar step_tensor()) and per-parameter state
  // "<group>.<index>.<name>" (e.g. "0.3.exp_avg"), sharing storage with the
  // live state.
  StateDict state_dict() const;
  // Restores state_dict() (tensors on any device); throws naming missing keys
  // or mismatched shapes.
  void load_state_dict(const StateDict& dict);

 protected:
  // A parameter that has a gradient in this step, and its compute copy.
  struct Item {
    size_t group, index;
    Tensor param, grad, copy;
  };
  // Updates every item (grad may be bfloat16 on a float32 param), writes
  // the copies and advances step_tensor() by one; called after step_count()
  // has advanced.
  virtual void apply(const std::vector<Item>& items) = 0;
  // Per-parameter state of subclasses, one list per parameter, same order
  // as the names in state_names().
  virtual std::vector<std::string> state_names() const = 0;
  std::vector<Tensor>& state(size_t group, size_t index) { return state_[group][index]; }
  // Creates zero state tensors like each parameter (call from the subclass
  // constructor).
  void init_state();

 private:
  std::string name_;
  std::vector<ParamGroup> groups_;
  std::vector<std::vector<std::vector<Tensor>>> state_;  // [group][param][state]
  std::vector<std::vector<Tensor>> copies_;               // [group][param], undefined if none
  double lr_;
  int64_t step_count_ = 0;
  Tensor lr_tensor_, step_;
};

// ---- AdamW ----

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // used by the single-group constructor
};

// AdamW (Loshchilov & Hutter, decoupled weight decay), PyTorch's algorithm:
//   p -= lr wd p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
// Every parameter in one multi-tensor step (ops::adamw_step_: one kernel per
// parameter dtype on CUDA, whose last block advances the step counter; a
// counter-only kernel when no parameter has a gradient), which also writes
// the compute copies of mixed precision.
class AdamW : public Optimizer {
 public:
  AdamW(std::vector<ParamGroup> groups, AdamWOptions options = {});
  // One group with options.weight_decay.
  AdamW(std::vector<Tensor> params, AdamWOptions options = {});
  const AdamWOptions& options() const { return options_; }

 protected:
  void apply(const std::vector<Item>& items) override;
  std::vector<std::string> state_names() const override { return {"exp_avg", "exp_avg_sq"}; }

 private:
  AdamWOptions options_;
};

// Two groups for AdamW: {weights of Linear layers with 2+ dims, decayed by
// weight_decay}, {everything else — biases, LayerNorm weights, embeddings —
// not decayed}. Each parameter appears once, in named_parameters() order.
std::vector<ParamGroup> weight_decay_groups(const Module& model, double weight_decay);

// ---- SGD ----

struct SGDOptions {
  double lr = 1e-2;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;  // L2 (added to the gradient); single-group constructor
  bool nesterov = false;
};

// PyTorch's SGD: g += wd p; buf = momentum buf + (1 - dampening) g (buf = g
// on the optimizer's first step); g = nesterov ? g + momentum buf : buf;
// p -= lr g. A few element-wise ops per parameter (not fused), reading lr and
// the step counter from lr_tensor() and step_tensor() as AdamW does, so a
// step captured in a CUDA graph follows set_lr and counts its replays.
class SGD : public Optimizer {
 public:
  SGD(std::vector<ParamGroup> groups, SGDOptions options = {});
  SGD(std::vector<Tensor> params, SGDOptions options = {});
  const SGDOptions& options() const { return options_; }

 protected:
  void apply(const std::vector<Item>& items) override;
  std::vector<std::string> state_names() const override { return {"momentum_buffer"}; }

 private:
  SGDOptions options_;
};

// ---- gradient clipping ----

// Scales the gradients of `params` in place so their global L2 norm is at
// most max_norm (by min(1, max_norm / (norm + 1e-6)), computed on the
// device), and returns the norm before clipping as a scalar tensor on the
// gradients' device (float32, or float64 when a gradient is float64). No
// host synchronisation: a few kernels for all gradients
// (ops::clip_by_global_norm_). Parameters without a gradient are skipped; a
// non-contiguous gradient is replaced by a contiguous copy first.
Tensor clip_grad_norm_(const std::vector<Tensor>& params, double max_norm);

}  // namespace minidl::nn
