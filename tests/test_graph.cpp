// CUDA graphs (nn::CudaGraph): generators with device-side offsets, replays
// that draw the eager sequence of dropout masks, the graph-private memory
// pool, and captures that must fail. The training-step graph against eager
// training is in test_train.cpp.
#include <utility>
#include <vector>

#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::random_tensor;

TEST_CASE("a generator bound to a device offset reserves offsets relative to it") {
  Generator g(7);
  g.set_state(7, 40);
  const PhiloxOffset host = g.next_philox_offset();
  CHECK(host.base == nullptr);
  CHECK(host.delta == 40);  // the host path: the offset itself, as next_offset() gives
  CHECK(host.value() == 40);
  CHECK(g.next_offset() == 41);

  uint64_t word = 1000;  // stands for the device word: PhiloxOffset::value() reads it on the host
  g.bind_device_offset(&word);
  CHECK(g.device_offset() == &word);
  const PhiloxOffset a = g.next_philox_offset(), b = g.next_philox_offset();
  CHECK(a.base == &word);
  CHECK(a.delta == 0);
  CHECK(b.delta == 1);
  CHECK(b.value() == 1001);
  CHECK(g.offset() == 44);  // the host offset keeps counting
  CHECK_THROWS_WITH_AS(g.next_offset(), doctest::Contains("bound to a device offset"), Error);
  CHECK_THROWS_AS(g.bind_device_offset(&word), Error);
  CHECK(g.unbind_device_offset() == 2);
  CHECK(g.device_offset() == nullptr);
  CHECK(g.next_offset() == 44);
  CHECK_THROWS_AS(g.unbind_device_offset(), Error);
}

TEST_CASE("a bound generator refuses CPU tensors and host-offset ops") {
  uint64_t word = 0;
  Generator g(3);
  g.bind_device_offset(&word);
  Tensor x = random_tensor({4, 8}, {DType::Float32});
  CHECK_THROWS_WITH_AS(ops::dropout(x, 0.5, true, &g), doctest::Contains("device offsets are for CUDA only"), Error);
  Tensor q = random_tensor({1, 8, 2, 4}, {DType::Float32});
  CHECK_THROWS_WITH_AS(ops::attention(q, q, q, true, 0, 0.1, &g), doctest::Contains("device offsets are for CUDA only"),
                       Error);
  CHECK_THROWS_AS(ops::rand({4}, {DType::Float32}, &g), Error);
  CHECK(g.unbind_device_offset() == 0);  // refused ops reserve nothing
  CHECK(g.offset() == 0);
}

TEST_CASE("CudaGraph without CUDA work: capture needs a device, replay a capture") {
  nn::CudaGraph graph;
  CHECK_FALSE(graph.captured());
  CHECK_THROWS_AS(graph.replay(), Error);
  if (!cuda_is_available()) CHECK_THROWS_AS(graph.capture([] {}), Error);
}

namespace {

// x (CUDA float32), with `replays` dropout masks drawn by a graph of one
// dropout op replayed, and by the same op run eagerly from the same state.
struct MaskRuns {
  std::vector<Tensor> graph, eager;
  uint64_t graph_offset = 0, eager_offset = 0;
};

MaskRuns dropout_masks(const Tensor& x, int replays, uint64_t seed, uint64_t offset) {
  MaskRuns r;
  Generator g(seed), e(seed);
  g.set_state(seed, offset);
  e.set_state(seed, offset);
  nn::CudaGraph graph({&g});
  Tensor y;
  graph.capture([&] { y = ops::dropout(x, 0.5, true, &g); });
  CHECK(g.offset() == offset);  // the capture ran nothing
  for (int i = 0; i < replays; ++i) {
    graph.replay();
    r.graph.push_back(y.clone());
    r.eager.push_back(ops::dropout(x, 0.5, true, &e));
  }
  r.graph_offset = g.offset();
  r.eager_offset = e.offset();
  return r;
}

}  // namespace

TEST_CASE("dropout replayed in a CUDA graph draws the eager sequence of masks") {
  MINIDL_REQUIRE_CUDA();
  Tensor x = random_tensor({3, 1000}, {DType::Float32}).to(Device::cuda());
  const MaskRuns r = dropout_masks(x, 5, 1234, 17);
  CHECK(r.graph_offset == 17 + 5);
  CHECK(r.eager_offset == r.graph_offset);
  for (int i = 0; i < 5; ++i) {
    CAPTURE(i);
    CHECK(r.graph[i].to_vector<float>() == r.eager[i].to_vector<float>());
  }
  for (int i = 1; i < 5; ++i) CHECK(r.graph[i].to_vector<float>() != r.graph[i - 1].to_vector<float>());
  // And the eager CUDA masks are the CPU's (the host path is unchanged).
  Generator c(1234);
  c.set_state(1234, 17);
  CHECK(ops::dropout(x.to(Device::cpu()), 0.5, true, &c).to_vector<float>() == r.eager[0].to_vector<float>());
}

