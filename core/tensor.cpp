#include "core/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <sstream>

#include "core/allocator.h"

namespace minidl {

namespace {

const TensorImpl& checked(const std::shared_ptr<TensorImpl>& impl) {
  MINIDL_CHECK(impl != nullptr, "use of an undefined Tensor");
  return *impl;
}

// The elements of a strided tensor in row-major order, converted to T
// through double (exact for every dtype minidl has). A CPU tensor is read in
// place, another device's storage span copied to the host first; the rows of
// the last dim are read in one loop each. Tests compare whole outputs of
// millions of elements through this: an index walk per element and a
// zero-filled staging copy made it ~25 ns an element.
template <typename T>
std::vector<T> gather_host(const Tensor& t) {
  const TensorImpl& impl = checked(t.impl_ptr());
  const int64_t n = t.numel();
  std::vector<T> out(static_cast<size_t>(n));
  if (n == 0) return out;
  const Extent extent = checked_extent(impl.shape, impl.strides, impl.offset, "to_vector");
  const size_t es = element_size(impl.dtype);
  const auto* base = static_cast<const unsigned char*>(impl.storage->data()) + extent.lo * es;
  std::unique_ptr<unsigned char[]> staging;
  if (!impl.storage->device().is_cpu()) {
    const size_t bytes = static_cast<size_t>(extent.hi - extent.lo + 1) * es;
    staging.reset(new unsigned char[bytes]);
    backend::copy_bytes(staging.get(), Device::cpu(), base, impl.storage->device(), bytes);
    base = staging.get();
  }
  visit_dtype(impl.dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* src = reinterpret_cast<const S*>(base) + (impl.offset - extent.lo);
    auto convert = [](S x) {
      const double d = static_cast<double>(x);
      if constexpr (std::is_same_v<T, BFloat16>) return BFloat16(static_cast<float>(d));
      else return static_cast<T>(d);
    };
    // A 0-d tensor is one row of one element; the dims before the last are
    // walked as an odometer, `off` following them.
    const size_t outer = impl.shape.empty() ? 0 : impl.shape.size() - 1;
    const int64_t len = impl.shape.empty() ? 1 : impl.shape.back();
    const int64_t step = impl.shape.empty() ? 1 : impl.strides.back();
    std::vector<int64_t> idx(outer, 0);
    int64_t off = 0;
    for (int64_t i = 0; i < n; i += len) {
      T* dst = out.data() + i;
      const S* row = src + off;
      if (step == 1)
        for (int64_t j = 0; j < len; ++j) dst[j] = convert(row[j]);
      else
        for (int64_t j = 0; j < len; ++j) dst[j] = convert(row[j * step]);
      for (size_t d = outer; d-- > 0;) {
        off += impl.strides[d];
        if (++idx[d] < impl.shape[d]) break;
        off -= idx[d] * impl.strides[d];
        idx[d] = 0;
      }
    }
  });
  return out;
}

}  // namespace

Tensor Tensor::empty(const Shape& shape, TensorOptions options) {
  int64_t nbytes = checked_nbytes(shape, element_size(options.dtype), "empty");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>(static_cast<size_t>(nbytes), options.device);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = options.dtype;
  Tensor t(std::move(impl));
  if (options.requires_grad) t.requires_grad_(true);
  return t;
}

const Shape& Tensor::shape() const { return checked(impl_).shape; }
const Shape& Tensor::strides() const { return checked(impl_).strides; }
// wrap_dim accepts dim 0 of a 0-d tensor (for squeeze and friends); there is
// no size to read there.
int64_t Tensor::size(int64_t d) const {
  MINIDL_CHECK(dim() > 0, "size: dim ", d, " is out of range for a zero-dimensional tensor");
  return shape()[wrap_dim(d, dim(), "size")];
}
int64_t Tensor::stride(int64_t d) const {
  MINIDL_CHECK(dim() > 0, "stride: dim ", d, " is out of range for a zero-dimensional tensor");
  return strides()[wrap_dim(d, dim(), "stride")];
}
int64_t Tensor::numel() const { return minidl::numel(shape()); }
int64_t Tensor::offset() const { return checked(impl_).offset; }
DType Tensor::dtype() const { return checked(impl_).dtype; }
Device Tensor::device() const { return checked(impl_).storage->device(); }
const std::shared_ptr<Storage>& Tensor::storage() const { return checked(impl_).storage; }
uint64_t Tensor::version() const { return storage()->version(); }
void Tensor::bump_version() const { storage()->bump_version(); }

