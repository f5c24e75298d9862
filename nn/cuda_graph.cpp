#include "nn/cuda_graph.h"

#include <algorithm>
#include <map>
#include <string>

#include "core/allocator.h"
#include "core/error.h"

#if defined(MINIDL_WITH_CUDA)
#include <cuda.h>  // driver types only: the functions are fetched as entry points
#include <cxxabi.h>

#include <cstdlib>

#include "cuda/random.h"
#include "cuda/runtime.h"
#endif

namespace minidl::nn {

#if defined(MINIDL_WITH_CUDA)

namespace {

// A generator's device offset word and what the host knows of it.
struct BoundStream {
  Generator* gen;
  uint64_t* word = nullptr;  // 8 bytes from the device's allocator (not the graph's pool)
  uint64_t seed = 0;         // baked into the captured kernels
  uint64_t per_replay = 0;   // offsets one replay draws
  bool word_current = false;
  uint64_t word_value = 0;  // what *word holds after the last replay
};

}  // namespace

struct CudaGraph::Impl {
  std::vector<BoundStream> streams;
  int device = -1;
  uint64_t pool = 0;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;

  void release() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    exec = nullptr;
    graph = nullptr;
    // Stream order: a replay still in flight finishes before later work
    // reuses the pool's memory or the words.
    if (pool) cuda::release_graph_pool(device, pool);
    pool = 0;
    for (BoundStream& s : streams)
      if (s.word) {
        allocator_for(Device::cuda(device)).deallocate(s.word, sizeof(uint64_t));
        s.word = nullptr;
      }
  }
};

CudaGraph::CudaGraph(std::vector<Generator*> generators) : impl_(std::make_unique<Impl>()) {
  for (Generator* g : generators) {
    MINIDL_CHECK(g != nullptr, "CudaGraph: a null generator");
    for (const BoundStream& s : impl_->streams)
      MINIDL_CHECK(s.gen != g, "CudaGraph: a generator is listed twice");
    impl_->streams.push_back({g});
  }
}

CudaGraph::~CudaGraph() {
  try {
    impl_->release();
  } catch (...) {
  }
}

bool CudaGraph::captured() const { return impl_->exec != nullptr; }