TEST_CASE("a CUDA graph follows its generator when set_state moves it between replays") {
  MINIDL_REQUIRE_CUDA();
  Tensor x = random_tensor({2, 300}, {DType::Float32}).to(Device::cuda());
  Generator g(9);
  nn::CudaGraph graph({&g});
  Tensor y;
  graph.capture([&] {
    y = ops::dropout(x, 0.3, true, &g);
    y = ops::dropout(y, 0.3, true, &g);  // two draws per replay
  });
  graph.replay();
  CHECK(g.offset() == 2);
  g.set_state(9, 100);  // e.g. a resumed run
  graph.replay();
  CHECK(g.offset() == 102);
  Generator e(9);
  e.set_state(9, 100);
  Tensor want = ops::dropout(ops::dropout(x, 0.3, true, &e), 0.3, true, &e);
  CHECK(y.to_vector<float>() == want.to_vector<float>());
  g.manual_seed(10);
  CHECK_THROWS_WITH_AS(graph.replay(), doctest::Contains("reseeded"), Error);
}

TEST_CASE("attention dropout in a CUDA graph, forward and backward, matches eager replay by replay") {
  MINIDL_REQUIRE_CUDA();
  // float32 (TF32 kernels) and bf16 at head dim 64, where on Hopper the
  // forward keeps the mask's bits (allocated inside the capture) for the
  // backward to read.
  for (auto [dtype, dim] : {std::pair{DType::Float32, int64_t{32}}, std::pair{DType::BFloat16, int64_t{64}}}) {
    CAPTURE(dtype);
    const Shape shape{2, 40, 2, dim};
    auto input = [&] { return random_tensor(shape, {DType::Float32}).to(dtype).to(Device::cuda()); };
    Tensor q = input(), k = input(), v = input(), go = input();
    Tensor qg = q.detach().requires_grad_(true);
    Generator g(77), e(77);
    nn::CudaGraph graph({&g});
    Tensor out;
    graph.capture([&] {
      qg.zero_grad();
      out = ops::dilated_attention(qg, k, v, {16, 40}, {1, 2}, true, 0, 0.25, &g).first;
      out.backward(go);
    });
    // dQ may add by atomics: equal up to the order of its fp32 sums (and a
    // bf16 rounding of them).
    const double tol = dtype == DType::Float32 ? 1e-5 : 1e-2;
    for (int i = 0; i < 3; ++i) {
      CAPTURE(i);
      graph.replay();
      Tensor qe = q.detach().requires_grad_(true);
      Tensor oe = ops::dilated_attention(qe, k, v, {16, 40}, {1, 2}, true, 0, 0.25, &e).first;
      oe.backward(go);
      CHECK(out.to_vector<float>() == oe.to_vector<float>());
      minidl::testing::check_close(qg.grad(), qe.grad(), tol, tol);
    }
    CHECK(g.offset() == e.offset());
  }
}

TEST_CASE("memory freed in a CUDA graph capture is not handed to other work") {
  MINIDL_REQUIRE_CUDA();
  Tensor x = random_tensor({256, 256}, {DType::Float32}).to(Device::cuda());
  nn::CudaGraph graph;
  Tensor y;
  void* scratch = nullptr;
  graph.capture([&] {
    Tensor t = ops::mul(x, 2.0);  // freed inside the capture; the graph writes it at every replay
    scratch = t.raw_data();
    y = ops::add(t, 1.0);
  });
  // Eager tensors of the same size made now must not land on the graph's scratch.
  std::vector<Tensor> others;
  for (int i = 0; i < 4; ++i) {
    others.push_back(ops::full({256, 256}, 5.0, {DType::Float32, Device::cuda()}));
    CHECK(others.back().raw_data() != scratch);
    CHECK(others.back().raw_data() != y.raw_data());
  }
  graph.replay();
  graph.replay();
  for (const Tensor& t : others) CHECK(t.to_vector<float>() == std::vector<float>(256 * 256, 5.0f));
  minidl::testing::check_close(y, ops::add(ops::mul(x, 2.0), 1.0), 0, 0);
}

TEST_CASE("a graph's output freed during another graph's capture stays the first graph's") {
  MINIDL_REQUIRE_CUDA();
  Tensor x = random_tensor({256, 256}, {DType::Float32}).to(Device::cuda());
  Tensor y;
  nn::CudaGraph a;
  a.capture([&] { y = ops::mul(x, 2.0); });
  void* a_out = y.raw_data();
  {
    nn::CudaGraph b;
    b.capture([&] { y = ops::add(x, 1.0); });  // drops a's output, which a still writes at every replay
  }
  std::vector<Tensor> others;
  for (int i = 0; i < 4; ++i) {
    others.push_back(ops::full({256, 256}, 5.0, {DType::Float32, Device::cuda()}));
    CHECK(others.back().raw_data() != a_out);
  }
  a.replay();
  for (const Tensor& t : others) CHECK(t.to_vector<float>() == std::vector<float>(256 * 256, 5.0f));
}

TEST_CASE("a capture that cannot be recorded fails cleanly and leaves the stream usable") {
  MINIDL_REQUIRE_CUDA();
  Tensor x = random_tensor({64}, {DType::Float32}).to(Device::cuda());
  Generator g(5);
  {
    nn::CudaGraph graph({&g});
    CHECK_THROWS_WITH_AS(graph.capture([&] { (void)ops::sum(x).item<float>(); }),
                         doctest::Contains("could not be captured"), Error);
    CHECK_FALSE(graph.captured());
  }
  {
    nn::CudaGraph graph({&g});
    CHECK_THROWS_WITH_AS(graph.capture([&] { (void)ops::rand({8}, {DType::Float32, Device::cuda()}, &g); }),
                         doctest::Contains("bound to a device offset"), Error);
  }
  CHECK(g.device_offset() == nullptr);
  CHECK(g.offset() == 0);
  minidl::testing::check_close(ops::mul(x, 1.0), x, 0, 0);
}
