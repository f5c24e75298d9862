#include "autograd/tape.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <unordered_map>
#include <unordered_set>

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
  std::vector<std::weak_ptr<TensorImpl>> output_refs;  // to see when outputs die
  MissingGrad missing = MissingGrad::Zeros;
  bool freed = false;

  void free() {
    freed = true;
    backward = nullptr;  // releases the saved tensors
    inputs.clear();
    output_refs.clear();
  }
};

std::atomic<uint64_t> g_next_generation{1};

// Nodes are freed when a backward pass runs through them, or when nothing
// can reach them any more (their outputs are dead and no live node uses
// them); once every node is freed the tape starts over.
struct Tape {
  uint64_t generation = g_next_generation++;
  std::vector<Node> nodes;
  size_t live = 0;
  void reset() {
    nodes.clear();
    live = 0;
    generation = g_next_generation++;
  }
  void free(Node& node) {
    if (node.freed) return;
    node.free();
    --live;
  }
  void reset_if_empty() {
    if (live == 0) reset();
  }
  // Frees nodes whose outputs are all dead and that no live node reads.
  void sweep() {
    std::vector<bool> used(nodes.size(), false);
    for (size_t i = nodes.size(); i-- > 0 && live > 0;) {
      Node& node = nodes[i];
      if (node.freed) continue;
      bool alive = used[i];
      for (const auto& ref : node.output_refs) alive = alive || !ref.expired();
      if (!alive) {
        free(node);
        continue;
      }
      for (const InputSlot& slot : node.inputs)
        if (slot.node >= 0) used[static_cast<size_t>(slot.node)] = true;
    }
  }
};

thread_local Tape g_tape;

// Deferred gradient work of the pass running on this thread (defer()).
struct Deferred {
  bool in_backward = false;
  std::vector<std::pair<const void*, std::function<void()>>> flushes;  // by key, in registration order
  std::unordered_set<const TensorImpl*> pending;
  std::vector<std::shared_ptr<TensorImpl>> unwritten;  // leaves whose .grad() is a pending gradient
  bool is_pending(const Tensor& t) const { return t.defined() && pending.count(t.impl()) > 0; }
  // Runs every registered flush; the pending gradients are then written. If
  // one throws, the others still run, the leaves given a pending gradient
  // drop it (.grad() undefined, as it was: which flush wrote which is not
  // known) and the first error is rethrown.
  void flush() {
    std::exception_ptr first;
    while (!flushes.empty()) {
      auto run = std::move(flushes);
      flushes.clear();
      pending.clear();
      for (auto& [key, fn] : run) try {
          fn();
        } catch (...) {
          if (!first) first = std::current_exception();
        }
    }
    pending.clear();
    std::vector<std::shared_ptr<TensorImpl>> leaves = std::move(unwritten);
    unwritten.clear();
    if (first) {
      for (const auto& leaf : leaves) Tensor(leaf).zero_grad();
      std::rethrow_exception(first);
    }
  }
};

thread_local Deferred g_deferred;

std::atomic<uint64_t> g_next_hook_id{1};

// Runs a leaf's hooks (a copy of the list: a hook may remove itself),
// writing the pass's deferred gradients first if one of them reads gradients.
void run_grad_hooks(const std::shared_ptr<TensorImpl>& leaf) {
  const auto hooks = leaf->autograd.grad_hooks;
  if (std::any_of(hooks.begin(), hooks.end(), [](const AutogradMeta::GradHook& h) { return h.reads_gradient; }))
    g_deferred.flush();
  const Tensor t(leaf);
  for (const AutogradMeta::GradHook& h : hooks) h.fn(t);
}

// The leaves of one backward pass that have hooks, with the earliest node
// reading each: the last node the pass runs that can add to its gradient.
// Once the pass has gone below that node, the gradient is final.
class HookedLeaves {
 public:
  HookedLeaves(const std::vector<Node>& nodes, int64_t last) {
    for (int64_t i = 0; i <= last; ++i) {
      const Node& node = nodes[static_cast<size_t>(i)];
      if (node.freed) continue;
      for (const InputSlot& slot : node.inputs)
        if (slot.leaf && !slot.leaf->autograd.grad_hooks.empty() && index_.try_emplace(slot.leaf.get(), 0).second)
          leaves_.push_back({i, slot.leaf});  // ascending i: the first reader seen is the earliest
    }
    // Latest last readers first: the order in which the pass finishes them.
    std::stable_sort(leaves_.begin(), leaves_.end(),
                     [](const Leaf& a, const Leaf& b) { return a.last_reader > b.last_reader; });
    for (size_t k = 0; k < leaves_.size(); ++k) index_[leaves_[k].impl.get()] = k;
  }
  bool empty() const { return leaves_.empty(); }
  void got_gradient(TensorImpl* leaf) {
    if (auto it = index_.find(leaf); it != index_.end()) leaves_[it->second].got = true;
  }
  // Calls the hooks of every leaf whose readers all lie above node `below`
  // (pass -1 at the end); leaves the pass gave no gradient are skipped.
  void finished_above(int64_t below) {
    for (; next_ < leaves_.size() && leaves_[next_].last_reader > below; ++next_)
      if (leaves_[next_].got) run_grad_hooks(leaves_[next_].impl);
  }

