#include "train.h"

#include <omp.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
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
#include <thread>

#include "dist/communicator.h"
#include "dist/launch.h"
#include "dist/nccl.h"
#include "nn/data_parallel.h"
#include "ops/seq_parallel.h"
#include "profile.h"
#include "progress.h"
#include "signals.h"
#include "vocab.h"

namespace charlm {

namespace fs = std::filesystem;
namespace dist = minidl::dist;
namespace nn = minidl::nn;
namespace ops = minidl::ops;
using minidl::Device;
using minidl::DType;
using minidl::Tensor;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kFormatKey = "charlm.format";
constexpr const char* kFormatVersion = "1";
// The run's id, also in every row of its log.csv (absent in checkpoints of older charlm).
constexpr const char* kRunIdKey = "run.id";

// Distinct Philox keys for the batch streams, derived from --seed (the model
// uses the seed itself for its initialisation and dropout streams).
uint64_t train_batch_seed(uint64_t seed) { return seed * 0x9e3779b97f4a7c15ull + 0x747261696eull; }
uint64_t val_batch_seed(uint64_t seed) { return seed * 0x9e3779b97f4a7c15ull + 0x76616cull; }

std::string hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

const std::string& meta_at(const nn::Metadata& meta, const std::string& key, const std::string& path) {
  auto it = meta.find(key);
  MINIDL_CHECK(it != meta.end(), "charlm: ", path, " has no metadata '", key,
               "' (not a checkpoint written by charlm train?)");
  return it->second;
}

// The model being trained. With --dtype bfloat16 the library's mixed
// precision (nn::MixedPrecision) owns it: the optimizer updates float32
// masters and writes their bfloat16 copy, which runs forward and backward.
// With float32 the master model runs directly.
class TrainModel {
 public:
  TrainModel(const nn::TransformerLMConfig& config, uint64_t seed, Device device, bool bf16)
      : master_(std::make_shared<nn::TransformerLM>(config, seed)), compute_(master_) {
    // Built on the CPU and moved, so the initial weights do not depend on the device.
    master_->to(device);
    if (bf16) {
      compute_ = std::make_shared<nn::TransformerLM>(config, seed);
      mixed_ = std::make_unique<nn::MixedPrecision>(master_, compute_);
    }
  }

  nn::TransformerLM& master() { return *master_; }
  // The model that runs forward; its dropout stream is the run's.
  nn::TransformerLM& compute() { return *compute_; }
  nn::MixedPrecision* mixed_precision() { return mixed_.get(); }
  const std::vector<Tensor>& parameters() { return mixed_ ? mixed_->parameters() : master_params(); }
  // Call once the optimizer over master().parameters() exists.
  void attach(nn::Optimizer& optimizer) {
    if (mixed_) mixed_->attach(optimizer);
  }

  // Mean cross-entropy of the next-character predictions (in float32).
  Tensor loss(const Tensor& x, const Tensor& y) {
    Tensor logits = compute().forward(x);
    if (logits.dtype() != DType::Float32) logits = ops::to(logits, DType::Float32);
    const int64_t n = x.numel();
    return ops::cross_entropy(logits.reshape({n, logits.size(-1)}), y.reshape({n}));
  }

  // After backward: the masters' gradients (a no-op for float32).
  void gradients_to_masters() {
    if (mixed_) mixed_->gradients_to_masters();
  }

 private:
  const std::vector<Tensor>& master_params() {
    if (params_.empty()) params_ = master_->parameters();
    return params_;
  }
  std::shared_ptr<nn::TransformerLM> master_, compute_;
  std::unique_ptr<nn::MixedPrecision> mixed_;
  std::vector<Tensor> params_;
};

// This rank's part in data parallelism (--dp N) and sequence parallelism
// (--sp M), over a world of N * M ranks (world rank = dp index * M + sp
// index): every rank draws the same global batch and computes on its block
// of it: batch / N rows (its dp index), and of each row context / M
// consecutive positions (its sp index), which the model runs at their global
// positions with attention across the M ranks of its sp group
// (nn::TransformerLM::set_sequence_parallel). DataParallel averages the
// gradients over all N * M ranks (each rank's gradient holds what its chunk's
// keys and values did for the other chunks' losses, returned by the
// attention's backward, so the average is that of the global mean loss), and
// losses are averaged over the ranks (blocks of equal size), so the run
// equals one rank on the global batch up to float rounding (dropout masks are
// each rank's own). Without a communicator (one rank) everything is a no-op.
// `messages`: where rank 0's commands travel (the CPU for the in-process
// backend; the rank's GPU for NCCL, which moves device memory only).
class Ranks {
 public:
  enum class Command { Step, EvalBegin, EvalBatch, EvalEnd, Stop };

