// `charlm sample`: generates text from a checkpoint.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <random>

#include "args.h"
#include "commands.h"
#include "options.h"
#include "vocab.h"

namespace charlm {

namespace nn = minidl::nn;

namespace {

struct SampleOptions {
  std::string ckpt, prompt;
  int64_t tokens = 500;
  double temperature = 0.8;
  int64_t top_k = 0;
  uint64_t seed = 1337;
  std::string device = "auto";
  int64_t threads = 0;
};

// Picks the next id from the logits: greedy at temperature 0, else a draw
// from softmax(logits / temperature) over the top_k largest (all when 0).
class Sampler {
 public:
  Sampler(double temperature, int64_t top_k, uint64_t seed)
      : temperature_(temperature), top_k_(top_k), rng_(seed) {}

  int32_t operator()(const std::vector<float>& logits) {
    const size_t n = logits.size();
    const size_t best = static_cast<size_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    if (temperature_ == 0) return static_cast<int32_t>(best);
    // Candidates: the top_k largest logits, ties broken by the lower id.
    std::vector<int32_t> ids(n);
    for (size_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(i);
    const size_t k = top_k_ > 0 ? std::min(n, static_cast<size_t>(top_k_)) : n;
    std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(k), ids.end(),
                      [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    ids.resize(k);
    std::vector<double> weights(k);
    double total = 0;
    for (size_t i = 0; i < k; ++i) {
      weights[i] = std::exp((static_cast<double>(logits[ids[i]]) - logits[best]) / temperature_);
      total += weights[i];
    }
    // A uniform double in [0, total) from 53 random bits (the same on every platform).
    const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * total;
    double cumulative = 0;
    for (size_t i = 0; i < k; ++i) {
      cumulative += weights[i];
      if (u < cumulative) return ids[i];
    }
    return ids[k - 1];
  }

 private:
  double temperature_;
  int64_t top_k_;
  std::mt19937_64 rng_;
};

constexpr const char* kSampleHelp =
    "Generates text with a model trained by charlm train. The model (vanilla or\n"
    "dilated attention, learned or rotary positions) is rebuilt from the\n"
    "checkpoint's metadata. Prints the prompt followed by --tokens generated\n"
    "characters and a newline; then one line on stderr: the characters generated,\n"
    "the seconds taken and the characters per second. Generation keeps a\n"
    "key/value cache: each new character costs one step, not a pass over the\n"
    "whole context. The model sees the latest characters, at most its training\n"
    "context (block size); when that is full, it restarts from the latest half of\n"
    "it. Prompt characters must occur in the training text.";

}  // namespace

int cmd_sample(const std::vector<std::string>& args) {
  SampleOptions o;
  FlagSet flags("charlm sample", "--ckpt FILE [--prompt TEXT] [--tokens N] [flags]", kSampleHelp);
  flags.add_string("ckpt", &o.ckpt, "FILE", "checkpoint (DIR/best.ckpt or DIR/last.ckpt)", /*required=*/true);
  flags.add_string("prompt", &o.prompt, "TEXT", "text to continue (default: start after a newline, not printed)");
  flags.add_int("tokens", &o.tokens, "characters to generate", 0, 100000000);
  flags.add_double("temperature", &o.temperature, "softmax temperature; 0 = greedy", 0, 100);
  flags.add_int("top-k", &o.top_k, "sample among the k most likely characters (0: all)", 0);
  flags.add_uint("seed", &o.seed, "seed of the sampling");
  flags.add_choice("device", &o.device, {"auto", "cpu", "cuda"}, "where to run (auto: cuda when available)");
  flags.add_int("threads", &o.threads, "CPU threads (0: OpenMP's default)", 0, 4096);
  if (!flags.parse(args)) return 0;
  if (o.threads > 0) omp_set_num_threads(static_cast<int>(o.threads));

  if (!std::filesystem::exists(o.ckpt)) throw UsageError("--ckpt: " + o.ckpt + " does not exist");
  if (std::filesystem::is_directory(o.ckpt))
    throw UsageError("--ckpt: " + o.ckpt + " is a directory; give a checkpoint file in it, e.g. " +
                     (std::filesystem::path(o.ckpt) / "best.ckpt").string());
  const minidl::Device device = resolve_device(o.device);
  const nn::Checkpoint ckpt = nn::load_checkpoint(o.ckpt, device);
  // The metadata is checked against itself and against the tensors present
  // before the model is built: a corrupt or hand-made file must fail here,
  // not read outside the vocabulary or allocate without bound.
  auto vocab_it = ckpt.metadata.find("vocab");
  MINIDL_CHECK(vocab_it != ckpt.metadata.end(), "charlm sample: ", o.ckpt,
               " has no 'vocab' metadata (not a checkpoint written by charlm train?)");
  const CharVocab vocab = CharVocab::from_string(vocab_it->second);
  const nn::TransformerLMConfig config = nn::TransformerLMConfig::from_metadata(ckpt.metadata);
  MINIDL_CHECK(vocab.size() == config.vocab_size, "charlm sample: ", o.ckpt, ": the vocabulary has ",
               vocab.size(), " characters but model.vocab_size is ", config.vocab_size);
  const std::vector<std::string> known = nn::registered_attentions();
  MINIDL_CHECK(std::find(known.begin(), known.end(), config.attention) != known.end(), "charlm sample: ",
               o.ckpt, " holds a model with '", config.attention,
               "' attention, which this build of minidl does not have");
  nn::StateDict weights;
  for (const auto& [name, tensor] : ckpt.tensors)
    if (name.rfind("model.", 0) == 0) weights.insert(name.substr(6), tensor);
  try {
    nn::check_state_dict(config, weights);
  } catch (const minidl::Error& e) {
    throw minidl::Error("charlm sample: " + o.ckpt + ": " + e.what());
  }

  nn::TransformerLM model(config, 0);
  model.to(device);
  model.load_state_dict(weights);
  model.eval();

  std::string prompt = o.prompt;
  if (prompt.empty()) prompt = vocab.contains('\n') ? "\n" : vocab.to_string().substr(0, 1);
  for (size_t i = 0; i < prompt.size(); ++i)
    if (!vocab.contains(prompt[i]))
      throw UsageError("--prompt: character '" + std::string(1, prompt[i]) + "' at position " +
                       std::to_string(i) + " does not occur in the training text");

  // Each character is printed as soon as it is chosen.
  std::fputs(o.prompt.c_str(), stdout);
  std::fflush(stdout);
  Sampler pick(o.temperature, o.top_k, o.seed);
  const std::string chars = vocab.to_string();
  const auto start = std::chrono::steady_clock::now();
  model.generate(vocab.encode(prompt), o.tokens, [&](const std::vector<float>& logits) {
    const int32_t id = pick(logits);
    std::fputc(chars[static_cast<size_t>(id)], stdout);
    std::fflush(stdout);
    return id;
  });
  std::fputc('\n', stdout);
  std::fflush(stdout);
  // The speed on stderr, so that stdout stays only the text. The time runs
  // from the prompt's pass to the last character printed.
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "charlm sample: %lld characters in %.3f s (%.1f characters/s)\n",
               static_cast<long long>(o.tokens), seconds, seconds > 0 ? static_cast<double>(o.tokens) / seconds : 0.0);
  return 0;
}

}  // namespace charlm
