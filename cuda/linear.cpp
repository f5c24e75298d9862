// cuBLASLt is column-major: a row-major (r, c) matrix is the column-major
// storage of its transpose, (c x r) with leading dim c. So, with x (M, K),
// weight W (N, K), grad G (M, N), every product below is written for the
// transposes:
//   forward     out^T (N x M) = op_T(W^T) . x^T           bias over D's rows (N)
//   weight grad dW^T  (K x N) = x^T . op_T(G^T)           BGRADB: sums B = G^T over k = M
//   input grad  dx^T  (K x M) = W^T . G^T                 DGELU_BGRAD: bias over D's rows (K)
// and the GELU input (aux) has D's layout.
#include "cuda/linear.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>

#include "core/scalar_math.h"
#include "cuda/elementwise.h"
#include "cuda/linear_batch.h"
#include "cuda/matmul.h"
#include "cuda/reduce.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

// One column-major problem D (m x n) = op(A) (m x k) . op(B) (k x n), D
// packed with leading dim m, plus its epilogue.
struct LtProblem {
  cudaDataType_t type;
  cublasComputeType_t compute;
  bool trans_a, trans_b;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // the bias, or where the bias gradient goes
  void* aux = nullptr;         // the GELU input (written forward, read backward)
  // > 1: `batch` problems of this shape, a, b and d device arrays of their
  // matrices' pointers (cuBLASLt's pointer-array batch mode); `align` is then
  // the matrices' alignment, which the arrays' addresses do not tell.
  int batch = 1;
  int align = 0;
};

bool lt_types(DType dtype, cudaDataType_t* type, cublasComputeType_t* compute) {
  // The same compute types as cuda::matmul (TF32 for float32).
  switch (dtype) {
    case DType::Float32: *type = CUDA_R_32F, *compute = CUBLAS_COMPUTE_32F_FAST_TF32; return true;
    case DType::BFloat16: *type = CUDA_R_16BF, *compute = CUBLAS_COMPUTE_32F; return true;
    default: return false;  // float64 takes the cuBLAS path
  }
}

// Largest power of two (up to 16) dividing every pointer: cuBLASLt's
// heuristics pick kernels by pointer alignment, so it is part of the key.
int alignment_of(std::initializer_list<const void*> ptrs) {
  int align = 16;
  for (const void* p : ptrs)
    if (p)
      while (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(align) != 0) align /= 2;
  return align;
}

// Owns a cuBLASLt descriptor or a CUDA object; destruction is unchecked (a
// destructor must not throw).
template <typename T, void (*Destroy)(T)> struct Handle {
  T h = nullptr;
  ~Handle() {
    if (h) Destroy(h);
  }
};
void destroy_desc(cublasLtMatmulDesc_t d) { cublasLtMatmulDescDestroy(d); }
void destroy_layout(cublasLtMatrixLayout_t l) { cublasLtMatrixLayoutDestroy(l); }
void destroy_pref(cublasLtMatmulPreference_t p) { cublasLtMatmulPreferenceDestroy(p); }
using Desc = Handle<cublasLtMatmulDesc_t, destroy_desc>;
using Layout = Handle<cublasLtMatrixLayout_t, destroy_layout>;
using Pref = Handle<cublasLtMatmulPreference_t, destroy_pref>;
void destroy_stream(cudaStream_t s) { cudaStreamDestroy(s); }
void destroy_event(cudaEvent_t e) { cudaEventDestroy(e); }
void destroy_graph(cudaGraph_t g) { cudaGraphDestroy(g); }
void destroy_exec(cudaGraphExec_t g) { cudaGraphExecDestroy(g); }
using Stream = Handle<cudaStream_t, destroy_stream>;
using Event = Handle<cudaEvent_t, destroy_event>;
using Graph = Handle<cudaGraph_t, destroy_graph>;
using GraphExec = Handle<cudaGraphExec_t, destroy_exec>;

template <typename V>
void set_attr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  MINIDL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

