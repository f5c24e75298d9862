#pragma once
// The scalar math of the elementwise ops, shared by the CPU and CUDA kernels
// so both backends compute the same functions. Each entry of the X-macro
// lists is (Name, expression); `x`, `a`, `b` are the operands and `p` the
// scalar parameter, in the op's compute type (float, or double for float64).
// Adding an elementwise op: one line here plus its forward/backward in
// ops/elementwise.cpp.
#include <math.h>

#include <bit>
#include <cstdint>
#include <type_traits>

#include "core/macros.h"

namespace minidl::math {

template <typename T> MINIDL_HD MINIDL_FORCEINLINE T exp_(T x) {
  if constexpr (std::is_same_v<T, float>) return expf(x); else return exp(x);
}
template <typename T> MINIDL_HD MINIDL_FORCEINLINE T log_(T x) {
  if constexpr (std::is_same_v<T, float>) return logf(x); else return log(x);
}
#ifndef __CUDA_ARCH__
// float exp and tanh for the CPU, written so that the compiler vectorises the
// loops that call them: libm's expf/tanhf are calls that stop vectorisation,
// and tanh took a quarter of CPU char-LM training (GELU forward and backward).
// Both are within a few ulp of the float64 values (tests/test_elementwise.cpp);
// NaN propagates.

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of ln2), e^r by its
// Taylor series to r^7, 2^n written into the exponent bits. Clamped to
// [-87, 88], where 2^n stays a normal float.
inline float exp_cpu(float x) {
  x = x > 88.f ? 88.f : x;
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504f;
  const float shifted = t + 12582912.f;  // round to nearest: 1.5 * 2^23, n in its low mantissa bits
  const float n = shifted - 12582912.f;
  float r = fmaf(n, -0.693145751953125f, x);      // ln2, high bits (exact product)
  r = fmaf(n, -1.42860677e-06f, r);               // ln2, the rest
  float p = 1.f / 5040.f;
  p = fmaf(p, r, 1.f / 720.f);
  p = fmaf(p, r, 1.f / 120.f);
  p = fmaf(p, r, 1.f / 24.f);
  p = fmaf(p, r, 1.f / 6.f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.f);
  p = fmaf(p, r, 1.f);
  // n's bits read off `shifted`, not by a float-to-int conversion, which is
  // undefined for NaN (NaN stays NaN through p; the results are otherwise
  // the conversion's, bit for bit, on every float).
  const uint32_t n_bits = std::bit_cast<uint32_t>(shifted) - std::bit_cast<uint32_t>(12582912.f);
  const float scale = std::bit_cast<float>((n_bits + 127u) << 23);
  return p * scale;
}

// tanh: its odd Taylor series to x^9 below |x| = 0.3 (next term < 2e-8
// there), else 1 - 2 / (e^{2|x|} + 1) with the sign of x; |x| >= 10 gives
// exactly +-1, as the correctly rounded tanh does from about 9.1.
inline float tanh_cpu(float x) {
  const float z = x * x;
  float p = 62.f / 2835.f;
  p = fmaf(p, z, -17.f / 315.f);
  p = fmaf(p, z, 2.f / 15.f);
  p = fmaf(p, z, -1.f / 3.f);
  const float small = x * fmaf(z, p, 1.f);  // x * (...) keeps the sign of -0
  float a = fabsf(x);
  a = a > 10.f ? 10.f : a;
  const float big = 1.f - 2.f / (exp_cpu(2.f * a) + 1.f);
  const float large = std::bit_cast<float>(std::bit_cast<uint32_t>(big) | (std::bit_cast<uint32_t>(x) & 0x80000000u));
  return a < 0.3f ? small : large;
}
#endif

template <typename T> MINIDL_HD MINIDL_FORCEINLINE T tanh_(T x) {
  if constexpr (std::is_same_v<T, float>) {
#ifdef __CUDA_ARCH__
    return tanhf(x);
#else
    return tanh_cpu(x);
#endif
  } else {
    return tanh(x);
  }
}
template <typename T> MINIDL_HD MINIDL_FORCEINLINE T sqrt_(T x) {
  if constexpr (std::is_same_v<T, float>) return sqrtf(x); else return sqrt(x);
}
template <typename T> MINIDL_HD MINIDL_FORCEINLINE T pow_(T x, T p) {
  if constexpr (std::is_same_v<T, float>) return powf(x, p); else return pow(x, p);
}

// GELU, tanh approximation: 0.5 x (1 + tanh(c (x + 0.044715 x^3))).
template <typename T> MINIDL_HD MINIDL_FORCEINLINE T gelu(T x) {
  const T c = T(0.7978845608028654);
  return T(0.5) * x * (T(1) + tanh_(c * (x + T(0.044715) * x * x * x)));
}
template <typename T> MINIDL_HD MINIDL_FORCEINLINE T gelu_grad(T x) {
  const T c = T(0.7978845608028654);
  T u = c * (x + T(0.044715) * x * x * x);
  T t = tanh_(u);
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * c * (T(1) + T(3 * 0.044715) * x * x);
}
template <typename T> MINIDL_HD MINIDL_FORCEINLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

}  // namespace minidl::math

