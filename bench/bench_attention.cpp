// Dilated vs dense attention on CUDA (bf16, B=1, H=8, D=64, causal unless
// named otherwise; dense also at D=128): forward
// and forward+backward time, effective TFLOP/s counting only useful FLOPs
// (4·D per attended (query, key) pair forward, 2.5x that backward) and peak
// memory. The dilated configuration is LongNet's: w = 2048, 4096, 8192, 16384
// with r = 1, 2, 4, 8 (segments clamp to N). Each problem runs on every
// tensor-core version (mma, wgmma, ws) that runs its forward or backward here
// (MINIDL_ATTENTION_KERNEL, cuda/dilated_attention.h; SIMT is not timed),
// side by side: "<problem>:<version>/N". "segments" is the dilated problem's
// dilation-1 branch alone (w = 2048, r = 1: causal attentions of 2048 rows),
// which bench/pytorch/attention_baseline.py runs through SDPA as a batch. The
// "_drop" problems train with attention dropout 0.2 (the char-LM recipe's),
// against the same problem without; "_drop_redraw" ones keep no dropout bits,
// so the ws backward draws the mask again (as past the bits' memory budget;
// ws only: the other versions never keep bits, their "_drop" rows are these;
// peak_GiB there counts the preallocated outputs, not the op's gradients);
// "_noncausal" problems drop the causal mask (an encoder's attention; for
// dilated, LongNet as an encoder). "_drop_per_pair" ones drop each pair the
// nested branches share once (ops::dilated_attention's dropout_per_pair).
// "piece_drop_per_pair" is what sequence parallelism with per-pair dropout
// gives the kernels for a segment of the largest branch spanning ranks: a
// lone dilation-1 attention over that segment's 2048 kept rows, computing
// only the branch's share of the pairs (spans of 1024 kept rows hold the
// smaller branches' pairs), through the kernels' entry points.
//   bench_attention [--plot=FILE.png] [Google Benchmark flags]
// --plot draws time against N on log-log axes, one line per benchmark.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "bench/bench_common.h"
#include "minidl.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/dilated_attention.h"
#endif
#include "plot/plot.h"

using namespace minidl;