// How an algorithm is chosen for a problem shape, once per shape: the
// MINIDL_GEMM_ALGO switch, read at every call (so a test can switch it; the
// policy is part of the cache key).
//   heuristic  cuBLASLt's first choice;
//   single     the first of its choices whose call is one kernel: no split-K
//              reduction, bias-gradient kernel or memset beside the GEMM (a
//              training step runs a few hundred launches, and each extra
//              one is a gap on the stream);
//   timed      the fastest of its choices, each captured as a CUDA graph and
//              replayed, so that extra kernels count with their gaps.
// A shape first met inside a CUDA graph capture takes the heuristic's choice;
// a graph captured after eager steps uses what they chose. Measured on the
// recipe (H200, docs/BENCHMARKS.md): cuBLASLt's bias, bias-gradient and
// DGELU-bias-gradient epilogues come with extra kernels or memsets in every
// one of its choices, so "single" changes nothing there; "timed" gains ~1%
// eager and may add launches. The default stays the heuristic: no host wait
// on a new shape, and the same choice every run.
enum class AlgoPolicy { kHeuristic, kSingleKernel, kTimed };

AlgoPolicy algo_policy() {
  const char* e = std::getenv("MINIDL_GEMM_ALGO");
  if (!e || !*e || std::string_view(e) == "heuristic") return AlgoPolicy::kHeuristic;
  if (std::string_view(e) == "single") return AlgoPolicy::kSingleKernel;
  if (std::string_view(e) == "timed") return AlgoPolicy::kTimed;
  MINIDL_FAIL("MINIDL_GEMM_ALGO='", e, "' is not a policy (heuristic, single, timed)");
}

// The chosen algorithm per problem shape (cached: the query costs more host
// time than the launch); `found == false` when cuBLASLt has no kernel for it.
struct CachedAlgo {
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
};
using AlgoKey = std::tuple<int, int, int, int, int, bool, bool, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int, int, int>;

std::mutex g_algo_mutex;
std::map<AlgoKey, CachedAlgo>& algo_cache() {
  static auto* cache = new std::map<AlgoKey, CachedAlgo>();  // leaked: used until exit
  return *cache;
}

std::atomic<int64_t> g_fallbacks{0};

// One problem's descriptors, ready for cublasLtMatmul.
struct LtCall {
  Desc desc;
  Layout la, lb, ld;
  void* ws = nullptr;
  size_t ws_bytes = 0;

  cublasStatus_t launch(const LtProblem& p, const cublasLtMatmulAlgo_t& algo, cudaStream_t s) const {
    const float one = 1.0f, zero = 0.0f;
    return cublasLtMatmul(cublaslt_handle(), desc.h, &one, p.a, la.h, p.b, lb.h, &zero, p.d, ld.h, p.d, ld.h, &algo,
                          ws, ws_bytes, s);
  }
};

// One candidate captured as a CUDA graph on a side stream (nothing runs):
// its node count (kernels and memsets) and, for timing, its executable graph.
// nodes == 0 when cuBLASLt refused the launch or the capture, or the graph
// could not be instantiated: the candidate is skipped.
struct CapturedCandidate {
  size_t nodes = 0;
  GraphExec exec;
};

std::atomic<int64_t> g_captured{0};

