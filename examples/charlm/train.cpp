// `charlm train`: the run (train_run), its directory and checkpoints, and the
// command line. The ranks of --dp/--sp are in parallel.cpp, --profile is in
// train_profile.cpp, and what they share with the run in train_internal.h.
#include "train.h"

#include <omp.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <sstream>

#include "dist/communicator.h"
#include "dist/launch.h"
#include "dist/nccl.h"
#include "parallel.h"
#include "profile.h"
#include "progress.h"
#include "signals.h"
#include "train_internal.h"
#include "vocab.h"

namespace charlm {

namespace fs = std::filesystem;
namespace dist = minidl::dist;
namespace nn = minidl::nn;
namespace ops = minidl::ops;
using minidl::Device;
using minidl::DType;
using minidl::Tensor;

namespace {

constexpr const char* kFormatKey = "charlm.format";
constexpr const char* kFormatVersion = "1";
// The run's id, also in every row of its log.csv (absent in checkpoints of older charlm).
constexpr const char* kRunIdKey = "run.id";

std::string hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

const std::string& meta_at(const nn::Metadata& meta, const std::string& key, const std::string& path) {
  auto it = meta.find(key);
  MINIDL_CHECK(it != meta.end(), "charlm: ", path, " has no metadata '", key,
               "' (not a checkpoint written by charlm train?)");
  return it->second;
}

std::string run_id_of(const nn::Metadata& meta) {
  auto it = meta.find(kRunIdKey);
  return it == meta.end() ? std::string() : it->second;
}

std::string shown_id(const std::string& id) { return id.empty() ? "(no run id: an older charlm)" : id; }

// Resuming DIR: its log.csv and best.ckpt must belong to the run of
// last.ckpt (`id`; empty for a checkpoint written before run ids).
void check_run_files(const std::string& dir, const std::string& id, const std::vector<LogRow>& log_rows) {
  for (const LogRow& r : log_rows)
    if (r.run_id != id)
      throw UsageError("--resume: " + (fs::path(dir) / "log.csv").string() + " has rows of run " +
                       shown_id(r.run_id) + ", but last.ckpt is run " + shown_id(id) +
                       ": the files come from different runs; start a new run in another directory");
  const fs::path best = fs::path(dir) / "best.ckpt";
  if (fs::exists(best)) {
    const std::string best_id = run_id_of(nn::load_checkpoint(best.string()).metadata);
    if (best_id != id)
      throw UsageError("--resume: " + best.string() + " is run " + shown_id(best_id) + ", but last.ckpt is run " +
                       shown_id(id) + ": the files come from different runs; start a new run in another directory");
  }
}

// Training tokens per second over the whole run, from the log: each row's
// rate covers the steps since the previous row (rows without one are skipped).
double log_tokens_per_s(const std::vector<LogRow>& rows, int64_t tokens_per_step) {
  double tokens = 0, seconds = 0;
  for (size_t i = 1; i < rows.size(); ++i) {
    const LogRow& r = rows[i];
    if (!(r.tokens_per_s > 0)) continue;
    const double n = static_cast<double>((r.step - rows[i - 1].step) * tokens_per_step);
    tokens += n;
    seconds += n / r.tokens_per_s;
  }
  return seconds > 0 ? tokens / seconds : NAN;
}

}  // namespace

// train_internal.h: the model and its training steps.

TrainModel::TrainModel(const nn::TransformerLMConfig& config, uint64_t seed, Device device, bool bf16)
    : master_(std::make_shared<nn::TransformerLM>(config, seed)), compute_(master_) {
  // Built on the CPU and moved, so the initial weights do not depend on the device.
  master_->to(device);
  if (bf16) {
    compute_ = std::make_shared<nn::TransformerLM>(config, seed);
    mixed_ = std::make_unique<nn::MixedPrecision>(master_, compute_);
  }
}

Tensor TrainModel::loss(const Tensor& x, const Tensor& y) {
  Tensor logits = compute().forward(x);
  if (logits.dtype() != DType::Float32) logits = ops::to(logits, DType::Float32);
  const int64_t n = x.numel();
  return ops::cross_entropy(logits.reshape({n, logits.size(-1)}), y.reshape({n}));
}

Tensor step_on_batch(TrainModel& model, nn::AdamW& optimizer, const Tensor& x, const Tensor& y, double grad_clip,
                     const std::function<void(Phase)>& end, Ranks* ranks) {
  auto mark = [&end](Phase phase) {
    if (end) end(phase);
  };
  Tensor loss = ranks ? model.loss(ranks->rows(x), ranks->rows(y)) : model.loss(x, y);
  mark(Phase::Forward);
  optimizer.zero_grad();  // drops the gradients: backward writes fresh ones
  loss.backward();
  if (ranks) ranks->all_reduce_gradients();  // the buckets reduced during backward, and the rest
  model.gradients_to_masters();
  mark(Phase::Backward);
  if (grad_clip > 0) nn::clip_grad_norm_(model.parameters(), grad_clip);
  optimizer.step();  // also writes the bfloat16 copy (MixedPrecision::attach)
  mark(Phase::Optimizer);
  return ranks ? ranks->mean(loss) : loss;
}

Tensor train_step(TrainModel& model, nn::AdamW& optimizer, nn::BatchSampler& batches, double lr, double grad_clip,
                  StepProfiler* profiler, Ranks* ranks) {
  if (profiler) profiler->begin_step();
  auto [x, y] = batches.next();
  optimizer.set_lr(lr);  // a device scalar the update reads
  if (profiler) profiler->end_phase(Phase::Data);
  std::function<void(Phase)> end;
  if (profiler) end = [profiler](Phase phase) { profiler->end_phase(phase); };
  return step_on_batch(model, optimizer, x, y, grad_clip, end, ranks);
}

StepRunner::StepRunner(TrainModel& model, nn::AdamW& optimizer, nn::BatchSampler& batches, double grad_clip, bool graph,
                       Ranks* ranks)
    : model_(model), optimizer_(optimizer), batches_(batches), grad_clip_(grad_clip), ranks_(ranks) {
  if (graph)
    graph_ = std::make_unique<nn::CudaGraph>(std::vector<minidl::Generator*>{&model.compute().dropout_generator()});
}

Tensor StepRunner::step(double lr) {
  if (!graph_) return train_step(model_, optimizer_, batches_, lr, grad_clip_, nullptr, ranks_);
  auto [x, y] = batches_.next();
  optimizer_.set_lr(lr);
  if (!x_.defined()) {
    x_ = x;
    y_ = y;
    return step_on_batch(model_, optimizer_, x_, y_, grad_clip_, {}, ranks_);
  }
  ops::copy_(x_, x);
  ops::copy_(y_, y);
  if (!graph_->captured()) {
    try {
      graph_->capture([this] { loss_ = step_on_batch(model_, optimizer_, x_, y_, grad_clip_, {}, ranks_); });
    } catch (const minidl::Error& e) {
      MINIDL_FAIL(e.what(), " (charlm: --no-graph trains without CUDA graphs)");
    }
  }
  graph_->replay();
  return loss_;
}

// The 90/10 split of the text must hold a context + 1 characters on each side.
void check_split_fits(const TrainOptions& o, const nn::TrainValSplit& split) {
  const int64_t T = o.model.context;
  if (static_cast<int64_t>(split.val.size()) < T + 1 || static_cast<int64_t>(split.train.size()) < T + 1)
    throw UsageError("--data: '" + o.data + "' is too small for --context " + std::to_string(T) +
                     ": its 90/10 split has " + std::to_string(split.train.size()) + " training and " +
                     std::to_string(split.val.size()) + " validation characters, each needs at least " +
                     std::to_string(T + 1));
}

std::string new_run_id() {
  std::random_device device;
  const uint64_t entropy = (uint64_t{device()} << 32) ^ device() ^
                           static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  return hex64(nn::fnv1a64(&entropy, sizeof entropy));
}

FreshDirGuard::FreshDirGuard(std::string dir, std::vector<std::string> files, std::string resumable)
    : dir_(std::move(dir)),
      files_(std::move(files)),
      resumable_(std::move(resumable)),
      created_(!fs::exists(dir_)),
      exceptions_(std::uncaught_exceptions()) {}

FreshDirGuard::~FreshDirGuard() {
  std::error_code ec;
  if (std::uncaught_exceptions() == exceptions_ || fs::exists(fs::path(dir_) / resumable_, ec)) return;
  for (const std::string& name : files_) fs::remove(fs::path(dir_) / name, ec);
  if (created_) fs::remove(dir_, ec);  // fails, as it should, unless empty
}

const std::vector<std::string>& run_artifact_names() {
  static const std::vector<std::string> names = {"last.ckpt",   "best.ckpt",   "log.csv",     "loss.png",
                                                 "compare.run", "compare.csv", "compare.png", "summary.txt",
                                                 "vanilla",     "dilated"};
  return names;
}

std::vector<std::string> run_artifacts(const std::string& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  for (const std::string& name : run_artifact_names())
    if (fs::exists(fs::path(dir) / name, ec)) found.push_back(name);
  return found;
}

std::string read_data_file(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec))
    throw UsageError("--data: '" + path + "' is a directory; give the text file to learn");
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) throw UsageError("--data: cannot read '" + path + "': " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  if (text.empty()) throw UsageError("--data: '" + path + "' is empty");
  return text;
}

