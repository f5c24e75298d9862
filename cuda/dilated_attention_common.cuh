#pragma once
// Geometry shared by the dilated-attention kernels: which positions a
// (branch, head, segment) keeps, and the strided views of q/k/v.
#include <cstdint>

#include "core/dtype.h"

namespace minidl::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The kept positions of one (branch, head, segment): base + t * stride for
// t in [0, count). Rows of different segments or heads never overlap.
struct RowSet {
  int64_t base;
  int64_t stride;
  int64_t count;
};

__device__ __forceinline__ RowSet kept_rows(int64_t n, int64_t w, int64_t r, int64_t head,
                                            int64_t segment) {
  int64_t start = segment * w;
  int64_t end = start + w < n ? start + w : n;
  int64_t first = start + head % r;
  int64_t count = first < end ? (end - first + r - 1) / r : 0;
  return {first, r, count};
}

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
