#pragma once
// A training step (or any work on minidl's CUDA stream) captured once as a
// CUDA graph and replayed: one launch instead of hundreds, no host work per
// kernel.
//
//   nn::CudaGraph graph({&model.dropout_generator()});
//   Tensor x = ..., y = ..., loss;                    // static inputs, made once
//   step_eagerly();                                   // warm-up: lazy init, caches
//   graph.capture([&] { loss = loss_of(model, x, y); opt.zero_grad(); loss.backward(); opt.step(); });
//   for (...) { ops::copy_(x, next_x); ops::copy_(y, next_y); opt.set_lr(lr); graph.replay(); }
//
// What the captured work must respect (each replay repeats its kernels with
// the arguments they had at capture):
//   - Inputs are read from tensors made before the capture and refilled in
//     place between replays; outputs (the loss) are tensors it assigns, which
//     then hold each replay's values.
//   - No host synchronisation and no value read back (capture fails).
//   - Random ops draw from the generators given here: their offsets advance
//     on the device at every replay, so each replay draws new masks, the ones
//     eager execution would draw. Ops with host offsets (ops::rand,
//     random_windows) refuse to run on a bound generator; on any other
//     generator they would repeat one draw.
//   - Scalars that change between steps live in device memory (the
//     optimizers' lr_tensor() and step_tensor()); set_lr() runs outside.
//     Host-side counters (Optimizer::step_count()) count the capture once,
//     not the replays: read step_tensor() instead.
//   - Gradients: zero_grad() inside the step (it only drops them), so that
//     backward writes fresh ones instead of accumulating across replays.
//   - Run it eagerly once first: one-time setup (kernel attributes, cuBLAS
//     handles, caches) must not happen during the capture.
// Memory: allocations during the capture come from a pool private to the
// graph, so nothing else reuses the addresses the graph writes; tensors made
// in the capture keep their storage for every replay.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/generator.h"

namespace minidl::nn {

class CudaGraph {
 public:
  // `generators`: the random streams the captured work draws from; they must
  // outlive the graph and keep their seeds (replay throws otherwise).
  explicit CudaGraph(std::vector<Generator*> generators = {});
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  // Records `work` on minidl's stream of the current CUDA device without
  // running it (the generators' offsets are left as they were). Once per
  // graph; throws, leaving nothing captured, when the work cannot be
  // captured (e.g. a host synchronisation inside), or when minidl was built
  // without CUDA.
  void capture(const std::function<void()>& work);
  bool captured() const;
  // Runs the captured work once, asynchronously on minidl's stream, and
  // advances each generator's offset by the draws of one run.
  void replay();

  // The graph's nodes by kind.
  struct NodeCounts {
    int64_t kernels = 0, memsets = 0, copies = 0, other = 0;
  };
  NodeCounts node_counts() const;
  // The graph's kernel nodes grouped by kernel: {name, nodes}, most nodes
  // first. Names are demangled, without return type, parameters or the
  // minidl namespaces; a kernel whose name the driver does not give is "?".
  std::vector<std::pair<std::string, int64_t>> kernel_names() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace minidl::nn