RunSummary train_run(const TrainOptions& o, const nn::Checkpoint* resume, const std::string& label,
                     const std::string& resume_command) {
  const Clock::time_point run_start = Clock::now();
  install_stop_handlers();
  if (o.threads > 0) omp_set_num_threads(static_cast<int>(o.threads));
  Device device;
  std::unique_ptr<dist::Communicator> process_comm = join_process_ranks(o, &device);
  std::optional<StartVote> vote;
  if (process_comm) vote.emplace(*process_comm, device);
  else device = resolve_device(o.device);
  const std::string dir = o.out;
  const std::string last_path = (fs::path(dir) / "last.ckpt").string();
  const std::string best_path = (fs::path(dir) / "best.ckpt").string();
  const std::string log_path = (fs::path(dir) / "log.csv").string();
  const std::string plot_path = (fs::path(dir) / "loss.png").string();
  const std::string continue_with = resume_command.empty() ? "charlm train --resume " + dir : resume_command;
  Progress progress(label);

  // Data.
  const std::string text = read_data_file(o.data);
  const std::string data_hash = hex64(nn::fnv1a64(text.data(), text.size()));
  CharVocab vocab;
  if (resume) {
    const std::string want = meta_at(resume->metadata, "data.fnv1a64", last_path);
    if (want != data_hash)
      throw UsageError("--data: '" + o.data + "' is not the text this run was trained on (checksum " +
                       data_hash + ", the checkpoint has " + want + ")");
    vocab = CharVocab::from_string(meta_at(resume->metadata, "vocab", last_path));
  } else {
    vocab = CharVocab::from_text(text);
  }
  const nn::TrainValSplit split = nn::split_train_val(vocab.encode(text));
  const int64_t T = o.model.context, B = o.batch;
  check_split_fits(o, split);
  const nn::TransformerLMConfig config = make_config(o.model, vocab.size());
  // A process of rank > 0 follows rank 0's commands and writes nothing.
  if (process_comm && process_comm->rank() != 0) {
    follow_rank0(o, config, split, device, device, o.graph, resume, *process_comm, &*vote);
    RunSummary summary;
    summary.dir = dir;
    return summary;
  }

  // Output directory and the run's identity.
  std::string run_id = o.run_id;
  std::vector<LogRow> rows;
  if (resume) {
    const std::string saved_id = run_id_of(resume->metadata);
    if (!run_id.empty() && saved_id != run_id)
      throw UsageError("--resume: " + last_path + " is run " + shown_id(saved_id) + ", not " + run_id +
                       ": the directory holds another run");
    std::vector<LogRow> log_rows;
    if (fs::exists(log_path)) log_rows = read_log(log_path);
    check_run_files(dir, saved_id, log_rows);
    run_id = saved_id;
    if (run_id.empty()) {
      // Written before run ids: nothing to check it against; from now on it has one.
      run_id = new_run_id();
      progress.message(last_path + " predates run ids; the run continues as run " + run_id);
    }
    // The log up to the checkpoint: rows written after it are repeated by this run.
    const int64_t saved_step = std::stoll(meta_at(resume->metadata, "train.step", last_path));
    for (LogRow& r : log_rows)
      if (r.step <= saved_step) {
        r.run_id = run_id;
        rows.push_back(r);
      }
  } else {
    const std::vector<std::string> found = run_artifacts(dir);
    if (!found.empty()) {
      std::string list;
      for (const std::string& name : found) list += (list.empty() ? "" : ", ") + name;
      const bool resumable = fs::exists(last_path);
      throw UsageError("--out: " + dir + " already holds a run (" + list + "); " +
                       (resumable ? "continue it with --resume " + dir + " or choose" : "choose") +
                       " another directory");
    }
    if (run_id.empty()) run_id = new_run_id();
  }
  // A fresh run that fails before its first checkpoint (a bad device, out of
  // memory) leaves no files that would make --out refuse the directory.
  std::optional<FreshDirGuard> fresh_guard;
  if (!resume) fresh_guard.emplace(dir, std::vector<std::string>{"log.csv", "loss.png", "best.ckpt"}, "last.ckpt");
  fs::create_directories(dir);

  minidl::reset_peak_memory_stats(device);
  Replica replica(o, config, split, device);
  TrainModel& model = replica.model;
  nn::AdamW& optimizer = replica.optimizer;
  nn::BatchSampler& train_batches = replica.train_batches;
  // --dp N --sp M: this thread is rank 0 and writes every file; the others
  // follow it, as threads sharing `device` (in-process); on CUDA with N * M
  // GPUs (from cuda:0) and NCCL, one GPU per rank; or as processes of their
  // own (process_comm).
  const int64_t world = o.dp * o.sp;
  const bool nccl = process_comm || (world > 1 && device.is_cuda() && device.index == 0 &&
                                     dist::nccl_available() && minidl::cuda_device_count() >= world);
  // On CUDA every rank replays its step as a CUDA graph, unless --no-graph:
  // one rank, or one GPU per rank (NCCL). Virtual ranks run eagerly: their
  // in-process collectives are host rendezvous of threads sharing one stream.
  const bool graph = o.graph && device.is_cuda() && (world == 1 || nccl);
  std::optional<OtherRanks> other_ranks;
  if (world > 1 && !process_comm)
    other_ranks.emplace(world, nccl, [&](dist::Communicator& comm) {
      const Device mine = nccl ? Device::cuda(comm.rank()) : device;
      follow_rank0(o, config, split, mine, nccl ? mine : Device::cpu(), graph, resume, comm);
    });
  // The run is checked and its model built: rank 0 votes.
  if (vote && !vote->cast())
    throw std::runtime_error("charlm: another rank could not start training (its output says why)");
  dist::Communicator* comm = process_comm ? process_comm.get() : other_ranks ? &other_ranks->rank0() : nullptr;
  Ranks ranks(comm, o.sp, nccl ? device : Device::cpu());
  const nn::WarmupCosineLR schedule = lr_schedule(o);

  // Progress of the run, all saved in checkpoints.
  int64_t step = 0;
  double best_val = INFINITY;
  int64_t best_step = -1;
  double last_val = NAN;
  int64_t last_val_step = -1;
  Tensor loss_sum = ops::zeros({}, {DType::Float32, device});  // train losses since the last row
  int64_t loss_count = 0;
  // A signal stopped the evaluation of `step`: its row is still to be written.
  bool eval_pending = false;
  double elapsed_before = 0;  // seconds the run spent in earlier processes
  size_t earlier_peak_bytes = 0;

  auto train_state = [&](nn::Metadata meta) { return replica.train_state(loss_sum, std::move(meta)); };
  if (resume) {
    nn::restore_train_state(*resume, train_state({}));  // also loss_sum, in place
    const nn::Metadata& m = resume->metadata;
    step = std::stoll(meta_at(m, "train.step", last_path));
    best_val = std::stod(meta_at(m, "train.best_val_loss", last_path));
    best_step = std::stoll(meta_at(m, "train.best_step", last_path));
    last_val = std::stod(meta_at(m, "train.last_val_loss", last_path));
    loss_count = std::stoll(meta_at(m, "train.loss_count", last_path));
    // Keys added later; older checkpoints lack them.
    auto optional = [&](const char* key, const char* fallback) {
      auto it = m.find(key);
      return it == m.end() ? std::string(fallback) : it->second;
    };
    last_val_step = std::stoll(optional("train.last_val_step", "-1"));
    eval_pending = optional("train.eval_pending", "0") == "1";
    elapsed_before = std::stod(optional("train.elapsed_s", "0"));
    earlier_peak_bytes = std::stoull(optional("train.peak_memory_bytes", "0"));
  }
  ranks.attach(model);
  LogWriter log(log_path, rows);

  // Wall-clock seconds of the run so far (this process: from here on).
  const Clock::time_point segment_start = Clock::now();
  auto elapsed = [&] { return elapsed_before + seconds_since(segment_start); };
  auto peak_bytes = [&] { return std::max(earlier_peak_bytes, minidl::memory_stats(device).peak_allocated); };

  auto save = [&](const std::string& path) {
    nn::Metadata meta = recipe_metadata(o, vocab.size());
    meta[kFormatKey] = kFormatVersion;
    meta[kRunIdKey] = run_id;
    meta["vocab"] = vocab.to_string();
    meta["data.fnv1a64"] = data_hash;
    meta["train.device"] = device.is_cuda() ? "cuda" : "cpu";  // where --resume continues by default
    meta["train.step"] = std::to_string(step);
    meta["train.best_val_loss"] = format_double(best_val);
    meta["train.best_step"] = std::to_string(best_step);
    meta["train.last_val_loss"] = format_double(last_val);
    meta["train.last_val_step"] = std::to_string(last_val_step);
    meta["train.loss_count"] = std::to_string(loss_count);
    meta["train.eval_pending"] = eval_pending ? "1" : "0";
    meta["train.elapsed_s"] = format_double(elapsed());
    meta["train.peak_memory_bytes"] = std::to_string(peak_bytes());
    nn::save_train_state(path, train_state(std::move(meta)));
  };

  // Mean loss over the same eval_iters validation batches every time
  // (Replica::eval_begin). Empty when a signal stopped it (checked between
  // batches).
  auto evaluate = [&]() -> std::optional<double> {
    minidl::NoGradGuard no_grad;
    ranks.command({Ranks::Command::EvalBegin});
    replica.eval_begin();
    Tensor sum = ops::zeros({}, {DType::Float32, device});
    progress.evaluating(step, o.iters, 0, o.eval_iters);
    for (int64_t i = 0; i < o.eval_iters; ++i) {
      if (stop_signal() != 0) {
        ranks.command({Ranks::Command::EvalEnd});
        replica.eval_end();
        return std::nullopt;
      }
      ranks.command({Ranks::Command::EvalBatch});
      sum = ops::add(sum, replica.val_loss(ranks));
      progress.evaluating(step, o.iters, i + 1, o.eval_iters);
    }
    ranks.command({Ranks::Command::EvalEnd});
    replica.eval_end();
    return static_cast<double>(sum.item<float>()) / static_cast<double>(o.eval_iters);
  };

  const std::string title = (o.model.attention == "dilated" ? "dilated" : "vanilla") + std::string(" attention, ") +
                            std::to_string(o.model.layers) + "x" + std::to_string(o.model.width) +
                            ", context " + std::to_string(T);
  auto plot = [&] { write_loss_plot(rows, plot_path, title); };

  const int64_t first_step = step;
  Clock::time_point interval_start = Clock::now();
  int64_t interval_steps = 0;

  // Writes the row of `step` (the one place the host waits for the device),
  // evaluating first at evaluation steps, then checkpointing and plotting.
  // Returns false when a signal stopped the evaluation: nothing is written,
  // and the row is left to the resumed run (eval_pending).
  auto log_step = [&](bool eval_step) -> bool {
    const double train_loss =
        loss_count > 0 ? static_cast<double>(loss_sum.item<float>()) / static_cast<double>(loss_count) : NAN;
    // Read after the wait above: the host issues a replayed step in well
    // under a millisecond and runs ahead of the device until it waits.
    const double interval_seconds = seconds_since(interval_start);
    if (loss_count > 0 && !std::isfinite(train_loss))
      MINIDL_FAIL("training diverged: the mean train loss of steps ", step - loss_count + 1, "..", step,
                  " is ", train_loss, "; ", last_path, " holds the last evaluated step (try a lower --lr)");
    LogRow row{.step = step, .train_loss = train_loss, .lr = schedule.lr_at(std::max<int64_t>(step - 1, 0)),
               .run_id = run_id};
    if (interval_steps > 0) row.tokens_per_s = static_cast<double>(interval_steps * B * T) / std::max(interval_seconds, 1e-9);
    ProgressState state{.step = step, .iters = o.iters, .train_loss = train_loss, .val_loss = last_val,
                        .val_step = last_val_step, .lr = row.lr, .tokens_per_s = row.tokens_per_s};
    if (eval_step) {
      eval_pending = true;
      const std::optional<double> val = evaluate();
      if (!val) return false;
      // The weights this step left may be non-finite though the interval's
      // train losses were not: nothing of them is saved over last.ckpt.
      if (!std::isfinite(*val))
        MINIDL_FAIL("training diverged: the validation loss at step ", step, " is ", *val, "; ", last_path,
                    " holds the last evaluated step (try a lower --lr)");
      eval_pending = false;
      last_val = *val;
      last_val_step = step;
      row.val_loss = state.val_loss = last_val;
      state.val_step = step;
      if (last_val < best_val) {
        best_val = last_val;
        best_step = step;
        state.new_best = true;
        save(best_path);
      }
    }
    loss_sum = ops::zeros({}, {DType::Float32, device});
    loss_count = 0;
    row.elapsed_s = elapsed();
    rows.push_back(row);
    log.append(row);
    if (eval_step) {
      save(last_path);
      plot();
    }
    if (step > first_step)
      state.seconds_left = seconds_since(run_start) / static_cast<double>(step - first_step) *
                           static_cast<double>(o.iters - step);
    progress.update(state);
    if (eval_step) progress.keep();
    interval_start = Clock::now();
    interval_steps = 0;
    return true;
  };

  StepRunner steps(model, optimizer, train_batches, o.grad_clip, graph, &ranks);
  bool stopped_in_eval = false;
  if (!resume) {
    progress.message("training " + std::to_string(model.master().num_parameters()) + " parameters on " +
                     device.str() + " (" + o.dtype + "), vocabulary " + std::to_string(vocab.size()) +
                     ", " + std::to_string(split.train.size()) + " train / " +
                     std::to_string(split.val.size()) + " val characters -> " + dir + " (run " + run_id + ")");
    stopped_in_eval = !log_step(/*eval_step=*/true);
  } else {
    progress.message("resuming " + dir + " at step " + std::to_string(step) + " of " + std::to_string(o.iters) +
                     " on " + device.str() + " (" + o.dtype + ")" +
                     (eval_pending ? ", first redoing the interrupted evaluation" : ""));
    // The evaluation a signal stopped: an evaluation step of the stopped run,
    // whatever the intervals now.
    if (eval_pending) stopped_in_eval = !log_step(/*eval_step=*/true);
    else if (step >= o.iters)
      progress.message("already at step " + std::to_string(step) + "; pass a larger --iters to train further");
  }

  // The steps after `from` up to the next row (a log or evaluation step, or the last).
  auto steps_to_row = [&](int64_t from) {
    int64_t to = std::min(o.iters, (from / o.log_interval + 1) * o.log_interval);
    to = std::min(to, (from / o.eval_interval + 1) * o.eval_interval);
    return to - from;
  };
  while (step < o.iters && !stopped_in_eval) {
    if (stop_signal() != 0) break;
    // One step at a time, so that a signal stops the run after the step in
    // flight; NCCL ranks get the steps up to the next row at once, so that
    // they run them without a host wait (a signal then stops the run at
    // that row). In-process ranks meet on the host in every collective
    // anyway. The batch is sampled on the device and the loss adds up there:
    // the host waits only in log_step.
    const int64_t count = nccl ? steps_to_row(step) : 1;
    ranks.command({Ranks::Command::Steps, step, count});
    for (int64_t i = 0; i < count; ++i) {
      Tensor loss = steps.step(schedule.lr_at(step));
      {
        minidl::NoGradGuard no_grad;
        loss_sum = ops::add(loss_sum, loss.detach());
      }
      ++loss_count;
      ++step;
      ++interval_steps;
    }

    const bool eval_step = step % o.eval_interval == 0 || step == o.iters;
    if (step % o.log_interval != 0 && !eval_step) continue;
    if (!log_step(eval_step)) stopped_in_eval = true;
  }

  ranks.command({Ranks::Command::Stop});

  RunSummary summary;
  summary.dir = dir;
  summary.run_id = run_id;
  summary.stop_signal = stop_signal();
  if (summary.stop_signal != 0) {
    save(last_path);
    plot();
    progress.message(std::string("interrupted by ") + signal_name(summary.stop_signal) + " at step " +
                     std::to_string(step) + " of " + std::to_string(o.iters) +
                     (stopped_in_eval ? " (during its evaluation, which the resumed run redoes)" : "") + "; saved " +
                     last_path + ". Continue with: " + continue_with);
  } else if (step > first_step) {
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "done: step %lld (%lld steps in %s), final val loss %.4f, best %.4f at step %lld, "
                  "peak memory %.2f GiB",
                  static_cast<long long>(step), static_cast<long long>(step - first_step),
                  format_duration(seconds_since(run_start)).c_str(), last_val, best_val,
                  static_cast<long long>(best_step), double(peak_bytes()) / double(1ull << 30));
    progress.message(buf);
  }
  summary.step = step;
  summary.final_val_loss = last_val;
  summary.best_val_loss = best_val;
  summary.best_step = best_step;
  summary.tokens_per_s = log_tokens_per_s(rows, B * T);
  summary.peak_bytes = peak_bytes();
  summary.elapsed_seconds = elapsed();
  summary.log = rows;
  return summary;
}

