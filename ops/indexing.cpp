// Data movement: embedding and index_select (gather forward, scatter-add
// backward), cat/stack (copy into slices of the output, backward slices the
// gradient) and split (views; one node whose backward concatenates).
#include <string>

#include "autograd/tape.h"
#include "cpu/elementwise.h"
#include "cpu/indexing.h"
#include "cuda/elementwise.h"
#include "cuda/embedding.h"
#include "cuda/indexing.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

void check_indices(const char* op, const Tensor& x, const Tensor& indices) {
  detail::check_defined(op, indices, "indices");
  MINIDL_CHECK(indices.dtype() == DType::Int32, op, ": indices must be int32, got ",
               detail::describe(indices));
  detail::check_same_device(op, x, indices);
}

// Bounds check on the host. Only CPU indices are checked: for CUDA indices it
// would cost a device-to-host copy and a synchronisation in every step.
void check_index_range(const char* op, const Tensor& indices, int64_t size, const char* what) {
  if (!indices.device().is_cpu()) return;
  const int32_t* p = indices.data_ptr<int32_t>();
  for (int64_t k = 0; k < indices.numel(); ++k)
    MINIDL_CHECK(p[k] >= 0 && p[k] < size, op, ": index ", p[k], " at position ", k,
                 " is out of range for ", what, " of size ", size);
}

// The gradient of a gather: zeros of the source's shape with grad_out added
// at the gathered rows. bfloat16 gradients are summed in an fp32 buffer.
Tensor scatter_add_grad(const Tensor& grad_out, int64_t dim, const Tensor& indices,
                        const Shape& source_shape) {
  DType acc_dtype = grad_out.dtype() == DType::BFloat16 ? DType::Float32 : grad_out.dtype();
  Tensor acc = zeros(source_shape, {acc_dtype, grad_out.device(), false});
  Tensor g = contiguous(grad_out);
  MINIDL_DISPATCH(g.device(), index_add, g, dim, indices, acc);
  return to(acc, grad_out.dtype());
}

}  // namespace

Tensor embedding(const Tensor& weight, const Tensor& indices) {
  const char* name = "embedding";
  detail::check_defined(name, weight, "weight");
  check_indices(name, weight, indices);
  MINIDL_CHECK(weight.dim() == 2, name, ": weight must be 2-D (num_embeddings, embedding_dim), got ",
               detail::describe(weight));
  Tensor idx = contiguous(indices);
  check_index_range(name, idx, weight.size(0), "a weight with num_embeddings");
  Shape out_shape = indices.shape();
  out_shape.push_back(weight.size(1));
  checked_nbytes(out_shape, element_size(weight.dtype()), name);
  Tensor out = Tensor::empty(out_shape, weight.options());
  {
    NoGradGuard no_grad;  // the contiguous copy is internal; the gradient goes to `weight`
    MINIDL_DISPATCH(weight.device(), index_select, contiguous(weight), 0, idx, out);
  }
  if (autograd::needs_grad({weight})) {
    autograd::record(name, {weight}, {out},
                     [si = SavedTensor(idx, name), shape = weight.shape()](const Grads& g) {
                       return Grads{scatter_add_grad(g[0], 0, si.get(), shape)};
                     });
  }
  return out;
}

