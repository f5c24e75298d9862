#pragma once
// CPU rotary position embedding (RoPE) kernel; same contract as cuda/rope.h.
//
// Convention (RoFormer's, interleaved pairs): for x (B, N, H, D), D even, each
// pair (x[2i], x[2i+1]) of a row at sequence index n turns by
//   theta(n, i) = (position_offset + n) * base^(-2i/D),   i = 0 .. D/2 - 1:
//   out[2i]   = x[2i] cos(theta) - x[2i+1] sin(theta)
//   out[2i+1] = x[2i] sin(theta) + x[2i+1] cos(theta)
// `inverse` turns by -theta instead (the backward pass: a rotation's
// transpose is its inverse).
//
// Angles, so that float32 holds its accuracy at positions of 2^20 and beyond
// (where theta reaches ~1e6 rad and a float32 theta would be off by ~0.03):
//  - float64: theta = pos * inv_freq in double, std::sin/std::cos in double.
//  - float32 / bfloat16: theta in double, reduced to [-pi, pi] in double with
//    one fma against 2 pi (error < 1e-10 rad at pos 2^20), then sin/cos in
//    float on the small reduced angle. cuda/rope.cu computes the same way.
// inv_freq(i) = exp2(-(2i/D) log2(base)) in double on both backends.
//
// Layout: x has the D dim contiguous (stride 1; other strides free, e.g. a
// (B, T, H, D) view of a fused QKV projection); out is contiguous (B, N, H, D)
// of x's dtype and fully overwritten. float32, bfloat16 or float64.
#include <cstdint>

#include "core/tensor.h"

namespace minidl::cpu {

void rope(const Tensor& x, int64_t position_offset, double base, bool inverse, const Tensor& out);

}  // namespace minidl::cpu
