#pragma once
// Mixed-precision training for any Module: the optimizer updates float32
// master weights, and a bfloat16 copy of the model runs forward and backward.
// With an attached AdamW a step costs no extra kernels: the bfloat16
// gradients are handed to the masters by handle, and AdamW's fused kernel
// writes each updated master into its bfloat16 copy (SGD copies each one, a
// kernel per parameter).
//
//   auto master = std::make_shared<MyNet>(config);   // float32
//   master->to(device);
//   auto compute = std::make_shared<MyNet>(config);  // becomes the bfloat16 copy
//   nn::MixedPrecision mp(master, compute);
//   nn::AdamW opt(nn::weight_decay_groups(mp.master(), 0.1), {.lr = 1e-3});
//   mp.attach(opt);
//   for (...) {
//     Tensor loss = loss_of(compute->forward(x));     // the bfloat16 model
//     opt.zero_grad();
//     loss.backward();
//     mp.gradients_to_masters();
//     nn::clip_grad_norm_(mp.parameters(), 1.0);
//     opt.step();
//   }
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "nn/module.h"

namespace minidl::nn {

class Optimizer;

class MixedPrecision {
 public:
  // `master`: the float32 model, already on its training device. `compute`:
  // a second instance of the same architecture (same parameter and buffer
  // names and shapes; its values are overwritten): moved to the master's
  // device, cast to bfloat16 and loaded from the master here.
  MixedPrecision(std::shared_ptr<Module> master, std::shared_ptr<Module> compute);

  Module& master() const { return *master_; }
  // The bfloat16 model that runs forward and backward.
  Module& compute() const { return *compute_; }
  // The float32 masters: what the optimizer updates and clip_grad_norm_ clips.
  const std::vector<Tensor>& parameters() const { return master_params_; }

  // Makes `optimizer` (built on the masters) write every updated master into
  // its bfloat16 copy, so the compute model is current after each step.
  void attach(Optimizer& optimizer) const;

  // After backward: the compute model's bfloat16 gradients become the
  // masters' gradients (moved by handle, no kernel; a master that already has
  // one accumulates) and the compute model's are dropped.
  void gradients_to_masters() const;

  // Copies every master parameter and buffer into the compute model (cast):
  // after the masters were loaded or changed outside an attached optimizer.
  void sync_compute() const;

 private:
  std::shared_ptr<Module> master_, compute_;
  std::vector<Tensor> master_params_, compute_params_;
};

}  // namespace minidl::nn
