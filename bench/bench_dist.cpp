// Several GPUs (issue 11, "Benchmarks"): one rank per visible GPU, threads of
// this process joined by NCCL (dist::run_nccl), measuring
//  - the collectives all_gather, reduce_scatter and all_reduce of bf16
//    buffers of 64 KiB (for the latency) to 1 GiB ("size" as in nccl-tests:
//    all_gather's output, reduce_scatter's input, all_reduce's buffer) on
//    all the GPUs, as time and bus bandwidth with nccl-tests' definitions:
//    algbw = size / time, busbw = algbw·(P-1)/P for all_gather and
//    reduce_scatter, algbw·2(P-1)/P for all_reduce;
//  - ops::seq_parallel_dilated_attention forward+backward (bf16, B = 1, H = 8,
//    D = 64, causal): weak scaling at 1M tokens per GPU on P = 1, 2, 4, ...
//    and all visible GPUs, and strong scaling of one sequence of --strong_n
//    tokens (default 8M) on those P that hold at most 4M tokens per GPU. Two
//    branch sets: "w16k" is bench_attention's LongNet configuration (w =
//    2048..16384, r = 1..8; at 1M tokens per GPU every segment lies inside a
//    chunk and the layout is given, so nothing is exchanged), "wN" the same
//    geometric family extended until one segment covers the sequence (what
//    docs/scaling.md models: its long segments gather across ranks).
// Each case is one job that every rank runs at once, a fixed number of
// iterations after warm-up, so all ranks run the same collectives. Every
// rank times each iteration with CUDA events on minidl's stream; Google
// Benchmark gets the slowest rank's time per iteration as manual time (an
// attention iteration starts after a barrier, so the ranks start together;
// collectives are queued back to back, as nccl-tests does). A summary
// follows the usual output: bus bandwidths, weak-scaling efficiency against
// P = 1 and strong-scaling efficiency against the smallest P run (medians of
// the repetitions with --benchmark_repetitions).
//   bench_dist [--strong_n=N] [Google Benchmark flags]
// With one GPU only the P = 1 cases run; with none it says so and exits 0.
// NCCL_NVLS_ENABLE=0 unless the environment sets it (dist/nccl.h).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_common.h"
#include "cuda/launch.h"
#include "dist/nccl.h"
#include "minidl.h"
#include "ops/seq_parallel.h"

using namespace minidl;

namespace {

constexpr int64_t kHeads = 8, kDim = 64;
constexpr int64_t kTokensPerGpu = int64_t{1} << 20;     // weak scaling
constexpr int64_t kMaxStrongPerGpu = int64_t{1} << 22;  // strong scaling runs where N / P fits this
constexpr int kAttentionWarmup = 2, kAttentionIters = 5;
constexpr int kCollectiveWarmup = 5, kCollectiveIters = 20;


// ---- The ranks ----

// What a rank keeps between jobs: the world communicator (all GPUs) and the
// groups of its first P ranks, split on first use.
struct Rank {
  dist::Communicator& world;
  std::map<int, std::unique_ptr<dist::Communicator>> groups;

  int rank() const { return world.rank(); }
  Device device() const { return Device::cuda(world.rank()); }
  // Ranks 0..P-1 as one communicator; null on the other ranks. Every rank
  // must call it (a split is collective over the world).
  dist::Communicator* group(int P) {
    if (P == world.size()) return &world;
    auto it = groups.find(P);
    if (it == groups.end()) it = groups.emplace(P, world.split(rank() < P ? 0 : 1, rank())).first;
    return rank() < P ? it->second.get() : nullptr;
  }
};

// One thread per GPU (dist::run_nccl on a driver thread), kept for the whole
// program so that NCCL's setup is paid once; each case is a job all of them run.
class Ranks {
 public:
  explicit Ranks(int gpus) : gpus_(gpus), errors_(static_cast<size_t>(gpus)), driver_([this] { drive(); }) {}
  ~Ranks() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    driver_.join();
  }
  int size() const { return gpus_; }