void add_train_command_flags(FlagSet& flags, TrainOptions& o) {
  flags.group("data and output");
  flags.add_string("data", &o.data, "FILE", "text file to learn (split 90/10 into train/validation)");
  flags.add_string("out", &o.out, "DIR", "run directory (new or empty): log.csv, last.ckpt, best.ckpt, loss.png");
  flags.add_string("resume", &o.resume, "DIR", "continue the run in DIR from DIR/last.ckpt");
  add_model_flags(flags, o.model);
  add_training_flags(flags, o);
}

ResumedRun load_resumed_run(const std::string& dir, const FlagSet& flags, const TrainOptions& requested) {
  const std::string path = (fs::path(dir) / "last.ckpt").string();
  if (!fs::exists(path)) throw UsageError("--resume: " + path + " does not exist");
  if (requested.threads > 0) omp_set_num_threads(static_cast<int>(requested.threads));
  // Loaded on the CPU: the run's device is only known from its metadata.
  ResumedRun run{nn::load_checkpoint(path, minidl::Device::cpu()), {}};
  MINIDL_CHECK(run.checkpoint.metadata.count(kFormatKey) != 0, "charlm: ", path,
               " is not a checkpoint written by charlm train (no '", kFormatKey, "' metadata)");
  run.options = with_run_flags(flags, requested, recipe_from_metadata(run.checkpoint.metadata));
  // Without --device the run continues where it trained (the same device
  // keeps the curve bit-exact on the CPU).
  if (!flags.given("device")) {
    auto it = run.checkpoint.metadata.find("train.device");
    if (it == run.checkpoint.metadata.end()) {
      std::cerr << "[charlm] " << path << " does not record its device (an older checkpoint): --device "
                << run.options.device << " picks one\n";
    } else {
      MINIDL_CHECK(it->second == "cpu" || it->second == "cuda", "charlm: ", path,
                   " has an unknown train.device '", it->second, "'");
      if (it->second == "cuda" && !minidl::cuda_is_available())
        throw UsageError("--resume: " + dir + " trained on cuda and no CUDA device is available; add "
                         "--device cpu to continue it on the CPU");
      run.options.device = it->second;
    }
  }
  run.options.out = dir;
  // The recipe was checked when the run started; this checks the run-level changes.
  check_options(FlagSet("", "", ""), run.options);
  return run;
}

