#include "nn/data_parallel.h"

#include "autograd/grad_mode.h"
#include "ops/ops.h"

namespace minidl::nn {

DataParallel::DataParallel(std::vector<Tensor> parameters, dist::Communicator& comm, size_t bucket_bytes)
    : parameters_(std::move(parameters)), comm_(comm), bucket_of_(parameters_.size()), ready_(parameters_.size()) {
  // Reverse order: backward finishes the last layers' gradients first.
  for (size_t k = parameters_.size(); k-- > 0;) {
    const Tensor& p = parameters_[k];
    MINIDL_CHECK(p.defined() && p.is_contiguous(), "DataParallel: parameter ", k, " must be a defined contiguous tensor");
    Bucket* b = buckets_.empty() ? nullptr : &buckets_.back();
    if (b) {
      const Tensor& first = parameters_[b->params.front()];
      const bool fits = static_cast<size_t>(b->numel + p.numel()) * element_size(p.dtype()) <= bucket_bytes;
      if (first.dtype() != p.dtype() || first.device() != p.device() || !fits) b = nullptr;
    }
    if (!b) b = &buckets_.emplace_back();
    b->params.push_back(k);
    b->offsets.push_back(b->numel);
    b->numel += p.numel();
    bucket_of_[k] = buckets_.size() - 1;
  }
}

void DataParallel::broadcast_parameters(int root) {
  NoGradGuard no_grad;
  for (const Tensor& p : parameters_) {
    comm_.broadcast(p, root);
    p.bump_version();
  }
}

void DataParallel::mark_ready(size_t i) {
  MINIDL_CHECK(i < parameters_.size(), "DataParallel::mark_ready: parameter ", i, " of ", parameters_.size());
  MINIDL_CHECK(!ready_[i], "DataParallel::mark_ready: parameter ", i, " marked twice in one step");
  ready_[i] = true;
  Bucket& b = buckets_[bucket_of_[i]];
  if (++b.ready == b.params.size()) issue(b);
}

void DataParallel::issue(Bucket& b) {
  NoGradGuard no_grad;
  const Tensor& first = parameters_[b.params.front()];
  if (!b.flat.defined()) b.flat = Tensor::empty({b.numel}, first.options());
  for (size_t j = 0; j < b.params.size(); ++j) {
    const Tensor& p = parameters_[b.params[j]];
    Tensor slot = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.shape());
    const Tensor g = p.grad();
    if (g.defined()) ops::copy_(slot, g);
    else ops::copy_(slot, ops::zeros({}, first.options()));
  }
  comm_.all_reduce(b.flat);
  b.issued = true;
}

void DataParallel::finish() {
  NoGradGuard no_grad;
  for (Bucket& b : buckets_)
    if (!b.issued) issue(b);
  const double scale = 1.0 / static_cast<double>(comm_.size());
  for (Bucket& b : buckets_) {
    ops::mul_(b.flat, scale);
    for (size_t j = 0; j < b.params.size(); ++j) {
      const Tensor& p = parameters_[b.params[j]];
      Tensor mean = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.shape());
      const Tensor g = p.grad();
      if (g.defined()) ops::copy_(g, mean);
      else p.set_grad(mean.clone());
    }
    b.ready = 0;
    b.issued = false;
  }
  ready_.assign(ready_.size(), false);
}

void DataParallel::all_reduce_gradients() {
  for (size_t k = parameters_.size(); k-- > 0;)
    if (!ready_[k]) mark_ready(k);
  finish();
}

}  // namespace minidl::nn