  // Runs job on every rank; returns when all have, rethrowing a rank's error.
  void run(const std::function<void(Rank&)>& job) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return started_ == gpus_ || dead_; });
    if (dead_) std::rethrow_exception(setup_error_ ? setup_error_ : std::make_exception_ptr(Error("ranks stopped")));
    job_ = &job;
    done_ = 0;
    std::fill(errors_.begin(), errors_.end(), nullptr);
    ++generation_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return done_ == gpus_ || dead_; });
    job_ = nullptr;
    for (const std::exception_ptr& e : errors_)
      if (e) std::rethrow_exception(e);
    if (done_ != gpus_) std::rethrow_exception(setup_error_);
  }

 private:
  void drive() {
    std::exception_ptr error;
    try {
      dist::run_nccl(gpus_, [this](dist::Communicator& world) { serve(world); });
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mu_);
    setup_error_ = error ? error : std::make_exception_ptr(Error("bench_dist: the ranks stopped"));
    dead_ = true;
    cv_.notify_all();
  }
  void serve(dist::Communicator& world) {
    Rank me{world, {}};
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    ++started_;
    cv_.notify_all();
    for (;;) {
      cv_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
      const std::function<void(Rank&)>& job = *job_;
      lock.unlock();
      std::exception_ptr error;
      try {
        job(me);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      errors_[static_cast<size_t>(me.rank())] = error;
      ++done_;
      cv_.notify_all();
    }
  }

  const int gpus_;
  std::mutex mu_;
  std::condition_variable cv_;
  const std::function<void(Rank&)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int started_ = 0, done_ = 0;
  bool stop_ = false, dead_ = false;
  std::vector<std::exception_ptr> errors_;
  std::exception_ptr setup_error_;
  std::thread driver_;  // last: starts once the rest is set up
};

Ranks* g_ranks = nullptr;

// CUDA events on the calling thread's device, recorded on minidl's stream.
class Events {
 public:
  explicit Events(size_t n) : events_(n) {
    for (cudaEvent_t& e : events_) MINIDL_CUDA_CHECK(cudaEventCreate(&e));
  }
  ~Events() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  void record(size_t i) { MINIDL_CUDA_CHECK(cudaEventRecord(events_[i], cuda::stream())); }
  // Seconds from event a to event b (both complete).
  double seconds(size_t a, size_t b) const {
    float ms = 0;
    MINIDL_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[a], events_[b]));
    return 1e-3 * ms;
  }

 private:
  std::vector<cudaEvent_t> events_;
};

// Per iteration, the slowest of ranks 0..P-1 (times[rank][iteration]).
std::vector<double> slowest(const std::vector<std::vector<double>>& times, int P) {
  std::vector<double> out(times[0].size(), 0.0);
  for (int p = 0; p < P; ++p)
    for (size_t i = 0; i < out.size(); ++i) out[i] = std::max(out[i], times[static_cast<size_t>(p)][i]);
  return out;
}