namespace {

constexpr const char* kTrainUsage =
    "--data FILE --out DIR [flags]\n       charlm train --resume DIR [--iters N] [flags]\n"
    "       charlm train --data FILE --profile N [flags]";
constexpr const char* kTrainHelp =
    "Trains a character-level transformer language model on a text file. Every\n"
    "--eval-interval steps it measures the validation loss, appends to DIR/log.csv,\n"
    "saves DIR/last.ckpt (and DIR/best.ckpt when the loss improves) and redraws\n"
    "DIR/loss.png. --out refuses a directory that already holds a run's files.\n"
    "Ctrl-C (or SIGTERM) finishes the current step (NCCL ranks: the steps up to the\n"
    "next log row) or abandons the evaluation under way, saves DIR/last.ckpt and\n"
    "exits; a second Ctrl-C quits at once.\n"
    "--resume DIR continues exactly where the run stopped, with its recipe (the\n"
    "model and optimisation flags) and its device read from the checkpoint\n"
    "(--device moves it); it refuses files of another run (each run has an id,\n"
    "in its checkpoints and log.csv). The defaults are nanoGPT's shakespeare_char\n"
    "recipe.\n"
    "--profile N writes nothing: after 3 warm-up steps it times N training steps\n"
    "of the recipe per phase (data, forward, backward, optimizer) and prints a\n"
    "table in ms per step with tokens/s; on CUDA also the host's time to issue\n"
    "each phase on an idle GPU, each phase's GPU time, the time the GPU waits for\n"
    "the host, host syncs per step, the launches of one step (kernels by name,\n"
    "memsets) and (unless --no-graph) the wall time of CUDA graph replays, as\n"
    "training runs them, with the host's time to issue one.";

}  // namespace

