#pragma once
// CUDA rotary position embedding (RoPE) launcher; same contract, convention
// and angle computation as cpu/rope.h. float32 or bfloat16 (fp32 math, angles
// in double then reduced mod 2 pi before sincosf).
#include <cstdint>

#include "core/tensor.h"

namespace minidl::cuda {

void rope(const Tensor& x, int64_t position_offset, double base, bool inverse, const Tensor& out);

}  // namespace minidl::cuda