void report(benchmark::State& state, const std::vector<double>& seconds) {
  size_t i = 0;
  for (auto _ : state) state.SetIterationTime(seconds[i++]);
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

// ---- Collectives ----

enum class Collective { AllGather, ReduceScatter, AllReduce };
const char* collective_name(Collective c) {
  return c == Collective::AllGather ? "all_gather" : c == Collective::ReduceScatter ? "reduce_scatter" : "all_reduce";
}
// nccl-tests' busbw / algbw.
double bus_factor(Collective c, int P) {
  return (c == Collective::AllReduce ? 2.0 : 1.0) * static_cast<double>(P - 1) / static_cast<double>(P);
}

void run_collective(benchmark::State& state, Collective op, int64_t bytes) {
  const int P = g_ranks->size();
  const int64_t count = bytes / 2 / P * P;  // bf16 elements, a multiple of P
  std::vector<std::vector<double>> times(static_cast<size_t>(P));
  try {
    g_ranks->run([&](Rank& r) {
      dist::Communicator& comm = r.world;
      const TensorOptions opts{DType::BFloat16, r.device(), false};
      const Tensor full = ops::zeros({count}, opts), part = ops::zeros({count / P}, opts);
      auto once = [&] {
        if (op == Collective::AllGather) comm.all_gather(part, full);
        else if (op == Collective::ReduceScatter) comm.reduce_scatter(full, part);
        else comm.all_reduce(full);
      };
      Events ev(kCollectiveIters + 1);
      comm.barrier();
      for (int i = 0; i < kCollectiveWarmup; ++i) once();  // queued: absorbs the ranks' start skew
      for (int i = 0; i < kCollectiveIters; ++i) {
        ev.record(static_cast<size_t>(i));
        once();
      }
      ev.record(kCollectiveIters);
      synchronize(r.device());
      auto& mine = times[static_cast<size_t>(r.rank())];
      for (size_t i = 0; i < kCollectiveIters; ++i) mine.push_back(ev.seconds(i, i + 1));
    });
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  const std::vector<double> t = slowest(times, P);
  report(state, t);
  const double algbw = static_cast<double>(count * 2) / mean(t) * 1e-9;
  state.counters["algbw_GB/s"] = algbw;
  state.counters["busbw_GB/s"] = algbw * bus_factor(op, P);
}

// ---- Sequence-parallel dilated attention ----

// One rank's part of a case: its chunk of n tokens (SequenceLayout::even:
// rank p of P holds [p·n/P, (p+1)·n/P)), warm-up, then the timed iterations into `seconds`,
// and its peak memory over them.
void attention_on_rank(dist::Communicator& comm, Device dev, int64_t n, const DilatedAttentionConfig& config,
                       std::vector<double>& seconds, double& peak_gib) {
  const int p = comm.rank(), P = comm.size();
  // The layout given, as charlm gives it: once the plan is built a call
  // exchanges no chunk sizes and never waits on the host.
  const ops::SequenceLayout layout = ops::SequenceLayout::even(n, P);
  const int64_t rows = layout.chunk_sizes[static_cast<size_t>(p)];
  Generator gen(0x5eed + static_cast<uint64_t>(p));  // per rank: the default generator is not for threads
  const TensorOptions opts{DType::BFloat16, dev, true};
  const Tensor q = ops::randn({1, rows, kHeads, kDim}, opts, &gen), k = ops::randn({1, rows, kHeads, kDim}, opts, &gen),
               v = ops::randn({1, rows, kHeads, kDim}, opts, &gen),
               seed = ops::randn({1, rows, kHeads, kDim}, {DType::BFloat16, dev, false}, &gen);
  auto step = [&] {
    auto [out, lse] = ops::seq_parallel_dilated_attention(q, k, v, config, comm, layout);
    out.backward(seed);
  };
  for (int i = 0; i < kAttentionWarmup; ++i) step();  // the first builds the layout's plan
  synchronize(dev);
  reset_peak_memory_stats(dev);
  Events ev(2 * kAttentionIters);
  for (int i = 0; i < kAttentionIters; ++i) {
    comm.barrier();  // also waits for this rank's queued work: the ranks start together
    ev.record(static_cast<size_t>(2 * i));
    step();
    ev.record(static_cast<size_t>(2 * i + 1));
  }
  synchronize(dev);
  for (size_t i = 0; i < kAttentionIters; ++i) seconds.push_back(ev.seconds(2 * i, 2 * i + 1));
  peak_gib = static_cast<double>(memory_stats(dev).peak_allocated) / double(1 << 30);
}

void run_attention(benchmark::State& state, int64_t n, int P, bool whole) {
  const DilatedAttentionConfig config = bench::longnet_config(n, whole);
  const int G = g_ranks->size();
  std::vector<std::vector<double>> times(static_cast<size_t>(G));
  std::vector<double> peak(static_cast<size_t>(G), 0.0);
  try {
    g_ranks->run([&](Rank& r) {
      dist::Communicator* comm = r.group(P);
      if (!comm) return;  // not one of the P ranks
      attention_on_rank(*comm, r.device(), n, config, times[static_cast<size_t>(comm->rank())],
                        peak[static_cast<size_t>(comm->rank())]);
      // The next case may need other block sizes: give this one's back.
      empty_cache(r.device());
    });
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  const std::vector<double> t = slowest(times, P);
  report(state, t);
  // Useful FLOPs as bench_attention counts them (4·D per attended pair
  // forward, 2.5× that backward), shared by the P GPUs.
  const double flops = 4.0 * kDim * attended_pairs(n, kHeads, config) * 3.5;
  state.counters["TFLOP/s_per_gpu"] = flops / P / mean(t) * 1e-12;
  state.counters["branches"] = static_cast<double>(config.branches.size());
  state.counters["peak_GiB"] = *std::max_element(peak.begin(), peak.end());
}

// ---- Registration and the summary ----

struct Case {
  enum Kind { Coll, Weak, Strong } kind;
  std::string op_or_config;  // collective name, or "w16k" / "wN"
  int P = 1;
  int64_t bytes_or_n = 0;  // collective size in bytes, or total tokens N
};
std::map<std::string, Case> g_cases;  // by registered name
std::vector<std::string> g_order;     // the names in registration order

std::string size_text(int64_t bytes) {
  return bytes >= (1 << 30)   ? std::to_string(bytes >> 30) + "GiB"
         : bytes >= (1 << 20) ? std::to_string(bytes >> 20) + "MiB"
                              : std::to_string(bytes >> 10) + "KiB";
}

// The GPU counts of the scaling runs: 1, 2, 4, ... below G, and G.
std::vector<int> scaling_counts(int G) {
  std::vector<int> out;
  for (int P = 1; P < G; P *= 2) out.push_back(P);
  out.push_back(G);
  return out;
}

void register_benchmarks(int G, int64_t strong_n) {
  if (G >= 2) {
    const int64_t sizes[] = {int64_t{64} << 10, int64_t{1} << 20, int64_t{16} << 20, int64_t{128} << 20,
                             int64_t{1} << 30};
    for (Collective op : {Collective::AllGather, Collective::ReduceScatter, Collective::AllReduce})
      for (int64_t bytes : sizes) {
        const std::string name =
            std::string(collective_name(op)) + "/P:" + std::to_string(G) + "/" + size_text(bytes);
        g_cases[name] = {Case::Coll, collective_name(op), G, bytes};
        g_order.push_back(name);
        benchmark::RegisterBenchmark(name.c_str(), [op, bytes](benchmark::State& s) { run_collective(s, op, bytes); })
            ->Iterations(kCollectiveIters)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
  } else {
    std::printf("bench_dist: 1 GPU visible: the collectives and the P > 1 cases are skipped\n");
  }
  std::vector<int> strong;
  for (int P : scaling_counts(G))
    if (strong_n / P <= kMaxStrongPerGpu) strong.push_back(P);
  if (strong.empty())
    std::printf("bench_dist: strong scaling of %lld tokens skipped: more than %lld tokens per GPU on %d GPU(s)\n",
                static_cast<long long>(strong_n), static_cast<long long>(kMaxStrongPerGpu), G);
  for (bool whole : {false, true}) {
    const char* config = whole ? "wN" : "w16k";
    auto add = [&](Case::Kind kind, int P, int64_t n) {
      const std::string name = std::string(kind == Case::Weak ? "sp_weak:" : "sp_strong:") + config +
                               "/P:" + std::to_string(P) + "/N:" + std::to_string(n);
      g_cases[name] = {kind, config, P, n};
      g_order.push_back(name);
      benchmark::RegisterBenchmark(name.c_str(), [n, P, whole](benchmark::State& s) { run_attention(s, n, P, whole); })
          ->Iterations(kAttentionIters)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    };
    for (int P : scaling_counts(G)) add(Case::Weak, P, kTokensPerGpu * P);
    for (int P : strong) add(Case::Strong, P, strong_n);
  }
}

// Console output as usual; keeps per case the median of the repetitions (or
// the one run) for the summary.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (!bench::reported_run(run)) continue;
      const auto it = g_cases.find(run.run_name.function_name);
      if (it == g_cases.end()) continue;
      Result& r = results_[run.run_name.function_name];
      r.seconds = run.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run.time_unit);
      const auto bw = run.counters.find("busbw_GB/s");
      if (bw != run.counters.end()) r.busbw = bw->second.value;
    }
    ConsoleReporter::ReportRuns(runs);
  }

  void print_summary(int G, int64_t strong_n) const {
    std::printf("\n== bench_dist summary (%d GPU%s; medians over repetitions) ==\n", G, G == 1 ? "" : "s");
    bool any = false;
    for (const std::string& name : g_order) {
      const Case& c = g_cases.at(name);
      if (c.kind != Case::Coll || !results_.count(name)) continue;
      if (!any) std::printf("%-16s %8s %10s %12s\n", "collective", "size", "us", "busbw GB/s");
      any = true;
      std::printf("%-16s %8s %10.1f %12.1f\n", c.op_or_config.c_str(), size_text(c.bytes_or_n).c_str(),
                  1e6 * results_.at(name).seconds, results_.at(name).busbw);
    }
    // Efficiency against P0, the smallest P measured (1 unless filtered out).
    for (Case::Kind kind : {Case::Weak, Case::Strong}) {
      if (measured(kind, "w16k").empty() && measured(kind, "wN").empty()) continue;
      if (kind == Case::Weak)
        std::printf("sp attention fwd+bwd, weak scaling (%lld tokens per GPU): efficiency t(P0) / t(P)\n",
                    static_cast<long long>(kTokensPerGpu));
      else
        std::printf("sp attention fwd+bwd, strong scaling (N = %lld): efficiency t(P0)·P0 / (t(P)·P)\n",
                    static_cast<long long>(strong_n));
      std::printf("%-6s %3s %10s %10s %11s\n", "config", "P", "N", "ms", "efficiency");
      for (const char* config : {"w16k", "wN"}) {
        double base = 0;  // P0's time (strong: times P0)
        for (const auto& [name, c] : measured(kind, config)) {
          const double cost = results_.at(name).seconds * (kind == Case::Weak ? 1 : c.P);
          if (base == 0) base = cost;
          std::printf("%-6s %3d %10lld %10.2f %10.1f%%\n", config, c.P, static_cast<long long>(c.bytes_or_n),
                      1e3 * results_.at(name).seconds, 100.0 * base / cost);
        }
      }
    }
  }

 private:
  struct Result {
    double seconds = 0, busbw = 0;
  };
  // The measured cases of one kind and config, by increasing P (registration order).
  std::vector<std::pair<std::string, Case>> measured(Case::Kind kind, const std::string& config) const {
    std::vector<std::pair<std::string, Case>> out;
    for (const std::string& name : g_order) {
      const Case& c = g_cases.at(name);
      if (c.kind == kind && c.op_or_config == config && results_.count(name)) out.push_back({name, c});
    }
    return out;
  }
  std::map<std::string, Result> results_;
};

}  // namespace

