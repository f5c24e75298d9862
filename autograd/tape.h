#pragma once
// The thread-local tape. While grad mode is on and some input requires grad,
// every op appends a node {input slots, backward closure, output metadata};
// the closure captures only what its backward needs (SavedTensor). Tape order
// is topological, so backward() walks it in reverse and then frees the nodes
// it walked (a second backward through them throws); nodes nothing can reach
// any more are dropped at the same time, and an empty tape starts over.
//
// Writing an op (see docs/extending.md):
//
//   Tensor y = ...forward...;
//   if (autograd::needs_grad({x})) {
//     autograd::record("exp", {x}, {y}, [saved = autograd::SavedTensor(y, "exp")](
//                          const std::vector<Tensor>& grads) -> std::vector<Tensor> {
//       return {ops::mul(grads[0], saved.get())};
//     });
//   }
//
// The closure receives one gradient per output (zeros where an output got
// none, or undefined for a node recorded with MissingGrad::Undefined) and
// returns one per input (undefined = no gradient for that input).
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "autograd/grad_mode.h"
#include "core/tensor.h"

namespace minidl::autograd {

using BackwardFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& grad_outputs)>;

// True when grad mode is on and some input carries a gradient (a leaf that
// requires grad, or an output of a live node on this thread's tape; the output
// of a freed node still says requires_grad() but records nothing): an op
// should then save tensors and call record().
bool needs_grad(std::initializer_list<Tensor> inputs);
bool needs_grad(const std::vector<Tensor>& inputs);

// What a node's closure receives for an output that got no gradient: a
// zero-filled tensor, or an undefined one when the closure handles that
// (saving the fill: a kernel per unused output, e.g. attention's lse).
enum class MissingGrad { Zeros, Undefined };

// Appends a node; marks each output as requiring grad and produced by it.
// Does nothing when needs_grad(inputs) is false.
void record(const char* op, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
            BackwardFn backward, MissingGrad missing = MissingGrad::Zeros);

// A tensor kept for backward, with the storage version it had when saved:
// get() throws if an in-place op changed it in between.
class SavedTensor {
 public:
  SavedTensor() = default;
  SavedTensor(const Tensor& t, const char* op);
  Tensor get() const;
  bool defined() const { return tensor_.defined(); }

 private:
  Tensor tensor_;
  uint64_t version_ = 0;
  const char* op_ = "";
};

// ---- deferred gradient work: batching launches across a pass's nodes ----
// Inside backward(), a node's closure may return gradients it has allocated
// but not yet written (`pending`) and leave `flush` to write them; the first
// defer() of a pass with a given `key` registers its flush (an op queues its
// nodes' work under one key and runs it all at once). The pass runs the
// flushes, in registration order, before the engine reads a pending gradient
// (a node's closure given one, an accumulation into or a cast to a leaf's
// gradient, a post-accumulate hook that reads gradients), when a backward()
// starts inside the pass, before the pass returns, and while it unwinds from
// an exception.
// A pending gradient reaching a leaf with no .grad() yet, of the leaf's
// dtype, is stored as is (no copy: it must be fresh, returned for one input,
// kept nowhere else); otherwise it is flushed and added. Pending tensors are
// known by identity: return exactly the tensors passed to defer, not views.
// A flush should not throw; if one does, the leaves given pending gradients
// drop them and the error propagates. in_backward(): a pass runs on this
// thread (also inside its hooks).
// deferred(key): a flush with `key` is registered and not yet run in this
// pass (an op whose queue holds work without one has work left by a pass that
// threw, and drops it).
bool in_backward();
void defer(const std::vector<Tensor>& pending, const void* key, std::function<void()> flush);
bool deferred(const void* key);
// Runs the pass's flushes now, so that every gradient it gave is written (a
// no-op outside a pass, or with nothing deferred): for a hook registered
// with reads_gradient = false, before it reads a gradient after all.
void flush_deferred();

// Walks the tape from `root` (seeded with `seed`, or 1 for a scalar) and
// accumulates into .grad() of leaves; then frees the nodes it walked. Outputs
// of freed nodes act as constants in later computations.
void backward(const Tensor& root, const Tensor& seed = Tensor());

// A function that backward calls once a leaf's gradient for the pass is
// final, every contribution of the pass accumulated into leaf.grad() (as
// PyTorch's register_post_accumulate_grad_hook): on the thread running
// backward, before the pass goes on to its remaining nodes. That is what lets
// data parallelism reduce the gradients of the last layers while backward
// still runs through the first. Not called for a leaf the pass gives no
// gradient. Hooks run with grad mode off. `leaf` must be a leaf that
// requires grad; the id removes the hook. Register and remove hooks while no
// other thread runs a backward pass through the leaf.
// Before a hook runs, the pass writes its deferred gradients (flush_deferred),
// which ends the batching of work queued so far. A hook that only notes that
// the gradient is final (`reads_gradient` false) skips that: it must call
// flush_deferred() before it reads any gradient during the pass (as
// DataParallel does when a bucket is complete).
using PostAccumulateGradHook = std::function<void(const Tensor& leaf)>;
uint64_t register_post_accumulate_grad_hook(const Tensor& leaf, PostAccumulateGradHook hook,
                                            bool reads_gradient = true);
void remove_post_accumulate_grad_hook(const Tensor& leaf, uint64_t id);

// Drops every recorded node (e.g. after an evaluation that recorded ops).
void clear_tape();
size_t tape_size();  // live (not yet freed) nodes

}  // namespace minidl::autograd
