#include "nn/module.h"

#include <sstream>
#include <unordered_set>

#include "autograd/grad_mode.h"
#include "ops/ops.h"

namespace minidl::nn {
namespace {

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

std::string describe(const Tensor& t) {
  return ::minidl::detail::concat(t.dtype(), " ", shape_str(t.shape()), " on ", t.device());
}

// Points `t`'s TensorImpl at `replacement`'s storage and geometry, so every
// handle to `t` sees the moved or cast tensor while autograd state (leaf,
// requires_grad) is untouched.
void rewrite_in_place(const Tensor& t, const Tensor& replacement) {
  TensorImpl* impl = t.impl();
  impl->storage = replacement.storage();
  impl->strides = replacement.strides();
  impl->offset = replacement.offset();
  impl->dtype = replacement.dtype();
}

}  // namespace

void Module::check_new_name(const std::string& name, const char* what) const {
  MINIDL_CHECK(!name.empty() && name.find('.') == std::string::npos, type_name_, ": ", what,
               " name '", name, "' must be non-empty and contain no '.'");
  auto taken = [&](const auto& list) {
    for (const auto& item : list)
      if (item.first == name) return true;
    return false;
  };
  MINIDL_CHECK(!taken(parameters_) && !taken(buffers_) && !taken(children_), type_name_,
               ": cannot register ", what, " '", name,
               "': the name is already used by a parameter, buffer or submodule");
}

Tensor Module::register_parameter(const std::string& name, Tensor tensor, bool requires_grad) {
  check_new_name(name, "parameter");
  MINIDL_CHECK(tensor.defined(), type_name_, ": parameter '", name, "' is an undefined tensor");
  MINIDL_CHECK(tensor.is_leaf(), type_name_, ": parameter '", name,
               "' was produced by an op; register a leaf (detach() it first)");
  if (requires_grad) tensor.requires_grad_(true);
  parameters_.emplace_back(name, tensor);
  return tensor;
}

Tensor Module::register_buffer(const std::string& name, Tensor tensor) {
  check_new_name(name, "buffer");
  MINIDL_CHECK(tensor.defined(), type_name_, ": buffer '", name, "' is an undefined tensor");
  buffers_.emplace_back(name, tensor);
  return tensor;
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> module) {
  check_new_name(name, "submodule");
  MINIDL_CHECK(module != nullptr, type_name_, ": submodule '", name, "' is null");
  children_.emplace_back(name, std::move(module));
}

void Module::collect(const std::string& prefix, bool params, bool recurse, NamedTensors& out) const {
  for (const auto& [name, t] : params ? parameters_ : buffers_) out.emplace_back(join(prefix, name), t);
  if (!recurse) return;
  for (const auto& [name, child] : children_) child->collect(join(prefix, name), params, true, out);
}

namespace {
NamedTensors unique(NamedTensors all) {
  std::unordered_set<const TensorImpl*> seen;
  NamedTensors out;
  for (auto& item : all)
    if (seen.insert(item.second.impl()).second) out.push_back(std::move(item));
  return out;
}
}  // namespace

NamedTensors Module::named_parameters(bool recurse) const {
  NamedTensors all;
  collect("", true, recurse, all);
  return unique(std::move(all));
}

NamedTensors Module::named_buffers(bool recurse) const {
  NamedTensors all;
  collect("", false, recurse, all);
  return unique(std::move(all));
}

std::vector<Tensor> Module::parameters(bool recurse) const {
  std::vector<Tensor> out;
  for (auto& item : named_parameters(recurse)) out.push_back(item.second);
  return out;
}

std::vector<Tensor> Module::buffers(bool recurse) const {
  std::vector<Tensor> out;
  for (auto& item : named_buffers(recurse)) out.push_back(item.second);
  return out;
}

std::vector<std::shared_ptr<Module>> Module::children() const {
  std::vector<std::shared_ptr<Module>> out;
  for (const auto& item : children_) out.push_back(item.second);
  return out;
}

std::vector<std::pair<std::string, std::shared_ptr<Module>>> Module::named_children() const {
  return children_;
}

void Module::collect_modules(const std::string& prefix,
                             std::vector<std::pair<std::string, const Module*>>& out) const {
  out.emplace_back(prefix, this);
  for (const auto& [name, child] : children_) child->collect_modules(join(prefix, name), out);
}

std::vector<std::pair<std::string, const Module*>> Module::named_modules() const {
  std::vector<std::pair<std::string, const Module*>> out;
  collect_modules("", out);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (const Tensor& p : parameters()) n += p.numel();
  return n;
}

void Module::train(bool on) {
  training_ = on;
  for (auto& item : children_) item.second->train(on);
}

std::vector<Tensor> Module::all_tensors() const {
  NamedTensors all;
  collect("", true, true, all);
  collect("", false, true, all);
  std::vector<Tensor> out;
  for (auto& item : unique(std::move(all))) out.push_back(item.second);
  return out;
}

void Module::to(Device device) {
  NoGradGuard no_grad;
  for (const Tensor& t : all_tensors()) {
    if (t.device() != device) rewrite_in_place(t, ops::to(t.detach(), device));
    Tensor g = t.grad();
    if (g.defined() && g.device() != device) t.set_grad(ops::to(g, device));
  }
}

void Module::to(DType dtype) {
  MINIDL_CHECK(is_floating(dtype), type_name_, ".to(", dtype,
               "): modules can only be cast to a floating dtype");
  NoGradGuard no_grad;
  for (const Tensor& t : all_tensors()) {
    if (!is_floating(t.dtype())) continue;
    if (t.dtype() != dtype) rewrite_in_place(t, ops::to(t.detach(), dtype));
    Tensor g = t.grad();
    if (g.defined() && g.dtype() != dtype) t.set_grad(ops::to(g, dtype));
  }
}

void Module::zero_grad() {
  for (const Tensor& p : parameters()) p.zero_grad();
}

StateDict Module::state_dict() const {
  // Per module: its parameters, then its buffers, then its children (the
  // PyTorch order), every registered name kept.
  StateDict dict;
  for (const auto& [prefix, module] : named_modules()) {
    for (const auto& [name, t] : module->parameters_) dict.insert(join(prefix, name), t);
    for (const auto& [name, t] : module->buffers_) dict.insert(join(prefix, name), t);
  }
  return dict;
}

LoadStateDictResult Module::load_state_dict(const StateDict& dict, bool strict) {
  StateDict own = state_dict();
  LoadStateDictResult result;
  std::vector<std::string> mismatches;
  for (const auto& [name, dst] : own) {
    const Tensor* src = dict.find(name);
    if (src == nullptr) {
      result.missing_keys.push_back(name);
      continue;
    }
    if (!src->defined() || src->shape() != dst.shape() || src->dtype() != dst.dtype())
      mismatches.push_back(::minidl::detail::concat("'", name, "': expected ", describe(dst), ", got ",
                                          src->defined() ? describe(*src) : "an undefined tensor"));
  }
  for (const auto& [name, t] : dict)
    if (!own.contains(name)) result.unexpected_keys.push_back(name);

  bool key_errors = strict && (!result.missing_keys.empty() || !result.unexpected_keys.empty());
  if (key_errors || !mismatches.empty()) {
    std::ostringstream msg;
    msg << type_name_ << ".load_state_dict: the state dict does not match the model";
    auto list = [&](const char* what, const std::vector<std::string>& items) {
      if (items.empty()) return;
      msg << "; " << what << " (" << items.size() << "):";
      for (size_t i = 0; i < items.size(); ++i) msg << (i ? ", " : " ") << items[i];
    };
    if (strict) {
      list("missing keys", result.missing_keys);
      list("unexpected keys", result.unexpected_keys);
    }
    list("shape/dtype mismatches", mismatches);
    throw Error(msg.str());
  }

  NoGradGuard no_grad;
  for (const auto& [name, dst] : own) {
    const Tensor* src = dict.find(name);
    if (src != nullptr && src->impl() != dst.impl()) ops::copy_(dst, *src);
  }
  return result;
}

}  // namespace minidl::nn
