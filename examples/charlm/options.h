#pragma once
// The settings of a training run (model shape, optimisation, evaluation,
// device), their command-line flags, and their round trip through checkpoint
// metadata so that a resumed run uses exactly the recipe it started with.
#include <cstdint>
#include <string>
#include <vector>

#include "args.h"
#include "minidl.h"

namespace charlm {

struct ModelOptions {
  int64_t layers = 6;
  int64_t heads = 6;
  int64_t width = 384;    // n_embd
  int64_t context = 256;  // block_size
  double dropout = 0.2;
  std::string attention = "vanilla";  // vanilla | dilated
  std::vector<int64_t> segments = {64, 128, 256};
  std::vector<int64_t> dilations = {1, 2, 4};
  std::string attention_dropout = "per_copy";  // per_copy | per_pair (nn::DilatedAttention's "dropout")
  std::string pos = "learned";  // learned | rope
};

// Defaults: nanoGPT's shakespeare_char recipe.
struct TrainOptions {
  std::string data, out, resume;
  ModelOptions model;
  int64_t batch = 64;
  int64_t iters = 5000;
  double lr = 1e-3;
  double min_lr = 1e-4;
  int64_t warmup = 100;
  int64_t decay_iters = 0;  // cosine decay ends here; 0 = iters
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.99;
  double grad_clip = 1.0;  // 0 = no clipping
  int64_t eval_interval = 250;
  int64_t eval_iters = 200;
  int64_t log_interval = 10;
  uint64_t seed = 1337;
  std::string device = "auto";  // auto | cpu | cuda
  std::string dtype = "float32";
  int64_t threads = 0;  // CPU threads; 0 = OpenMP's default
  // Data-parallel ranks (on the CPU: threads of this process), each on
  // batch / dp of the global --batch; a run-level flag (resume may change it).
  int64_t dp = 1;
  // Sequence-parallel ranks per data-parallel rank (on the CPU: threads of
  // this process), each on context / sp consecutive positions of every
  // sequence; dp * sp ranks in all; a run-level flag like dp.
  int64_t sp = 1;
  bool graph = true;    // CUDA: each step after the first replays one CUDA graph (--no-graph: eager)
  // The run's id (checkpoints, log.csv); empty: a fresh run draws a new one.
  std::string run_id;
};

// Registers the model-shape flags (--layers ... --pos); `with_attention`
// adds --attention (compare trains both kinds and leaves it out).
void add_model_flags(FlagSet& flags, ModelOptions& model, bool with_attention = true);
// Optimisation, evaluation and run flags (--batch ... --threads).
void add_training_flags(FlagSet& flags, TrainOptions& options);

// Cross-flag checks after parsing (dilated settings, head dims, intervals);
// throws UsageError naming the flag.
void check_options(const FlagSet& flags, const TrainOptions& options);

// The model config for a vocabulary of `vocab_size`. Throws UsageError when
// this build of minidl lacks what the flags ask for (the "dilated" attention
// or rotary position embeddings).
minidl::nn::TransformerLMConfig make_config(const ModelOptions& model, int64_t vocab_size);

// "cpu" or "cuda" for --device auto|cpu|cuda; throws UsageError when CUDA is
// asked for and unavailable.
minidl::Device resolve_device(const std::string& device);

// Checkpoint metadata of the recipe: the model config ("model.*") and the
// training settings ("train.*", "data.path").
minidl::nn::Metadata recipe_metadata(const TrainOptions& options, int64_t vocab_size);
// The recipe stored in a checkpoint (device, threads, out and resume are left
// at their defaults; the resuming command reads "train.device" itself). Throws minidl::Error naming a missing or bad key.
TrainOptions recipe_from_metadata(const minidl::nn::Metadata& metadata);
// Throws UsageError for each flag given on the command line whose value
// differs from the checkpoint's recipe (a resumed run keeps its recipe, so
// that its curve continues the original one); the run-level flags
// (with_run_flags) may change.
void check_resume_flags(const FlagSet& flags, const TrainOptions& requested,
                        const TrainOptions& recipe);

// `recipe` with the run-level flags given on the command line (--data,
// --iters, --eval-interval, --eval-iters, --log-interval, --device, --dtype,
// --threads, --dp, --sp, --no-graph) taken from `requested`: what a resumed run may change.
TrainOptions with_run_flags(const FlagSet& flags, const TrainOptions& requested, TrainOptions recipe);

std::string format_double(double v);  // shortest text that reads back exactly

}  // namespace charlm
