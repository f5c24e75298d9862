#pragma once
// The scalar math of the elementwise ops, shared by the CPU and CUDA kernels
// so both backends compute the same functions. Each entry of the X-macro
// lists is (Name, expression); `x`, `a`, `b` are the operands and `p` the
// scalar parameter, in the op's compute type (float, or double for float64).
// Adding an elementwise op: one line here plus its forward/backward in
// ops/elementwise.cpp.
#include <math.h>

#include <type_traits>

#include "core/macros.h"

namespace minidl::math {

template <typename T> MINIDL_HD MINIDL_FORCEINLINE T exp_(T x) {
  if constexpr (std::is_same_v<T, float>) return expf(x); else return exp(x);
}
template <typename T> MINIDL_HD MINIDL_FORCEINLINE T log_(T x) {
  if constexpr (std::is_same_v<T, float>) return logf(x); else return log(x);
}
template <typename T> MINIDL_HD MINIDL_FORCEINLINE T tanh_(T x) {
  if constexpr (std::is_same_v<T, float>) return tanhf(x); else return tanh(x);
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
  X(Relu, x > T(0) ? x : T(0))                   \
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
  X(ReluBackward, b > T(0) ? a : T(0))                        \
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

}  // namespace minidl
