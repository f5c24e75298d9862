#include "autograd/tape.h"

#include <atomic>

#include "autograd/tensor_math.h"

namespace minidl::autograd {
namespace {

// Where a node input's gradient goes: an earlier node's output, or a leaf.
struct InputSlot {
  int64_t node = -1;
  int32_t output_nr = 0;
  std::shared_ptr<TensorImpl> leaf;  // set when the input is a leaf
};

struct OutputMeta {
  Shape shape;
  TensorOptions options;
};

struct Node {
  const char* op;
  std::vector<InputSlot> inputs;  // one per op input; empty slot = no grad
  std::vector<OutputMeta> outputs;
  BackwardFn backward;
};

std::atomic<uint64_t> g_next_generation{1};

struct Tape {
  uint64_t generation = g_next_generation++;
  std::vector<Node> nodes;
  void reset() {
    nodes.clear();
    generation = g_next_generation++;
  }
};

thread_local Tape g_tape;

// The gradient to store in a leaf: `g` itself when nothing else can see it
// (its only handle, sole user of its storage, contiguous), else a contiguous
// copy. Backward closures hand one tensor to several inputs (add), return
// views of the upstream gradient (permute, cat) or pass the caller's seed on;
// a leaf must not share memory with them, or an in-place update of one
// gradient (clipping, an optimizer) would change another.
Tensor owned_gradient(const Tensor& g) {
  if (g.impl_ptr().use_count() == 1 && g.storage().use_count() == 1 && g.is_contiguous())
    return g;
  return detail::clone(g);
}

// True if `t` carries gradient: a leaf that requires grad, or the output of a
// node on the live tape. Outputs of a freed tape act as constants.
bool carries_grad(const Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return false;
  const AutogradMeta& m = t.impl()->autograd;
  return m.node < 0 || m.tape_generation == g_tape.generation;
}

}  // namespace

bool needs_grad(const std::vector<Tensor>& inputs) {
  if (!grad_enabled()) return false;
  for (const Tensor& t : inputs)
    if (carries_grad(t)) return true;
  return false;
}

bool needs_grad(std::initializer_list<Tensor> inputs) {
  return needs_grad(std::vector<Tensor>(inputs));
}

void record(const char* op, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
            BackwardFn backward) {
  if (!needs_grad(inputs)) return;
  Node node{op, {}, {}, std::move(backward)};
  node.inputs.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    if (!carries_grad(t)) continue;
    const AutogradMeta& m = t.impl()->autograd;
    if (m.node < 0) node.inputs[i].leaf = t.impl_ptr();
    else node.inputs[i] = {m.node, m.output_nr, nullptr};
  }
  int64_t index = static_cast<int64_t>(g_tape.nodes.size());
  for (size_t k = 0; k < outputs.size(); ++k) {
    const Tensor& out = outputs[k];
    node.outputs.push_back({out.shape(), out.options()});
    AutogradMeta& m = out.impl()->autograd;
    m.requires_grad = true;
    m.tape_generation = g_tape.generation;
    m.node = index;
    m.output_nr = static_cast<int32_t>(k);
  }
  g_tape.nodes.push_back(std::move(node));
}

SavedTensor::SavedTensor(const Tensor& t, const char* op)
    : tensor_(t), version_(t.defined() ? t.version() : 0), op_(op) {}

Tensor SavedTensor::get() const {
  if (tensor_.defined())
    MINIDL_CHECK(tensor_.version() == version_, op_, " backward: a tensor of shape ",
                 shape_str(tensor_.shape()), " saved for backward was modified in place "
                 "(version ", version_, " -> ", tensor_.version(), ")");
  return tensor_;
}

