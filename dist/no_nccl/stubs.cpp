// Built instead of dist/nccl.cpp when minidl has no CUDA or NCCL was not
// found: the factories exist and throw a clear error.
#include "core/error.h"
#include "dist/nccl.h"

namespace minidl::dist {

namespace {
[[noreturn]] void no_nccl(const char* what) {
  MINIDL_FAIL("dist::", what, ": minidl was built without NCCL (no CUDA, or nccl.h / libnccl not found at configure "
              "time); the in-process backend (dist::run_in_process) is available");
}
}  // namespace

bool nccl_available() { return false; }
void run_nccl(int, const std::function<void(Communicator&)>&) { no_nccl("run_nccl"); }
std::unique_ptr<Communicator> nccl_from_env(const std::string&) { no_nccl("nccl_from_env"); }

}  // namespace minidl::dist
