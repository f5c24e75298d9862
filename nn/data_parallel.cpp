#include "nn/data_parallel.h"

#include "autograd/grad_mode.h"
#include "autograd/tape.h"
#include "ops/ops.h"

namespace minidl::nn {

DataParallel::DataParallel(std::vector<Tensor> parameters, dist::Communicator& comm, DataParallelOptions options)
    : parameters_(std::move(parameters)),
      comm_(comm),
      reduce_dtype_(options.reduce_dtype),
      bucket_of_(parameters_.size()),
      ready_(parameters_.size()),
      got_(parameters_.size()) {
  // Reverse order: backward finishes the last layers' gradients first.
  for (size_t k = parameters_.size(); k-- > 0;) {
    const Tensor& p = parameters_[k];
    MINIDL_CHECK(p.defined() && p.is_contiguous(), "DataParallel: parameter ", k, " must be a defined contiguous tensor");
    Bucket* b = buckets_.empty() ? nullptr : &buckets_.back();
    if (b) {
      const Tensor& first = parameters_[b->params.front()];
      const bool fits = static_cast<size_t>(b->numel + p.numel()) * element_size(reduce_dtype_.value_or(p.dtype())) <=
                        options.bucket_bytes;
      if (first.dtype() != p.dtype() || first.device() != p.device() || !fits) b = nullptr;
    }
    if (!b) b = &buckets_.emplace_back();
    b->params.push_back(k);
    b->offsets.push_back(b->numel);
    b->numel += p.numel();
    bucket_of_[k] = buckets_.size() - 1;
  }
  hook_ids_.assign(parameters_.size(), 0);
  for (size_t k = 0; k < parameters_.size(); ++k)
    if (parameters_[k].requires_grad() && parameters_[k].is_leaf())
      hook_ids_[k] = autograd::register_post_accumulate_grad_hook(parameters_[k], [this, k](const Tensor&) {
        got_[k] = true;
        if (!reduce_in_backward_) return;
        MINIDL_CHECK(!ready_[k], "DataParallel: parameter ", k, " got a gradient after it was reduced this step "
                     "(a second backward pass before all_reduce_gradients(); for gradient accumulation, call "
                     "set_reduce_in_backward(false) before the passes that only accumulate)");
        mark_ready(k);
      }, /*reads_gradient=*/false);  // issue() writes the pass's deferred gradients when a bucket is complete
}

DataParallel::~DataParallel() {
  for (size_t k = 0; k < parameters_.size(); ++k)
    if (hook_ids_[k]) autograd::remove_post_accumulate_grad_hook(parameters_[k], hook_ids_[k]);
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
  ++buckets_[bucket_of_[i]].ready;
  try {
    for (; next_ < buckets_.size() && buckets_[next_].ready == buckets_[next_].params.size(); ++next_)
      issue(buckets_[next_]);
  } catch (...) {
    reset_step();
    throw;
  }
}

void DataParallel::check_gradients_kept(const std::vector<size_t>& params) const {
  for (size_t k : params)
    MINIDL_CHECK(!got_[k] || parameters_[k].grad().defined(), "DataParallel: parameter ", k,
                 "'s gradient was taken away before it was reduced (with nn::MixedPrecision, call "
                 "all_reduce_gradients() before gradients_to_masters())");
}

void DataParallel::reset_step() {
  for (Bucket& b : buckets_) {
    b.reduction = dist::Work();  // waits for one in flight
    b.ready = 0;
  }
  ready_.assign(ready_.size(), false);
  got_.assign(got_.size(), false);
  next_ = 0;
}

void DataParallel::issue(Bucket& b) {
  NoGradGuard no_grad;
  autograd::flush_deferred();  // inside backward: the bucket's gradients may still be queued
  check_gradients_kept(b.params);
  const Tensor& first = parameters_[b.params.front()];
  if (!b.flat.defined()) b.flat = Tensor::empty({b.numel}, {reduce_dtype_.value_or(first.dtype()), first.device()});
  for (size_t j = 0; j < b.params.size(); ++j) {
    const Tensor& p = parameters_[b.params[j]];
    Tensor slot = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.shape());
    const Tensor g = p.grad();
    if (g.defined()) ops::copy_(slot, g);  // cast to the reduce dtype
    else ops::copy_(slot, ops::zeros({}, b.flat.options()));
  }
  b.reduction = comm_.all_reduce_async(b.flat);
}

void DataParallel::finish() {
  NoGradGuard no_grad;
  try {
    // The buckets packed already (issue() checks the others), before anything is written.
    for (size_t b = 0; b < next_; ++b) check_gradients_kept(buckets_[b].params);
    for (; next_ < buckets_.size(); ++next_) issue(buckets_[next_]);
    const double scale = 1.0 / static_cast<double>(comm_.size());
    for (Bucket& b : buckets_) {
      b.reduction.wait();
      ops::mul_(b.flat, scale);
      for (size_t j = 0; j < b.params.size(); ++j) {
        const Tensor& p = parameters_[b.params[j]];
        Tensor mean = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.shape());
        const Tensor g = p.grad();
        if (g.defined()) ops::copy_(g, mean);  // cast back
        else p.set_grad(mean.dtype() == p.dtype() ? mean.clone() : ops::to(mean, p.dtype()));
      }
    }
  } catch (...) {
    reset_step();
    throw;
  }
  reset_step();
}

void DataParallel::all_reduce_gradients() {
  for (size_t k = parameters_.size(); k-- > 0;)
    if (!ready_[k]) mark_ready(k);
  finish();
}

}  // namespace minidl::nn