Tensor embedding_dropout(const Tensor& weight, const Tensor& indices, const Tensor& positions, double p,
                         bool training, Generator* gen) {
  const char* name = "embedding_dropout";
  detail::check_defined(name, weight, "weight");
  check_indices(name, weight, indices);
  MINIDL_CHECK(weight.dim() == 2, name, ": weight must be 2-D (num_embeddings, embedding_dim), got ",
               detail::describe(weight));
  MINIDL_CHECK(indices.dim() >= 1, name, ": indices must have a last dim (positions), got ", detail::describe(indices));
  if (positions.defined()) {
    detail::check_same_device(name, weight, positions);
    detail::check_same_dtype(name, weight, positions);
    MINIDL_CHECK(positions.dim() == 2 && positions.size(0) == indices.size(-1) && positions.size(1) == weight.size(1),
                 name, ": positions ", detail::describe(positions), " must be (T, C) = (", indices.size(-1), ", ",
                 weight.size(1), ") for indices ", detail::describe(indices), " and weight ", detail::describe(weight));
  }
  MINIDL_CHECK(p >= 0.0 && p < 1.0, name, ": p must be in [0, 1), got ", p);
  if (!weight.is_cuda()) {  // the ops composed: the same values and draws
    Tensor x = embedding(weight, indices);
    if (positions.defined()) x = add(x, positions);
    return dropout(x, p, training, gen);
  }
#if defined(MINIDL_WITH_CUDA)
  detail::check_floating(name, weight);
  const bool drop = training && p > 0.0;
  const detail::DropoutMask mask =
      drop ? detail::reserve_dropout_mask(p, gen, weight, name) : detail::DropoutMask{0, {}, 0.0f, 1.0};
  Tensor idx = contiguous(indices);
  Shape out_shape = indices.shape();
  out_shape.push_back(weight.size(1));
  checked_nbytes(out_shape, element_size(weight.dtype()), name);
  Tensor out = Tensor::empty(out_shape, weight.options());
  {
    NoGradGuard no_grad;  // the contiguous copies are internal; the gradients go to weight and positions
    backend::DeviceScope scope(weight.device());
    cuda::embedding_dropout_forward(contiguous(weight), idx, positions.defined() ? contiguous(positions) : Tensor(),
                                    mask.seed, mask.offset, mask.keep_threshold, mask.scale, out);
  }
  const bool gw = autograd::needs_grad({weight}), gp = autograd::needs_grad({positions});
  if (gw || gp) {
    // The three ops' backward: the mask, then the positions' sum over the
    // leading dims and the embedding's scatter-add.
    autograd::record(name, {weight, positions}, {out},
                     [si = SavedTensor(idx, name), wshape = weight.shape(),
                      pshape = positions.defined() ? positions.shape() : Shape{}, mask, drop, gw, gp](const Grads& g) {
                       Tensor d = drop ? detail::apply_dropout_mask(g[0], mask) : g[0];
                       return Grads{gw ? scatter_add_grad(d, 0, si.get(), wshape) : Tensor(),
                                    gp ? sum_to(d, pshape) : Tensor()};
                     });
  }
  return out;
#else
  MINIDL_FAIL(name, ": minidl was built without CUDA");
#endif
}

Tensor index_select(const Tensor& x, int64_t dim, const Tensor& indices) {
  const char* name = "index_select";
  detail::check_defined(name, x, "input");
  check_indices(name, x, indices);
  MINIDL_CHECK(x.dim() > 0, name, ": input is zero-dimensional (", detail::describe(x), ")");
  MINIDL_CHECK(indices.dim() == 1, name, ": indices must be 1-D, got ", detail::describe(indices));
  int64_t d = wrap_dim(dim, x.dim(), name);
  Tensor idx = contiguous(indices);
  check_index_range(name, idx, x.size(d), minidl::detail::concat("dim ", d).c_str());
  Shape out_shape = x.shape();
  out_shape[d] = idx.numel();
  checked_nbytes(out_shape, element_size(x.dtype()), name);
  Tensor out = Tensor::empty(out_shape, x.options());
  {
    NoGradGuard no_grad;
    MINIDL_DISPATCH(x.device(), index_select, contiguous(x), d, idx, out);
  }
  if (autograd::needs_grad({x})) {
    autograd::record(name, {x}, {out},
                     [si = SavedTensor(idx, name), d, shape = x.shape()](const Grads& g) {
                       return Grads{scatter_add_grad(g[0], d, si.get(), shape)};
                     });
  }
  return out;
}

