#include "nn/schedule.h"

#include <cmath>

#include "core/error.h"

namespace minidl::nn {

ConstantLR::ConstantLR(double lr) : lr_(lr) {
  MINIDL_CHECK(lr >= 0, "ConstantLR: lr must be non-negative, got ", lr);
}

double ConstantLR::lr_at(int64_t) const { return lr_; }

WarmupCosineLR::WarmupCosineLR(double max_lr, double min_lr, int64_t warmup_steps, int64_t decay_steps)
    : max_lr_(max_lr), min_lr_(min_lr), warmup_steps_(warmup_steps), decay_steps_(decay_steps) {
  MINIDL_CHECK(max_lr >= 0 && min_lr >= 0 && min_lr <= max_lr,
               "WarmupCosineLR: need 0 <= min_lr <= max_lr, got min_lr ", min_lr, ", max_lr ", max_lr);
  MINIDL_CHECK(warmup_steps >= 0 && decay_steps >= warmup_steps,
               "WarmupCosineLR: need 0 <= warmup_steps <= decay_steps, got warmup_steps ",
               warmup_steps, ", decay_steps ", decay_steps);
}

double WarmupCosineLR::lr_at(int64_t step) const {
  MINIDL_CHECK(step >= 0, "WarmupCosineLR: step must be non-negative, got ", step);
  if (step < warmup_steps_)
    return max_lr_ * static_cast<double>(step + 1) / static_cast<double>(warmup_steps_ + 1);
  if (step >= decay_steps_) return min_lr_;
  const double ratio = static_cast<double>(step - warmup_steps_) /
                       static_cast<double>(decay_steps_ - warmup_steps_);
  const double coeff = 0.5 * (1.0 + std::cos(M_PI * ratio));
  return min_lr_ + coeff * (max_lr_ - min_lr_);
}

}  // namespace minidl::nn