void capture_candidate(const LtCall& call, const LtProblem& p, const cublasLtMatmulAlgo_t& algo, bool instantiate,
                       CapturedCandidate* out) {
  // Run once first, on minidl's stream: a kernel's module loads on its first
  // launch (lazy loading), which a capture cannot do.
  if (call.launch(p, algo, stream()) != CUBLAS_STATUS_SUCCESS) {
    (void)cudaGetLastError();
    return;
  }
  (void)cublaslt_handle();  // made before the capture, which must not make it
  Stream side;
  MINIDL_CUDA_CHECK(cudaStreamCreateWithFlags(&side.h, cudaStreamNonBlocking));
  Graph graph;
  if (cudaStreamBeginCapture(side.h, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  const cublasStatus_t st = call.launch(p, algo, side.h);
  const cudaError_t end = cudaStreamEndCapture(side.h, &graph.h);
  size_t nodes = 0;
  if (st != CUBLAS_STATUS_SUCCESS || end != cudaSuccess || !graph.h ||
      cudaGraphGetNodes(graph.h, nullptr, &nodes) != cudaSuccess ||
      (instantiate && cudaGraphInstantiate(&out->exec.h, graph.h, 0) != cudaSuccess)) {
    (void)cudaGetLastError();
    return;
  }
  out->nodes = nodes;
  ++g_captured;
}

// Mean time of `replays` replays of a captured candidate on minidl's stream
// (in order after the work that made its inputs). A host wait, counted as
// every one is (cuda::synchronize): tuning happens once per shape, in the
// first step that meets it.
float time_candidate(const CapturedCandidate& c, int replays) {
  Event start, stop;
  MINIDL_CUDA_CHECK(cudaEventCreate(&start.h));
  MINIDL_CUDA_CHECK(cudaEventCreate(&stop.h));
  MINIDL_CUDA_CHECK(cudaGraphLaunch(c.exec.h, stream()));  // warm-up
  MINIDL_CUDA_CHECK(cudaEventRecord(start.h, stream()));
  for (int i = 0; i < replays; ++i) MINIDL_CUDA_CHECK(cudaGraphLaunch(c.exec.h, stream()));
  MINIDL_CUDA_CHECK(cudaEventRecord(stop.h, stream()));
  synchronize();
  float ms = 0.f;
  MINIDL_CUDA_CHECK(cudaEventElapsedTime(&ms, start.h, stop.h));
  return ms / static_cast<float>(replays);
}

// Picks among cuBLASLt's choices (best first) by `policy`. Each candidate
// writes the problem's outputs (D, and the bias gradient or GELU input if
// any), which the real call overwrites; its inputs are only read.
cublasLtMatmulAlgo_t choose_algo(const LtCall& call, const LtProblem& p, AlgoPolicy policy,
                                 const cublasLtMatmulHeuristicResult_t* results, int count) {
  if (policy == AlgoPolicy::kHeuristic || count == 1) return results[0].algo;
  // MINIDL_GEMM_ALGO_LOG=1: one line per shape on stderr, each candidate's
  // launches (graph nodes) and time, and the choice.
  const char* log_env = std::getenv("MINIDL_GEMM_ALGO_LOG");
  const bool log = log_env && *log_env && std::string_view(log_env) != "0";
  std::string line;
  int best = -1;
  float best_ms = INFINITY;
  for (int i = 0; i < count; ++i) {
    CapturedCandidate c;
    capture_candidate(call, p, results[i].algo, policy == AlgoPolicy::kTimed, &c);
    char part[64];
    if (log) std::snprintf(part, sizeof(part), " [%d] %zu nodes", i, c.nodes), line.append(part);
    if (c.nodes == 0) continue;
    if (policy == AlgoPolicy::kSingleKernel) {
      if (c.nodes == 1) {
        best = i;
        break;
      }
      continue;
    }
    const float ms = time_candidate(c, 5);
    if (log) std::snprintf(part, sizeof(part), " %.1f us", ms * 1e3f), line.append(part);
    if (ms < best_ms) best_ms = ms, best = i;
  }
  if (log)
    std::fprintf(stderr, "minidl gemm %s: m %lld n %lld k %lld epilogue %d:%s -> [%d]\n",
                 policy == AlgoPolicy::kTimed ? "timed" : "single", static_cast<long long>(p.m),
                 static_cast<long long>(p.n), static_cast<long long>(p.k), static_cast<int>(p.epilogue), line.c_str(),
                 best < 0 ? 0 : best);
  return results[best < 0 ? 0 : best].algo;
}

AlgoKey key_of(const LtProblem& p, AlgoPolicy policy) {
  return {current_device(), static_cast<int>(p.type), static_cast<int>(p.compute),
          static_cast<int>(p.epilogue), p.align ? p.align : alignment_of({p.a, p.b, p.d, p.bias, p.aux}),
          p.trans_a, p.trans_b, p.m, p.n, p.k, p.lda, p.ldb, p.bias != nullptr, static_cast<int>(policy),
          p.batch};
}

// Whether cuBLASLt already refused this problem's shape (cached): lets a
// caller skip the set-up of a call that would launch nothing.
bool known_refused(const LtProblem& p) {
  std::lock_guard<std::mutex> lock(g_algo_mutex);
  auto it = algo_cache().find(key_of(p, algo_policy()));
  return it != algo_cache().end() && !it->second.found;
}

// Runs the problem; false (nothing launched) when cuBLASLt has no kernel.
bool run_lt(const LtProblem& p);

// run_lt for a single layer's call, whose refusal sends it to the cuBLAS
// path: counted (linear_fallbacks), so that tests see an unexpected one.
bool run_lt_or_count(const LtProblem& p) {
  if (run_lt(p)) return true;
  ++g_fallbacks;
  return false;
}

bool run_lt(const LtProblem& p) {
  LtCall call;
  MINIDL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&call.desc.h, p.compute, CUDA_R_32F));
  cublasLtMatmulDesc_t desc = call.desc.h;
  set_attr(desc, CUBLASLT_MATMUL_DESC_TRANSA, p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_attr(desc, CUBLASLT_MATMUL_DESC_TRANSB, p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_attr(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, p.epilogue);
  if (p.bias) set_attr(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias);
  if (p.aux) {
    set_attr(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, p.aux);
    set_attr(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, p.m);
  }
  // Stored shapes: op(A) is m x k, so A is stored k x m when transposed.
  MINIDL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&call.la.h, p.type, p.trans_a ? p.k : p.m,
                                                 p.trans_a ? p.m : p.k, p.lda));
  MINIDL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&call.lb.h, p.type, p.trans_b ? p.n : p.k,
                                                 p.trans_b ? p.k : p.n, p.ldb));
  MINIDL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&call.ld.h, p.type, p.m, p.n, p.m));
  if (p.batch > 1) {
    const int32_t count = p.batch;
    const uint32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
    for (cublasLtMatrixLayout_t l : {call.la.h, call.lb.h, call.ld.h}) {
      MINIDL_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      MINIDL_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof(mode)));
    }
  }
  call.ws = cublaslt_workspace(&call.ws_bytes);

  const AlgoPolicy policy = algo_policy();
  const AlgoKey key = key_of(p, policy);
  // A split-K algorithm is two kernels around the shared workspace; tuning
  // runs candidates in it too. The per-device queue lock is held throughout,
  // the cache's lock only to look up and insert: tuning waits for this
  // device's stream, which may wait for another device's rank (an NCCL
  // collective), and that rank must be able to reach its own lookups.
  const std::unique_lock<std::mutex> queue = lock_device_queue();
  CachedAlgo chosen;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    auto it = algo_cache().find(key);
    if (it != algo_cache().end()) chosen = it->second, cached = true;
  }
  if (!cached) {
    Pref pref;
    MINIDL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.h));
    MINIDL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &call.ws_bytes, sizeof(call.ws_bytes)));
    // The heuristic assumes 256-byte aligned pointers unless told otherwise,
    // and a kernel chosen that way refuses a view that starts mid-vector.
    const uint32_t align = static_cast<uint32_t>(std::get<4>(key));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      MINIDL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, attr, &align, sizeof(align)));
    // Inside a capture nothing may run: the shape keeps the heuristic's
    // choice (cached, so eager calls of it choose the same).
    const bool tune = policy != AlgoPolicy::kHeuristic && !stream_capturing();
    constexpr int kCandidates = 8;
    cublasLtMatmulHeuristicResult_t results[kCandidates]{};
    int count = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(cublaslt_handle(), desc, call.la.h, call.lb.h, call.ld.h,
                                                       call.ld.h, pref.h, tune ? kCandidates : 1, results, &count);
    // Any refusal means no fused kernel for this case: the caller falls
    // back (linear_fallbacks() counts it, so tests see an unexpected one).
    chosen.found = st == CUBLAS_STATUS_SUCCESS && count > 0;
    if (chosen.found) chosen.algo = choose_algo(call, p, tune ? policy : AlgoPolicy::kHeuristic, results, count);
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    algo_cache().emplace(key, chosen);  // the key's device queue is ours: nobody inserted it meanwhile
  }
  if (!chosen.found) return false;
  MINIDL_CUBLAS_CHECK(call.launch(p, chosen.algo, stream()));
  return true;
}

