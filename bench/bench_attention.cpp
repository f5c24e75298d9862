// Dilated vs dense causal attention on CUDA (bf16, B=1, H=8, D=64): forward
// and forward+backward time, effective TFLOP/s counting only useful FLOPs
// (4·D per attended (query, key) pair forward, 2.5x that backward) and peak
// memory. The dilated configuration is LongNet's: w = 2048, 4096, 8192, 16384
// with r = 1, 2, 4, 8 (segments clamp to N).
//   bench_attention [--plot=FILE.png] [Google Benchmark flags]
// --plot draws time against N on log-log axes, one line per benchmark.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "minidl.h"
#include "plot/plot.h"

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

namespace {

// Console output as usual, plus (N, milliseconds) per benchmark family for the plot.
class PlotReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.error_occurred || run.run_type != Run::RT_Iteration) continue;
      // "run/<family>/<N>/real_time"
      std::string name = run.benchmark_name();
      size_t a = name.find('/'), b = name.find('/', a + 1), c = name.find('/', b + 1);
      if (a == std::string::npos || b == std::string::npos) continue;
      std::string family = name.substr(a + 1, b - a - 1);
      double n = std::stod(name.substr(b + 1, c - b - 1));
      points_[family].push_back({n, run.GetAdjustedRealTime()});
    }
    ConsoleReporter::ReportRuns(runs);
  }

  void save(const std::string& path) const {
    minidl::plot::Figure fig;
    fig.title = "attention on " + std::string(cuda_is_available() ? "CUDA" : "CPU") +
                " (bf16, B=1, H=8, D=64, causal)";
    fig.x.label = "sequence length N";
    fig.y.label = "time (ms)";
    fig.x.log = fig.y.log = true;
    for (int64_t n = 2048; n <= (1 << 20); n *= 4) fig.x.ticks.push_back(double(n));
    fig.x.ticks.push_back(double(1 << 20));
    for (const auto& [family, pts] : points_) {
      minidl::plot::Series series{.label = family, .markers = true};
      for (const auto& [n, ms] : pts) {
        series.x.push_back(n);
        series.y.push_back(ms);
      }
      fig.series.push_back(series);
    }
    minidl::plot::save_png(fig, path);
  }
  bool empty() const { return points_.empty(); }

 private:
  std::map<std::string, std::vector<std::pair<double, double>>> points_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string plot_path;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--plot=", 7) == 0) plot_path = argv[i] + 7;
    else argv[kept++] = argv[i];
  }
  argc = kept;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  PlotReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  if (!plot_path.empty() && !reporter.empty()) reporter.save(plot_path);
  benchmark::Shutdown();
  return 0;
}
