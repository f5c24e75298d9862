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
// bucket. mark_ready/finish let a caller that knows when each gradient is
// final start a bucket's reduction as soon as the bucket is full; on a CUDA
// backend (NCCL) that reduction is queued on minidl's stream. What overlaps
// today: nothing with the backward itself (the tape has no per-gradient
// hooks yet, so all_reduce_gradients runs after backward, and NCCL shares
// the compute stream); bucket reductions are issued back to back without a
// host wait, and with an asynchronous backend the first buckets' transfers
// overlap the packing of the later ones. A backward hook calling mark_ready,
// plus a communication stream with events, would give the full overlap.
#include <cstddef>
#include <vector>

#include "core/tensor.h"
#include "dist/communicator.h"

namespace minidl::nn {

class DataParallel {
 public:
  // `parameters` must be the same list (shapes, dtypes, order) on every rank,
  // e.g. Module::parameters(). The communicator must outlive this object.
  DataParallel(std::vector<Tensor> parameters, dist::Communicator& comm, size_t bucket_bytes = size_t{25} << 20);

  // Copies rank `root`'s parameter values to every rank (at the start, or
  // after rank root loaded a checkpoint).
  void broadcast_parameters(int root = 0);

  // After backward: every parameter's gradient becomes the mean over ranks of
  // the ranks' gradients, in place when defined. An undefined gradient counts
  // as zeros and is set (so all ranks agree on which parameters have one).
  // Equivalent to mark_ready(i) for every parameter, then finish().
  void all_reduce_gradients();

  // Parameter i's gradient is final: when it completes its bucket, the
  // bucket is packed and its all-reduce issued.
  void mark_ready(size_t i);
  // Issues the buckets not yet issued, then scales by 1 / size() and writes
  // the averaged gradients back; resets the ready marks for the next step.
  void finish();

  size_t num_buckets() const { return buckets_.size(); }
  dist::Communicator& communicator() const { return comm_; }

 private:
  struct Bucket {
    std::vector<size_t> params;    // indices into parameters_
    std::vector<int64_t> offsets;  // element offset of each in `flat`
    int64_t numel = 0;
    Tensor flat;                   // allocated on first use, kept
    size_t ready = 0;
    bool issued = false;
  };
  void issue(Bucket& bucket);

  std::vector<Tensor> parameters_;
  dist::Communicator& comm_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;  // parameter -> bucket
  std::vector<bool> ready_;
};

}  // namespace minidl::nn