  // Collective when comm is given (the sp split): every rank constructs one.
  Ranks(dist::Communicator* comm, int64_t sp = 1, Device messages = Device::cpu())
      : comm_(comm), sp_(sp), messages_(messages) {
    if (comm_ && sp_ > 1) sp_comm_ = comm_->split(comm_->rank() / static_cast<int>(sp_), comm_->rank());
  }
  // Once the model holds its initial (or restored) weights, on every rank:
  // averages its gradients from now on; rank 0's weights everywhere (equal
  // already: same seed or same checkpoint); ranks > 0 draw their own dropout;
  // with --sp, the model runs this rank's chunk across its sp group.
  void attach(TrainModel& model) {
    if (!comm_) return;
    dp_ = std::make_unique<nn::DataParallel>(model.parameters(), *comm_);
    dp_->broadcast_parameters();
    minidl::Generator& dropout = model.compute().dropout_generator();
    if (comm_->rank() > 0)
      dropout.set_state(dropout.seed() ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(comm_->rank())),
                        dropout.offset());
    if (sp_comm_) {
      // Every sequence is block_size long (--context, a multiple of --sp):
      // the attention is given the even split and exchanges no chunk sizes.
      const ops::SequenceLayout layout =
          ops::SequenceLayout::even(model.compute().config().block_size, sp_comm_->size());
      model.compute().set_sequence_parallel({*sp_comm_, layout});
    }
  }
  // This rank's block of a global batch (B, T): its rows, and with --sp its
  // chunk of their positions.
  Tensor rows(const Tensor& t) const {
    if (!comm_) return t;
    const int64_t dp = comm_->size() / sp_, n = t.size(0) / dp;
    Tensor mine = t.narrow(0, comm_->rank() / sp_ * n, n);
    if (sp_comm_) {
      const int64_t chunk = t.size(1) / sp_;
      mine = mine.narrow(1, sp_comm_->rank() * chunk, chunk);
    }
    return mine.contiguous();
  }
  // The mean over ranks of a per-rank mean loss.
  Tensor mean(const Tensor& loss) const {
    if (!comm_) return loss;
    minidl::NoGradGuard no_grad;
    Tensor m = loss.detach().clone();
    comm_->all_reduce(m);
    ops::mul_(m, 1.0 / comm_->size());
    return m;
  }
  void all_reduce_gradients() {
    if (dp_) dp_->all_reduce_gradients();
  }
  // Rank 0 tells the other ranks what it does next (follow_rank0); the
  // others call it without arguments to hear it.
  std::pair<Command, double> command(Command c = Command::Stop, double arg = 0) const {
    if (!comm_) return {c, arg};
    Tensor msg = minidl::from_vector<double>({static_cast<double>(c), arg}, {2}).to(messages_);
    comm_->broadcast(msg, 0);
    const std::vector<double> v = msg.to_vector<double>();
    return {static_cast<Command>(static_cast<int>(v[0])), v[1]};
  }

 private:
  dist::Communicator* comm_;
  int64_t sp_;
  Device messages_;
  std::unique_ptr<dist::Communicator> sp_comm_;  // this rank's sp group (--sp > 1)
  std::unique_ptr<nn::DataParallel> dp_;
};

