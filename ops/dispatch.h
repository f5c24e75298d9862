#pragma once
// Internal helpers shared by op implementations (not a public header).
#include "core/allocator.h"
#include "core/generator.h"
#include "core/tensor.h"

// Calls cpu::fn(args...) or cuda::fn(args...) for `device`, the CUDA one
// with `device` current (backend::DeviceScope: the temporary lives until the
// call returns). In a build without CUDA the CUDA branch is compiled out and
// throws. Ops that call a cuda:: function directly open the scope themselves.
#if defined(MINIDL_WITH_CUDA)
#define MINIDL_DISPATCH(device, fn, ...)                                                            \
  ((device).is_cuda() ? (::minidl::backend::DeviceScope{(device)}, ::minidl::cuda::fn(__VA_ARGS__)) \
                      : ::minidl::cpu::fn(__VA_ARGS__))
#else
#define MINIDL_DISPATCH(device, fn, ...)                                                   \
  ((device).is_cuda() ? throw ::minidl::Error(#fn ": minidl was built without CUDA")      \
                      : ::minidl::cpu::fn(__VA_ARGS__))
#endif

namespace minidl::ops::detail {

// "op: <what> a is float32 [2, 3] on cpu, b is ..." checks.
void check_defined(const char* op, const Tensor& t, const char* name);
void check_same_device(const char* op, const Tensor& a, const Tensor& b);
void check_same_dtype(const char* op, const Tensor& a, const Tensor& b);
void check_floating(const char* op, const Tensor& t);
std::string describe(const Tensor& t);  // "float32 [2, 3] on cuda:0"

// ops::dropout's mask for drop probability p in (0, 1): element i is kept
// when philox::uniform(seed, offset, i) >= keep_threshold, for one offset
// reserved from gen (default_generator() when null); kept elements are
// scaled by 1 / (1 - p). Ops that fuse a dropout draw it here, so they drop
// what ops::dropout would for the same generator state.
struct DropoutMask {
  uint64_t seed;
  PhiloxOffset offset;  // on the device while a CUDA graph is captured
  float keep_threshold;
  double scale;
};
// `x` and `name` for the error when a generator bound to a device offset
// (CUDA graph capture) meets a CPU tensor.
DropoutMask reserve_dropout_mask(double p, Generator* gen, const Tensor& x, const char* name);
// x with the mask applied (a fresh contiguous tensor): dropout's forward, and
// the backward of every op that drops with a mask.
Tensor apply_dropout_mask(const Tensor& x, const DropoutMask& mask);

// Attention dropout numbers its mask rows (branches x B x H x N) in 32 bits
// (core/dilated.h): refuses a problem with more, naming op.
void check_attention_mask_rows(const char* op, size_t branches, int64_t B, int64_t H, int64_t N);

}  // namespace minidl::ops::detail
