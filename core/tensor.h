#pragma once
// minidl::Tensor: a shape, strides and element offset over a refcounted
// Storage, plus the autograd fields the tape needs. Copying a Tensor copies a
// handle (like torch::Tensor); views share storage.
//
// Methods that need kernels or record autograd (reshape, permute, to, ...)
// are declared here for convenience and defined in ops/tensor_methods.cpp;
// they are thin calls into minidl::ops.
#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/shape.h"
#include "core/storage.h"

namespace minidl {

struct TensorOptions {
  DType dtype = DType::Float32;
  Device device = Device::cpu();
  bool requires_grad = false;
};

struct TensorImpl;

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // Uninitialised contiguous tensor.
  static Tensor empty(const Shape& shape, TensorOptions options = {});

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const;
  const Shape& strides() const;
  int64_t size(int64_t dim) const;  // negative dims count from the end
  int64_t stride(int64_t dim) const;
  int64_t dim() const { return static_cast<int64_t>(shape().size()); }
  int64_t numel() const;
  int64_t offset() const;  // in elements, into storage
  DType dtype() const;
  Device device() const;
  bool is_cuda() const { return device().is_cuda(); }
  bool is_contiguous() const;
  TensorOptions options() const { return {dtype(), device(), false}; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * element_size(dtype()); }

  // Pointer to the first element (storage + offset). data_ptr<T>() checks T.
  void* raw_data() const;
  template <typename T> T* data_ptr() const {
    MINIDL_CHECK(dtype_of<T>() == dtype(), "data_ptr: tensor is ", dtype(), ", asked for ",
                 dtype_of<T>());
    return static_cast<T*>(raw_data());
  }
  const std::shared_ptr<Storage>& storage() const;
  uint64_t version() const;  // storage version counter (bumped by in-place ops)
  void bump_version() const;

  // Host access; work for any device, dtype and strides (they copy).
  template <typename T> std::vector<T> to_vector() const;
  template <typename T> T item() const;
  std::string str() const;

  // A view with explicit geometry over the same storage; no autograd. Throws,
  // naming `op`, when the view would reach outside the storage.
  Tensor as_strided(const Shape& shape, const Shape& strides, int64_t offset,
                    const char* op = "as_strided") const;

  // ---- autograd (state here, logic in autograd/) ----
  bool requires_grad() const;
  // Marks a leaf as a parameter-like tensor whose .grad() backward fills.
  Tensor& requires_grad_(bool on = true);
  bool is_leaf() const;
  Tensor grad() const;  // undefined until backward reaches this leaf
  void set_grad(const Tensor& grad) const;
  void zero_grad() const;  // drops the gradient (sets it undefined)
  Tensor detach() const;   // same storage, cut from the graph
  // Runs the tape backward from this tensor; a non-scalar needs a seed
  // gradient of its shape. Defined in autograd/tape.cpp.
  void backward(const Tensor& seed = Tensor()) const;

  // ---- views and conversions (defined in ops/) ----
  Tensor reshape(const Shape& shape) const;  // a view when strides allow, else a copy
  Tensor view(const Shape& shape) const;     // always a view; errors if impossible
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor transpose(int64_t dim0, int64_t dim1) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor expand(const Shape& shape) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;

  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

std::ostream& operator<<(std::ostream& os, const Tensor& t);

// Autograd bookkeeping; owned by the tape (autograd/tape.h).
struct AutogradMeta {
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;
  uint64_t tape_generation = 0;  // which tape recorded the producing node
  int64_t node = -1;             // index of the producing node; -1 for leaves
  int32_t output_nr = 0;         // which output of that node
  // A leaf's post-accumulate-grad hooks (autograd/tape.h).
  struct GradHook {
    uint64_t id;
    std::function<void(const Tensor&)> fn;
    bool reads_gradient;
  };
  std::vector<GradHook> grad_hooks;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  Shape shape;
  Shape strides;
  int64_t offset = 0;
  DType dtype = DType::Float32;
  AutogradMeta autograd;
};

// A tensor holding `values` (row-major) with the dtype of T on the CPU, or
// converted to `options.dtype` on `options.device`.
template <typename T>
Tensor from_vector(const std::vector<T>& values, const Shape& shape);
template <typename T>
Tensor from_vector(const std::vector<T>& values, const Shape& shape, TensorOptions options);

}  // namespace minidl
