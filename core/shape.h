#pragma once
// Shapes and strides are plain vectors of int64 (elements, not bytes).
#include <cstdint>
#include <string>
#include <vector>

namespace minidl {

using Shape = std::vector<int64_t>;

int64_t numel(const Shape& shape);
Shape contiguous_strides(const Shape& shape);
std::string shape_str(const Shape& shape);  // "[2, 3]"
// Wraps a possibly negative dim into [0, ndim); `op` names the caller in errors.
int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op);
// A contiguous shape seen as (outer, size, inner) around dim `dim`: the
// products of the dims before it, its size, and the dims after it.
struct DimSplit {
  int64_t outer = 1, size = 1, inner = 1;
};
DimSplit split_around(const Shape& shape, int64_t dim);
// NumPy broadcasting of two shapes; throws naming `op` when incompatible.
Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);

}  // namespace minidl