 private:
  struct Leaf {
    int64_t last_reader;
    std::shared_ptr<TensorImpl> impl;
    bool got = false;
  };
  std::vector<Leaf> leaves_;
  std::unordered_map<TensorImpl*, size_t> index_;  // leaf -> its place in leaves_
  size_t next_ = 0;
};

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
  if (m.node < 0) return true;
  return m.tape_generation == g_tape.generation && !g_tape.nodes[static_cast<size_t>(m.node)].freed;
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
            BackwardFn backward, MissingGrad missing) {
  if (!needs_grad(inputs)) return;
  Node node{op, {}, {}, std::move(backward), {}, missing, false};
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
    node.output_refs.push_back(out.impl_ptr());
    AutogradMeta& m = out.impl()->autograd;
    m.requires_grad = true;
    m.tape_generation = g_tape.generation;
    m.node = index;
    m.output_nr = static_cast<int32_t>(k);
  }
  g_tape.nodes.push_back(std::move(node));
  ++g_tape.live;
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
  // Started inside a pass (a closure's or a hook's): the outer pass's pending
  // gradients are written first, so this pass sees them and its own deferred
  // work starts empty.
  if (g_deferred.in_backward) g_deferred.flush();
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
    // The closures take their dtype from the gradient and read the saved
    // tensors as it: a seed of another dtype would have them misread memory.
    MINIDL_CHECK(g0.dtype() == root.dtype() && g0.device() == root.device(), "backward: seed gradient is ",
                 g0.dtype(), " on ", g0.device(), ", the tensor ", root.dtype(), " on ", root.device(),
                 "; they must match");
  }
  const AutogradMeta& rm = root.impl()->autograd;
  if (rm.node < 0) {  // a leaf: its gradient is the seed
    root.set_grad(root.grad().defined() ? detail::add(root.grad(), g0) : owned_gradient(g0));
    NoGradGuard no_grad;  // as for the hooks a pass runs
    run_grad_hooks(root.impl_ptr());
    return;
  }
  MINIDL_CHECK(rm.tape_generation == g_tape.generation &&
                   !g_tape.nodes[static_cast<size_t>(rm.node)].freed,
               "backward: the graph of this tensor was freed (backward already ran through it, "
               "or clear_tape() was called); recompute the forward pass");

  NoGradGuard no_grad;
  std::vector<Node>& nodes = g_tape.nodes;
  std::vector<int64_t> visited;
  // Whatever happens, the nodes this pass ran through are spent. A pass
  // started from inside another has its own deferred work (the outer one's
  // was flushed on entry).
  Deferred outer = std::move(g_deferred);
  g_deferred = Deferred{};
  g_deferred.in_backward = true;
  struct FreeVisited {
    std::vector<int64_t>& visited;
    Deferred& outer;
    ~FreeVisited() {
      g_deferred = std::move(outer);
      for (int64_t i : visited) g_tape.free(g_tape.nodes[static_cast<size_t>(i)]);
      g_tape.sweep();
      g_tape.reset_if_empty();
    }
  } free_visited{visited, outer};
  std::vector<std::vector<Tensor>> grads(static_cast<size_t>(rm.node) + 1);
  auto accumulate = [](Tensor& slot, const Tensor& g) {
    slot = slot.defined() ? detail::add(slot, g) : g;
  };
  grads[static_cast<size_t>(rm.node)].resize(nodes[static_cast<size_t>(rm.node)].outputs.size());
  grads[static_cast<size_t>(rm.node)][static_cast<size_t>(rm.output_nr)] = g0;
  HookedLeaves hooked(nodes, rm.node);

  // Deferred work still runs if the pass throws, so that no gradient stored
  // so far is left unwritten (an error in it is dropped for the first one).
  struct FlushOnThrow {
    int exceptions = std::uncaught_exceptions();
    ~FlushOnThrow() {
      if (std::uncaught_exceptions() > exceptions) try {
          g_deferred.flush();
        } catch (...) {
        }
    }
  } flush_on_throw;
  for (int64_t i = rm.node; i >= 0; --i) {
    if (!hooked.empty()) hooked.finished_above(i);
    Node& node = nodes[static_cast<size_t>(i)];
    std::vector<Tensor>& out_grads = grads[static_cast<size_t>(i)];
    if (out_grads.empty()) continue;  // not on a path from the root
    visited.push_back(i);
    if (node.missing == MissingGrad::Zeros)
      for (size_t k = 0; k < node.outputs.size(); ++k)
        if (!out_grads[k].defined())
          out_grads[k] = detail::zeros(node.outputs[k].shape, node.outputs[k].options);
    for (const Tensor& g : out_grads)
      if (g_deferred.is_pending(g)) g_deferred.flush();
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
        if (g_deferred.is_pending(g) && !acc.defined() && g.dtype() == leaf.dtype()) {
          acc = g;  // fresh from its closure and written before the pass returns: stored as is
          g_deferred.unwritten.push_back(slot.leaf);
        } else {
          if (g_deferred.is_pending(g) || g_deferred.is_pending(acc)) g_deferred.flush();
          if (acc.defined())
            accumulate(acc, g.dtype() == leaf.dtype() ? g : detail::cast(g, leaf.dtype()));
          else
            acc = g.dtype() == leaf.dtype() ? owned_gradient(g) : detail::cast(g, leaf.dtype());
        }
        leaf.set_grad(acc);
        if (!hooked.empty()) hooked.got_gradient(slot.leaf.get());
      } else {
        std::vector<Tensor>& target = grads[static_cast<size_t>(slot.node)];
        const Node& producer = nodes[static_cast<size_t>(slot.node)];
        MINIDL_CHECK(!producer.freed, "backward: ", node.op, " reads the output of ", producer.op,
                     ", whose part of the graph an earlier backward already freed; recompute the "
                     "forward pass");
        if (target.empty()) target.resize(producer.outputs.size());
        MINIDL_CHECK(g.shape() == producer.outputs[slot.output_nr].shape, node.op,
                     " backward: gradient of shape ", shape_str(g.shape()), " for input ", j,
                     " of shape ", shape_str(producer.outputs[slot.output_nr].shape));
        Tensor& into = target[static_cast<size_t>(slot.output_nr)];
        if (into.defined() && (g_deferred.is_pending(g) || g_deferred.is_pending(into))) g_deferred.flush();
        accumulate(into, g);  // a pending sum is flushed before the closure that reads it
      }
    }
    node.backward = nullptr;  // free saved tensors early
  }
  g_deferred.flush();
  if (!hooked.empty()) hooked.finished_above(-1);
}

