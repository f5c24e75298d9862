#pragma once
// Data parallelism: every rank holds a replica of the model and runs forward
// and backward on its share of the global batch; DataParallel then averages
// the replicas' parameter gradients over a communicator, so that each rank's
// optimizer steps with the gradient of the global batch's mean loss (shares
// of equal size) and the replicas stay equal.
//
//   nn::DataParallel dp(model.parameters(), comm);
//   dp.broadcast_parameters();          // rank 0's initial weights everywhere
//   loss.backward();                    // on this rank's rows of the batch
//   dp.all_reduce_gradients();          // grad = mean over ranks
//   optimizer.step();
//
// Gradients travel in buckets: parameters are taken in reverse order (the
// order backward finishes their gradients), grouped by dtype and device, and
// packed into flat buffers of about `bucket_bytes` each, one all-reduce per
// bucket, in `reduce_dtype` (default: the parameters' dtype; float32 for a
// bfloat16 model sums its gradients in float32 and rounds each mean to
// bfloat16 once, when it is written back). Each parameter that requires grad
// gets a post-accumulate-grad hook (autograd/tape.h) that marks it ready, so a
// bucket is packed and its all-reduce issued during backward, as soon as it
// and every earlier bucket are complete, in bucket order. The hooks do not
// read gradients, so work the pass batches (every layer's weight gradients,
// ops/linear.cpp) stays batched until a bucket is packed. A parameter the pass
// gives no gradient holds its bucket and every later one back until
// all_reduce_gradients() (where it counts as zeros); parameters whose
// gradients are set after backward are reduced there too. With
// nn::MixedPrecision, reduce the compute model's (bfloat16) parameters, with
// reduce_dtype float32, during backward, and hand the means to the masters
// (gradients_to_masters) after all_reduce_gradients(): a gradient a pass gave
// and that is gone before it is reduced is an error. Every rank must run the
// same computation (the same parameters get gradients, in the same order);
// where ranks differ, or collectives of another communicator run inside
// backward in a rank-dependent order, set_reduce_in_backward(false).
// Each bucket's all-reduce is started asynchronously
// (Communicator::all_reduce_async): on NCCL it runs on the communication
// stream beside the rest of the backward, and finish() makes minidl's stream
// wait for the buckets, in order, before unpacking them; the host never
// waits. The flat buffers are allocated once and kept, so a bucket's memory
// is never freed under its reduction. With the in-process backend a rank's
// thread does each reduction when issuing it. In a CUDA graph, capture the
// backward and all_reduce_gradients() together: a bucket started in one
// capture must be waited for in it (NCCL says so if not).
#include <cstddef>
#include <optional>
#include <vector>

#include "core/tensor.h"
#include "dist/communicator.h"

namespace minidl::nn {

struct DataParallelOptions {
  size_t bucket_bytes = size_t{25} << 20;  // of a bucket in reduce_dtype
  std::optional<DType> reduce_dtype;       // default: each parameter's dtype
};

class DataParallel {
 public:
  // `parameters` must be the same list (shapes, dtypes, order) on every rank,
  // e.g. Module::parameters(). The communicator must outlive this object.
  DataParallel(std::vector<Tensor> parameters, dist::Communicator& comm, DataParallelOptions options = {});
  ~DataParallel();  // removes the hooks
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Copies rank `root`'s parameter values to every rank (at the start, or
  // after rank root loaded a checkpoint).
  void broadcast_parameters(int root = 0);

  // After backward: every parameter's gradient becomes the mean over ranks of
  // the ranks' gradients, in place when defined. An undefined gradient counts
  // as zeros and is set (so all ranks agree on which parameters have one).
  // Equivalent to mark_ready(i) for every parameter not marked yet (the
  // hooks mark those backward reached), then finish().
  void all_reduce_gradients();

  // Parameter i's gradient is final (the hooks call this): once its bucket
  // and every earlier one are complete, they are packed and their
  // all-reduces issued, in order. Marking a parameter twice in a step throws.
  void mark_ready(size_t i);
  // Issues the buckets not yet issued, waits for each bucket's all-reduce,
  // then scales by 1 / size() and writes the averaged gradients back; resets
  // the ready marks for the next step.
  void finish();

  // While off, the hooks do nothing: backward passes only accumulate local
  // gradients (gradient accumulation; PyTorch's no_sync), and
  // all_reduce_gradients() reduces their sum. On by default.
  void set_reduce_in_backward(bool on) { reduce_in_backward_ = on; }

  size_t num_buckets() const { return buckets_.size(); }
  size_t issued_buckets() const { return next_; }  // this step's, so far
  dist::Communicator& communicator() const { return comm_; }

 private:
  struct Bucket {
    std::vector<size_t> params;    // indices into parameters_
    std::vector<int64_t> offsets;  // element offset of each in `flat`
    int64_t numel = 0;
    Tensor flat;                   // allocated on first use, kept
    size_t ready = 0;
    dist::Work reduction;          // this step's all-reduce of flat, until finish()
  };
  void issue(Bucket& bucket);
  // Before packing (issue) and before writing back (finish): every
  // gradient this step's passes gave is still there.
  void check_gradients_kept(const std::vector<size_t>& params) const;
  // This step's marks and reductions gone (waiting for those in flight):
  // after finish(), or after an error, so the next step starts clean.
  void reset_step();

  std::vector<Tensor> parameters_;
  dist::Communicator& comm_;
  std::optional<DType> reduce_dtype_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;  // parameter -> bucket
  std::vector<bool> ready_;
  std::vector<bool> got_;          // the step's passes gave parameter k a gradient (its hook ran)
  size_t next_ = 0;                // buckets issued this step (a prefix)
  std::vector<uint64_t> hook_ids_;  // per parameter; 0: none
  bool reduce_in_backward_ = true;
};

}  // namespace minidl::nn
