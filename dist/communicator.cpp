// dist/communicator.h: Work, and the async collectives' default (the plain
// collective, complete on return).
#include "dist/communicator.h"

namespace minidl::dist {

Work& Work::operator=(Work&& other) noexcept {
  if (this != &other) {
    wait_nothrow();  // for what this one held
    finish_ = std::exchange(other.finish_, nullptr);
  }
  return *this;
}

Work::~Work() { wait_nothrow(); }

// Waiting enqueues no host wait and, when unwinding, keeps the tensors of a
// collective still running from being reused under it. Errors cannot be
// thrown from a destructor.
void Work::wait_nothrow() noexcept {
  try {
    wait();
  } catch (...) {
  }
}

void Work::wait() {
  if (!finish_) return;
  std::function<void()> finish = std::exchange(finish_, nullptr);
  finish();
}

Work Communicator::all_gather_async(const Tensor& input, const Tensor& output) {
  all_gather(input, output);
  return Work();
}

Work Communicator::reduce_scatter_async(const Tensor& input, const Tensor& output) {
  reduce_scatter(input, output);
  return Work();
}

Work Communicator::all_reduce_async(const Tensor& tensor) {
  all_reduce(tensor);
  return Work();
}

}  // namespace minidl::dist
