#pragma once
// Element types. float64 is for CPU gradchecks, bfloat16 for tensor-core
// work, int32 for indices and targets.
#include <cstdint>
#include <cstring>
#include <ostream>
#include <string>

#include "core/macros.h"

namespace minidl {

enum class DType : uint8_t { Float32, Float64, BFloat16, Int32 };

size_t element_size(DType dtype);
const char* dtype_name(DType dtype);
inline bool is_floating(DType d) { return d != DType::Int32; }
std::ostream& operator<<(std::ostream& os, DType dtype);

// bfloat16 storage type: the top 16 bits of an IEEE float. Layout-compatible
// with CUDA's __nv_bfloat16; conversion rounds to nearest even.
struct BFloat16 {
  uint16_t bits = 0;

  BFloat16() = default;
  MINIDL_HD explicit BFloat16(float f) : bits(round_bits(f)) {}
  MINIDL_HD operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
#if defined(__CUDA_ARCH__)
    f = __uint_as_float(u);
#else
    std::memcpy(&f, &u, sizeof f);
#endif
    return f;
  }

 private:
  MINIDL_HD static uint16_t round_bits(float f) {
    uint32_t u;
#if defined(__CUDA_ARCH__)
    u = __float_as_uint(f);
#else
    std::memcpy(&u, &f, sizeof u);
#endif
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

// C++ type for a DType.
template <DType D> struct dtype_traits;
template <> struct dtype_traits<DType::Float32> { using type = float; };
template <> struct dtype_traits<DType::Float64> { using type = double; };
template <> struct dtype_traits<DType::BFloat16> { using type = BFloat16; };
template <> struct dtype_traits<DType::Int32> { using type = int32_t; };

// DType for a C++ type.
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::Float32; }
template <> constexpr DType dtype_of<double>() { return DType::Float64; }
template <> constexpr DType dtype_of<BFloat16>() { return DType::BFloat16; }
template <> constexpr DType dtype_of<int32_t>() { return DType::Int32; }

// Calls f with a value of the C++ type of `dtype` (a type tag): kernels use
//   visit_dtype(t.dtype(), [&](auto tag) { using T = decltype(tag); ... });
template <typename F>
decltype(auto) visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::BFloat16: return f(BFloat16{});
    case DType::Int32: return f(int32_t{});
  }
  return f(float{});
}

}  // namespace minidl
