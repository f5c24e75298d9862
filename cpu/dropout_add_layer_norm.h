#pragma once
// CPU kernels of ops::dropout_add_layer_norm: sum = residual + dropout(h),
// z = layer_norm(sum), and the backward. Every tensor is contiguous;
// x-like tensors are (rows, cols) matrices. The dropout mask is ops::dropout's
// (cpu/random.h): element i of h is kept when
// philox::uniform(seed, offset, i) >= keep_threshold; keep_threshold <= 0
// keeps every element (no dropout) and then scale is 1. Values are rounded
// to the storage dtype where the unfused ops would store them, so the
// results equal those of dropout, add and layer_norm composed (bitwise in
// bfloat16; in float32/float64 the compiler may fuse h * scale + residual
// into one multiply-add, a rounding fewer).
#include "core/generator.h"
#include "core/tensor.h"

namespace minidl::cpu {

// Writes sum, z, and mean and rstd (rows; the compute type) for the backward.
// weight and bias (cols) may be undefined.
void dropout_add_layer_norm_forward(const Tensor& h, const Tensor& residual, uint64_t seed,
                                    PhiloxOffset offset, float keep_threshold, double scale,
                                    const Tensor& weight, const Tensor& bias, int64_t rows,
                                    int64_t cols, double eps, const Tensor& sum, const Tensor& z,
                                    const Tensor& mean, const Tensor& rstd);
// From dz (z's gradient) and dsum (sum's gradient from its other users;
// undefined when none): dresidual = layer_norm's input gradient + dsum,
// dh = mask * scale * dresidual, dweight and dbias; each output is written
// only when defined (dh only along with dresidual).
void dropout_add_layer_norm_backward(const Tensor& dz, const Tensor& dsum, const Tensor& sum,
                                     const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                                     uint64_t seed, PhiloxOffset offset, float keep_threshold,
                                     double scale, int64_t rows, int64_t cols,
                                     const Tensor& dresidual, const Tensor& dh,
                                     const Tensor& dweight, const Tensor& dbias);

}  // namespace minidl::cpu