void backward(const Tensor& root, const Tensor& seed) {
  MINIDL_CHECK(root.defined(), "backward: called on an undefined tensor");
  MINIDL_CHECK(root.requires_grad(), "backward: tensor of shape ", shape_str(root.shape()),
               " does not require grad (no input of the computation requires grad)");
  Tensor g0 = seed;
  if (!g0.defined()) {
    MINIDL_CHECK(root.numel() == 1, "backward: tensor of shape ", shape_str(root.shape()),
                 " is not a scalar; pass a seed gradient of the same shape");
    g0 = detail::ones(root.shape(), root.options());
  } else {
    MINIDL_CHECK(g0.shape() == root.shape(), "backward: seed gradient shape ",
                 shape_str(g0.shape()), " differs from tensor shape ", shape_str(root.shape()));
  }
  const AutogradMeta& rm = root.impl()->autograd;
  if (rm.node < 0) {  // a leaf: its gradient is the seed
    root.set_grad(root.grad().defined() ? detail::add(root.grad(), g0) : owned_gradient(g0));
    return;
  }
  MINIDL_CHECK(rm.tape_generation == g_tape.generation,
               "backward: the graph of this tensor was freed (backward already ran through it, "
               "or clear_tape() was called); recompute the forward pass");

  NoGradGuard no_grad;
  // Detach the nodes so a throwing closure still leaves a clean, empty tape.
  std::vector<Node> nodes = std::move(g_tape.nodes);
  g_tape.reset();
  std::vector<std::vector<Tensor>> grads(static_cast<size_t>(rm.node) + 1);
  auto accumulate = [](Tensor& slot, const Tensor& g) {
    slot = slot.defined() ? detail::add(slot, g) : g;
  };
  grads[static_cast<size_t>(rm.node)].resize(nodes[static_cast<size_t>(rm.node)].outputs.size());
  grads[static_cast<size_t>(rm.node)][static_cast<size_t>(rm.output_nr)] = g0;

  for (int64_t i = rm.node; i >= 0; --i) {
    Node& node = nodes[static_cast<size_t>(i)];
    std::vector<Tensor>& out_grads = grads[static_cast<size_t>(i)];
    if (out_grads.empty()) continue;  // not on a path from the root
    for (size_t k = 0; k < node.outputs.size(); ++k)
      if (!out_grads[k].defined())
        out_grads[k] = detail::zeros(node.outputs[k].shape, node.outputs[k].options);
    std::vector<Tensor> in_grads = node.backward(out_grads);
    out_grads.clear();
    MINIDL_CHECK(in_grads.size() == node.inputs.size(), node.op, " backward returned ",
                 in_grads.size(), " gradients for ", node.inputs.size(), " inputs");
    for (size_t j = 0; j < node.inputs.size(); ++j) {
      const InputSlot& slot = node.inputs[j];
      const Tensor& g = in_grads[j];
      if (!g.defined() || (slot.node < 0 && !slot.leaf)) continue;
      if (slot.leaf) {
        Tensor leaf(slot.leaf);
        MINIDL_CHECK(g.shape() == leaf.shape(), node.op, " backward: gradient of shape ",
                     shape_str(g.shape()), " for input ", j, " of shape ", shape_str(leaf.shape()));
        Tensor acc = leaf.grad();
        if (acc.defined())
          accumulate(acc, g.dtype() == leaf.dtype() ? g : detail::cast(g, leaf.dtype()));
        else
          acc = g.dtype() == leaf.dtype() ? owned_gradient(g) : detail::cast(g, leaf.dtype());
        leaf.set_grad(acc);
      } else {
        std::vector<Tensor>& target = grads[static_cast<size_t>(slot.node)];
        const Node& producer = nodes[static_cast<size_t>(slot.node)];
        if (target.empty()) target.resize(producer.outputs.size());
        MINIDL_CHECK(g.shape() == producer.outputs[slot.output_nr].shape, node.op,
                     " backward: gradient of shape ", shape_str(g.shape()), " for input ", j,
                     " of shape ", shape_str(producer.outputs[slot.output_nr].shape));
        accumulate(target[static_cast<size_t>(slot.output_nr)], g);
      }
    }
    node.backward = nullptr;  // free saved tensors early
  }
}

void clear_tape() { g_tape.reset(); }
size_t tape_size() { return g_tape.nodes.size(); }

}  // namespace minidl::autograd

namespace minidl {
void Tensor::backward(const Tensor& seed) const { autograd::backward(*this, seed); }
}  // namespace minidl
