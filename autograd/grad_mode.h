#pragma once
// Grad mode: while off, ops record nothing on the tape.
namespace minidl::autograd {

bool grad_enabled();
void set_grad_enabled(bool enabled);

// RAII: disables recording in this scope (like torch::NoGradGuard).
class NoGradGuard {
 public:
  NoGradGuard() : previous_(grad_enabled()) { set_grad_enabled(false); }
  ~NoGradGuard() { set_grad_enabled(previous_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

}  // namespace minidl::autograd

namespace minidl {
using autograd::NoGradGuard;
}
