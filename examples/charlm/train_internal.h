#pragma once
// What the parts of `charlm train` share: train.cpp (the run and the
// command), parallel.cpp (the ranks of --dp/--sp) and train_profile.cpp
// (--profile) all build the model being trained and take its training steps
// the same way. Internal to the command: compare and sample use train.h.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "minidl.h"
#include "options.h"
#include "profile.h"

namespace charlm {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Distinct Philox keys for the batch streams, derived from --seed (the model
// uses the seed itself for its initialisation and dropout streams).
inline uint64_t train_batch_seed(uint64_t seed) { return seed * 0x9e3779b97f4a7c15ull + 0x747261696eull; }
inline uint64_t val_batch_seed(uint64_t seed) { return seed * 0x9e3779b97f4a7c15ull + 0x76616cull; }

// The learning rate of every step: --lr, --min-lr, --warmup, --decay-iters
// (0: --iters).
inline minidl::nn::WarmupCosineLR lr_schedule(const TrainOptions& o) {
  return minidl::nn::WarmupCosineLR(o.lr, o.min_lr, o.warmup, o.decay_iters > 0 ? o.decay_iters : o.iters);
}

// The 90/10 split of the text must hold a context + 1 characters on each side.
void check_split_fits(const TrainOptions& o, const minidl::nn::TrainValSplit& split);

// The model being trained. With --dtype bfloat16 the library's mixed
// precision (nn::MixedPrecision) owns it: the optimizer updates float32
// masters and writes their bfloat16 copy, which runs forward and backward.
// With float32 the master model runs directly.
class TrainModel {
 public:
  TrainModel(const minidl::nn::TransformerLMConfig& config, uint64_t seed, minidl::Device device, bool bf16);

  minidl::nn::TransformerLM& master() { return *master_; }
  // The model that runs forward; its dropout stream is the run's.
  minidl::nn::TransformerLM& compute() { return *compute_; }
  minidl::nn::MixedPrecision* mixed_precision() { return mixed_.get(); }
  const std::vector<minidl::Tensor>& parameters() { return mixed_ ? mixed_->parameters() : master_params(); }
  // Call once the optimizer over master().parameters() exists.
  void attach(minidl::nn::Optimizer& optimizer) {
    if (mixed_) mixed_->attach(optimizer);
  }

  // Mean cross-entropy of the next-character predictions (in float32).
  minidl::Tensor loss(const minidl::Tensor& x, const minidl::Tensor& y);

  // After backward: the masters' gradients (a no-op for float32).
  void gradients_to_masters() {
    if (mixed_) mixed_->gradients_to_masters();
  }

 private:
  const std::vector<minidl::Tensor>& master_params() {
    if (params_.empty()) params_ = master_->parameters();
    return params_;
  }
  std::shared_ptr<minidl::nn::TransformerLM> master_, compute_;
  std::unique_ptr<minidl::nn::MixedPrecision> mixed_;
  std::vector<minidl::Tensor> params_;
};

class Ranks;  // parallel.h: this rank's part in --dp/--sp

// Forward, backward, clipping and the update on the batch (x, y) (with --dp,
// on this rank's rows of it). Returns the loss (the mean over ranks), left on
// the device: nothing here waits for it. `end` (may be empty) marks where the
// work of each phase ends.
minidl::Tensor step_on_batch(TrainModel& model, minidl::nn::AdamW& optimizer, const minidl::Tensor& x,
                             const minidl::Tensor& y, double grad_clip, const std::function<void(Phase)>& end,
                             Ranks* ranks = nullptr);

// One optimisation step at learning rate `lr`, eagerly. `profiler` (may be
// null) marks where the work of each phase ends.
minidl::Tensor train_step(TrainModel& model, minidl::nn::AdamW& optimizer, minidl::nn::BatchSampler& batches, double lr,
                          double grad_clip, StepProfiler* profiler, Ranks* ranks = nullptr);

// The training steps of a run: eager, or on CUDA with the graph on, the
// first step eager (its lazy setup must not happen during a capture) and
// every later one a replay of one CUDA graph of step_on_batch. The graph
// reads its batch from static buffers (the first batch's tensors), which each
// step refills from the sampler, and draws dropout from the model's
// generator at device-side offsets: the same masks and batches as eager.
class StepRunner {
 public:
  StepRunner(TrainModel& model, minidl::nn::AdamW& optimizer, minidl::nn::BatchSampler& batches, double grad_clip,
             bool graph, Ranks* ranks = nullptr);

  // The loss of the step, on the device. With the graph it is the graph's
  // output tensor, which the next step overwrites: read it before then.
  minidl::Tensor step(double lr);

 private:
  TrainModel& model_;
  minidl::nn::AdamW& optimizer_;
  minidl::nn::BatchSampler& batches_;
  double grad_clip_;
  Ranks* ranks_;
  std::unique_ptr<minidl::nn::CudaGraph> graph_;
  minidl::Tensor x_, y_, loss_;  // the graph's static input and output
};

// charlm train --profile N: the recipe's steps, timed per phase (profile.h).
// In train_profile.cpp.
void profile_run(const TrainOptions& o, int64_t steps);

}  // namespace charlm