int main(int argc, char** argv) {
  constexpr int64_t kDefaultStrongN = int64_t{8} << 20;
  int64_t strong_n = kDefaultStrongN;
  int kept = 1;
  static char help_flag[] = "--help";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      // Google Benchmark's help (printed next, and it exits) knows only its own flags.
      std::printf(
          "usage: bench_dist [--strong_n=N] [Google Benchmark flags]\n"
          "  --strong_n=N  tokens of the strong-scaling sequence, run on each P with at most\n"
          "                %lld tokens per GPU (default %lld)\n\n",
          static_cast<long long>(kMaxStrongPerGpu), static_cast<long long>(kDefaultStrongN));
      argv[kept++] = help_flag;
    } else if (std::strncmp(argv[i], "--strong_n=", 11) == 0) {
      char* end = nullptr;
      strong_n = std::strtoll(argv[i] + 11, &end, 10);
      if (end == argv[i] + 11 || *end != '\0' || strong_n < 1) {
        std::fprintf(stderr, "bench_dist: --strong_n takes a positive token count, got '%s'\n", argv[i] + 11);
        return 1;
      }
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const int G = cuda_is_available() ? cuda_device_count() : 0;
  if (G == 0 || !dist::nccl_available()) {
    std::printf("bench_dist: %s: nothing to measure\n", G == 0 ? "no CUDA device" : "minidl was built without NCCL");
    return 0;
  }
  register_benchmarks(G, strong_n);
  Ranks ranks(G);
  g_ranks = &ranks;
  SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_summary(G, strong_n);
  benchmark::Shutdown();
  g_ranks = nullptr;
  return 0;
}
