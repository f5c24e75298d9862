// Dilated vs dense causal attention on CUDA (bf16, B=1, H=8, D=64): forward
// and forward+backward time, effective TFLOP/s counting only useful FLOPs
// (4·D per attended (query, key) pair forward, 2.5x that backward) and peak
// memory. The dilated configuration is LongNet's: w = 2048, 4096, 8192, 16384
// with r = 1, 2, 4, 8 (segments clamp to N).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <vector>

#include "minidl.h"

using namespace minidl;

namespace {

constexpr int64_t kHeads = 8, kDim = 64;
const std::vector<int64_t> kSegments = {2048, 4096, 8192, 16384};
const std::vector<int64_t> kDilations = {1, 2, 4, 8};

// Attended (query, key) pairs, counted from the semantics (per branch, head
// and segment: m kept rows give m(m+1)/2 causal pairs).
double attended_pairs(int64_t n, const std::vector<int64_t>& segments,
                      const std::vector<int64_t>& dilations) {
  double pairs = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    int64_t w = std::min(segments[i], n), r = dilations[i];
    for (int64_t h = 0; h < kHeads; ++h)
      for (int64_t start = 0; start < n; start += w) {
        int64_t first = start + h % r, end = std::min(start + w, n);
        double m = first < end ? double((end - first + r - 1) / r) : 0;
        pairs += m * (m + 1) / 2;
      }
  }
  return pairs;
}

void run(benchmark::State& state, bool dilated, bool backward) {
  if (!cuda_is_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const int64_t n = state.range(0);
  const Device dev = Device::cuda();
  std::vector<int64_t> segments = dilated ? kSegments : std::vector<int64_t>{n};
  std::vector<int64_t> dilations = dilated ? kDilations : std::vector<int64_t>{1};
  TensorOptions opts{DType::BFloat16, dev, backward};
  Tensor q = ops::randn({1, n, kHeads, kDim}, opts), k = ops::randn({1, n, kHeads, kDim}, opts),
         v = ops::randn({1, n, kHeads, kDim}, opts);
  Tensor seed = backward ? ops::randn({1, n, kHeads, kDim}, {DType::BFloat16, dev, false}) : Tensor();
  auto step = [&] {
    auto [out, lse] = ops::dilated_attention(q, k, v, segments, dilations, true);
    if (backward) out.backward(seed);
  };
  step();  // warm-up: module load, allocator cache
  synchronize(dev);
  reset_peak_memory_stats(dev);
  for (auto _ : state) {
    step();
    synchronize(dev);
  }
  double flops = 4.0 * kDim * attended_pairs(n, segments, dilations) * (backward ? 3.5 : 1.0);
  state.counters["TFLOP/s"] =
      benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GiB"] = double(memory_stats(dev).peak_allocated) / double(1 << 30);
}

void sizes(benchmark::internal::Benchmark* b, int64_t max_n) {
  for (int64_t n = 2048; n <= max_n; n *= 4) b->Arg(n);
  if (max_n >= (1 << 20)) b->Arg(1 << 20);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK_CAPTURE(run, dilated_fwd, true, false)->Apply([](auto* b) { sizes(b, 1 << 20); });
BENCHMARK_CAPTURE(run, dilated_fwd_bwd, true, true)->Apply([](auto* b) { sizes(b, 1 << 20); });
BENCHMARK_CAPTURE(run, dense_fwd, false, false)->Apply([](auto* b) { sizes(b, 131072); });
BENCHMARK_CAPTURE(run, dense_fwd_bwd, false, true)->Apply([](auto* b) { sizes(b, 131072); });

BENCHMARK_MAIN();
