#include "nn/attention.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>

#include "autograd/grad_mode.h"
#include "nn/dilated_attention.h"
#include "ops/ops.h"
#include "ops/seq_parallel.h"

namespace minidl::nn {
namespace {

std::map<std::string, AttentionFactory>& registry() {
  // Built on first use, so registering from another translation unit's
  // static initialiser is safe. The built-in kinds are listed here rather
  // than registered by static initialisers in their own files: minidl is a
  // static library, and the linker would drop an object file nothing refers to.
  static std::map<std::string, AttentionFactory> factories = {
      {"causal",
       [](const AttentionInit& init) -> std::shared_ptr<AttentionLayer> {
         return std::make_shared<CausalSelfAttention>(init);
       }},
      {"dilated", [](const AttentionInit& init) -> std::shared_ptr<AttentionLayer> {
         return std::make_shared<DilatedAttention>(init);
       }}};
  return factories;
}

// Writes rows (B, T, ...) at positions [length, length + T) along dim 1 of
// `buffer` (B, capacity, ...) in `dtype`, first reallocating it (doubling the
// capacity, keeping the valid rows) when they do not fit.
void append_rows(Tensor& buffer, int64_t length, const Tensor& rows, DType dtype) {
  const int64_t needed = length + rows.size(1);
  if (!buffer.defined() || buffer.size(1) < needed) {
    Shape shape = rows.shape();
    shape[1] = std::max<int64_t>({needed, 64, buffer.defined() ? 2 * buffer.size(1) : 0});
    Tensor grown = ops::empty(shape, {dtype, rows.device(), false});
    if (length > 0) ops::copy_(grown.narrow(1, 0, length), buffer.narrow(1, 0, length));
    buffer = grown;
  }
  ops::copy_(buffer.narrow(1, length, rows.size(1)), rows);
}

// x must be (B, T >= 1, C) with the batch size of the rows already cached.
void check_cached_input(const std::string& layer, const Tensor& x, const AttentionCache& cache,
                        const Tensor& cached) {
  MINIDL_CHECK(x.defined() && x.dim() == 3 && x.size(1) >= 1, layer,
               ": cached forward expects input (B, T >= 1, C), got ",
               x.defined() ? shape_str(x.shape()) : std::string("an undefined tensor"));
  MINIDL_CHECK(cache.length >= 0 && (cache.length == 0 || (cached.defined() &&
                                                           cached.size(1) >= cache.length)),
               layer, ": the cache claims ", cache.length, " positions but holds ",
               cached.defined() ? cached.size(1) : 0);
  MINIDL_CHECK(cache.length == 0 || cached.size(0) == x.size(0), layer, ": input batch ", x.size(0),
               " differs from the cached batch ", cached.size(0));
}

// Attention of the queries q (B, T, H, D) at positions pos .. pos + T - 1
// over the cached keys and values (B, >= pos + T, H, D) that `branches` give
// them (docs/dilated-attention.md): for each head and query, one softmax over
// the multiset union of the keys of the branches that keep the query, i.e.
// weights proportional to m_j exp(s_j), where m_j counts the branches that
// give key j. It runs densely over the window of keys any branch gives (from
// the earliest segment start), adding log m_j to the scores (-inf where no
// branch gives j); a (head, query) that no branch keeps gets 0, as in the op.
Tensor attend_cached(const Tensor& q, const AttentionCache& cache, int64_t pos,
                     const AttentionBranches& branches) {
  NoGradGuard no_grad;
  const int64_t H = q.size(2), T = q.size(1), D = q.size(3), last = pos + T - 1;
  const DType dtype = cache.k.dtype();
  const TensorOptions options{dtype, q.device(), false};
  int64_t start = pos;
  for (int64_t w : branches.segments) start = std::min(start, pos / w * w);
  const int64_t L = last - start + 1;

  // The multiplicities m (H, T, L), one strided block per (query, branch):
  // branch (w, r) keeps query p for the heads h = c, c + r, ... where
  // c = (p - s) mod r, s = p's segment start, and gives them the keys
  // s + c, s + c + r, ... <= p.
  // (One branch with r = 1 gives one query every key of the window: no bias.)
  const bool plain = T == 1 && branches.dilations.size() == 1 && branches.dilations[0] == 1;
  Tensor bias, kept;
  if (!plain) {
    Tensor count = ops::zeros({H, T, L}, options);
    const Tensor one = ops::ones({}, options);
    std::vector<double> covered(static_cast<size_t>(H * T), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = pos + t;
      for (size_t i = 0; i < branches.segments.size(); ++i) {
        const int64_t w = branches.segments[i], r = branches.dilations[i];
        const int64_t s = p / w * w, c = (p - s) % r;
        if (c >= H) continue;  // no head has this offset
        ops::add_(count.slice(0, c, H, r).narrow(1, t, 1).slice(2, s + c - start, p - start + 1, r),
                  one);
        for (int64_t h = c; h < H; h += r) covered[static_cast<size_t>(h * T + t)] = 1.0;
      }
    }
    if (std::find(covered.begin(), covered.end(), 0.0) != covered.end()) {
      // Rows no branch keeps: any finite scores (then zeroed) instead of 0/0.
      kept = from_vector(covered, {H, T, 1}).to(dtype).to(q.device());
      count = count + (1.0 - kept);
    }
    bias = ops::log(count);
  }
  // Scaled queries (B, H, T, D) @ keys (B, H, D, L) -> scores (B, H, T, L);
  // the window's keys and values are views of the cache, not copies.
  Tensor keys = cache.k.narrow(1, start, L), values = cache.v.narrow(1, start, L);
  Tensor scaled = ops::mul(ops::to(q, dtype), 1.0 / std::sqrt(static_cast<double>(D)));
  Tensor scores = ops::matmul(scaled.permute({0, 2, 1, 3}), keys.permute({0, 2, 3, 1}));
  if (bias.defined()) scores = ops::add(scores, bias);
  Tensor y = ops::matmul(ops::softmax(scores), values.permute({0, 2, 1, 3}));  // (B, H, T, D)
  if (kept.defined()) y = ops::mul(y, kept);
  return ops::to(y.permute({0, 2, 1, 3}), q.dtype());
}

}  // namespace

SequenceParallel::SequenceParallel(dist::Communicator& comm, ops::SequenceLayout layout)
    : comm_(&comm), layout_(std::move(layout)) {
  const std::vector<int64_t>& sizes = layout_->chunk_sizes;
  MINIDL_CHECK(static_cast<int64_t>(sizes.size()) == comm.size(), "SequenceParallel: layout has ", sizes.size(),
               " chunk sizes ", shape_str(sizes), " for a communicator of ", comm.size(), " ranks; expected one per rank");
  for (int64_t n : sizes)
    MINIDL_CHECK(n >= 0, "SequenceParallel: layout has chunk sizes ", shape_str(sizes), "; sizes must be >= 0");
  offset_ = layout_->start(comm.rank());
}

SequenceParallel::SequenceParallel(dist::Communicator& comm, int64_t offset) : comm_(&comm), offset_(offset) {
  MINIDL_CHECK(offset >= 0, "SequenceParallel: offset ", offset, " must be >= 0");
}

Tensor AttentionLayer::forward(const Tensor& x, AttentionCache& cache) {
  check_cached_input(type_name(), x, cache, cache.x);
  const int64_t T = x.size(1);
  append_rows(cache.x, cache.length, x, x.dtype());
  cache.length += T;
  return forward(cache.x.narrow(1, 0, cache.length)).narrow(1, cache.length - T, T);
}

std::optional<double> rope_base_for(const TransformerLMConfig& config) {
  if (config.position_embedding != "rope") return std::nullopt;
  auto it = config.attention_options.find("rope_base");
  if (it == config.attention_options.end()) return kDefaultRopeBase;
  const std::string& text = it->second;
  size_t used = 0;
  double base = 0;
  try {
    base = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MINIDL_CHECK(used == text.size() && !text.empty() && std::isfinite(base) && base > 0,
               "attention option 'rope_base' must be a positive number, got '", text, "'");
  return base;
}

void register_attention(const std::string& name, AttentionFactory factory) {
  MINIDL_CHECK(!name.empty() && factory, "register_attention: need a name and a factory");
  registry()[name] = std::move(factory);
}

std::vector<std::string> registered_attentions() {
  std::vector<std::string> names;
  for (const auto& item : registry()) names.push_back(item.first);
  return names;
}

std::shared_ptr<AttentionLayer> make_attention(const AttentionInit& init) {
  auto it = registry().find(init.config.attention);
  if (it == registry().end()) {
    std::ostringstream known;
    for (const std::string& name : registered_attentions()) known << " '" << name << "'";
    MINIDL_FAIL("make_attention: unknown attention '", init.config.attention, "'; registered:",
                known.str());
  }
  std::shared_ptr<AttentionLayer> layer = it->second(init);
  MINIDL_CHECK(layer != nullptr, "make_attention: the factory for '", init.config.attention,
               "' returned null");
  return layer;
}

MultiHeadSelfAttention::MultiHeadSelfAttention(std::string type_name, int64_t n_embd_, int64_t n_head_,
                                               bool bias, double dropout, Generator& gen,
                                               Generator* dropout_gen, TensorOptions options,
                                               double proj_init_std, std::optional<double> rope_base_)
    : AttentionLayer(std::move(type_name)), n_embd(n_embd_), n_head(n_head_), rope_base(rope_base_) {
  const std::string& name = this->type_name();
  MINIDL_CHECK(n_head > 0 && n_embd > 0 && n_embd % n_head == 0, name, ": n_embd ", n_embd,
               " must be a positive multiple of n_head ", n_head);
  MINIDL_CHECK(!rope_base || (std::isfinite(*rope_base) && *rope_base > 0), name,
               ": rope_base must be positive and finite, got ", *rope_base);
  MINIDL_CHECK(!rope_base || (n_embd / n_head) % 2 == 0, name, ": rotary embeddings need an even "
               "head dim, got n_embd ", n_embd, " / n_head ", n_head, " = ", n_embd / n_head);
  c_attn = register_module("c_attn", std::make_shared<Linear>(n_embd, 3 * n_embd, bias, gen, options));
  c_proj = register_module("c_proj", std::make_shared<Linear>(n_embd, n_embd, bias, gen, options,
                                                              proj_init_std));
  resid_drop = register_module("resid_drop", std::make_shared<Dropout>(dropout, dropout_gen));
}

std::vector<Tensor> MultiHeadSelfAttention::project_qkv(const Tensor& x, int64_t position) {
  MINIDL_CHECK(x.dim() == 3 && x.size(2) == n_embd, type_name(), ": expected input (B, T, ", n_embd,
               "), got ", shape_str(x.shape()));
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  Tensor qkv = c_attn->forward(x);  // (B, T, 3C), contiguous
  // Each of q, k, v is a (B, T, H, D) view into qkv with row stride 3C.
  // split records one node, so backward assembles d(qkv) with at most one
  // concatenation (none in bf16 on CUDA: the attention backward writes the
  // three gradients into one packed buffer, which split takes as it is).
  std::vector<Tensor> parts = ops::split(qkv, C, 2);
  for (Tensor& part : parts) part = part.view({B, T, n_head, C / n_head});
  if (rope_base) {
    parts[0] = ops::rope(parts[0], position, *rope_base);
    parts[1] = ops::rope(parts[1], position, *rope_base);
  }
  return parts;
}

Tensor MultiHeadSelfAttention::forward(const Tensor& x) {
  return resid_drop->forward(forward_before_dropout(x));
}

Tensor MultiHeadSelfAttention::forward_before_dropout(const Tensor& x) {
  // Attention-probability dropout with the residual's p and generator, as nanoGPT does.
  const double dropout_p = is_training() ? resid_drop->p : 0.0;
  const SequenceParallel& sp = sequence_parallel;
  if (sp.comm()) {
    std::vector<Tensor> qkv = project_qkv(x, sp.offset());
    const AttentionBranches b = branches();
    DilatedAttentionConfig config;
    for (size_t i = 0; i < b.segments.size(); ++i) config.branches.push_back({b.segments[i], b.dilations[i]});
    config.dropout = ops::attention_dropout(dropout_p, resid_drop->gen, qkv[0]);
    config.dropout.per_pair = b.dropout_per_pair;
    Tensor y = (sp.layout() ? ops::seq_parallel_dilated_attention(qkv[0], qkv[1], qkv[2], config, *sp.comm(),
                                                                  *sp.layout())
                            : ops::seq_parallel_dilated_attention(qkv[0], qkv[1], qkv[2], config, *sp.comm()))
                   .first;
    return c_proj->forward(y.reshape(x.shape()));
  }
  std::vector<Tensor> qkv = project_qkv(x, 0);
  Tensor y = attend(qkv[0], qkv[1], qkv[2], dropout_p, resid_drop->gen);
  return c_proj->forward(y.reshape(x.shape()));
}

Tensor MultiHeadSelfAttention::forward(const Tensor& x, AttentionCache& cache) {
  check_cached_input(type_name(), x, cache, cache.k);
  MINIDL_CHECK(!sequence_parallel.comm(), type_name(), ": cached decoding is not sequence parallel");
  MINIDL_CHECK(!is_training() || resid_drop->p == 0, type_name(),
               ": cached decoding runs without dropout; call eval() first");
  const int64_t position = cache.length, T = x.size(1);
  std::vector<Tensor> qkv = project_qkv(x, position);
  const DType dtype = qkv[1].dtype() == DType::Float64 ? DType::Float64 : DType::Float32;
  append_rows(cache.k, position, qkv[1], dtype);
  append_rows(cache.v, position, qkv[2], dtype);
  cache.length = position + T;
  // From an empty cache the new rows are the whole sequence: the fused op.
  Tensor y = position == 0 ? attend(qkv[0], qkv[1], qkv[2], 0.0, nullptr)
                           : attend_cached(qkv[0], cache, position, branches());
  return resid_drop->forward(c_proj->forward(y.reshape(x.shape())));
}

CausalSelfAttention::CausalSelfAttention(int64_t n_embd, int64_t n_head, bool bias, double dropout,
                                         Generator& gen, Generator* dropout_gen,
                                         TensorOptions options, double proj_init_std,
                                         std::optional<double> rope_base)
    : MultiHeadSelfAttention("CausalSelfAttention", n_embd, n_head, bias, dropout, gen, dropout_gen,
                             options, proj_init_std, rope_base) {}

CausalSelfAttention::CausalSelfAttention(const AttentionInit& init)
    : CausalSelfAttention(init.config.n_embd, init.config.n_head, init.config.bias,
                          init.config.dropout, init.init_gen, init.dropout_gen, init.options,
                          init.proj_init_std, rope_base_for(init.config)) {}

Tensor CausalSelfAttention::attend(const Tensor& q, const Tensor& k, const Tensor& v, double dropout_p,
                                   Generator* gen) {
  return ops::attention(q, k, v, /*causal=*/true, /*scale=*/0, dropout_p, gen);
}

}  // namespace minidl::nn
