#include "cuda/runtime.h"

#include <atomic>
#include <cctype>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace minidl::cuda {

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  MINIDL_FAIL("CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ") in ", expr,
              " at ", file, ":", line);
}

void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line) {
  MINIDL_FAIL("cuBLAS error ", cublasGetStatusName(st), " (", cublasGetStatusString(st), ") in ",
              expr, " at ", file, ":", line);
}

namespace {

constexpr size_t kLtWorkspace = 32u << 20;
constexpr size_t kCublasWorkspace = 32u << 20;

struct PerDevice {
  std::mutex queue;  // lock_device_queue()
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  void* cublas_workspace = nullptr;
  int* counters = nullptr;
  int sms = 0;
  int cc = 0;
  size_t memory = 0;  // bytes of device memory in all
};

// Leaked on purpose: handles must outlive static tensors at exit.
std::vector<PerDevice>& devices() {
  static auto* v = new std::vector<PerDevice>(16);
  return *v;
}
std::mutex g_mutex;

// Whether this build has code that runs on a device of compute capability cc
// (major * 10 + minor). CMake's "NN" builds SASS and PTX for NN, "NN-real"
// SASS only (runs on the same major version at a minor >= N), "NN-virtual"
// PTX only (compiled at load time for any cc >= NN). An entry it cannot read
// ("native", "all") is taken to cover the device.
bool built_for(int cc) {
#ifdef MINIDL_CUDA_ARCHITECTURES
  std::string list = MINIDL_CUDA_ARCHITECTURES;
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    const std::string entry = list.substr(start, end - start);
    start = end + 1;
    size_t digits = 0;
    while (digits < entry.size() && std::isdigit(static_cast<unsigned char>(entry[digits]))) ++digits;
    if (digits == 0) return true;
    const int arch = std::stoi(entry.substr(0, digits));
    const std::string kind = entry.substr(digits);
    if (kind != "-virtual" && arch / 10 == cc / 10 && arch <= cc) return true;
    if (kind != "-real" && arch <= cc) return true;
  }
  return false;
#else
  (void)cc;
  return true;
#endif
}

PerDevice& current() {
  int dev = current_device();
  PerDevice& d = devices().at(static_cast<size_t>(dev));
  if (!d.stream) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!d.stream) {
      cudaStream_t s;
      MINIDL_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      MINIDL_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
      int major = 0, minor = 0;
      MINIDL_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
      MINIDL_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
      d.cc = major * 10 + minor;
#ifdef MINIDL_CUDA_ARCHITECTURES
      MINIDL_CHECK(built_for(d.cc), "minidl was built for CUDA architectures ", MINIDL_CUDA_ARCHITECTURES,
                   ", which cannot run on cuda:", dev, " (compute capability ", major, ".", minor,
                   "): configure with -DCMAKE_CUDA_ARCHITECTURES=", d.cc, " (a fresh build folder adds the ",
                   "GPUs nvidia-smi lists to the default)");
#endif
      size_t free = 0;
      MINIDL_CUDA_CHECK(cudaMemGetInfo(&free, &d.memory));
      // Made with the stream, before any capture could be under way; zeroed
      // in stream order ahead of every launch that uses them.
      MINIDL_CUDA_CHECK(cudaMalloc(&d.counters, 2 * sizeof(int)));
      MINIDL_CUDA_CHECK(cudaMemsetAsync(d.counters, 0, 2 * sizeof(int), s));
      d.stream = s;
    }
  }
  return d;
}

}  // namespace

int current_device() {
  int dev = 0;
  MINIDL_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

cudaStream_t stream() { return current().stream; }
int multiprocessor_count() { return current().sms; }
size_t device_memory_bytes() { return current().memory; }
int compute_capability() { return current().cc; }

// The handles and workspaces are made on first use, under g_mutex: threads
// sharing a device may ask at the same moment, and a handle must not be seen
// before its stream is set.
cublasHandle_t cublas_handle() {
  PerDevice& d = current();
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!d.cublas) {
    cublasHandle_t h;
    MINIDL_CUBLAS_CHECK(cublasCreate(&h));
    MINIDL_CUBLAS_CHECK(cublasSetStream(h, d.stream));
    // After cublasSetStream, which resets the workspace to cuBLAS's own pool.
    d.cublas_workspace = malloc_persistent(kCublasWorkspace, "cuBLAS workspace");
    MINIDL_CUBLAS_CHECK(cublasSetWorkspace(h, d.cublas_workspace, kCublasWorkspace));
    d.cublas = h;
  }
  return d.cublas;
}

cublasLtHandle_t cublaslt_handle() {
  PerDevice& d = current();
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!d.lt) MINIDL_CUBLAS_CHECK(cublasLtCreate(&d.lt));
  return d.lt;
}

void* cublaslt_workspace(size_t* nbytes) {
  PerDevice& d = current();
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!d.workspace) d.workspace = malloc_persistent(kLtWorkspace, "cuBLASLt workspace");
  *nbytes = kLtWorkspace;
  return d.workspace;
}

int* scheduler_counters() { return current().counters; }

bool stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  MINIDL_CUDA_CHECK(cudaStreamIsCapturing(stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

std::unique_lock<std::mutex> lock_device_queue() { return std::unique_lock<std::mutex>(current().queue); }

void allow_dynamic_smem(const void* kernel, int bytes) {
  static auto* raised = new std::map<std::pair<int, const void*>, int>();  // leaked: used until exit
  const std::pair<int, const void*> key{current_device(), kernel};
  std::lock_guard<std::mutex> lock(g_mutex);
  int& done = (*raised)[key];
  if (done >= bytes) return;
  MINIDL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done = bytes;
}

void require_launch_registers(const void* kernel, int regs, const char* what) {
  static auto* checked = new std::map<const void*, bool>();  // leaked: used until exit
  std::lock_guard<std::mutex> lock(g_mutex);
  bool& done = (*checked)[kernel];
  if (done) return;
  cudaFuncAttributes attr{};
  MINIDL_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  MINIDL_CHECK(attr.numRegs >= regs, what, ": compiled with ", attr.numRegs,
               " registers a thread, but its warpgroups' register split needs ", regs, " at launch");
  done = true;
}

// ---- host synchronisation counter ----

namespace {
std::atomic<uint64_t> g_host_syncs{0};
}  // namespace

void synchronize() {
  g_host_syncs.fetch_add(1, std::memory_order_relaxed);
  MINIDL_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

uint64_t host_sync_count() { return g_host_syncs.load(std::memory_order_relaxed); }

}  // namespace minidl::cuda
