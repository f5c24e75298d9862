// Generation speed, tokens/s, at full context: each new token with the
// key/value cache ("after": TransformerLM::forward(idx, cache), one position
// per step, as generate() and charlm sample run it) against a full forward
// over the whole context window per token ("before": what sample did before
// the cache; the loop is written here, the library no longer has it). Both
// take the last position's logits to the host and pick greedily, as
// generate() hands them to its sampler. Random weights: speed does not
// depend on them.
//
// Models:
// - ctx256: charlm's recipe (examples/charlm/options.h ModelOptions defaults:
//   6 layers, 6 heads, width 384, context 256, vanilla attention, learned
//   positions; vocabulary 65, tiny shakespeare's), fp32 on the CPU and bf16
//   on CUDA;
// - ctx65536: 2 layers, 4 heads, width 256, rope, dilated attention with
//   w = 2048, 4096, 8192, 16384 and r = 1, 2, 4, 8: the model and branches
//   of the long-context runs in docs/BENCHMARKS.md (and of bench_attention),
//   so these figures sit beside those; its longest segment (16384) is a
//   quarter of the context, so a cached step attends a bounded window, not
//   the whole context. bf16 on CUDA only (a full forward at 65,536 on two
//   CPU cores takes seconds per token).
//
// Steady state at full context: "after" prefills (untimed) the context
// minus the tokens of one iteration, then each iteration generates those
// tokens at the last positions of the context, after rewinding the cache to
// the prefill (only positions [0, length) of a cache are valid, so setting
// the lengths back is exact; the buffers, grown in the warm-up, are reused).
// "before" keeps a full window of context ids and slides it by one id per
// token (one token per iteration; at 65,536 only a few, each costs a full
// forward). CUDA benchmarks skip with an error without a device. Counter
// "tok/s" is tokens per second.
//   bench_generate [Google Benchmark flags]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "minidl.h"

using namespace minidl;

namespace {

constexpr int64_t kVocab = 65;

struct Model {
  const char* name;
  nn::TransformerLMConfig config;
};

Model recipe_model() {
  nn::TransformerLMConfig c;
  c.vocab_size = kVocab;
  c.n_layer = 6;
  c.n_head = 6;
  c.n_embd = 384;
  c.block_size = 256;
  c.attention = "causal";
  c.position_embedding = "learned";
  return {"ctx256_vanilla", c};
}

Model long_model() {
  nn::TransformerLMConfig c;
  c.vocab_size = kVocab;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_embd = 256;
  c.block_size = 65536;
  c.attention = "dilated";
  c.attention_options["segments"] = "2048,4096,8192,16384";
  c.attention_options["dilations"] = "1,2,4,8";
  c.position_embedding = "rope";
  return {"ctx65536_dilated_rope", c};
}

std::vector<int32_t> random_ids(int64_t n) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> id(0, kVocab - 1);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int32_t& x : ids) x = id(rng);
  return ids;
}

// The greedy pick from the last position's logits (B = 1), on the host as
// generate() gives them to its sampler.
int32_t pick_last(const Tensor& logits) {
  const int64_t T = logits.size(1);
  std::vector<float> last =
      logits.narrow(1, T - 1, 1).reshape({kVocab}).to(DType::Float32).to_vector<float>();
  return static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
}

Tensor ids_tensor(const std::vector<int32_t>& ids, Device device) {
  return from_vector(ids, {1, static_cast<int64_t>(ids.size())}, {DType::Int32, device, false});
}

// Builds the model on `device` in `dtype`, in eval mode; null (with the
// benchmark skipped) when CUDA is asked for and absent.
std::unique_ptr<nn::TransformerLM> build(benchmark::State& state, const Model& m, Device device,
                                         DType dtype) {
  if (device.is_cuda() && !cuda_is_available()) {
    state.SkipWithError("no CUDA device");
    return nullptr;
  }
  auto model = std::make_unique<nn::TransformerLM>(m.config, 1);
  model->eval();
  model->to(device);
  model->to(dtype);
  return model;
}

