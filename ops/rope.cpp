// Rotary position embedding (RoPE, Su et al. 2021): turns each pair
// (x[2i], x[2i+1]) of a (B, N, H, D) row by (position_offset + n) *
// base^(-2i/D). The kernels (cpu/rope, cuda/rope) hold the convention and the
// angle arithmetic. A rotation is orthogonal, so the backward pass is the same
// kernel turning by the negative angle.
#include <cmath>

#include "autograd/tape.h"
#include "cpu/rope.h"
#include "cuda/rope.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using Grads = std::vector<Tensor>;

// Positions are exact in double (and so the angles) below 2^53.
constexpr int64_t kMaxPosition = int64_t{1} << 53;

Tensor rope_rotate(const Tensor& x_in, int64_t position_offset, double base, bool inverse) {
  // The kernels need the D dim contiguous; other strides are free.
  Tensor x = x_in;
  if (x.size(3) > 1 && x.stride(3) != 1) {
    NoGradGuard no_grad;
    x = contiguous(x_in);
  }
  Tensor out = Tensor::empty(x.shape(), x.options());
  if (out.numel() > 0) MINIDL_DISPATCH(x.device(), rope, x, position_offset, base, inverse, out);
  if (autograd::needs_grad({x_in})) {
    autograd::record(inverse ? "rope backward" : "rope", {x_in}, {out},
                     [position_offset, base, inverse](const Grads& g) {
                       return Grads{rope_rotate(g[0], position_offset, base, !inverse)};
                     });
  }
  return out;
}

}  // namespace

Tensor rope(const Tensor& x, int64_t position_offset, double base) {
  const char* op = "rope";
  detail::check_defined(op, x, "x");
  MINIDL_CHECK(x.dim() == 4, op, ": x must be 4-D (B, N, H, D), got ", detail::describe(x));
  MINIDL_CHECK(x.size(3) >= 2 && x.size(3) % 2 == 0, op,
               ": head dim D must be even and positive (pairs (x[2i], x[2i+1]) rotate together), "
               "got D = ",
               x.size(3), " in x ", detail::describe(x));
  DType dt = x.dtype();
  MINIDL_CHECK(dt == DType::Float32 || dt == DType::BFloat16 || dt == DType::Float64, op,
               ": unsupported dtype (x is ", detail::describe(x),
               "); expected float32, bfloat16 or float64");
  MINIDL_CHECK(!(dt == DType::Float64 && x.is_cuda()), op,
               ": float64 is supported on the CPU only (x is ", detail::describe(x),
               "); use float32 or bfloat16 on CUDA");
  MINIDL_CHECK(std::isfinite(base) && base > 0, op, ": base must be positive and finite, got ",
               base);
  MINIDL_CHECK(position_offset > -kMaxPosition && position_offset < kMaxPosition - x.size(1), op,
               ": positions position_offset + n must stay within +-2^53, got position_offset ",
               position_offset, " with N = ", x.size(1));
  return rope_rotate(x, position_offset, base, /*inverse=*/false);
}

}  // namespace minidl::ops