// Unary ops: X(Name, expression of x and p).
#define MINIDL_UNARY_OPS(X)                      \
  X(Neg, -x)                                     \
  X(Exp, ::minidl::math::exp_(x))                \
  X(Log, ::minidl::math::log_(x))                \
  X(Tanh, ::minidl::math::tanh_(x))              \
  X(Sqrt, ::minidl::math::sqrt_(x))              \
  X(Relu, x < T(0) ? T(0) : x)                   \
  X(Gelu, ::minidl::math::gelu(x))               \
  X(Sigmoid, ::minidl::math::sigmoid(x))         \
  X(AddScalar, x + p)                            \
  X(MulScalar, x * p)                            \
  X(PowScalar, ::minidl::math::pow_(x, p))       \
  X(Fill, p)

// Binary ops: X(Name, expression of a and b).
#define MINIDL_BINARY_OPS(X)                                  \
  X(Add, a + b)                                               \
  X(Sub, a - b)                                               \
  X(Mul, a * b)                                               \
  X(Div, a / b)                                               \
  X(Gt, a > b ? T(1) : T(0))                                  \
  X(Lt, a < b ? T(1) : T(0))                                  \
  X(Eq, a == b ? T(1) : T(0))                                 \
  X(ReluBackward, b <= T(0) ? T(0) : a)                       \
  X(GeluBackward, a * ::minidl::math::gelu_grad(b))

namespace minidl {

#define MINIDL_ENUM_ENTRY(name, expr) name,
enum class UnaryOp { MINIDL_UNARY_OPS(MINIDL_ENUM_ENTRY) };
enum class BinaryOp { MINIDL_BINARY_OPS(MINIDL_ENUM_ENTRY) };
#undef MINIDL_ENUM_ENTRY

// One functor per op, usable from host and device code:
//   UnaryFn<UnaryOp::Exp>{}(x, p), BinaryFn<BinaryOp::Add>{}(a, b).
template <UnaryOp op> struct UnaryFn;
template <BinaryOp op> struct BinaryFn;
#define MINIDL_UNARY_FN(name, expr)                                          \
  template <> struct UnaryFn<UnaryOp::name> {                                \
    template <typename T> MINIDL_HD MINIDL_FORCEINLINE T operator()(T x, T p) const { \
      (void)p;                                                               \
      return expr;                                                           \
    }                                                                        \
  };
#define MINIDL_BINARY_FN(name, expr)                                         \
  template <> struct BinaryFn<BinaryOp::name> {                              \
    template <typename T> MINIDL_HD MINIDL_FORCEINLINE T operator()(T a, T b) const { \
      return expr;                                                           \
    }                                                                        \
  };
MINIDL_UNARY_OPS(MINIDL_UNARY_FN)
MINIDL_BINARY_OPS(MINIDL_BINARY_FN)
#undef MINIDL_UNARY_FN
#undef MINIDL_BINARY_FN

// Calls f(UnaryFn<op>{}) with the functor for a run-time op value.
template <typename F> decltype(auto) visit_unary(UnaryOp op, F&& f) {
  switch (op) {
#define MINIDL_CASE(name, expr) \
  case UnaryOp::name: return f(UnaryFn<UnaryOp::name>{});
    MINIDL_UNARY_OPS(MINIDL_CASE)
#undef MINIDL_CASE
  }
  return f(UnaryFn<UnaryOp::Neg>{});
}
template <typename F> decltype(auto) visit_binary(BinaryOp op, F&& f) {
  switch (op) {
#define MINIDL_CASE(name, expr) \
  case BinaryOp::name: return f(BinaryFn<BinaryOp::name>{});
    MINIDL_BINARY_OPS(MINIDL_CASE)
#undef MINIDL_CASE
  }
  return f(BinaryFn<BinaryOp::Add>{});
}

// Compute type of a storage type: float for float32/bfloat16, double for
// float64 (and for int32, so integer values stay exact).
template <typename S> struct compute_type { using type = float; };
template <> struct compute_type<double> { using type = double; };
template <> struct compute_type<int32_t> { using type = double; };
template <typename S> using compute_t = typename compute_type<S>::type;

// A compute value stored as S. For int32 the value, truncated toward zero,
// wraps around as int32 arithmetic does (PyTorch's int32 ops wrap too), and
// NaN gives 0: a plain conversion of an out-of-range double is undefined
// (x86 gives INT32_MIN, a GPU saturates), so CPU and CUDA would differ.
template <typename S, typename C> MINIDL_HD MINIDL_FORCEINLINE S from_compute(C v) {
  if constexpr (std::is_same_v<S, int32_t>) {
    if (!(v == v)) return 0;
    const C lim = C(9.0e18);  // inside int64 (reached only by a division by zero)
    return static_cast<int32_t>(static_cast<int64_t>(v > lim ? lim : v < -lim ? -lim : v));
  } else {
    return static_cast<S>(v);
  }
}

}  // namespace minidl
