#pragma once
// Kernel-side description of a strided operand: sizes and element strides,
// up to kMaxDims dims, passed by value to CPU loops and CUDA kernels alike.
#include <cstdint>

#include "core/error.h"
#include "core/macros.h"
#include "core/shape.h"

namespace minidl {

constexpr int kMaxDims = 8;

struct StridedIndex {
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  // Element offset of the linear (row-major over `sizes`) index i.
  MINIDL_HD MINIDL_FORCEINLINE int64_t operator()(int64_t i) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      int64_t s = sizes[d];
      off += (i % s) * strides[d];
      i /= s;
    }
    return off;
  }
};

// Index over `shape` with `strides` (same length), merging dims that are
// contiguous with each other so typical cases need one or two divisions.
inline StridedIndex make_strided_index(const Shape& shape, const Shape& strides) {
  StridedIndex ix;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    if (ix.ndim > 0 && ix.strides[ix.ndim - 1] == strides[d] * shape[d]) {
      ix.sizes[ix.ndim - 1] *= shape[d];
      ix.strides[ix.ndim - 1] = strides[d];
      continue;
    }
    MINIDL_CHECK(ix.ndim < kMaxDims, "strided kernels support at most ", kMaxDims,
                 " non-mergeable dims, got shape ", shape_str(shape));
    ix.sizes[ix.ndim] = shape[d];
    ix.strides[ix.ndim] = strides[d];
    ++ix.ndim;
  }
  return ix;
}

}  // namespace minidl