void CudaGraph::capture(const std::function<void()>& work) {
  Impl& m = *impl_;
  MINIDL_CHECK(m.exec == nullptr, "CudaGraph::capture: already captured (one capture per graph)");
  MINIDL_CHECK(backend::cuda_device_count() > 0, "CudaGraph::capture: no CUDA device");
  m.device = cuda::current_device();
  for (BoundStream& s : m.streams)
    s.word = static_cast<uint64_t*>(allocator_for(Device::cuda(m.device)).allocate(sizeof(uint64_t)));
  m.pool = cuda::create_graph_pool();
  cudaStream_t stream = cuda::stream();

  cuda::begin_graph_pool(m.pool);
  // Relaxed: the pool may call cudaMalloc while capturing.
  const cudaError_t began = cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed);
  if (began != cudaSuccess) {
    (void)cudaGetLastError();
    cuda::end_graph_pool();
    m.release();
    MINIDL_FAIL("CudaGraph::capture: cudaStreamBeginCapture failed: ", cudaGetErrorString(began));
  }
  std::vector<uint64_t> start(m.streams.size());
  size_t bound = 0;
  std::string error;
  try {
    for (; bound < m.streams.size(); ++bound) {
      BoundStream& s = m.streams[bound];
      start[bound] = s.gen->offset();
      s.seed = s.gen->seed();
      s.gen->bind_device_offset(s.word);
    }
    work();
  } catch (const std::exception& e) {
    error = e.what();
  }
  for (size_t i = 0; i < bound; ++i) {
    BoundStream& s = m.streams[i];
    s.per_replay = s.gen->unbind_device_offset();
    // The capture ran nothing: the generator is where it was.
    s.gen->set_state(s.seed, start[i]);
    if (error.empty() && s.per_replay > 0) {
      try {
        cuda::advance_offset_word(s.word, s.per_replay);  // the graph's last node
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
  }
  cuda::end_graph_pool();
  const cudaError_t ended = cudaStreamEndCapture(stream, &m.graph);
  if (ended != cudaSuccess) {
    (void)cudaGetLastError();
    if (error.empty()) error = std::string(cudaGetErrorName(ended)) + " (" + cudaGetErrorString(ended) + ")";
  }
  if (error.empty()) {
    const cudaError_t made = cudaGraphInstantiate(&m.exec, m.graph, 0);
    if (made != cudaSuccess) {
      (void)cudaGetLastError();
      m.exec = nullptr;
      error = std::string("cudaGraphInstantiate: ") + cudaGetErrorString(made);
    }
  }
  if (!error.empty()) {
    m.release();
    MINIDL_FAIL("CudaGraph::capture: the work could not be captured as a CUDA graph (no host syncs, no "
                "values read back, no stream other than minidl's): ", error);
  }
}

void CudaGraph::replay() {
  Impl& m = *impl_;
  MINIDL_CHECK(m.exec != nullptr, "CudaGraph::replay: nothing captured (call capture first)");
  MINIDL_CHECK(cuda::current_device() == m.device, "CudaGraph::replay: captured on cuda:", m.device,
               " but the current device is cuda:", cuda::current_device());
  for (BoundStream& s : m.streams) {
    MINIDL_CHECK(s.gen->seed() == s.seed, "CudaGraph::replay: a generator was reseeded (", s.seed, " -> ",
                 s.gen->seed(), ") since the capture, whose kernels hold the seed; capture a new graph");
    // A generator moved by set_state (a resume) or drawn from outside the
    // graph: the word catches up before the replay reads it.
    if (!s.word_current || s.word_value != s.gen->offset()) cuda::set_offset_word(s.word, s.gen->offset());
  }
  MINIDL_CUDA_CHECK(cudaGraphLaunch(m.exec, cuda::stream()));
  for (BoundStream& s : m.streams) {
    s.gen->set_state(s.seed, s.gen->offset() + s.per_replay);
    s.word_value = s.gen->offset();
    s.word_current = true;
  }
}

CudaGraph::NodeCounts CudaGraph::node_counts() const {
  MINIDL_CHECK(impl_->graph != nullptr, "CudaGraph::node_counts: nothing captured");
  size_t n = 0;
  MINIDL_CUDA_CHECK(cudaGraphGetNodes(impl_->graph, nullptr, &n));
  std::vector<cudaGraphNode_t> nodes(n);
  MINIDL_CUDA_CHECK(cudaGraphGetNodes(impl_->graph, nodes.data(), &n));
  NodeCounts counts;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    MINIDL_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type == cudaGraphNodeTypeKernel) ++counts.kernels;
    else if (type == cudaGraphNodeTypeMemset) ++counts.memsets;
    else if (type == cudaGraphNodeTypeMemcpy) ++counts.copies;
    else ++counts.other;
  }
  return counts;
}