bool Tensor::is_contiguous() const {
  const TensorImpl& impl = checked(impl_);
  // No elements: nothing to lay out (as in PyTorch), whatever the strides.
  for (int64_t size : impl.shape)
    if (size == 0) return true;
  int64_t expected = 1;
  for (size_t d = impl.shape.size(); d-- > 0;) {
    if (impl.shape[d] == 1) continue;
    if (impl.strides[d] != expected) return false;
    expected *= impl.shape[d];
  }
  return true;
}

void* Tensor::raw_data() const {
  const TensorImpl& impl = checked(impl_);
  return static_cast<char*>(impl.storage->data()) +
         impl.offset * static_cast<int64_t>(element_size(impl.dtype));
}

Tensor Tensor::as_strided(const Shape& shape, const Shape& strides, int64_t offset,
                          const char* op) const {
  const TensorImpl& src = checked(impl_);
  // Every view stays inside its storage, so kernels and to_vector can trust
  // any tensor's geometry, and its byte offsets fit int64 as the storage's do.
  Extent e = checked_extent(shape, strides, offset, op);
  if (minidl::numel(shape) > 0) {
    int64_t capacity = static_cast<int64_t>(src.storage->nbytes() / element_size(src.dtype));
    MINIDL_CHECK(e.lo >= 0 && e.hi < capacity, op, ": a view of shape ", shape_str(shape),
                 " with strides ", shape_str(strides), " at offset ", offset, " reaches elements [",
                 e.lo, ", ", e.hi, "] but its storage holds ", capacity, " elements");
  }
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = src.storage;
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  impl->dtype = src.dtype;
  return Tensor(std::move(impl));
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  return gather_host<T>(*this);
}

template <typename T>
T Tensor::item() const {
  MINIDL_CHECK(numel() == 1, "item: tensor of shape ", shape_str(shape()),
               " has ", numel(), " elements, expected 1");
  return to_vector<T>()[0];
}

template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<BFloat16> Tensor::to_vector<BFloat16>() const;
template std::vector<int32_t> Tensor::to_vector<int32_t>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;
template float Tensor::item<float>() const;
template double Tensor::item<double>() const;
template int32_t Tensor::item<int32_t>() const;
template int64_t Tensor::item<int64_t>() const;

std::string Tensor::str() const {
  std::ostringstream os;
  os << *this;
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) {
  if (!t.defined()) return os << "Tensor(undefined)";
  std::vector<double> v = gather_host<double>(t);
  const Shape& shape = t.shape();
  const int64_t edge = 3;  // elements shown at each end of a long dim
  std::ostringstream body;
  body << std::setprecision(t.dtype() == DType::Float64 ? 8 : 4);
  // Recursive printer over dims with elision of long dims.
  std::vector<int64_t> strides = contiguous_strides(shape);
  auto print = [&](auto&& self, size_t d, int64_t base, int indent) -> void {
    if (d == shape.size()) {
      body << v[static_cast<size_t>(base)];
      return;
    }
    body << "[";
    int64_t n = shape[d];
    for (int64_t i = 0; i < n; ++i) {
      if (n > 2 * edge && i == edge) {
        body << (d + 1 == shape.size() ? "..., " : "...,\n" + std::string(indent + 1, ' '));
        i = n - edge - 1;
        continue;
      }
      self(self, d + 1, base + i * strides[d], indent + 1);
      if (i + 1 < n) body << (d + 1 == shape.size() ? ", " : ",\n" + std::string(indent + 1, ' '));
    }
    body << "]";
  };
  print(print, 0, 0, 7);
  os << "tensor(" << body.str() << ", shape=" << shape_str(shape) << ", dtype=" << t.dtype();
  if (t.is_cuda()) os << ", device=" << t.device();
  if (t.requires_grad()) os << ", requires_grad";
  return os << ")";
}

