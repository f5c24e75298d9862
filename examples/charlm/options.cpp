#include "options.h"

#include <algorithm>
#include <filesystem>
#include <sstream>

namespace charlm {

namespace nn = minidl::nn;

std::string format_double(double v) {
  // The shortest of %.1g ... %.17g that reads back to the same double.
  for (int precision = 1; precision <= 17; ++precision) {
    std::ostringstream os;
    os.precision(precision);
    os << v;
    if (std::stod(os.str()) == v) return os.str();
  }
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

void add_model_flags(FlagSet& flags, ModelOptions& m, bool with_attention) {
  flags.group("model");
  flags.add_int("layers", &m.layers, "transformer blocks", 1, 1024);
  flags.add_int("heads", &m.heads, "attention heads (must divide --width)", 1, 1024);
  flags.add_int("width", &m.width, "embedding width n_embd", 1, 65536);
  flags.add_int("context", &m.context, "context length in characters (block size)", 1, 1 << 24);
  flags.add_double("dropout", &m.dropout, "dropout probability", 0, 0.95);
  if (with_attention)
    flags.add_choice("attention", &m.attention, {"vanilla", "dilated"},
                     "attention layer: vanilla causal or LongNet dilated");
  flags.add_int_list("segments", &m.segments, "dilated attention: segment length of each branch");
  flags.add_int_list("dilations", &m.dilations, "dilated attention: dilation of each branch");
  flags.add_choice("attention-dropout", &m.attention_dropout, {"per_copy", "per_pair"},
                   "dilated attention: dropout of a pair nested branches share, per branch copy or once per "
                   "pair (docs/dilated-attention.md)");
  flags.add_choice("pos", &m.pos, {"learned", "rope"},
                   "positions: learned embedding table or rotary (RoPE)");
}

void add_training_flags(FlagSet& flags, TrainOptions& o) {
  flags.group("optimisation (AdamW, linear warmup then cosine decay)");
  flags.add_int("batch", &o.batch, "sequences per step", 1, 1 << 20);
  flags.add_int("iters", &o.iters, "optimizer steps in total", 1);
  flags.add_double("lr", &o.lr, "peak learning rate", 0, 10, /*min_exclusive=*/true);
  flags.add_double("min-lr", &o.min_lr, "learning rate at the end of the decay", 0, 10);
  flags.add_int("warmup", &o.warmup, "linear warmup steps", 0);
  flags.add_int("decay-iters", &o.decay_iters, "step where the cosine decay ends (0: --iters)", 0);
  flags.add_double("weight-decay", &o.weight_decay, "AdamW weight decay of Linear weight matrices", 0, 10);
  flags.add_double("beta1", &o.beta1, "AdamW beta1", 0, 0.999999);
  flags.add_double("beta2", &o.beta2, "AdamW beta2", 0, 0.999999);
  flags.add_double("grad-clip", &o.grad_clip, "clip the gradient norm to this (0: off)", 0, 1e9);
  flags.add_uint("seed", &o.seed, "seed of the initialisation, batches and dropout");
  flags.group("evaluation and logging");
  flags.add_int("eval-interval", &o.eval_interval,
                "evaluate, checkpoint and plot every this many steps", 1);
  flags.add_int("eval-iters", &o.eval_iters, "validation batches per evaluation", 1);
  flags.add_int("log-interval", &o.log_interval, "log a row and refresh progress every this many steps", 1);
  flags.group("run");
  flags.add_choice("device", &o.device, {"auto", "cpu", "cuda"}, "where to train (auto: cuda when available)");
  flags.add_choice("dtype", &o.dtype, {"float32", "bfloat16"},
                   "compute dtype (bfloat16: bf16 compute, float32 master weights; float32 on CUDA: matmuls on TF32 tensor cores)");
  flags.add_int("threads", &o.threads, "CPU threads (0: OpenMP's default)", 0, 4096);
  flags.add_int("dp", &o.dp, "data-parallel ranks, each on --batch / N sequences (threads of this process: "
                "on the CPU, sharing one GPU, or one GPU each through NCCL when N times --sp GPUs are visible)",
                1, 1024);
  flags.add_int("sp", &o.sp,
                "sequence-parallel ranks, each on --context / N consecutive positions of every sequence "
                "(with --dp: --dp times N ranks, placed as for --dp)",
                1, 1024);
  flags.add_switch("no-graph", &o.graph, false,
                   "CUDA: run every step eagerly instead of replaying it as one CUDA graph");
}

void check_options(const FlagSet& flags, const TrainOptions& o) {
  const ModelOptions& m = o.model;
  if (m.width % m.heads != 0)
    throw UsageError("--heads " + std::to_string(m.heads) + " must divide --width " + std::to_string(m.width));
  for (const char* flag : {"segments", "dilations", "attention-dropout"})
    if (flags.given(flag) && m.attention != "dilated")
      throw UsageError(std::string("--") + flag + " applies to --attention dilated only");
  if (m.segments.size() != m.dilations.size())
    throw UsageError("--segments (" + join(m.segments) + ") and --dilations (" + join(m.dilations) +
                     ") must have the same number of entries");
  if (m.pos == "rope" && (m.width / m.heads) % 2 != 0)
    throw UsageError("--pos rope needs an even head dim, got --width " + std::to_string(m.width) +
                     " / --heads " + std::to_string(m.heads));
  const int64_t decay_iters = o.decay_iters > 0 ? o.decay_iters : o.iters;
  if (o.warmup > decay_iters)
    throw UsageError("--warmup " + std::to_string(o.warmup) + " exceeds the decay length " +
                     std::to_string(decay_iters) + " (--decay-iters, default --iters)");
  if (o.batch % o.dp != 0)
    throw UsageError("--batch " + std::to_string(o.batch) + " must be a multiple of --dp " + std::to_string(o.dp) +
                     " (--batch is the global batch, split evenly over the ranks)");
  if (m.context % o.sp != 0)
    throw UsageError("--context " + std::to_string(m.context) + " must be a multiple of --sp " + std::to_string(o.sp) +
                     " (every rank holds context / sp positions of each sequence)");
  if (o.min_lr > o.lr) throw UsageError("--min-lr " + format_double(o.min_lr) + " exceeds --lr " + format_double(o.lr));
}

namespace {

nn::TransformerLMConfig config_of(const ModelOptions& m, int64_t vocab_size) {
  nn::TransformerLMConfig c;
  c.vocab_size = vocab_size;
  c.n_layer = m.layers;
  c.n_head = m.heads;
  c.n_embd = m.width;
  c.block_size = m.context;
  c.dropout = m.dropout;
  c.attention = m.attention == "vanilla" ? "causal" : m.attention;
  if (m.attention == "dilated") {
    c.attention_options["segments"] = join(m.segments);
    c.attention_options["dilations"] = join(m.dilations);
    if (m.attention_dropout != "per_copy") c.attention_options["dropout"] = m.attention_dropout;
  }
  c.position_embedding = m.pos;
  return c;
}

const std::string& required(const nn::Metadata& meta, const std::string& key) {
  auto it = meta.find(key);
  MINIDL_CHECK(it != meta.end(), "checkpoint metadata has no '", key,
               "' (not a checkpoint written by charlm train?)");
  return it->second;
}

int64_t meta_int(const nn::Metadata& meta, const std::string& key) {
  const std::string& text = required(meta, key);
  try {
    return parse_int(key, text);
  } catch (const UsageError&) {
    MINIDL_FAIL("checkpoint metadata '", key, "' is not an integer: '", text, "'");
  }
}

double meta_double(const nn::Metadata& meta, const std::string& key) {
  const std::string& text = required(meta, key);
  try {
    return parse_double(key, text);
  } catch (const UsageError&) {
    MINIDL_FAIL("checkpoint metadata '", key, "' is not a number: '", text, "'");
  }
}

// Flags a resumed run must keep, with the metadata key that records each.
const std::vector<std::pair<const char*, const char*>> kRecipeFlags = {
    {"layers", "model.n_layer"},
    {"heads", "model.n_head"},
    {"width", "model.n_embd"},
    {"context", "model.block_size"},
    {"dropout", "model.dropout"},
    {"attention", "model.attention"},
    {"segments", "model.attention.segments"},
    {"dilations", "model.attention.dilations"},
    {"attention-dropout", "model.attention.dropout"},
    {"pos", "model.position_embedding"},
    {"batch", "train.batch"},
    {"lr", "train.lr"},
    {"min-lr", "train.min_lr"},
    {"warmup", "train.warmup"},
    {"decay-iters", "train.decay_iters"},
    {"weight-decay", "train.weight_decay"},
    {"beta1", "train.beta1"},
    {"beta2", "train.beta2"},
    {"grad-clip", "train.grad_clip"},
    {"seed", "train.seed"},
};

}  // namespace

nn::TransformerLMConfig make_config(const ModelOptions& m, int64_t vocab_size) {
  if (m.attention == "dilated") {
    const std::vector<std::string> known = nn::registered_attentions();
    if (std::find(known.begin(), known.end(), "dilated") == known.end())
      throw UsageError("--attention dilated: this build of minidl has no \"dilated\" attention layer "
                       "registered (nn::DilatedAttention); use --attention vanilla");
  }
  nn::TransformerLMConfig c = config_of(m, vocab_size);
  try {
    c.validate();
  } catch (const minidl::Error& e) {
    if (m.pos == "rope" && std::string(e.what()).find("position_embedding") != std::string::npos)
      throw UsageError("--pos rope: this build of minidl has no rotary position embeddings "
                       "(TransformerLMConfig.position_embedding \"rope\"); use --pos learned");
    throw;
  }
  return c;
}

minidl::Device resolve_device(const std::string& device) {
  if (device == "cpu") return minidl::Device::cpu();
  if (device == "cuda") {
    if (!minidl::cuda_is_available())
      throw UsageError("--device cuda: no CUDA device is available (minidl built without CUDA, or no GPU)");
    return minidl::Device::cuda();
  }
  return minidl::cuda_is_available() ? minidl::Device::cuda() : minidl::Device::cpu();
}

nn::Metadata recipe_metadata(const TrainOptions& o, int64_t vocab_size) {
  nn::Metadata meta = config_of(o.model, vocab_size).to_metadata();
  meta["train.batch"] = std::to_string(o.batch);
  meta["train.iters"] = std::to_string(o.iters);
  meta["train.lr"] = format_double(o.lr);
  meta["train.min_lr"] = format_double(o.min_lr);
  meta["train.warmup"] = std::to_string(o.warmup);
  meta["train.decay_iters"] = std::to_string(o.decay_iters > 0 ? o.decay_iters : o.iters);
  meta["train.weight_decay"] = format_double(o.weight_decay);
  meta["train.beta1"] = format_double(o.beta1);
  meta["train.beta2"] = format_double(o.beta2);
  meta["train.grad_clip"] = format_double(o.grad_clip);
  meta["train.seed"] = std::to_string(o.seed);
  meta["train.eval_interval"] = std::to_string(o.eval_interval);
  meta["train.eval_iters"] = std::to_string(o.eval_iters);
  meta["train.log_interval"] = std::to_string(o.log_interval);
  meta["train.dtype"] = o.dtype;
  std::error_code ec;
  const std::filesystem::path data = std::filesystem::absolute(o.data, ec);
  meta["data.path"] = ec ? o.data : data.lexically_normal().string();
  return meta;
}

TrainOptions recipe_from_metadata(const nn::Metadata& meta) {
  const nn::TransformerLMConfig c = nn::TransformerLMConfig::from_metadata(meta);
  TrainOptions o;
  o.model.layers = c.n_layer;
  o.model.heads = c.n_head;
  o.model.width = c.n_embd;
  o.model.context = c.block_size;
  o.model.dropout = c.dropout;
  o.model.attention = c.attention == "causal" ? "vanilla" : c.attention;
  if (c.attention == "dilated") {
    o.model.segments = parse_int_list("segments", required(meta, "model.attention.segments"), 1);
    o.model.dilations = parse_int_list("dilations", required(meta, "model.attention.dilations"), 1);
    if (auto it = meta.find("model.attention.dropout"); it != meta.end()) o.model.attention_dropout = it->second;
  }
  o.model.pos = c.position_embedding;
  o.batch = meta_int(meta, "train.batch");
  o.iters = meta_int(meta, "train.iters");
  o.lr = meta_double(meta, "train.lr");
  o.min_lr = meta_double(meta, "train.min_lr");
  o.warmup = meta_int(meta, "train.warmup");
  o.decay_iters = meta_int(meta, "train.decay_iters");
  o.weight_decay = meta_double(meta, "train.weight_decay");
  o.beta1 = meta_double(meta, "train.beta1");
  o.beta2 = meta_double(meta, "train.beta2");
  o.grad_clip = meta_double(meta, "train.grad_clip");
  o.seed = std::stoull(required(meta, "train.seed"));
  o.eval_interval = meta_int(meta, "train.eval_interval");
  o.eval_iters = meta_int(meta, "train.eval_iters");
  o.log_interval = meta_int(meta, "train.log_interval");
  o.dtype = required(meta, "train.dtype");
  o.data = required(meta, "data.path");
  return o;
}

TrainOptions with_run_flags(const FlagSet& flags, const TrainOptions& requested, TrainOptions recipe) {
  if (flags.given("data")) recipe.data = requested.data;
  if (flags.given("iters")) recipe.iters = requested.iters;
  if (flags.given("eval-interval")) recipe.eval_interval = requested.eval_interval;
  if (flags.given("eval-iters")) recipe.eval_iters = requested.eval_iters;
  if (flags.given("log-interval")) recipe.log_interval = requested.log_interval;
  if (flags.given("device")) recipe.device = requested.device;
  if (flags.given("dtype")) recipe.dtype = requested.dtype;
  if (flags.given("threads")) recipe.threads = requested.threads;
  if (flags.given("dp")) recipe.dp = requested.dp;
  if (flags.given("sp")) recipe.sp = requested.sp;
  if (flags.given("no-graph")) recipe.graph = requested.graph;
  return recipe;
}

void check_resume_flags(const FlagSet& flags, const TrainOptions& requested, const TrainOptions& recipe) {
  // The flags against the checkpoint's attention unless --attention is given
  // (the defaults' vanilla has no segments or dilations to compare).
  TrainOptions asked = requested;
  if (!flags.given("attention")) asked.model.attention = recipe.model.attention;
  for (const char* flag : {"segments", "dilations", "attention-dropout"})
    if (flags.given(flag) && asked.model.attention != "dilated")
      throw UsageError(std::string("--") + flag + " applies to --attention dilated only, and the checkpoint's run has " +
                       recipe.model.attention + " attention");
  const nn::Metadata want = recipe_metadata(asked, 1), have = recipe_metadata(recipe, 1);
  auto value = [](const nn::Metadata& m, const char* key) {
    auto it = m.find(key);
    return it == m.end() ? std::string("(none)") : it->second;
  };
  for (const auto& [flag, key] : kRecipeFlags) {
    if (!flags.given(flag) || value(want, key) == value(have, key)) continue;
    std::string shown = value(have, key);
    if (std::string(flag) == "attention") shown = recipe.model.attention;
    if (std::string(flag) == "attention-dropout") shown = recipe.model.attention_dropout;
    throw UsageError(std::string("--") + flag + ": a resumed run keeps its recipe, and the checkpoint has " +
                     shown + " (leave the flag out to continue that run)");
  }
}

}  // namespace charlm
