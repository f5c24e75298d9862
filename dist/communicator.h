#pragma once
// Collective communication between ranks (DESIGN.md, "Scaling out"): the
// interface every distributed algorithm in minidl is written against, with
// two backends: NCCL (the real engine, one GPU per rank) and in-process (ranks
// are threads sharing memory; CPU tensors, or CUDA tensors on one GPU as
// virtual ranks), which tests and CPU runs use. Raw tensors in and out, never
// autograd: ops/ builds differentiable algorithms from these.
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "core/tensor.h"

namespace minidl::dist {

// A collective started by an async call (Communicator::all_reduce_async and
// the others, as torch.distributed's async_op=True). Once wait() returns, work
// the caller enqueues afterwards (on CUDA: on minidl's stream) sees the
// collective's output; on CUDA the host does not wait, the stream does.
// wait() again does nothing. A Work destroyed without wait() waits, so no
// collective is left unordered with the work that follows. Move-only.
class Work {
 public:
  Work() = default;  // complete already: wait() does nothing
  // For backends: what wait() runs, once.
  explicit Work(std::function<void()> finish) : finish_(std::move(finish)) {}
  Work(Work&& other) noexcept : finish_(std::exchange(other.finish_, nullptr)) {}
  Work& operator=(Work&& other) noexcept;
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;
  ~Work();

  void wait();

 private:
  void wait_nothrow() noexcept;
  std::function<void()> finish_;
};

// Every collective takes contiguous tensors of one dtype and device that all
// ranks of the communicator pass in the same order (shapes as stated per
// call). On CUDA tensors the work is ordered on minidl's stream; the host
// does not wait for it.
//
// The async forms (all_gather_async, ...) do what the plain ones do, but may
// run beside the work the caller enqueues before Work::wait() (NCCL: on a
// communication stream). The collective reads its input as it is at the call
// (in stream order) and its output is ready for work enqueued after wait().
// Until wait(), the caller keeps both tensors alive and neither writes them
// nor reads the output. Every rank starts the same collectives in the same
// order, sync and async forms alike; a Work started during a CUDA graph
// capture is waited for before the capture ends. The base class runs the
// plain collective and returns a completed Work (the in-process backend).
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // output (size() * input.numel() elements) = the ranks' inputs, in rank order.
  virtual void all_gather(const Tensor& input, const Tensor& output) = 0;
  // output (input.numel() / size() elements) = chunk rank() of the sum over ranks of input.
  virtual void reduce_scatter(const Tensor& input, const Tensor& output) = 0;
  // tensor = the sum over ranks of tensor, in place.
  virtual void all_reduce(const Tensor& tensor) = 0;
  virtual Work all_gather_async(const Tensor& input, const Tensor& output);
  virtual Work reduce_scatter_async(const Tensor& input, const Tensor& output);
  virtual Work all_reduce_async(const Tensor& tensor);
  // tensor = root's tensor, in place.
  virtual void broadcast(const Tensor& tensor, int root) = 0;
  // Returns when every rank has called it. In-process: a host rendezvous (CUDA
  // work before it is not waited for); NCCL: a one-element all-reduce, then
  // a wait for this rank's queued CUDA work.
  virtual void barrier() = 0;
  // The sub-communicator of the ranks that pass the same `color` (>= 0),
  // ordered by `key` (then by rank), as MPI_Comm_split. Every rank must call
  // it; a rank passing kNoColor joins none and gets null (no communicator is
  // built for it: MPI_UNDEFINED, NCCL_SPLIT_NOCOLOR).
  static constexpr int kNoColor = -1;
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // What callers derive from this communicator and keep with it, one slot
  // per key, released with it (ops/ keeps its sequence-parallel plans here,
  // sub-communicators included). Each rank has its own communicator object,
  // so a slot is used by one thread.
  std::shared_ptr<void>& attachment(const std::string& key) { return attachments_[key]; }

 private:
  std::map<std::string, std::shared_ptr<void>> attachments_;
};

// Runs fn(comm) on world_size threads of this process, one rank each, and
// returns when all have; an exception on any rank is rethrown here (the other
// ranks' collectives then throw too, instead of waiting forever).
void run_in_process(int world_size, const std::function<void(Communicator&)>& fn);

}  // namespace minidl::dist