// ---- autograd state ----

bool Tensor::requires_grad() const { return checked(impl_).autograd.requires_grad; }

Tensor& Tensor::requires_grad_(bool on) {
  TensorImpl& impl = const_cast<TensorImpl&>(checked(impl_));
  MINIDL_CHECK(impl.autograd.node < 0, "requires_grad_: only leaf tensors can be marked; "
               "this one was produced by an op (use detach() first)");
  MINIDL_CHECK(!on || is_floating(impl.dtype), "requires_grad_: ", impl.dtype,
               " tensors cannot require gradients");
  impl.autograd.requires_grad = on;
  return *this;
}

bool Tensor::is_leaf() const { return checked(impl_).autograd.node < 0; }

Tensor Tensor::grad() const { return Tensor(checked(impl_).autograd.grad); }

void Tensor::set_grad(const Tensor& grad) const {
  TensorImpl& impl = const_cast<TensorImpl&>(checked(impl_));
  if (grad.defined())
    MINIDL_CHECK(grad.shape() == impl.shape, "set_grad: gradient shape ", shape_str(grad.shape()),
                 " differs from tensor shape ", shape_str(impl.shape));
  impl.autograd.grad = grad.impl_ptr();
}

void Tensor::zero_grad() const { const_cast<TensorImpl&>(checked(impl_)).autograd.grad.reset(); }

Tensor Tensor::detach() const {
  const TensorImpl& src = checked(impl_);
  return as_strided(src.shape, src.strides, src.offset);
}

// ---- host construction ----

template <typename T>
Tensor from_vector(const std::vector<T>& values, const Shape& shape) {
  return from_vector(values, shape, TensorOptions{dtype_of<T>(), Device::cpu(), false});
}

template <typename T>
Tensor from_vector(const std::vector<T>& values, const Shape& shape, TensorOptions options) {
  MINIDL_CHECK(static_cast<int64_t>(values.size()) == checked_numel(shape, "from_vector"),
               "from_vector: ", values.size(), " values do not fill shape ", shape_str(shape));
  Tensor host = Tensor::empty(shape, {options.dtype, Device::cpu(), false});
  visit_dtype(options.dtype, [&](auto tag) {
    using D = decltype(tag);
    D* dst = static_cast<D*>(host.raw_data());
    for (size_t i = 0; i < values.size(); ++i) {
      if constexpr (std::is_same_v<D, BFloat16>) dst[i] = BFloat16(static_cast<float>(values[i]));
      else dst[i] = static_cast<D>(static_cast<double>(values[i]));
    }
  });
  Tensor out = host;
  if (options.device.is_cuda()) {
    out = Tensor::empty(shape, {options.dtype, options.device, false});
    backend::copy_bytes(out.raw_data(), out.device(), host.raw_data(), Device::cpu(), host.nbytes());
  }
  if (options.requires_grad) out.requires_grad_(true);
  return out;
}

#define MINIDL_FROM_VECTOR(T)                                                        \
  template Tensor from_vector<T>(const std::vector<T>&, const Shape&);               \
  template Tensor from_vector<T>(const std::vector<T>&, const Shape&, TensorOptions);
MINIDL_FROM_VECTOR(float)
MINIDL_FROM_VECTOR(double)
MINIDL_FROM_VECTOR(int32_t)
template Tensor from_vector<int64_t>(const std::vector<int64_t>&, const Shape&, TensorOptions);
#undef MINIDL_FROM_VECTOR

}  // namespace minidl
