#include "ops/dispatch.h"

namespace minidl::ops::detail {

std::string describe(const Tensor& t) {
  if (!t.defined()) return "undefined";
  return minidl::detail::concat(t.dtype(), " ", shape_str(t.shape()), " on ", t.device());
}

void check_defined(const char* op, const Tensor& t, const char* name) {
  MINIDL_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
}

void check_same_device(const char* op, const Tensor& a, const Tensor& b) {
  MINIDL_CHECK(a.device() == b.device(), op, ": inputs are on different devices (",
               describe(a), " vs ", describe(b), ")");
}

void check_same_dtype(const char* op, const Tensor& a, const Tensor& b) {
  MINIDL_CHECK(a.dtype() == b.dtype(), op, ": dtype mismatch (", describe(a), " vs ",
               describe(b), "); convert one with to(dtype)");
}

void check_floating(const char* op, const Tensor& t) {
  MINIDL_CHECK(is_floating(t.dtype()), op, ": expected a floating-point tensor, got ",
               describe(t));
}

}  // namespace minidl::ops::detail