int cmd_train(const std::vector<std::string>& args) {
  TrainOptions options;
  int64_t profile_steps = 0;
  FlagSet flags("charlm train", kTrainUsage, kTrainHelp);
  add_train_command_flags(flags, options);
  flags.group("profiling");
  flags.add_int("profile", &profile_steps, "time this many steps per phase, print the table and exit (0: train)", 0,
                1 << 20);
  if (!flags.parse(args)) return 0;

  if (profile_steps > 0) {
    if (!options.resume.empty()) throw UsageError("--profile times a fresh model; leave --resume out");
    if (flags.given("out")) throw UsageError("--profile writes nothing; leave --out out");
    if (options.dp > 1) throw UsageError("--profile times one rank; leave --dp out");
    if (options.sp > 1) throw UsageError("--profile times one rank; leave --sp out");
    if (dist::process_rank_from_env().world > 1)
      throw UsageError("--profile times one process; leave WORLD_SIZE unset");
    if (options.data.empty()) throw UsageError("--data is required");
    check_options(flags, options);
    profile_run(options, profile_steps);
    return 0;
  }

  if (options.resume.empty()) {
    if (options.data.empty()) throw UsageError("--data is required (or --resume DIR to continue a run)");
    if (options.out.empty()) throw UsageError("--out is required (or --resume DIR to continue a run)");
    check_options(flags, options);
    const RunSummary s = train_run(options, nullptr, "");
    return s.stop_signal ? exit_code_for_signal(s.stop_signal) : 0;
  }

  // Resume: the recipe comes from the checkpoint; the command line may only
  // change how the run continues (steps, evaluation, device).
  const std::string dir = options.resume;
  if (flags.given("out") && fs::weakly_canonical(options.out) != fs::weakly_canonical(dir))
    throw UsageError("--out: a resumed run continues in its own directory " + dir + "; leave --out out");
  const ResumedRun run = load_resumed_run(dir, flags, options);
  check_resume_flags(flags, options, recipe_from_metadata(run.checkpoint.metadata));
  const RunSummary s = train_run(run.options, &run.checkpoint, "");
  return s.stop_signal ? exit_code_for_signal(s.stop_signal) : 0;
}

}  // namespace charlm