namespace {

constexpr int64_t kHeads = 8, kDim = 64;

// dense: one causal attention over all N rows; dilated: LongNet's branches;
// segments: their first branch alone (w = 2048, r = 1); piece: the last
// branch's share (w = 16384, r = 8) as a spanning sequence-parallel piece
// (segments of 2048 rows, r = 1), with per-pair dropout.
enum class Pattern { kDense, kDilated, kSegments, kPiece };

// Runs with MINIDL_ATTENTION_KERNEL = `kernel` (the newest version the
// problem may use), restoring no state: every benchmark sets its own.
// redraw: the forward keeps no dropout bits (as when they are past their
// memory budget), so the backward draws the mask again; through the kernels'
// entry points, the scale and dropout given as the op would give them.
void run(benchmark::State& state, Pattern pattern, bool backward, int64_t dim, double dropout, bool causal,
         const char* kernel, bool redraw = false, bool per_pair = false) {
  if (!cuda_is_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  setenv("MINIDL_ATTENTION_KERNEL", kernel, 1);
  const int64_t n = state.range(0);
  const Device dev = Device::cuda();
  DilatedAttentionConfig config;
  if (pattern == Pattern::kDilated) config = bench::longnet_config();
  else if (pattern == Pattern::kSegments) config.branches.push_back(bench::longnet_config().branches.front());
  else if (pattern == Pattern::kPiece) {
    const DilatedBranch& last = bench::longnet_config().branches.back();
    config.branches.push_back({last.segment / last.dilation, 1});
  } else config.branches.push_back({n, 1});
  config.causal = causal;  // after the pattern's config: attended_pairs counts by it
  std::vector<int64_t> segments, dilations;
  for (const DilatedBranch& b : config.branches) {
    segments.push_back(b.segment);
    dilations.push_back(b.dilation);
  }
  TensorOptions opts{DType::BFloat16, dev, backward};
  Tensor q = ops::randn({1, n, kHeads, dim}, opts), k = ops::randn({1, n, kHeads, dim}, opts),
         v = ops::randn({1, n, kHeads, dim}, opts);
  Tensor seed = backward ? ops::randn({1, n, kHeads, dim}, {DType::BFloat16, dev, false}) : Tensor();
  std::function<void()> step = [&] {
    // q, k, v stand for a layer's activations: each backward writes their
    // gradients afresh (accumulating into the last call's would add a pass
    // over three full-size tensors, ~5% of the 1M fwd+bwd, and hold them at
    // the peak), as bench/pytorch/attention_baseline.py does too.
    for (const Tensor* t : {&q, &k, &v}) t->zero_grad();
    auto [out, lse] = ops::dilated_attention(q, k, v, segments, dilations, causal, 0, dropout, nullptr, per_pair);
    if (backward) out.backward(seed);
  };
#if defined(MINIDL_WITH_CUDA)
  // redraw and the piece: the kernels' entry points (the piece with its
  // share of the pairs, its ws forward keeping the bits as the op would).
  Tensor out, lse, dq, dk, dv, bits;
  if (redraw || pattern == Pattern::kPiece) {
    DilatedAttentionConfig direct = config;
    direct.scale = 1.0 / std::sqrt(static_cast<double>(dim));
    direct.dropout = make_attention_dropout(dropout, 1234, 0);
    if (pattern == Pattern::kPiece) {
      direct.dropout.per_pair = true;
      DilatedAttentionConfig whole = bench::longnet_config();
      whole.causal = causal;
      direct.pairs = {nested_pairs(whole, n).back()};
    }
    out = ops::empty(q.shape(), {DType::BFloat16, dev, false});
    lse = ops::empty({1, n, kHeads}, {DType::Float32, dev, false});
    for (Tensor* t : {&dq, &dk, &dv}) *t = ops::empty(q.shape(), {DType::BFloat16, dev, false});
    step = [&, direct] {
      cuda::dilated_attention_forward(q, k, v, direct, out, lse, backward && !redraw ? &bits : nullptr);
      if (backward) cuda::dilated_attention_backward(q, k, v, out, lse, seed, Tensor(), direct, dq, dk, dv, bits);
    };
  }
#endif
  step();  // warm-up: module load, allocator cache
  synchronize(dev);
  reset_peak_memory_stats(dev);
  for (auto _ : state) {
    step();
    synchronize(dev);
  }
  // Effective: the definition's pairs, each shared pair as often as the
  // branches holding it (the ws kernels compute it once where they nest).
  double pairs = attended_pairs(n, kHeads, config);
  if (pattern == Pattern::kPiece) {  // only the pairs across its spans (half a segment's rows each)
    DilatedAttentionConfig span = config;
    span.branches.front().segment /= 2;
    pairs -= attended_pairs(n, kHeads, span);
  }
  double flops = 4.0 * dim * pairs * (backward ? 3.5 : 1.0);
  state.counters["TFLOP/s"] =
      benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GiB"] = double(memory_stats(dev).peak_allocated) / double(1 << 30);
}

void sizes(benchmark::internal::Benchmark* b, int64_t min_n, int64_t max_n) {
  int64_t n = min_n;
  for (; n <= max_n; n *= 4) b->Arg(n);
  if (max_n >= (1 << 20) && n / 4 != (1 << 20)) b->Arg(1 << 20);  // 1M, unless the steps of 4 reached it
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

// One benchmark per (problem, tensor-core kernel version that runs its
// forward or backward on this device); the SIMT kernels (fp32 math) are far
// off these and are timed by the tests' sizes only.
void register_benchmarks() {
  struct Problem {
    const char* name;
    Pattern pattern;
    bool backward;
    int64_t dim, min_n, max_n;
    double dropout = 0;
    bool causal = true;
    bool redraw = false;  // run(): the backward draws the mask again
    bool per_pair = false;  // dropout_per_pair
  };
  using enum Pattern;
  const Problem problems[] = {{"dilated_fwd", kDilated, false, kDim, 2048, 1 << 20},
                              {"dilated_fwd_bwd", kDilated, true, kDim, 2048, 1 << 20},
                              {"segments_fwd", kSegments, false, kDim, 1 << 20, 1 << 20},
                              {"segments_fwd_bwd", kSegments, true, kDim, 1 << 20, 1 << 20},
                              {"dense_fwd", kDense, false, kDim, 2048, 131072},
                              {"dense_fwd_bwd", kDense, true, kDim, 2048, 131072},
                              {"dense_d128_fwd", kDense, false, 128, 16384, 16384},
                              {"dense_d128_fwd_bwd", kDense, true, 128, 16384, 16384},
                              {"dense_drop_fwd", kDense, false, kDim, 32768, 32768, 0.2},
                              {"dense_drop_fwd_bwd", kDense, true, kDim, 2048, 32768, 0.2},
                              {"dilated_drop_fwd", kDilated, false, kDim, 131072, 1 << 20, 0.2},
                              {"dilated_drop_fwd_bwd", kDilated, true, kDim, 131072, 1 << 20, 0.2},
                              {"dense_drop_redraw_fwd_bwd", kDense, true, kDim, 32768, 32768, 0.2, true, true},
                              {"dense_d128_drop_fwd_bwd", kDense, true, 128, 16384, 16384, 0.2},
                              {"dense_d128_drop_redraw_fwd_bwd", kDense, true, 128, 16384, 16384, 0.2, true, true},
                              {"dilated_drop_redraw_fwd_bwd", kDilated, true, kDim, 131072, 131072, 0.2, true, true},
                              {"dilated_drop_per_pair_fwd", kDilated, false, kDim, 131072, 1 << 20, 0.2, true, false, true},
                              {"dilated_drop_per_pair_fwd_bwd", kDilated, true, kDim, 131072, 1 << 20, 0.2, true, false,
                               true},
                              {"dense_noncausal_fwd", kDense, false, kDim, 32768, 32768, 0, false},
                              {"dense_noncausal_fwd_bwd", kDense, true, kDim, 32768, 32768, 0, false},
                              {"dense_d128_noncausal_fwd", kDense, false, 128, 16384, 16384, 0, false},
                              {"dense_d128_noncausal_fwd_bwd", kDense, true, 128, 16384, 16384, 0, false},
                              {"dilated_noncausal_fwd", kDilated, false, kDim, 131072, 1 << 20, 0, false},
                              {"dilated_noncausal_fwd_bwd", kDilated, true, kDim, 131072, 1 << 20, 0, false},
                              {"piece_drop_per_pair_fwd_bwd", kPiece, true, kDim, 1 << 20, 1 << 20, 0.2, true, false,
                               true}};
  for (const Problem& p : problems)
    for (const char* name : {"mma", "wgmma", "ws"}) {
#if defined(MINIDL_WITH_CUDA)
      if (!cuda_is_available()) {
        if (std::string_view(name) != "mma") continue;  // one entry per problem reports the missing device
      } else {
        if (p.redraw && std::string_view(name) != "ws") continue;  // the others keep no bits anyway
        if (p.pattern == kPiece && std::string_view(name) == "wgmma") continue;  // a share runs mma.sync there
        // Only the versions that run this problem's forward or backward here.
        setenv("MINIDL_ATTENTION_KERNEL", name, 1);
        auto runs = [&](cuda::AttentionPass pass) {
          return std::string_view(name) == cuda::attention_kernel_name(
                                                cuda::choose_attention_kernel(DType::BFloat16, p.dim, pass));
        };
        if (!runs(cuda::AttentionPass::kForward) && !(p.backward && runs(cuda::AttentionPass::kBackward)))
          continue;
      }
#else
      if (std::string_view(name) != "mma") continue;
#endif
      sizes(benchmark::RegisterBenchmark(
                (std::string(p.name) + ":" + name).c_str(),
                [p, name](benchmark::State& st) {
                  run(st, p.pattern, p.backward, p.dim, p.dropout, p.causal, name, p.redraw, p.per_pair);
                }),
            p.min_n, p.max_n);
    }
  unsetenv("MINIDL_ATTENTION_KERNEL");
}

}  // namespace

namespace {

// Console output as usual, plus (N, milliseconds) per benchmark family for the
// plot: the median of the repetitions when there are several
// (--benchmark_repetitions), else the one run.
class PlotReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (!bench::reported_run(run)) continue;
      // "<problem>:<kernel>/<N>/real_time"
      std::string name = run.benchmark_name();
      size_t a = name.find('/'), b = name.find('/', a + 1);
      if (a == std::string::npos) continue;
      std::string family = name.substr(0, a);
      double n = std::stod(name.substr(a + 1, b == std::string::npos ? std::string::npos : b - a - 1));
      points_[family].push_back({n, run.GetAdjustedRealTime()});
    }
    ConsoleReporter::ReportRuns(runs);
  }

  void save(const std::string& path) const {
    minidl::plot::Figure fig;
    fig.title = "attention on " + std::string(cuda_is_available() ? "CUDA" : "CPU") +
                " (bf16, B=1, H=8, D=64)";
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
  static char help_flag[] = "--help";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--plot=", 7) == 0) {
      plot_path = argv[i] + 7;
    } else if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      // Google Benchmark's help (printed next, and it exits) knows only its own flags.
      std::printf(
          "usage: bench_attention [--plot=FILE.png] [Google Benchmark flags]\n"
          "  --plot=FILE.png  also draw each benchmark's time against N (log-log axes) into FILE.png\n"
          "                   (default: no plot)\n\n");
      argv[kept++] = help_flag;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  PlotReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  if (!plot_path.empty() && !reporter.empty()) reporter.save(plot_path);
  benchmark::Shutdown();
  return 0;
}