Tensor cat(const std::vector<Tensor>& tensors, int64_t dim) {
  const char* name = "cat";
  MINIDL_CHECK(!tensors.empty(), name, ": expected a non-empty list of tensors");
  for (size_t i = 0; i < tensors.size(); ++i)
    detail::check_defined(name, tensors[i], minidl::detail::concat("input ", i).c_str());
  const Tensor& first = tensors[0];
  MINIDL_CHECK(first.dim() > 0, name, ": input 0 is zero-dimensional (", detail::describe(first),
               "); unsqueeze it or use stack");
  int64_t d = wrap_dim(dim, first.dim(), name);
  Shape out_shape = first.shape();
  out_shape[d] = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    MINIDL_CHECK(t.device() == first.device() && t.dtype() == first.dtype(), name, ": input ", i,
                 " is ", detail::describe(t), " but input 0 is ", detail::describe(first),
                 "; all inputs need the same dtype and device");
    bool same = t.dim() == first.dim();
    for (int64_t k = 0; same && k < t.dim(); ++k) same = k == d || t.size(k) == first.size(k);
    MINIDL_CHECK(same, name, ": input ", i, " has shape ", shape_str(t.shape()), " but input 0 has ",
                 shape_str(first.shape()), "; sizes must match except in dim ", d);
    MINIDL_CHECK(checked_add(out_shape[d], t.size(d), &out_shape[d]), name, ": the sizes of dim ",
                 d, " add up to more than int64 can count (input ", i, " has shape ",
                 shape_str(t.shape()), ")");
  }
  checked_nbytes(out_shape, element_size(first.dtype()), name);
  Tensor out = Tensor::empty(out_shape, first.options());
  std::vector<int64_t> sizes;
  bool contiguous_inputs = true;
  for (const Tensor& t : tensors) {
    sizes.push_back(t.size(d));
    contiguous_inputs = contiguous_inputs && t.is_contiguous();
  }
#if defined(MINIDL_WITH_CUDA)
  // Contiguous inputs on CUDA: one launch for all of them (a step's qkv gradient).
  const bool one_launch = out.is_cuda() && contiguous_inputs;
  if (one_launch) {
    backend::DeviceScope scope(out.device());
    cuda::cat(tensors, d, out);
  }
#else
  const bool one_launch = false;
#endif
  int64_t start = 0;
  for (const Tensor& t : tensors) {
    int64_t size = t.size(d);
    if (!one_launch && t.numel() > 0) {
      // out's slice [start, start + size) along d, written by the copy kernel.
      Tensor dst =
          out.as_strided(t.shape(), out.strides(), out.offset() + start * out.stride(d), "cat");
      MINIDL_DISPATCH(t.device(), copy, t, dst);
    }
    start += size;
  }
  if (autograd::needs_grad(tensors)) {
    autograd::record(name, tensors, {out}, [sizes, d](const Grads& g) {
      Grads grads;
      int64_t start = 0;
      for (int64_t size : sizes) {
        grads.push_back(narrow(g[0], d, start, size));
        start += size;
      }
      return grads;
    });
  }
  return out;
}

Tensor stack(const std::vector<Tensor>& tensors, int64_t dim) {
  const char* name = "stack";
  MINIDL_CHECK(!tensors.empty(), name, ": expected a non-empty list of tensors");
  for (size_t i = 0; i < tensors.size(); ++i) {
    detail::check_defined(name, tensors[i], minidl::detail::concat("input ", i).c_str());
    MINIDL_CHECK(tensors[i].shape() == tensors[0].shape(), name, ": input ", i, " has shape ",
                 shape_str(tensors[i].shape()), " but input 0 has ", shape_str(tensors[0].shape()),
                 "; all inputs need the same shape");
  }
  int64_t d = wrap_dim(dim, tensors[0].dim() + 1, name);
  Shape out_shape = tensors[0].shape();
  out_shape.insert(out_shape.begin() + d, static_cast<int64_t>(tensors.size()));
  checked_nbytes(out_shape, element_size(tensors[0].dtype()), name);
  std::vector<Tensor> expanded;
  expanded.reserve(tensors.size());
  for (const Tensor& t : tensors) expanded.push_back(unsqueeze(t, d));
  return cat(expanded, d);
}