// A GELU input's leading dim must be a multiple of 8 (cuBLASLt's rule).
bool aux_ok(const Tensor& gelu_input, int64_t ld) { return !gelu_input.defined() || ld % 8 == 0; }

// Row-broadcast (M, N) view of a bias of N elements.
Tensor rows_view(const Tensor& bias, int64_t m, int64_t n) {
  return bias.as_strided({m, n}, {0, 1}, bias.offset());
}

}  // namespace

int64_t linear_fallbacks() { return g_fallbacks.load(); }
int64_t gemm_candidates_captured() { return g_captured.load(); }

void linear_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                    const Tensor& gelu_input, const Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const bool gelu = gelu_input.defined();
  LtProblem p{};
  if (lt_types(out.dtype(), &p.type, &p.compute) && aux_ok(gelu_input, n)) {
    p.trans_a = true;
    p.trans_b = false;
    p.m = n, p.n = m, p.k = k;
    p.a = weight.raw_data(), p.lda = k;
    p.b = x.raw_data(), p.ldb = k;
    p.d = out.raw_data();
    if (bias.defined()) p.bias = bias.raw_data();
    if (gelu) p.aux = gelu_input.raw_data();
    p.epilogue = gelu ? (bias.defined() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX)
                      : (bias.defined() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
    if (run_lt_or_count(p)) return;
  }
  // cuBLAS GEMM, then the epilogue as elementwise kernels.
  const Tensor& sum = gelu ? gelu_input : out;
  matmul(x, false, k, weight.as_strided({k, n}, {1, k}, weight.offset()), true, k, sum);
  if (bias.defined()) binary(BinaryOp::Add, sum, rows_view(bias, m, n), sum);
  if (gelu) unary(UnaryOp::Gelu, sum, 0, out);
}

