// `charlm train --profile N`: the recipe's steps on a fresh model, timed per
// phase with StepProfiler (profile.h), and on CUDA the launches of one step
// and the time of its graph replays. Prints a table and writes nothing.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "minidl.h"
#include "options.h"
#include "profile.h"
#include "train.h"
#include "train_internal.h"
#include "vocab.h"

namespace charlm {

namespace nn = minidl::nn;
using minidl::Device;

namespace {

constexpr int64_t kProfileWarmupSteps = 3;  // train --help (kTrainHelp, train.cpp) says 3

std::string ms_cell(double ms, bool valid) {
  char buf[32];
  if (valid) std::snprintf(buf, sizeof buf, "%10.3f", ms);
  else std::snprintf(buf, sizeof buf, "%10s", "n/a");
  return buf;
}

}  // namespace

void profile_run(const TrainOptions& o, int64_t steps) {
  if (o.threads > 0) omp_set_num_threads(static_cast<int>(o.threads));
  const Device device = resolve_device(o.device);
  const std::string text = read_data_file(o.data);
  const CharVocab vocab = CharVocab::from_text(text);
  const nn::TrainValSplit split = nn::split_train_val(vocab.encode(text));
  check_split_fits(o, split);
  TrainModel model(make_config(o.model, vocab.size()), o.seed, device, o.dtype == "bfloat16");
  nn::AdamW optimizer(nn::weight_decay_groups(model.master(), o.weight_decay),
                      {.lr = o.lr, .beta1 = o.beta1, .beta2 = o.beta2});
  model.attach(optimizer);
  const nn::WarmupCosineLR schedule = lr_schedule(o);
  nn::BatchSampler batches(split.train, o.batch, o.model.context, train_batch_seed(o.seed), device, "train");
  int64_t step = 0;
  auto run_step = [&](StepProfiler* profiler) {
    train_step(model, optimizer, batches, schedule.lr_at(step++), o.grad_clip, profiler);
  };
  for (int64_t i = 0; i < kProfileWarmupSteps; ++i) run_step(nullptr);
  minidl::synchronize(device);

  // The steps as training runs them, back to back: the wall time and each
  // phase's span on the stream.
  StepProfiler issue(device, steps, StepProfiler::Mode::Issue);
  const uint64_t syncs_before = host_syncs();
  const Clock::time_point start = Clock::now();
  for (int64_t i = 0; i < steps; ++i) run_step(&issue);
  const uint64_t syncs = host_syncs() - syncs_before;
  const StepProfiler::Result issued = issue.finish();
  const double wall_ms = seconds_since(start) * 1e3 / static_cast<double>(steps);
  const double tokens_per_s = static_cast<double>(o.batch * o.model.context) / (wall_ms * 1e-3);

  // On CUDA: the host's issue time per phase with each step started on an
  // idle device (back to back, the host waits for the GPU once the launch
  // queue is full, and its time tends to the GPU's), each phase's kernels
  // alone, then one step captured as a graph.
  const bool gpu = device.is_cuda();
  StepProfiler::Result idle = issued, held;
  StepGraphCounts graph;
  if (gpu) {
    StepProfiler from_idle(device, steps, StepProfiler::Mode::Issue);
    for (int64_t i = 0; i < steps; ++i) {
      minidl::synchronize(device);  // before begin_step: not timed
      run_step(&from_idle);
    }
    idle = from_idle.finish();
    StepProfiler device_only(device, steps, StepProfiler::Mode::DeviceOnly);
    for (int64_t i = 0; i < steps; ++i) run_step(&device_only);
    held = device_only.finish();
    graph = count_step_graph_nodes([&] { run_step(nullptr); }, {&model.compute().dropout_generator()});
  }
  // As training runs them by default on CUDA: replays of one graph of the
  // step (after its eager warm-up step and the capture), back to back for
  // the wall time, then each from an idle device for the host's issue time.
  double graph_wall_ms = NAN, graph_host_ms = NAN;
  if (gpu && o.graph) {
    StepRunner runner(model, optimizer, batches, o.grad_clip, /*graph=*/true);
    for (int i = 0; i < 2; ++i) runner.step(schedule.lr_at(step++));
    minidl::synchronize(device);
    const Clock::time_point replay_start = Clock::now();
    for (int64_t i = 0; i < steps; ++i) runner.step(schedule.lr_at(step++));
    minidl::synchronize(device);
    graph_wall_ms = seconds_since(replay_start) * 1e3 / static_cast<double>(steps);
    graph_host_ms = host_issue_ms(device, steps, [&] { runner.step(schedule.lr_at(step++)); });
  }

  std::printf("profile: %lld steps after %lld warm-up steps, batch %lld x context %lld, %lld parameters, %s, %s\n",
              static_cast<long long>(steps), static_cast<long long>(kProfileWarmupSteps),
              static_cast<long long>(o.batch), static_cast<long long>(o.model.context),
              static_cast<long long>(model.master().num_parameters()), device.str().c_str(), o.dtype.c_str());
  if (gpu) std::printf("%-10s %10s %10s %10s\n", "phase", "host ms", "stream ms", "GPU ms");
  else std::printf("%-10s %10s\n", "phase", "ms");
  for (int p = 0; p <= kPhases; ++p) {
    const bool total = p == kPhases;
    const char* name = total ? "step" : phase_name(static_cast<Phase>(p));
    const double host = total ? idle.host.total() : idle.host.ms[p];
    std::string line = std::string(name) + std::string(10 - std::strlen(name), ' ') + " " + ms_cell(host, true);
    if (gpu) {
      // Appended piecewise: `line += " " + cell` trips a false -Wrestrict in GCC 12's string operator+.
      line.append(" ").append(ms_cell(total ? issued.device.total() : issued.device.ms[p], issued.device_valid));
      line.append(" ").append(ms_cell(total ? held.device.total() : held.device.ms[p], held.device_valid));
    }
    std::printf("%s\n", line.c_str());
  }
  if (gpu)
    std::printf("(host ms: issuing each phase, every step started on an idle GPU; stream ms: the phase's span on "
                "the stream, steps back to back; GPU ms: its kernels alone)\n");
  std::printf("wall %.3f ms/step, %.0f tokens/s\n", wall_ms, tokens_per_s);
  if (gpu) {
    if (held.device_valid)
      std::printf("GPU busy %.3f ms/step (%.0f%%), idle %.3f ms/step waiting for the host\n", held.device.total(),
                  100.0 * held.device.total() / wall_ms, std::max(0.0, wall_ms - held.device.total()));
    else
      std::printf("GPU ms n/a: a phase could not be issued while held (more launches than the stream's queue "
                  "takes, or a host sync in it)\n");
    std::printf("host syncs per step: %.2f\n", static_cast<double>(syncs) / static_cast<double>(steps));
    if (graph.captured) {
      std::printf("launches per step: %lld = %lld kernels + %lld memsets (+ %lld copies, %lld other nodes; a CUDA "
                  "graph capture of one step); kernels by name:\n",
                  static_cast<long long>(graph.kernels + graph.memsets), static_cast<long long>(graph.kernels),
                  static_cast<long long>(graph.memsets), static_cast<long long>(graph.copies),
                  static_cast<long long>(graph.other));
      print_kernels_by_name(graph);
    } else {
      std::printf("kernels per step: n/a (the step could not be captured as a CUDA graph: %s)\n", graph.error.c_str());
    }
    if (o.graph)
      std::printf("graph: wall %.3f ms/step, %.0f tokens/s (replays back to back); host %.3f ms/step to issue a "
                  "step on an idle GPU (batch, copies, replay)\n",
                  graph_wall_ms, static_cast<double>(o.batch * o.model.context) / (graph_wall_ms * 1e-3),
                  graph_host_ms);
  }
}

}  // namespace charlm
