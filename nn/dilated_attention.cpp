#include "nn/dilated_attention.h"

#include <cmath>
#include <sstream>

#include "core/dilated.h"
#include "ops/ops.h"

namespace minidl::nn {
namespace {

std::string list_str(const std::vector<int64_t>& values) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < values.size(); ++i) os << (i ? ", " : "") << values[i];
  os << "]";
  return os.str();
}

std::string trimmed(const std::string& s) {
  size_t begin = s.find_first_not_of(" \t"), end = s.find_last_not_of(" \t");
  return begin == std::string::npos ? std::string() : s.substr(begin, end - begin + 1);
}

const std::string& required_option(const TransformerLMConfig& config, const std::string& key,
                                   const char* example) {
  auto it = config.attention_options.find(key);
  MINIDL_CHECK(it != config.attention_options.end(), "DilatedAttention: attention option '", key,
               "' is missing; set config.attention_options[\"", key, "\"], e.g. \"", example, "\"");
  return it->second;
}

}  // namespace

// The options from config.attention_options, checked for unknown keys.
struct DilatedAttention::Options {
  std::vector<int64_t> segments, dilations;
  bool dropout_per_pair = false;
};

DilatedAttention::Options DilatedAttention::parse_options(const TransformerLMConfig& config) {
  for (const auto& [key, value] : config.attention_options)
    MINIDL_CHECK(key == "segments" || key == "dilations" || key == "rope_base" || key == "dropout",
                 "DilatedAttention: unknown attention option '", key,
                 "'; known: 'segments', 'dilations', 'rope_base', 'dropout'");
  bool per_pair = false;
  if (auto it = config.attention_options.find("dropout"); it != config.attention_options.end()) {
    const std::string value = trimmed(it->second);
    MINIDL_CHECK(value == "per_copy" || value == "per_pair", "DilatedAttention: attention option 'dropout' is '",
                 it->second, "'; give 'per_copy' or 'per_pair'");
    per_pair = value == "per_pair";
  }
  return {parse_attention_int_list("segments", required_option(config, "segments", "64,128,256")),
          parse_attention_int_list("dilations", required_option(config, "dilations", "1,2,4")), per_pair};
}

std::vector<int64_t> parse_attention_int_list(const std::string& key, const std::string& text) {
  std::vector<int64_t> values;
  std::string rest = text;
  while (true) {
    size_t comma = rest.find(',');
    std::string item = trimmed(rest.substr(0, comma));
    size_t used = 0;
    int64_t v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MINIDL_CHECK(!item.empty() && used == item.size() && v >= 1, "attention option '", key,
                 "' must be a comma-separated list of positive integers (e.g. \"64,128,256\"), got '",
                 text, "' (bad entry '", item, "')");
    values.push_back(v);
    if (comma == std::string::npos) break;
    rest = rest.substr(comma + 1);
  }
  return values;
}

DilatedAttention::DilatedAttention(int64_t n_embd, int64_t n_head, std::vector<int64_t> segments_,
                                   std::vector<int64_t> dilations_, bool bias, double dropout,
                                   Generator& gen, Generator* dropout_gen, TensorOptions options,
                                   double proj_init_std, std::optional<double> rope_base)
    : MultiHeadSelfAttention("DilatedAttention", n_embd, n_head, bias, dropout, gen, dropout_gen, options,
                             proj_init_std, rope_base),
      segments(std::move(segments_)),
      dilations(std::move(dilations_)) {
  MINIDL_CHECK(!segments.empty(), "DilatedAttention: segments is empty; give at least one branch "
               "(segment length w, dilation r)");
  MINIDL_CHECK(segments.size() == dilations.size(), "DilatedAttention: segments ",
               list_str(segments), " has ", segments.size(), " entries but dilations ",
               list_str(dilations), " has ", dilations.size(), "; give one dilation per segment");
  for (size_t i = 0; i < segments.size(); ++i) {
    MINIDL_CHECK(segments[i] >= 1, "DilatedAttention: segment lengths must be >= 1, got ",
                 segments[i], " in segments ", list_str(segments));
    MINIDL_CHECK(dilations[i] >= 1, "DilatedAttention: dilations must be >= 1, got ", dilations[i],
                 " in dilations ", list_str(dilations));
  }
}

DilatedAttention::DilatedAttention(const AttentionInit& init) : DilatedAttention(init, parse_options(init.config)) {}

DilatedAttention::DilatedAttention(const AttentionInit& init, const Options& parsed)
    : DilatedAttention(init.config.n_embd, init.config.n_head, parsed.segments, parsed.dilations, init.config.bias,
                       init.config.dropout, init.init_gen, init.dropout_gen, init.options, init.proj_init_std,
                       rope_base_for(init.config)) {
  dropout_per_pair = parsed.dropout_per_pair;
  // Asked for where no pair is shared, the option would change nothing: say so.
  DilatedAttentionConfig config;
  for (size_t i = 0; i < segments.size(); ++i) config.branches.push_back({segments[i], dilations[i]});
  MINIDL_CHECK(!dropout_per_pair || !nested_pairs(config, init.config.block_size).empty(),
               "DilatedAttention: attention option 'dropout' is 'per_pair', but segments ", list_str(segments),
               " and dilations ", list_str(dilations), " do not nest at block_size ", init.config.block_size,
               " (sorted, each segment a multiple of the last, each dilation of the last, the smallest dilation 1, "
               "the largest dividing 8 and the smallest segment; docs/dilated-attention.md): no pair is shared, "
               "so it would change nothing");
}

Tensor DilatedAttention::attend(const Tensor& q, const Tensor& k, const Tensor& v, double dropout_p,
                                Generator* gen) {
  return ops::dilated_attention(q, k, v, segments, dilations, /*causal=*/true, /*scale=*/0, dropout_p, gen,
                                dropout_per_pair)
      .first;
}

}  // namespace minidl::nn
