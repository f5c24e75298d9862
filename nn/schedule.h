#pragma once
// Learning-rate schedules: lr_at(step) for step = 0, 1, ... (the step about
// to be taken); the training loop calls optimizer.set_lr(schedule.lr_at(s)).
#include <cstdint>

namespace minidl::nn {

class LRSchedule {
 public:
  virtual ~LRSchedule() = default;
  virtual double lr_at(int64_t step) const = 0;
};

class ConstantLR : public LRSchedule {
 public:
  explicit ConstantLR(double lr);
  double lr_at(int64_t step) const override;

 private:
  double lr_;
};

// nanoGPT's schedule: linear warmup max_lr (step+1)/(warmup_steps+1) for
// step < warmup_steps; then cosine decay from max_lr (at warmup_steps) to
// min_lr (at decay_steps); min_lr after decay_steps.
class WarmupCosineLR : public LRSchedule {
 public:
  WarmupCosineLR(double max_lr, double min_lr, int64_t warmup_steps, int64_t decay_steps);
  double lr_at(int64_t step) const override;

 private:
  double max_lr_, min_lr_;
  int64_t warmup_steps_, decay_steps_;
};

}  // namespace minidl::nn
