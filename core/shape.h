#pragma once
// Shapes and strides are plain vectors of int64 (elements, not bytes).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace minidl {

using Shape = std::vector<int64_t>;

// The product of the sizes, unchecked: for shapes already accepted by
// checked_numel (every tensor's shape is). Use checked_numel for new shapes.
int64_t numel(const Shape& shape);
Shape contiguous_strides(const Shape& shape);
std::string shape_str(const Shape& shape);  // "[2, 3]"
// Wraps a possibly negative dim into [0, ndim) (dim 0 or -1 of a 0-d tensor
// gives 0, as in PyTorch); `op` names the caller in errors.
int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op);
// A contiguous shape seen as (outer, size, inner) around dim `dim`: the
// products of the dims before it, its size, and the dims after it.
struct DimSplit {
  int64_t outer = 1, size = 1, inner = 1;
};
DimSplit split_around(const Shape& shape, int64_t dim);
// NumPy broadcasting of two shapes; throws naming `op` when incompatible or
// when the result's element count overflows int64.
Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);

// ---- Overflow-checked size arithmetic ----
// Every place that makes a shape (factories, Tensor::empty, views, reshape,
// expand, slice, broadcasting, cat/stack) goes through these, so a shape whose
// element count, byte size or furthest strided offset does not fit int64 is
// refused with an Error naming the op and the shape, instead of wrapping to a
// small or negative count that a kernel later trusts.

// *out = a * b or a + b; false (and *out unspecified) when it overflows int64.
bool checked_mul(int64_t a, int64_t b, int64_t* out);
bool checked_add(int64_t a, int64_t b, int64_t* out);
// The element count of `shape`. Throws naming `op` for a negative size or a
// count beyond int64; zero sizes count as 1 in that test, so the contiguous
// strides of an accepted shape fit as well.
int64_t checked_numel(const Shape& shape, const char* op);
// Bytes of a contiguous `shape` of `element_size`-byte elements: checked_numel,
// and the byte count must fit int64 too.
int64_t checked_nbytes(const Shape& shape, size_t element_size, const char* op);
// The lowest and highest element offsets a strided view reaches (both equal
// `offset` for an empty view); throws naming `op` when they overflow int64.
struct Extent {
  int64_t lo = 0, hi = 0;
};
Extent checked_extent(const Shape& shape, const Shape& strides, int64_t offset, const char* op);

}  // namespace minidl