// Forward, backward, clipping and the update on the batch (x, y) (with --dp,
// on this rank's rows of it). Returns the loss (the mean over ranks), left on
// the device: nothing here waits for it. `end` (may be empty) marks where the
// work of each phase ends.
Tensor step_on_batch(TrainModel& model, nn::AdamW& optimizer, const Tensor& x, const Tensor& y, double grad_clip,
                     const std::function<void(Phase)>& end, Ranks* ranks = nullptr) {
  auto mark = [&end](Phase phase) {
    if (end) end(phase);
  };
  Tensor loss = ranks ? model.loss(ranks->rows(x), ranks->rows(y)) : model.loss(x, y);
  mark(Phase::Forward);
  optimizer.zero_grad();  // drops the gradients: backward writes fresh ones
  loss.backward();
  model.gradients_to_masters();
  if (ranks) ranks->all_reduce_gradients();
  mark(Phase::Backward);
  if (grad_clip > 0) nn::clip_grad_norm_(model.parameters(), grad_clip);
  optimizer.step();  // also writes the bfloat16 copy (MixedPrecision::attach)
  mark(Phase::Optimizer);
  return ranks ? ranks->mean(loss) : loss;
}

// One optimisation step at learning rate `lr`, eagerly. `profiler` (may be
// null) marks where the work of each phase ends.
Tensor train_step(TrainModel& model, nn::AdamW& optimizer, nn::BatchSampler& batches, double lr, double grad_clip,
                  StepProfiler* profiler, Ranks* ranks = nullptr) {
  if (profiler) profiler->begin_step();
  auto [x, y] = batches.next();
  optimizer.set_lr(lr);  // a device scalar the update reads
  if (profiler) profiler->end_phase(Phase::Data);
  std::function<void(Phase)> end;
  if (profiler) end = [profiler](Phase phase) { profiler->end_phase(phase); };
  return step_on_batch(model, optimizer, x, y, grad_clip, end, ranks);
}

// The training steps of a run: eager, or on CUDA with the graph on, the
// first step eager (its lazy setup must not happen during a capture) and
// every later one a replay of one CUDA graph of step_on_batch. The graph
// reads its batch from static buffers (the first batch's tensors), which each
// step refills from the sampler, and draws dropout from the model's
// generator at device-side offsets: the same masks and batches as eager.
class StepRunner {
 public:
  StepRunner(TrainModel& model, nn::AdamW& optimizer, nn::BatchSampler& batches, double grad_clip, bool graph,
             Ranks* ranks = nullptr)
      : model_(model), optimizer_(optimizer), batches_(batches), grad_clip_(grad_clip), ranks_(ranks) {
    if (graph)
      graph_ = std::make_unique<nn::CudaGraph>(std::vector<minidl::Generator*>{&model.compute().dropout_generator()});
  }

  // The loss of the step, on the device. With the graph it is the graph's
  // output tensor, which the next step overwrites: read it before then.
  Tensor step(double lr) {
    if (!graph_) return train_step(model_, optimizer_, batches_, lr, grad_clip_, nullptr, ranks_);
    auto [x, y] = batches_.next();
    optimizer_.set_lr(lr);
    if (!x_.defined()) {
      x_ = x;
      y_ = y;
      return step_on_batch(model_, optimizer_, x_, y_, grad_clip_, {});
    }
    ops::copy_(x_, x);
    ops::copy_(y_, y);
    if (!graph_->captured()) {
      try {
        graph_->capture([this] { loss_ = step_on_batch(model_, optimizer_, x_, y_, grad_clip_, {}); });
      } catch (const minidl::Error& e) {
        MINIDL_FAIL(e.what(), " (charlm: --no-graph trains without CUDA graphs)");
      }
    }
    graph_->replay();
    return loss_;
  }

 private:
  TrainModel& model_;
  nn::AdamW& optimizer_;
  nn::BatchSampler& batches_;
  double grad_clip_;
  Ranks* ranks_;
  std::unique_ptr<nn::CudaGraph> graph_;
  Tensor x_, y_, loss_;  // the graph's static input and output
};

