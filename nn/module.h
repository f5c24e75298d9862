#pragma once
// nn::Module in the libtorch style: a module owns named parameters (leaf
// tensors that require grad), named buffers (state that is saved but not
// trained) and named child modules. Names are dotted paths ("h.0.attn.c_attn.
// weight") and every listing is in registration order: own tensors first,
// then each child's, depth first.
//
// Layers keep Tensor handles to what they register (Linear::weight, ...).
// Because Tensor is a handle, operations that change a parameter's storage
// (to(Device), to(DType)) rewrite the tensor in place, so every handle — the
// layer's, an optimizer's — keeps seeing the same tensor.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/device.h"
#include "core/dtype.h"
#include "core/tensor.h"
#include "nn/state_dict.h"

namespace minidl::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// What a non-strict load_state_dict skipped.
struct LoadStateDictResult {
  std::vector<std::string> missing_keys;     // in the module, not in the dict
  std::vector<std::string> unexpected_keys;  // in the dict, not in the module
};

class Module {
 public:
  explicit Module(std::string type_name = "Module") : type_name_(std::move(type_name)) {}
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // The layer's kind ("Linear", "TransformerLM"), used in messages.
  const std::string& type_name() const { return type_name_; }

  // Registers `tensor` as a trainable leaf (requires_grad set when
  // `requires_grad`) and returns the same handle. Names must be unique among
  // this module's parameters, buffers and children, and contain no '.'.
  Tensor register_parameter(const std::string& name, Tensor tensor, bool requires_grad = true);
  // Saved in state_dict and moved by to(), never trained.
  Tensor register_buffer(const std::string& name, Tensor tensor);
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    add_child(name, module);
    return module;
  }

  // Each distinct tensor once (a tensor registered twice keeps its first name).
  std::vector<Tensor> parameters(bool recurse = true) const;
  NamedTensors named_parameters(bool recurse = true) const;
  std::vector<Tensor> buffers(bool recurse = true) const;
  NamedTensors named_buffers(bool recurse = true) const;
  std::vector<std::shared_ptr<Module>> children() const;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const;
  // This module (name "") and all descendants, depth first, registration order.
  std::vector<std::pair<std::string, const Module*>> named_modules() const;
  int64_t num_parameters() const;

  // Recursive; layers such as Dropout read is_training().
  virtual void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }

  // Moves every parameter and buffer (and any gradient) to `device` in place:
  // the tensors stay leaves with their requires_grad flag. Build optimizers
  // after moving, since their state lives on the parameters' device.
  void to(Device device);
  // Casts floating parameters and buffers (and gradients) to `dtype` in
  // place; int32 buffers are left alone.
  void to(DType dtype);
  // Drops every parameter's gradient (libtorch's set_to_none).
  void zero_grad();

  // Parameters and buffers by dotted name, sharing storage with the module.
  StateDict state_dict() const;
  // Copies tensors from `dict` into this module's parameters and buffers
  // (any device; shapes and dtypes must match). Throws minidl::Error listing
  // every problem at once: shape or dtype mismatches always, missing and
  // unexpected keys when `strict`; otherwise returns what was skipped.
  LoadStateDictResult load_state_dict(const StateDict& dict, bool strict = true);

 private:
  void add_child(const std::string& name, std::shared_ptr<Module> module);
  void check_new_name(const std::string& name, const char* what) const;
  void collect(const std::string& prefix, bool params, bool recurse, NamedTensors& out) const;
  void collect_modules(const std::string& prefix, std::vector<std::pair<std::string, const Module*>>& out) const;
  // Every distinct parameter and buffer of the tree, for in-place rewrites.
  std::vector<Tensor> all_tensors() const;

  std::string type_name_;
  bool training_ = true;
  NamedTensors parameters_;
  NamedTensors buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
};

}  // namespace minidl::nn