void linear_weight_grad(const Tensor& grad, const Tensor& x, const Tensor& grad_weight,
                        const Tensor& grad_bias) {
  const int64_t m = grad.size(0), n = grad.size(1);
  if (grad_weight.defined()) {
    const int64_t k = x.size(1);
    LtProblem p{};
    if (lt_types(grad.dtype(), &p.type, &p.compute)) {
      p.trans_a = false;
      p.trans_b = true;
      p.m = k, p.n = n, p.k = m;
      p.a = x.raw_data(), p.lda = k;
      p.b = grad.raw_data(), p.ldb = n;
      p.d = grad_weight.raw_data();
      if (grad_bias.defined()) {
        p.bias = grad_bias.raw_data();
        p.epilogue = CUBLASLT_EPILOGUE_BGRADB;
      }
      if (run_lt_or_count(p)) return;
    }
    matmul(grad.as_strided({n, m}, {1, n}, grad.offset()), true, n, x, false, k, grad_weight);
  }
  if (grad_bias.defined()) sum_first(grad, m, n, 1.0, grad_bias);
}

namespace {

std::atomic<int64_t> g_batched_calls{0};

// One batched call for up to kMaxLinearBatch problems (validated by the
// caller); false where cuBLASLt refuses the shape (nothing launched once it
// is known refused).
bool weight_grads_batch(const std::vector<const WeightGradProblem*>& problems) {
  const WeightGradProblem& first = *problems.front();
  LtProblem p{};
  lt_types(first.grad.dtype(), &p.type, &p.compute);
  const int64_t m = first.grad.size(0), n = first.grad.size(1), k = first.x.size(1);
  const int batch = static_cast<int>(problems.size());
  std::vector<const void*> all;  // the pointer arrays A | B | D, in one device buffer
  int align = 16;
  for (const auto& get : {+[](const WeightGradProblem& q) -> const void* { return q.x.raw_data(); },
                          +[](const WeightGradProblem& q) -> const void* { return q.grad.raw_data(); },
                          +[](const WeightGradProblem& q) -> const void* { return q.grad_weight.raw_data(); }})
    for (const WeightGradProblem* q : problems) {
      all.push_back(get(*q));
      align = std::min(align, alignment_of({all.back()}));
    }
  // As linear_weight_grad: dW^T (K x N) = x^T . op_T(G^T), per problem; a,
  // b and d point into the pointer arrays, made only for a shape not refused.
  p.trans_a = false;
  p.trans_b = true;
  p.m = k, p.n = n, p.k = m;
  p.lda = k, p.ldb = n;
  p.batch = batch;
  p.align = align;
  if (known_refused(p)) return false;
  std::vector<Tensor> grads, biases;  // the bias gradients come from the launch that writes the pointer arrays
  for (const WeightGradProblem* q : problems) {
    grads.push_back(q->grad);
    if (first.grad_bias.defined()) biases.push_back(q->grad_bias);
  }
  const Tensor arrays = prepare_weight_grads(all, grads, m, n, biases);
  const auto* base = static_cast<const void* const*>(arrays.raw_data());
  p.a = base;
  p.b = base + batch;
  p.d = const_cast<void*>(static_cast<const void*>(base + 2 * batch));
  if (!run_lt(p)) return false;
  ++g_batched_calls;
  return true;
}

}  // namespace