// What each rank trains: the model, its optimizer and the batch streams
// (with --dp every rank draws the global batches).
struct Replica {
  Replica(const TrainOptions& o, const nn::TransformerLMConfig& config, const nn::TrainValSplit& split, Device device)
      : seed(o.seed),
        model(config, o.seed, device, o.dtype == "bfloat16"),
        optimizer(nn::weight_decay_groups(model.master(), o.weight_decay),
                  {.lr = o.lr, .beta1 = o.beta1, .beta2 = o.beta2}),
        train_batches(split.train, o.batch, o.model.context, train_batch_seed(o.seed), device, "train"),
        val_batches(split.val, o.batch, o.model.context, val_batch_seed(o.seed), device, "val") {
    model.attach(optimizer);
  }

  // Everything a resumed run needs, saved and restored as one train state.
  nn::TrainState train_state(const Tensor& loss_sum, nn::Metadata meta) {
    nn::StateDict extra;
    extra.insert("train.loss_sum", loss_sum);
    return nn::TrainState{.model = model.mixed_precision() ? nullptr : &model.master(),
                          .mixed_precision = model.mixed_precision(),
                          .optimizer = &optimizer,
                          .generators = {{"train", &train_batches.generator()},
                                         {"dropout", &model.compute().dropout_generator()}},
                          .tensors = extra,
                          .metadata = std::move(meta)};
  }

  // An evaluation: the same validation batches every time (the stream
  // restarts), so evaluations are comparable and need no saved state.
  void eval_begin() {
    model.compute().eval();
    val_batches.generator().set_state(val_batch_seed(seed), 0);
  }
  // The mean loss of the next validation batch (over the ranks).
  Tensor val_loss(const Ranks& ranks) {
    auto [x, y] = val_batches.next();
    return ranks.mean(model.loss(ranks.rows(x), ranks.rows(y)));
  }
  void eval_end() { model.compute().train(); }

  uint64_t seed;
  TrainModel model;
  nn::AdamW optimizer;
  nn::BatchSampler train_batches, val_batches;
};

// Several processes: every rank votes once, before the run's first
// collectives, whether it can train (rank 0: the run's directory and
// checkpoint checked, its model built; the others: their data read, their
// model built and restored); all go on only if all can. Destroyed without a
// vote (its rank threw first), it votes no, so that the others stop instead
// of waiting in a collective for ever.
class StartVote {
 public:
  StartVote(dist::Communicator& comm, Device device) : comm_(comm), device_(device) {}
  ~StartVote() {
    if (cast_) return;
    try {
      exchange(0);
    } catch (...) {
      // Already failing: the others are left to NCCL's own error handling.
    }
  }
  StartVote(const StartVote&) = delete;
  StartVote& operator=(const StartVote&) = delete;
  // This rank can train: whether every rank can.
  bool cast() {
    cast_ = true;
    return exchange(1) == comm_.size();
  }

 private:
  double exchange(double ok) {
    Tensor votes = minidl::from_vector<double>({ok}, {1}).to(device_);
    comm_.all_reduce(votes);
    return votes.to_vector<double>()[0];
  }
  dist::Communicator& comm_;
  Device device_;
  bool cast_ = false;
};

// Ranks 1..N-1 of --dp N: a replica each, doing what rank 0 announces.
// `device`: this rank's (with NCCL, its own GPU); `messages`: see Ranks;
// `vote`: several processes' start vote (StartVote), cast once the replica is built.
void follow_rank0(const TrainOptions& o, const nn::TransformerLMConfig& config, const nn::TrainValSplit& split,
                  Device device, Device messages, const nn::Checkpoint* resume, dist::Communicator& comm,
                  StartVote* vote = nullptr) {
  if (o.threads > 0) omp_set_num_threads(static_cast<int>(o.threads));  // per thread too
  Replica replica(o, config, split, device);
  if (resume) nn::restore_train_state(*resume, replica.train_state(ops::zeros({}, {DType::Float32, device}), {}));
  if (vote && !vote->cast()) return;  // another rank cannot start (rank 0 says why, or the failing rank)
  Ranks ranks(&comm, o.sp, messages);
  ranks.attach(replica.model);
  for (;;) {
    auto [command, lr] = ranks.command();
    switch (command) {
      case Ranks::Command::Step:
        train_step(replica.model, replica.optimizer, replica.train_batches, lr, o.grad_clip, nullptr, &ranks);
        break;
      case Ranks::Command::EvalBegin: replica.eval_begin(); break;
      case Ranks::Command::EvalBatch: {
        minidl::NoGradGuard no_grad;
        replica.val_loss(ranks);
        break;
      }
      case Ranks::Command::EvalEnd: replica.eval_end(); break;
      case Ranks::Command::Stop: return;
    }
  }
}