bool in_backward() { return g_deferred.in_backward; }

void flush_deferred() { g_deferred.flush(); }

bool deferred(const void* key) {
  for (const auto& [k, fn] : g_deferred.flushes)
    if (k == key) return true;
  return false;
}

void defer(const std::vector<Tensor>& pending, const void* key, std::function<void()> flush) {
  MINIDL_CHECK(g_deferred.in_backward, "autograd::defer: only a backward pass's closures may defer work");
  for (const Tensor& t : pending)
    if (t.defined()) g_deferred.pending.insert(t.impl());
  if (!deferred(key)) g_deferred.flushes.emplace_back(key, std::move(flush));
}

uint64_t register_post_accumulate_grad_hook(const Tensor& leaf, PostAccumulateGradHook hook, bool reads_gradient) {
  MINIDL_CHECK(leaf.defined() && leaf.requires_grad() && leaf.is_leaf(),
               "register_post_accumulate_grad_hook: the tensor must be a leaf that requires grad");
  MINIDL_CHECK(static_cast<bool>(hook), "register_post_accumulate_grad_hook: an empty function");
  const uint64_t id = g_next_hook_id++;
  leaf.impl()->autograd.grad_hooks.push_back({id, std::move(hook), reads_gradient});
  return id;
}

void remove_post_accumulate_grad_hook(const Tensor& leaf, uint64_t id) {
  MINIDL_CHECK(leaf.defined(), "remove_post_accumulate_grad_hook: an undefined tensor");
  auto& hooks = leaf.impl()->autograd.grad_hooks;
  hooks.erase(std::remove_if(hooks.begin(), hooks.end(), [&](const auto& h) { return h.id == id; }), hooks.end());
}

void clear_tape() { g_tape.reset(); }
size_t tape_size() { return g_tape.live; }

}  // namespace minidl::autograd

namespace minidl {
void Tensor::backward(const Tensor& seed) const { autograd::backward(*this, seed); }
}  // namespace minidl