// `tokens` new ids per iteration with the cache, at positions
// block_size - tokens .. block_size - 1.
void after(benchmark::State& state, const Model& m, Device device, DType dtype, int64_t tokens) {
  auto model = build(state, m, device, dtype);
  if (!model) return;
  NoGradGuard no_grad;
  const int64_t prefill = m.config.block_size - tokens;
  nn::KVCache cache;
  const int32_t first = pick_last(model->forward(ids_tensor(random_ids(prefill), device), cache));
  auto rewind = [&] {
    cache.length = prefill;
    for (nn::AttentionCache& layer : cache.layers) layer.length = prefill;
  };
  auto generate = [&] {
    int32_t next = first;
    for (int64_t i = 0; i < tokens; ++i) next = pick_last(model->forward(ids_tensor({next}, device), cache));
    benchmark::DoNotOptimize(next);
  };
  generate();  // warm-up: grows the cache buffers, allocator cache, cuBLAS heuristics
  for (auto _ : state) {
    rewind();
    generate();  // each token ends on the host: no synchronize needed
  }
  state.counters["tok/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
}

// One new id per iteration by a full forward over the latest block_size ids.
void before(benchmark::State& state, const Model& m, Device device, DType dtype) {
  auto model = build(state, m, device, dtype);
  if (!model) return;
  NoGradGuard no_grad;
  std::vector<int32_t> window = random_ids(m.config.block_size);
  auto step = [&] {
    const int32_t next = pick_last(model->forward(ids_tensor(window, device)));
    window.erase(window.begin());
    window.push_back(next);
  };
  step();  // warm-up
  for (auto _ : state) step();
  state.counters["tok/s"] = benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate);
}

// min_time_flag: --benchmark_min_time was given, and overrides the defaults
// below (a benchmark's own MinTime would override the flag).
void register_benchmarks(bool min_time_flag) {
  struct Run {
    Model model;
    Device device;
    DType dtype;
    int64_t tokens;        // "after": new ids per iteration
    int64_t before_iters;  // "before": tokens timed (0: Google Benchmark's choice)
    double min_time;       // default seconds per benchmark
  };
  // Short CPU defaults (a full forward at 256 takes ~50 ms on two cores);
  // GPU runs stay within ~60 s in all.
  const Run runs[] = {
      {recipe_model(), Device::cpu(), DType::Float32, 16, 0, 0.2},
      {recipe_model(), Device::cuda(), DType::BFloat16, 64, 0, 0.5},
      {long_model(), Device::cuda(), DType::BFloat16, 64, 8, 0.5},
  };
  for (const Run& r : runs) {
    const std::string prefix = std::string(r.model.name) + "/" + (r.device.is_cuda() ? "cuda" : "cpu") + "_" +
                               (r.dtype == DType::BFloat16 ? "bf16" : "f32");
    auto* b = benchmark::RegisterBenchmark((prefix + "/before").c_str(), [r](benchmark::State& st) {
      before(st, r.model, r.device, r.dtype);
    });
    b->Unit(benchmark::kMillisecond)->UseRealTime();
    if (r.before_iters > 0) b->Iterations(r.before_iters);  // (Google Benchmark takes one of the two)
    else if (!min_time_flag) b->MinTime(r.min_time);
    auto* a = benchmark::RegisterBenchmark((prefix + "/after").c_str(), [r](benchmark::State& st) {
      after(st, r.model, r.device, r.dtype, r.tokens);
    });
    a->Unit(benchmark::kMillisecond)->UseRealTime();
    if (!min_time_flag) a->MinTime(r.min_time);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool min_time_flag = false;
  for (int i = 1; i < argc; ++i) min_time_flag |= std::string_view(argv[i]).starts_with("--benchmark_min_time");
  register_benchmarks(min_time_flag);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
