#pragma once
// Geometry shared by the dilated-attention kernels: which positions a
// (branch, head, segment) keeps, and the strided views of q/k/v.
#include <cstdint>

#include "core/dilated.h"
#include "core/dtype.h"

namespace minidl::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The kept positions of one (branch, head, segment): core/dilated.h.
using RowSet = KeptRows;

// A (B, N, H, D) operand with the D dim contiguous.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t sb, sn, sh;
  __device__ __forceinline__ const T* row(int64_t b, int64_t pos, int64_t h) const {
    return ptr + b * sb + pos * sn + h * sh;
  }
};

// Per-launch description of one branch over the whole (B, H) grid.
struct BranchGrid {
  int64_t n;               // sequence length
  int64_t heads;           // H
  int64_t w, r;            // segment (clamped to n) and dilation
  int64_t segments;        // ceil(n / w)
  int64_t tiles_per_segment;
  int64_t dim = 0;         // head dim D (the SIMT kernels pad it to a multiple of 32)
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(BFloat16 x) { return static_cast<float>(x); }

}  // namespace minidl::cuda::attn