bool linear_weight_grads(const std::vector<WeightGradProblem>& problems) {
  if (problems.size() < 2) return false;
  const WeightGradProblem& first = problems.front();
  cudaDataType_t type;
  cublasComputeType_t compute;
  if (!first.x.defined() || !lt_types(first.grad.dtype(), &type, &compute)) return false;
  for (const WeightGradProblem& q : problems)
    if (!q.grad_weight.defined() || !q.x.defined() || q.grad_bias.defined() != first.grad_bias.defined() ||
        q.grad.shape() != first.grad.shape() || q.x.shape() != first.x.shape() || !q.grad.is_contiguous() ||
        !q.x.is_contiguous() || !q.grad_weight.is_contiguous())
      return false;
  // Chunks of at most kMaxLinearBatch; the first decides (a refusal launches
  // nothing), a later refused or single one runs per problem.
  for (size_t start = 0; start < problems.size(); start += kMaxLinearBatch) {
    const size_t end = std::min(problems.size(), start + kMaxLinearBatch);
    std::vector<const WeightGradProblem*> chunk;
    for (size_t i = start; i < end; ++i) chunk.push_back(&problems[i]);
    if (chunk.size() >= 2 && weight_grads_batch(chunk)) continue;
    if (start == 0) return false;
    for (const WeightGradProblem* q : chunk) linear_weight_grad(q->grad, q->x, q->grad_weight, q->grad_bias);
  }
  return true;
}

int64_t linear_batched_calls() { return g_batched_calls.load(); }

void linear_input_grad(const Tensor& grad, const Tensor& weight, const Tensor& gelu_input,
                       const Tensor& grad_x, const Tensor& grad_bias) {
  const int64_t m = grad.size(0), n = grad.size(1), k = weight.size(1);
  const bool gelu = gelu_input.defined();
  LtProblem p{};
  if (lt_types(grad.dtype(), &p.type, &p.compute) && aux_ok(gelu_input, k) &&
      (gelu || !grad_bias.defined())) {
    p.trans_a = false;
    p.trans_b = false;
    p.m = k, p.n = m, p.k = n;
    p.a = weight.raw_data(), p.lda = k;
    p.b = grad.raw_data(), p.ldb = n;
    p.d = grad_x.raw_data();
    if (gelu) {
      p.aux = gelu_input.raw_data();
      p.epilogue = CUBLASLT_EPILOGUE_DGELU;
      if (grad_bias.defined()) {
        p.bias = grad_bias.raw_data();
        p.epilogue = CUBLASLT_EPILOGUE_DGELU_BGRAD;
      }
    }
    if (run_lt_or_count(p)) return;
  }
  matmul(grad, false, n, weight, false, k, grad_x);
  if (gelu) binary(BinaryOp::GeluBackward, grad_x, gelu_input, grad_x);
  if (grad_bias.defined()) sum_first(grad_x, m, k, 1.0, grad_bias);
}

}  // namespace minidl::cuda