namespace {
// The whole of `parts` when they are, in order, the slices along d of one
// contiguous tensor (an op that wrote its gradients into one buffer, as
// views); undefined otherwise.
Tensor joined_view(const std::vector<Tensor>& parts, int64_t d) {
  const Tensor& first = parts[0];
  Shape shape = first.shape();
  shape[static_cast<size_t>(d)] = 0;
  for (const Tensor& p : parts) shape[static_cast<size_t>(d)] += p.size(d);
  const Shape strides = contiguous_strides(shape);
  int64_t offset = first.offset();
  for (const Tensor& p : parts) {
    if (p.storage() != first.storage() || p.offset() != offset) return Tensor();
    for (int64_t k = 0; k < p.dim(); ++k)
      if (p.size(k) > 1 && p.stride(k) != strides[static_cast<size_t>(k)]) return Tensor();
    offset += p.size(d) * strides[static_cast<size_t>(d)];
  }
  return first.as_strided(shape, strides, first.offset());
}

// The parts as views of x, recorded as one node whose backward concatenates
// the parts' gradients: one allocation, instead of a zero-filled full-size
// gradient per part summed together; no copy at all when the gradients
// already lie side by side in one buffer.
std::vector<Tensor> split_views(const Tensor& x, const std::vector<int64_t>& sizes, int64_t d) {
  std::vector<Tensor> parts;
  int64_t start = 0;
  for (int64_t s : sizes) {
    Shape shape = x.shape();
    shape[static_cast<size_t>(d)] = s;
    parts.push_back(x.as_strided(shape, x.strides(), x.offset() + start * x.stride(d), "split"));
    start += s;
  }
  if (autograd::needs_grad({x}))
    autograd::record("split", {x}, parts, [d](const std::vector<Tensor>& g) {
      Tensor whole = joined_view(g, d);
      return std::vector<Tensor>{whole.defined() ? whole : cat(g, d)};
    });
  return parts;
}
}  // namespace

std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim) {
  const char* name = "split";
  detail::check_defined(name, x, "input");
  MINIDL_CHECK(x.dim() > 0, name, ": input is zero-dimensional (", detail::describe(x), ")");
  int64_t d = wrap_dim(dim, x.dim(), name);
  int64_t size = x.size(d);
  MINIDL_CHECK(split_size > 0 || (split_size == 0 && size == 0), name, ": split_size must be "
               "positive, got ", split_size, " for dim ", d, " of ", detail::describe(x));
  if (size == 0) return {x};
  std::vector<int64_t> sizes;
  for (int64_t start = 0; start < size; start += split_size) sizes.push_back(std::min(split_size, size - start));
  return split_views(x, sizes, d);
}

std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim) {
  const char* name = "split";
  detail::check_defined(name, x, "input");
  MINIDL_CHECK(x.dim() > 0, name, ": input is zero-dimensional (", detail::describe(x), ")");
  int64_t d = wrap_dim(dim, x.dim(), name);
  int64_t total = 0;
  for (int64_t s : sizes) {
    MINIDL_CHECK(s >= 0, name, ": negative size ", s, " in sizes ", shape_str(sizes));
    MINIDL_CHECK(checked_add(total, s, &total), name, ": sizes ", shape_str(sizes),
                 " add up to more than int64 can count");
  }
  MINIDL_CHECK(total == x.size(d), name, ": sizes ", shape_str(sizes), " sum to ", total,
               " but dim ", d, " of ", detail::describe(x), " has size ", x.size(d));
  return split_views(x, sizes, d);
}

}  // namespace minidl::ops
