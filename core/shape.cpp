#include "core/shape.h"

#include <algorithm>
#include <limits>

#include "core/error.h"

namespace minidl {

int64_t numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op) {
  int64_t d = dim < 0 ? dim + std::max<int64_t>(ndim, 1) : dim;
  MINIDL_CHECK(d >= 0 && d < std::max<int64_t>(ndim, 1), op, ": dim ", dim,
               " is out of range for a tensor of ", ndim, " dims");
  return d;
}

DimSplit split_around(const Shape& shape, int64_t dim) {
  DimSplit s;
  for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
    if (d < dim) s.outer *= shape[d];
    else if (d == dim) s.size = shape[d];
    else s.inner *= shape[d];
  }
  return s;
}

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    MINIDL_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(a), " and ",
                 shape_str(b), " are not broadcastable");
    out[i] = da == 1 ? db : da;
  }
  checked_numel(out, op);
  return out;
}

bool checked_mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool checked_add(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }

int64_t checked_numel(const Shape& shape, const char* op) {
  int64_t n = 1, bound = 1;  // bound: the product with zero sizes taken as 1
  for (int64_t s : shape) {
    MINIDL_CHECK(s >= 0, op, ": negative size in shape ", shape_str(shape));
    MINIDL_CHECK(checked_mul(bound, std::max<int64_t>(s, 1), &bound), op, ": shape ",
                 shape_str(shape), " has more elements than int64 can count (at most ",
                 std::numeric_limits<int64_t>::max(), ")");
    n *= s;  // n <= bound: cannot overflow
  }
  return n;
}

int64_t checked_nbytes(const Shape& shape, size_t element_size, const char* op) {
  int64_t n = checked_numel(shape, op), bytes = 0;
  MINIDL_CHECK(checked_mul(n, static_cast<int64_t>(element_size), &bytes), op, ": shape ",
               shape_str(shape), " of ", element_size, "-byte elements needs more bytes than int64 "
               "can count (at most ", std::numeric_limits<int64_t>::max(), ")");
  return bytes;
}

Extent checked_extent(const Shape& shape, const Shape& strides, int64_t offset, const char* op) {
  MINIDL_CHECK(shape.size() == strides.size(), op, ": shape ", shape_str(shape), " and strides ",
               shape_str(strides), " differ in length");
  Extent e{offset, offset};
  if (checked_numel(shape, op) == 0) return e;
  for (size_t d = 0; d < shape.size(); ++d) {
    int64_t reach = 0;
    bool ok = checked_mul(shape[d] - 1, strides[d], &reach) &&
              checked_add(reach < 0 ? e.lo : e.hi, reach, reach < 0 ? &e.lo : &e.hi);
    MINIDL_CHECK(ok, op, ": a view of shape ", shape_str(shape), " with strides ",
                 shape_str(strides), " at offset ", offset,
                 " reaches element offsets beyond what int64 can count");
  }
  return e;
}

}  // namespace minidl