// The other ranks of --dp N --sp M (N * M > 1), on threads of their own
// until destroyed. train_run's thread is rank 0: it uses the communicator of
// the backend's rank 0, whose function only waits for this object's
// destruction. The backend: NCCL, one GPU per rank (GPUs 0..N*M-1), when
// `nccl`; else in-process (CPU ranks, or virtual ranks sharing one GPU). A
// rank's failure reaches rank 0 through its next collective (in-process; an
// NCCL collective cannot be abandoned, so there a failure may hang the
// others); rank 0's failure (destruction during an exception) ends the others'.
class OtherRanks {
 public:
  OtherRanks(int64_t n, bool nccl, std::function<void(dist::Communicator&)> follow) {
    thread_ = std::thread([this, n, nccl, follow = std::move(follow)] {
      try {
        auto run = nccl ? dist::run_nccl : dist::run_in_process;
        run(static_cast<int>(n), [&](dist::Communicator& comm) {
          if (comm.rank() != 0) return follow(comm);
          std::unique_lock<std::mutex> lock(mu_);
          rank0_ = &comm;
          cv_.notify_all();
          cv_.wait(lock, [&] { return released_; });
          if (failed_) throw std::runtime_error("charlm: rank 0 stopped with an error");
        });
      } catch (...) {
        // Rank 0's own collectives have reported it, or rank 0 failed first.
      }
    });
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return rank0_ != nullptr; });
  }
  ~OtherRanks() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = true;
      failed_ = std::uncaught_exceptions() > exceptions_;
    }
    cv_.notify_all();
    thread_.join();
  }
  OtherRanks(const OtherRanks&) = delete;
  OtherRanks& operator=(const OtherRanks&) = delete;

  dist::Communicator& rank0() { return *rank0_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  dist::Communicator* rank0_ = nullptr;
  bool released_ = false, failed_ = false;
  const int exceptions_ = std::uncaught_exceptions();
  std::thread thread_;
};

