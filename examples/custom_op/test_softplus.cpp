// The user op's tests: exact values, a float64 gradcheck, CPU vs CUDA.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include "softplus.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/launch.h"
#endif

using namespace minidl;

TEST_CASE("softplus: exact values") {
  Tensor x = from_vector(std::vector<double>{-30.0, 0.0, 1.0, 30.0}, {4});
  std::vector<double> y = myops::softplus(x).to_vector<double>();
  CHECK(y[0] == doctest::Approx(std::exp(-30.0)));
  CHECK(y[1] == doctest::Approx(std::log(2.0)));
  CHECK(y[2] == doctest::Approx(std::log1p(std::exp(1.0))));
  CHECK(y[3] == doctest::Approx(30.0));
}

TEST_CASE("softplus: float64 gradcheck") {
  Tensor x = ops::randn({3, 5}, {DType::Float64, Device::cpu(), true});
  CHECK(gradcheck([](const std::vector<Tensor>& in) { return myops::softplus(in[0]); }, {x}));
}

TEST_CASE("softplus: CUDA matches CPU") {
  if (!cuda_is_available()) {
    MESSAGE("skipped: no CUDA device");
    return;
  }
  Tensor x = ops::randn({257, 33}, {DType::Float32, Device::cpu(), true});
  Tensor xg = x.detach().to(Device::cuda()).requires_grad_(true);
  Tensor y = myops::softplus(x), yg = myops::softplus(xg);
  ops::sum(y).backward();
  ops::sum(yg).backward();
  std::vector<float> a = y.to_vector<float>(), b = yg.to_vector<float>();
  std::vector<float> ga = x.grad().to_vector<float>(), gb = xg.grad().to_vector<float>();
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-5));
    CHECK(ga[i] == doctest::Approx(gb[i]).epsilon(1e-5));
  }
}

TEST_CASE("softplus: the CUDA kernels run on minidl's stream with no synchronisation") {
#if defined(MINIDL_WITH_CUDA)
  if (!cuda_is_available()) {
    MESSAGE("skipped: no CUDA device");
    return;
  }
  // Captures minidl's stream into a CUDA graph around one call: a device or
  // stream synchronisation inside the op breaks the capture, and a kernel
  // launched on another stream is missing from the graph.
  Tensor x = ops::randn({1000, 3}, {DType::Float32, Device::cuda()});
  myops::softplus(x);  // leaves an output-sized block cached, so the captured call allocates nothing
  cudaStream_t s = cuda::stream();
  MINIDL_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  Tensor y;
  std::string error;
  try {
    y = myops::softplus(x);
  } catch (const Error& e) {
    error = e.what();
  }
  cudaGraph_t graph = nullptr;
  cudaError_t end = cudaStreamEndCapture(s, &graph);
  REQUIRE_MESSAGE(error.empty(), error);
  REQUIRE(end == cudaSuccess);
  size_t nodes = 0;
  MINIDL_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &nodes));
  CHECK(nodes == 1);
  // The graph alone computes y: poison it first.
  ops::copy_(y, ops::full(y.shape(), std::nan(""), y.options()));
  cudaGraphExec_t exec = nullptr;
  MINIDL_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  MINIDL_CUDA_CHECK(cudaGraphLaunch(exec, s));
  std::vector<float> got = y.to_vector<float>();
  std::vector<float> want = myops::softplus(x.to(Device::cpu())).to_vector<float>();
  for (size_t i = 0; i < want.size(); ++i) CHECK(got[i] == doctest::Approx(want[i]).epsilon(1e-5));
  MINIDL_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MINIDL_CUDA_CHECK(cudaGraphDestroy(graph));
#else
  MESSAGE("skipped: minidl built without CUDA");
#endif
}