namespace {

// The driver's name of a captured kernel node's function (mangled), or null.
// Through driver entry points (no libcuda link), which also see the kernels
// that libraries launch with the driver API (cuBLASLt), unlike
// cudaGraphKernelNodeGetParams + cudaFuncGetName.
const char* driver_kernel_name(cudaGraphNode_t node) {
  using GetParams = CUresult (*)(CUgraphNode, CUDA_KERNEL_NODE_PARAMS*);
  using FuncName = CUresult (*)(const char**, CUfunction);
  using KernelName = CUresult (*)(const char**, CUkernel);
  struct Entry {
    GetParams get_params = nullptr;
    FuncName func_name = nullptr;
    KernelName kernel_name = nullptr;
  };
  static const Entry e = [] {
    Entry r;
    auto fetch = [](const char* symbol, void** fn) {
      cudaDriverEntryPointQueryResult found{};
      if (cudaGetDriverEntryPointByVersion(symbol, fn, 12030, cudaEnableDefault, &found) != cudaSuccess ||
          found != cudaDriverEntryPointSuccess) {
        (void)cudaGetLastError();
        *fn = nullptr;
      }
    };
    fetch("cuGraphKernelNodeGetParams", reinterpret_cast<void**>(&r.get_params));
    fetch("cuFuncGetName", reinterpret_cast<void**>(&r.func_name));
    fetch("cuKernelGetName", reinterpret_cast<void**>(&r.kernel_name));
    return r;
  }();
  if (!e.get_params) return nullptr;
  CUDA_KERNEL_NODE_PARAMS p{};
  if (e.get_params(reinterpret_cast<CUgraphNode>(node), &p) != CUDA_SUCCESS) return nullptr;
  const char* name = nullptr;
  if (p.func && e.func_name && e.func_name(&name, p.func) == CUDA_SUCCESS) return name;
  if (p.kern && e.kernel_name && e.kernel_name(&name, p.kern) == CUDA_SUCCESS) return name;
  return nullptr;
}

// "void minidl::cuda::(anonymous namespace)::k<float, 4>(float const*, int)"
// -> "k<float, 4>": demangled, without return type, parameters or minidl's
// namespaces (so one kernel's instantiations stay apart, its launches together).
std::string short_kernel_name(const char* mangled) {
  if (!mangled) return "?";
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string s = status == 0 && demangled ? demangled : mangled;
  std::free(demangled);
  // Cut the parameter list: the last top-level '(' (templates may hold parens).
  int depth = 0;
  for (size_t i = s.size(); i-- > 0;) {
    const char c = s[i];
    if (c == ')' || c == '>') ++depth;
    else if ((c == '(' || c == '<') && --depth == 0 && c == '(') {
      s.resize(i);
      break;
    }
  }
  // Cut the return type: up to the last top-level space before the name.
  depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '<' || c == '(') ++depth;
    else if (c == '>' || c == ')') --depth;
    else if (c == ' ' && depth == 0) {
      s.erase(0, i + 1);
      i = static_cast<size_t>(-1);
    }
  }
  for (const char* prefix : {"minidl::cuda::(anonymous namespace)::", "minidl::cuda::", "(anonymous namespace)::"})
    for (size_t at; (at = s.find(prefix)) != std::string::npos;) s.erase(at, std::string(prefix).size());
  return s;
}

}  // namespace

std::vector<std::pair<std::string, int64_t>> CudaGraph::kernel_names() const {
  MINIDL_CHECK(impl_->graph != nullptr, "CudaGraph::kernel_names: nothing captured");
  size_t n = 0;
  MINIDL_CUDA_CHECK(cudaGraphGetNodes(impl_->graph, nullptr, &n));
  std::vector<cudaGraphNode_t> nodes(n);
  MINIDL_CUDA_CHECK(cudaGraphGetNodes(impl_->graph, nodes.data(), &n));
  std::map<std::string, int64_t> by_name;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    MINIDL_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type == cudaGraphNodeTypeKernel) ++by_name[short_kernel_name(driver_kernel_name(node))];
  }
  std::vector<std::pair<std::string, int64_t>> out(by_name.begin(), by_name.end());
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  return out;
}

#else  // CPU-only build

struct CudaGraph::Impl {};

CudaGraph::CudaGraph(std::vector<Generator*>) : impl_(std::make_unique<Impl>()) {}
CudaGraph::~CudaGraph() = default;
bool CudaGraph::captured() const { return false; }
void CudaGraph::capture(const std::function<void()>&) {
  MINIDL_FAIL("CudaGraph::capture: minidl was built without CUDA");
}
void CudaGraph::replay() { MINIDL_FAIL("CudaGraph::replay: nothing captured (minidl was built without CUDA)"); }
CudaGraph::NodeCounts CudaGraph::node_counts() const {
  MINIDL_FAIL("CudaGraph::node_counts: nothing captured (minidl was built without CUDA)");
}
std::vector<std::pair<std::string, int64_t>> CudaGraph::kernel_names() const {
  MINIDL_FAIL("CudaGraph::kernel_names: nothing captured (minidl was built without CUDA)");
}

#endif

}  // namespace minidl::nn
