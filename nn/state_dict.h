#pragma once
// StateDict: named tensors in insertion order, with lookup by name. The unit
// that modules and optimizers export, checkpoints store and load_state_dict
// consumes (libtorch's OrderedDict<std::string, Tensor>, reduced).
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"

namespace minidl::nn {

class StateDict {
 public:
  using Item = std::pair<std::string, Tensor>;

  // Adds `name`; a second insert of the same name throws.
  void insert(const std::string& name, const Tensor& tensor) {
    MINIDL_CHECK(index_.find(name) == index_.end(), "StateDict: duplicate key '", name, "'");
    index_.emplace(name, items_.size());
    items_.emplace_back(name, tensor);
  }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Null when absent.
  const Tensor* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &items_[it->second].second;
  }
  const Tensor& at(const std::string& name) const {
    const Tensor* t = find(name);
    MINIDL_CHECK(t != nullptr, "StateDict: no key '", name, "'");
    return *t;
  }
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    out.reserve(items_.size());
    for (const Item& item : items_) out.push_back(item.first);
    return out;
  }
  std::vector<Item>::const_iterator begin() const { return items_.begin(); }
  std::vector<Item>::const_iterator end() const { return items_.end(); }

 private:
  std::vector<Item> items_;
  std::unordered_map<std::string, size_t> index_;
};

}  // namespace minidl::nn
