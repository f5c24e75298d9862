#include "parallel.h"

#include <omp.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "dist/launch.h"
#include "dist/nccl.h"
#include "ops/seq_parallel.h"

namespace charlm {

namespace dist = minidl::dist;
namespace nn = minidl::nn;
namespace ops = minidl::ops;
using minidl::Device;
using minidl::DType;
using minidl::Tensor;

Ranks::Ranks(dist::Communicator* comm, int64_t sp, Device messages) : comm_(comm), sp_(sp), messages_(messages) {
  if (comm_ && sp_ > 1) sp_comm_ = comm_->split(comm_->rank() / static_cast<int>(sp_), comm_->rank());
}

void Ranks::attach(TrainModel& model) {
  if (!comm_) return;
  if (nn::MixedPrecision* mixed = model.mixed_precision()) {
    // The compute model's bfloat16 gradients are reduced during backward, in
    // float32 (the same sums as the masters' after backward, but beside it),
    // and their means then go to the masters.
    dp_ = std::make_unique<nn::DataParallel>(mixed->compute().parameters(), *comm_,
                                             nn::DataParallelOptions{.reduce_dtype = DType::Float32});
    for (const Tensor& p : mixed->parameters()) comm_->broadcast(p, 0);
    mixed->sync_compute();
  } else {
    dp_ = std::make_unique<nn::DataParallel>(model.parameters(), *comm_);
    dp_->broadcast_parameters();
  }
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

Tensor Ranks::rows(const Tensor& t) const {
  if (!comm_) return t;
  const int64_t dp = comm_->size() / sp_, n = t.size(0) / dp;
  Tensor mine = t.narrow(0, comm_->rank() / sp_ * n, n);
  if (sp_comm_) {
    const int64_t chunk = t.size(1) / sp_;
    mine = mine.narrow(1, sp_comm_->rank() * chunk, chunk);
  }
  return mine.contiguous();
}

Tensor Ranks::mean(const Tensor& loss) const {
  if (!comm_) return loss;
  minidl::NoGradGuard no_grad;
  Tensor m = loss.detach().clone();
  comm_->all_reduce(m);
  ops::mul_(m, 1.0 / comm_->size());
  return m;
}

Ranks::Order Ranks::command(const Order& order) const {
  if (!comm_) return order;
  // Step numbers travel exactly as doubles (below 2^53).
  Tensor msg = minidl::from_vector<double>({static_cast<double>(order.command), static_cast<double>(order.first),
                                            static_cast<double>(order.count)},
                                           {3})
                   .to(messages_);
  comm_->broadcast(msg, 0);
  const std::vector<double> v = msg.to_vector<double>();
  return {static_cast<Command>(static_cast<int>(v[0])), static_cast<int64_t>(v[1]), static_cast<int64_t>(v[2])};
}

Replica::Replica(const TrainOptions& o, const nn::TransformerLMConfig& config, const nn::TrainValSplit& split,
                 Device device)
    : seed(o.seed),
      model(config, o.seed, device, o.dtype == "bfloat16"),
      optimizer(nn::weight_decay_groups(model.master(), o.weight_decay),
                {.lr = o.lr, .beta1 = o.beta1, .beta2 = o.beta2}),
      train_batches(split.train, o.batch, o.model.context, train_batch_seed(o.seed), device, "train"),
      val_batches(split.val, o.batch, o.model.context, val_batch_seed(o.seed), device, "val") {
  model.attach(optimizer);
}

nn::TrainState Replica::train_state(const Tensor& loss_sum, nn::Metadata meta) {
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

void Replica::eval_begin() {
  model.compute().eval();
  val_batches.generator().set_state(val_batch_seed(seed), 0);
}

Tensor Replica::val_loss(const Ranks& ranks) {
  auto [x, y] = val_batches.next();
  return ranks.mean(model.loss(ranks.rows(x), ranks.rows(y)));
}

StartVote::~StartVote() {
  if (cast_) return;
  try {
    exchange(0);
  } catch (...) {
    // Already failing: the others are left to NCCL's own error handling.
  }
}

bool StartVote::cast() {
  cast_ = true;
  return exchange(1) == comm_.size();
}

double StartVote::exchange(double ok) {
  Tensor votes = minidl::from_vector<double>({ok}, {1}).to(device_);
  comm_.all_reduce(votes);
  return votes.to_vector<double>()[0];
}

void follow_rank0(const TrainOptions& o, const nn::TransformerLMConfig& config, const nn::TrainValSplit& split,
                  Device device, Device messages, bool graph, const nn::Checkpoint* resume, dist::Communicator& comm,
                  StartVote* vote) {
  if (o.threads > 0) omp_set_num_threads(static_cast<int>(o.threads));  // per thread too
  Replica replica(o, config, split, device);
  if (resume) nn::restore_train_state(*resume, replica.train_state(ops::zeros({}, {DType::Float32, device}), {}));
  if (vote && !vote->cast()) return;  // another rank cannot start (rank 0 says why, or the failing rank)
  Ranks ranks(&comm, o.sp, messages);
  ranks.attach(replica.model);
  StepRunner steps(replica.model, replica.optimizer, replica.train_batches, o.grad_clip, graph, &ranks);
  const nn::WarmupCosineLR schedule = lr_schedule(o);
  for (;;) {
    const Ranks::Order order = ranks.listen();
    switch (order.command) {
      case Ranks::Command::Steps:
        for (int64_t step = order.first; step < order.first + order.count; ++step) steps.step(schedule.lr_at(step));
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

OtherRanks::OtherRanks(int64_t n, bool nccl, std::function<void(dist::Communicator&)> follow) {
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
      // Rank 0's own collectives have reported it, or rank 0 failed first;
      // but a failure before rank 0 ever ran (the communicators' set-up, e.g.
      // NCCL's init) is the constructor's to report.
      std::lock_guard<std::mutex> lock(mu_);
      if (!rank0_) start_error_ = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mu_);
    ended_ = true;
    cv_.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return rank0_ != nullptr || ended_; });
  if (rank0_) return;
  lock.unlock();
  thread_.join();
  if (start_error_) std::rethrow_exception(start_error_);
  throw std::runtime_error("charlm: the ranks ended before rank 0 started");
}

OtherRanks::~OtherRanks() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    failed_ = std::uncaught_exceptions() > exceptions_;
  }
  cv_.notify_all();
  thread_.join();
}

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

}  // namespace charlm