// Launched as one of several processes (WORLD_SIZE > 1 in the environment):
// this process is rank RANK of the --dp x --sp ranks, on its node's GPU
// LOCAL_RANK, joined to the others through NCCL (the unique id through the
// file $MINIDL_NCCL_ID_FILE). Null when launched alone.
std::unique_ptr<dist::Communicator> join_process_ranks(const TrainOptions& o, Device* device) {
  const dist::ProcessRank me = dist::process_rank_from_env();
  if (me.world <= 1) return nullptr;
  if (me.world != o.dp * o.sp)
    throw UsageError("WORLD_SIZE=" + std::to_string(me.world) + " processes, but --dp " + std::to_string(o.dp) +
                     " --sp " + std::to_string(o.sp) + " make " + std::to_string(o.dp * o.sp) +
                     " ranks: launch one process per rank");
  if (o.device == "cpu" || !minidl::cuda_is_available() || !dist::nccl_available())
    throw UsageError("WORLD_SIZE=" + std::to_string(me.world) +
                     ": several processes train on CUDA through NCCL (this build or machine has " +
                     (!minidl::cuda_is_available() ? "no CUDA device"
                      : o.device == "cpu"           ? "--device cpu, given or resumed from a CPU run: add --device cuda"
                                                    : "no NCCL") +
                     "); on one machine, leave WORLD_SIZE unset: --dp/--sp run the ranks as threads");
  *device = Device::cuda(me.local);
  return dist::nccl_from_env();
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
    const std::string& want = meta_at(resume->metadata, "data.fnv1a64", last_path);
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
    follow_rank0(o, config, split, device, device, resume, *process_comm, &*vote);
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
  std::optional<OtherRanks> other_ranks;
  if (world > 1 && !process_comm)
    other_ranks.emplace(world, nccl, [&](dist::Communicator& comm) {
      const Device mine = nccl ? Device::cuda(comm.rank()) : device;
      follow_rank0(o, config, split, mine, nccl ? mine : Device::cpu(), resume, comm);
    });
  // The run is checked and its model built: rank 0 votes.
  if (vote && !vote->cast())
    throw std::runtime_error("charlm: another rank could not start training (its output says why)");
  dist::Communicator* comm = process_comm ? process_comm.get() : other_ranks ? &other_ranks->rank0() : nullptr;
  Ranks ranks(comm, o.sp, nccl ? device : Device::cpu());
  const int64_t decay_iters = o.decay_iters > 0 ? o.decay_iters : o.iters;
  const nn::WarmupCosineLR schedule(o.lr, o.min_lr, o.warmup, decay_iters);

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
    ranks.command(Ranks::Command::EvalBegin);
    replica.eval_begin();
    Tensor sum = ops::zeros({}, {DType::Float32, device});
    progress.evaluating(step, o.iters, 0, o.eval_iters);
    for (int64_t i = 0; i < o.eval_iters; ++i) {
      if (stop_signal() != 0) {
        ranks.command(Ranks::Command::EvalEnd);
        replica.eval_end();
        return std::nullopt;
      }
      ranks.command(Ranks::Command::EvalBatch);
      sum = ops::add(sum, replica.val_loss(ranks));
      progress.evaluating(step, o.iters, i + 1, o.eval_iters);
    }
    ranks.command(Ranks::Command::EvalEnd);
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

  // With several ranks the steps run eagerly. The sequence-parallel
  // attention no longer waits on the host (it is given its layout), but the
  // in-process collectives are host rendezvous of threads that share one
  // stream (virtual ranks cannot each capture their step), and capturing a
  // multi-GPU NCCL step (data-parallel reductions included) is not tested.
  StepRunner steps(model, optimizer, train_batches, o.grad_clip, o.graph && device.is_cuda() && world == 1, &ranks);
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

  while (step < o.iters && !stopped_in_eval) {
    if (stop_signal() != 0) break;
    // The batch is sampled on the device and the loss adds up there: the
    // host waits only in log_step.
    ranks.command(Ranks::Command::Step, schedule.lr_at(step));
    Tensor loss = steps.step(schedule.lr_at(step));
    {
      minidl::NoGradGuard no_grad;
      loss_sum = ops::add(loss_sum, loss.detach());
    }
    ++loss_count;
    ++step;
    ++interval_steps;

    const bool eval_step = step % o.eval_interval == 0 || step == o.iters;
    if (step % o.log_interval != 0 && !eval_step) continue;
    if (!log_step(eval_step)) stopped_in_eval = true;
  }

  ranks.command(Ranks::Command::Stop);

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
    "Ctrl-C (or SIGTERM) finishes the current step or abandons the evaluation under\n"
    "way, saves DIR/last.ckpt and exits; a second Ctrl-C quits at once.\n"
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

constexpr int64_t kProfileWarmupSteps = 3;

std::string ms_cell(double ms, bool valid) {
  char buf[32];
  if (valid) std::snprintf(buf, sizeof buf, "%10.3f", ms);
  else std::snprintf(buf, sizeof buf, "%10s", "n/a");
  return buf;
}

// charlm train --profile N: the recipe's steps, timed per phase (profile.h).
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
  const nn::WarmupCosineLR schedule(o.lr, o.min_lr, o.warmup, o.decay_iters > 0 ? o.decay_iters : o.iters);
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
      line += " " + ms_cell(total ? issued.device.total() : issued.device.ms[p], issued.device_valid);
      line += " " + ms_cell(total ? held.device.total() : held.device.ms[p], held.device_valid);
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
