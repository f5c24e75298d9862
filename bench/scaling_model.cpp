// The paper model of docs/scaling.md: step time and memory per GPU of
// sequence-parallel dilated attention (LongNet's algorithm as
// ops/seq_parallel_attention.cpp implements it) and of a char-LM training
// step, against the GPU count P and the sequence length N. It measures
// nothing: it evaluates the model from the single-GPU measurements and the
// link figures below, prints the tables docs/scaling.md quotes, and draws the
// curves with the measured P = 1 points as markers.
//   scaling_model [--plot=FILE.png]
// Not a Google Benchmark program, hence not named bench_*.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "plot/plot.h"

namespace {

constexpr double kGiB = 1024.0 * 1024 * 1024, kMiB = 1024.0 * 1024;
constexpr int64_t kMi = int64_t(1) << 20;
constexpr int64_t kDim = 64;  // head dim of every problem here

// ---------------------------------------------------------------------------
// Calibration. Every figure names where it comes from.

// H200, 2026-12-03, session 15 (docs/BENCHMARKS.md, kernel-notes): bench_attention
// call 3, two runs each (131K 5.60 / 5.58 ms, 1M 43.7 / 43.8); the forward from
// call 2 (11.4 ms; the same forward code). Dilated fwd+bwd through
// ops::dilated_attention (kernels only), bf16, B = 1, H = 8, D = 64, causal,
// w = 2048/4096/8192/16384 with r = 1/2/4/8. Call 5, beside the PyTorch
// anchors on a card 2-5% slower throughout: 5.74 / 45.8 / 11.8 ms. These
// match bench_dist's op at P = 1 below (43.8 ms, another call).
constexpr double kSmallN = 131072, kSmallMs = 5.59;
constexpr double kLargeN = 1048576, kLargeMs = 43.75, kLargeFwdMs = 11.4;
// Same call: dense causal fwd+bwd at N = 32,768 (ws kernels, 8.46 / 8.39;
// call 5: 8.66, SDPA 8.99).
constexpr double kDenseN = 32768, kDenseMs = 8.43;
// H200, 2026-12-03, session 15: bench_dist at P = 1 (NCCL world size 1), the
// op ops::seq_parallel_dilated_attention fwd+bwd on 1,048,576 tokens, 5
// iterations, medians of 3: "w16k" (the four branches above) 43.8 ms, "wN"
// (the family to w = N below, 10 branches) 47.0 ms; peak 17.07 GiB in both
// (session 9, on session 8's kernels: 48.9 / 52.3 ms, the same peak).
// Session 8 measured 61.9 / 65.2 ms and 23.07 GiB: the op then ran fp32 row
// passes over the whole chunk (zero-fills, merges, sums, casts back to bf16),
// 12.1 ms per 1M tokens at H = 8 beyond the kernels. Since then the kernels'
// results are the base and only the rows the spanning pieces touch are merged
// and summed (whole_chunk in ops/seq_parallel_attention.cpp); at P = 1 there
// are none. Session 9 found w16k less its kernels -0.9 ms, zero within the
// calls' spread; session 15 finds 43.8 against 43.75. A per-row cost is no
// longer measurable at P = 1, so the
// pieces' rows are charged session 8's per-row figure: an upper bound, as
// they skip the zero-fills and casts it included. Memory is taken linear in N
// (the H100 single-device table, 0.53 / 2.14 / 8.55 / 17.1 GiB at 32K / 128K
// / 512K / 1M, 2026-11-26: the op's peak now matches it) and in H.
constexpr double kOpW16kMs = 43.8, kOpWNMs = 47.0;
// Session 8's op and its kernels (bench_attention, session 8, call 2).
constexpr double kOpW16kMsSession8 = 61.9, kLargeMsSession8 = 49.8;
constexpr double kPassMsPerMi = kOpW16kMsSession8 - kLargeMsSession8;  // per 1M rows at H = 8
constexpr double kAttnGiBPerMi = 17.07;                          // at H = 8
// H200, 2026-12-04, session 20: charlm at context 1,048,576, batch 1, 2
// layers, 4 heads, width 256, rope, bf16, the recipe's dropout 0.2 (the same
// four branches): 9.24 M tok/s (`--profile 5`, 113.5 ms per step as a CUDA
// graph), 26.72 GiB peak (a 6-step training run). Session 15 measured 9.06 M
// tok/s and 24.78 GiB: since session 19 the attention keeps its dropout
// mask as bits from the forward to the backward (0.97 GiB per layer here).
// The H100 measured 4.7 M tok/s and 22.6 GiB in 2026-11.
constexpr int64_t kLmLayers = 2, kLmHeads = 4, kLmWidth = 256, kLmVocab = 65;
constexpr double kLmTokPerS = 9.24e6, kLmGiBPerMi = 26.72;
// H200 memory: 141 GB of HBM3e, about 139 GiB usable.
constexpr double kCapacityGiB = 139;

// Links: DATASHEET PLACEHOLDERS, no multi-GPU measurement exists yet. H200
// NVLink 4: 900 GB/s bidirectional per GPU, 450 GB/s per direction, within a
// node of 8 GPUs; InfiniBand NDR: 400 Gb/s = 50 GB/s per GPU across nodes.
// The per-step latencies are assumptions (typical NCCL small-message steps).
struct Link {
  double bytes_per_s, latency_s;
};
constexpr Link kNVLink{450e9, 3e-6}, kInfiniBand{50e9, 6e-6};
constexpr int64_t kGpusPerNode = 8;

// ---------------------------------------------------------------------------
// The kernel-time fit: t = a · launches + c · pairs, one launch per branch,
// pairs = attended (query, key) pairs summed over heads. Two measured points,
// two unknowns.

struct Branch {
  int64_t w, r;
};

// LongNet's geometric family: w = 2048·2^i, r = 2^i, extended until one
// segment covers the sequence (its last w is clamped to N). Every segment of
// every branch keeps 2048 rows per head, so each branch costs half the one
// before it and the total converges. The measured problem is its first four
// branches.
std::vector<Branch> family(int64_t N, size_t max_branches = SIZE_MAX) {
  std::vector<Branch> b;
  for (int64_t w = 2048, r = 1; b.size() < max_branches; w *= 2, r *= 2) {
    b.push_back({std::min(w, N), r});
    if (w >= N) break;
  }
  return b;
}

double causal_pairs(double k) { return k * (k + 1) / 2; }

// Pairs of the whole sequence on one GPU, all heads.
double pairs_one_gpu(int64_t N, int64_t H, const std::vector<Branch>& branches) {
  double pairs = 0;
  for (const Branch& br : branches) pairs += double(H) * double(N / br.w) * causal_pairs(double(br.w / br.r));
  return pairs;
}

struct KernelFit {
  double launch_ms, pair_ms;
  double ms(double launches, double pairs) const { return launches * launch_ms + pairs * pair_ms; }
};

KernelFit fit_kernel() {
  const std::vector<Branch> measured = family(kMi, 4);
  const double p_small = pairs_one_gpu(int64_t(kSmallN), 8, measured);
  const double p_large = pairs_one_gpu(int64_t(kLargeN), 8, measured);
  KernelFit f;
  f.pair_ms = (kLargeMs - kSmallMs) / (p_large - p_small);
  f.launch_ms = (kSmallMs - p_small * f.pair_ms) / double(measured.size());
  return f;
}

// ---------------------------------------------------------------------------
// One ring collective over S contiguous ranks (a segment's group, or all P):
// S - 1 steps, each moving one rank's block. Groups of up to 8 sit in one
// node (contiguous, aligned: S and the chunk are powers of two).
double ring_ms(int64_t S, double bytes_per_rank) {
  if (S <= 1) return 0;
  const Link& l = S <= kGpusPerNode ? kNVLink : kInfiniBand;
  return 1e3 * double(S - 1) * (l.latency_s + bytes_per_rank / l.bytes_per_s);
}

// Parameter-gradient all-reduce over all P ranks (NCCL picks ring or tree).
double all_reduce_ms(int64_t P, double bytes) {
  if (P <= 1) return 0;
  const Link& l = P <= kGpusPerNode ? kNVLink : kInfiniBand;
  const double ring = 2.0 * double(P - 1) * (l.latency_s + bytes / double(P) / l.bytes_per_s);
  const double tree = 2.0 * std::ceil(std::log2(double(P))) * l.latency_s + 2.0 * bytes / l.bytes_per_s;
  return 1e3 * std::min(ring, tree);
}

enum class Gather {
  AllRanks,   // today: one all-gather of every spanning segment over all P ranks
  SubGroups,  // one all-gather per spanning segment over the ranks it spans
};

// One layer's attention fwd+bwd on the slowest rank, the last one: it is the
// last rank of every spanning segment, so its queries see the most keys.
struct Attention {
  double local_ms = 0, span_ms = 0;      // kernels: local branches, spanning pieces
  double pass_ms = 0;                    // the op's merges and sums on the pieces' rows
  double gather_ms = 0, scatter_ms = 0;  // k,v all-gather (fwd); dK,dV reduce-scatter (bwd)
  double latency_ms = 0;                 // the part of the two that is per-step latency
  double longest_ms = 0;                 // gather + scatter of the longest segment alone
  double saved_bytes = 0;                // gathered rows kept from forward to backward
  double transient_bytes = 0;            // the backward's gradient send buffer
  double bytes = 0;                      // received (gather) plus sent (scatter) per rank
  int spanning = 0, branches = 0;
  double comm_ms() const { return gather_ms + scatter_ms; }
  // Nothing overlaps (the op's first version).
  double serial_ms() const { return local_ms + span_ms + pass_ms + comm_ms(); }
  // Gather behind the local forward kernels, scatter behind the local
  // backward ones; the spanning pieces wait for the gather and the scatter
  // waits for them. The row passes hide nothing here: conservative, as the
  // code runs the local merge and the local gradient sums while the
  // collectives are in flight.
  double overlapped_ms() const {
    const double f = kLargeFwdMs / kLargeMs;
    return std::max(f * local_ms, gather_ms) + span_ms + std::max((1 - f) * local_ms, scatter_ms) + pass_ms;
  }
};

// k, v rows travel in bf16; gradient sums in fp32. (The CPU code today works
// in float64; a GPU port would move these.)
constexpr double kRowBytesKV = 2 * kDim * 2.0, kRowBytesGrad = 2 * kDim * 4.0;

Attention attention(int64_t N, int64_t P, int64_t H, Gather how, bool kernel_query_range,
                    const KernelFit& fit) {
  const int64_t n = N / P;
  Attention a;
  double local_pairs = 0, span_pairs = 0, packed_rows = 0, merged_rows = 0;
  for (const Branch& br : family(N)) {
    ++a.branches;
    const double keep = double(br.w / br.r);  // kept rows per head per segment
    if (br.w <= n) {
      local_pairs += double(H) * double(n / br.w) * causal_pairs(keep);
      continue;
    }
    ++a.spanning;
    const int64_t S = br.w / n;                          // ranks the segment spans
    const double m = double((n + br.r - 1) / br.r);      // kept rows per head on one rank
    merged_rows += double(H) * m;                        // the piece's rows this rank merges and sums
    // The last rank's m queries see keys keep - m + 1 .. keep. Today a piece
    // also runs the other ranks' (zero) query rows: the whole segment.
    span_pairs += double(H) * (kernel_query_range ? m * keep - m * (m - 1) / 2 : causal_pairs(keep));
    if (how == Gather::AllRanks) {
      packed_rows += double(H) * m;
      continue;
    }
    const double rows = double(H) * m;
    const double g = ring_ms(S, rows * kRowBytesKV), s = ring_ms(S, rows * kRowBytesGrad);
    a.gather_ms += g;
    a.scatter_ms += s;
    a.latency_ms += ring_ms(S, 0) * 2;
    a.bytes += double(S - 1) * rows * (kRowBytesKV + kRowBytesGrad);
    if (S == P) a.longest_ms = g + s;
    a.saved_bytes += double(S) * rows * kRowBytesKV;
    a.transient_bytes = std::max(a.transient_bytes, double(S) * rows * kRowBytesGrad);
  }
  if (how == Gather::AllRanks && packed_rows > 0) {
    a.gather_ms = ring_ms(P, packed_rows * kRowBytesKV);
    a.scatter_ms = ring_ms(P, packed_rows * kRowBytesGrad);
    a.latency_ms = ring_ms(P, 0) * 2;
    a.bytes = double(P - 1) * packed_rows * (kRowBytesKV + kRowBytesGrad);
    a.longest_ms = a.comm_ms();  // one collective carries every segment
    a.saved_bytes = double(P) * packed_rows * kRowBytesKV;
    a.transient_bytes = double(P) * packed_rows * kRowBytesGrad;
  }
  a.local_ms = fit.ms(a.branches - a.spanning, local_pairs);
  a.span_ms = fit.ms(a.spanning, span_pairs);  // one piece per spanning branch on this rank
  // The chunks here are powers of two that every local segment divides, so
  // the local branches' results are the base (whole_chunk in
  // ops/seq_parallel_attention.cpp) and only the pieces' rows go through a
  // merge and a sum: session 8's per-row cost, on those rows.
  a.pass_ms = kPassMsPerMi * merged_rows / (double(kMi) * 8);
  return a;
}

// What the model compares: the code today, and per-segment sub-groups with a
// kernel entry taking a query range, without and with overlap.
struct Variant {
  const char* name;
  Gather gather;
  bool query_range, overlap;
};
const Variant kToday{"today (all-rank gather, no overlap)", Gather::AllRanks, false, false};
const Variant kSubSerial{"sub-group gathers, no overlap", Gather::SubGroups, true, false};
const Variant kSubOverlap{"sub-group gathers, overlapped", Gather::SubGroups, true, true};

double attention_ms(int64_t N, int64_t P, int64_t H, const Variant& v, const KernelFit& fit) {
  const Attention a = attention(N, P, H, v.gather, v.query_range, fit);
  return v.overlap ? a.overlapped_ms() : a.serial_ms();
}

// Attention activations per GPU (inputs, outputs, gradients, accumulators)
// plus the sequence-parallel buffers of one layer.
double attention_gib(int64_t N, int64_t P, int64_t H, const Variant& v, const KernelFit& fit) {
  const Attention a = attention(N, P, H, v.gather, v.query_range, fit);
  return kAttnGiBPerMi * double(N / P) / double(kMi) * double(H) / 8 +
         (a.saved_bytes + a.transient_bytes) / kGiB;
}

// ---------------------------------------------------------------------------
// The char-LM training step (the long-context shape: 2 layers, 4 heads, width
// 256, rope, batch 1) with the sequence split over P GPUs: everything but
// attention is per token and runs on the local chunk; attention is the
// sequence-parallel op; parameter gradients are all-reduced over the P ranks.

// Non-attention time per token and layer: the step less its attention
// kernels without dropout (H = 4 costs half the H = 8 figure), so that the
// attention dropout's extra (~5 ms per layer at 1M) counts as per-token work.
double rest_ms_per_token_layer() {
  const double step_ms = 1e3 * double(kMi) / kLmTokPerS;
  return (step_ms - double(kLmLayers) * kLargeMs * double(kLmHeads) / 8) / double(kLmLayers) / double(kMi);
}

double lm_param_bytes() {
  const double d = double(kLmWidth);
  return 4.0 * (double(kLmLayers) * (12 * d * d + 13 * d) + double(kLmVocab) * d + 2 * d);
}

struct Step {
  double ms, gib;
};

Step lm_step(int64_t N, int64_t P, const Variant& v, const KernelFit& fit) {
  const int64_t n = N / P;
  const Attention a = attention(N, P, kLmHeads, v.gather, v.query_range, fit);
  // At P = 1 nothing spans: no row passes (and charlm calls
  // ops::dilated_attention there anyway: no communicator at --sp 1).
  const double attn = v.overlap ? a.overlapped_ms() : a.serial_ms();
  Step s;
  s.ms = double(kLmLayers) * (attn + rest_ms_per_token_layer() * double(n)) + all_reduce_ms(P, lm_param_bytes());
  s.gib = kLmGiBPerMi * double(n) / double(kMi) + (double(kLmLayers) * a.saved_bytes + a.transient_bytes) / kGiB;
  return s;
}

// ---------------------------------------------------------------------------
// Printing.

std::string tokens(int64_t N) {
  char buf[32];
  if (N >= (int64_t(1) << 30)) std::snprintf(buf, sizeof buf, "%lldG", (long long)(N >> 30));
  else if (N >= kMi) std::snprintf(buf, sizeof buf, "%lldM", (long long)(N / kMi));
  else std::snprintf(buf, sizeof buf, "%lldK", (long long)(N / 1024));
  return buf;
}

std::vector<int64_t> gpu_counts() {
  std::vector<int64_t> p;
  for (int64_t P = 1; P <= 1024; P *= 2) p.push_back(P);
  return p;
}

void print_calibration(const KernelFit& fit) {
  const std::vector<Branch> measured = family(kMi, 4);
  std::printf("## Calibration\n\n");
  std::printf("fit: %.3f ms per branch launch + %.3g ps per attended (query, key) pair\n", fit.launch_ms,
              fit.pair_ms * 1e9);
  std::printf("effective fwd+bwd rate: %.0f TFLOP/s (4*D*3.5 FLOPs per pair)\n",
              4.0 * kDim * 3.5 / (fit.pair_ms * 1e-3) / 1e12);
  for (int64_t N : {int64_t(32768), int64_t(131072), kMi, 8 * kMi})
    std::printf("N %8s: measured config %.2f ms; LongNet family to w = N (%zu branches) %.2f ms\n",
                tokens(N).c_str(), fit.ms(4, pairs_one_gpu(N, 8, measured)), family(N).size(),
                fit.ms(double(family(N).size()), pairs_one_gpu(N, 8, family(N))));
  std::printf("op at 1M, P = 1 (bench_dist, session 15): w16k measured %.1f ms against kernels %.1f; wN measured "
              "%.1f ms, model %.1f ms\n",
              kOpW16kMs, kLargeMs, kOpWNMs, attention_ms(kMi, 1, 8, kToday, fit));
  std::printf("row passes on the pieces' rows: %.1f ms per 1M rows at H 8 (session 8, over the whole chunk: "
              "%.1f less %.1f)\n",
              kPassMsPerMi, kOpW16kMsSession8, kLargeMsSession8);
  std::printf("charlm non-attention: %.1f ms per layer per 1M tokens (H200); params %.2f M\n",
              rest_ms_per_token_layer() * double(kMi), lm_param_bytes() / 4 / 1e6);
  std::printf("dense causal fwd+bwd, ring attention, 1G tokens on 1024 GPUs: %.0f s per layer\n\n",
              kDenseMs * 1e-3 * std::pow(double(int64_t(1) << 30) / kDenseN, 2) / 1024);
}

void print_attention_table(const char* title, int64_t tokens_per_gpu, int64_t fixed_N, const KernelFit& fit) {
  std::printf("## %s (H = 8, one layer fwd+bwd, slowest rank)\n\n", title);
  std::printf("| P | N | N/P | spanning | local ms | spanning ms | row passes ms | today: comm ms | sub-group: comm ms "
              "(latency) | longest segment ms | today ms | sub serial ms | sub overlapped ms | "
              "eff. today / sub | GiB today / sub |\n|");
  for (int i = 0; i < 15; ++i) std::printf("---|");
  std::printf("\n");
  double t1_today = 0, t1_sub = 0;
  for (int64_t P : gpu_counts()) {
    const int64_t N = fixed_N ? fixed_N : tokens_per_gpu * P;
    const Attention today = attention(N, P, 8, Gather::AllRanks, false, fit);
    const Attention sub = attention(N, P, 8, Gather::SubGroups, true, fit);
    const double t_today = today.serial_ms(), t_sub = sub.overlapped_ms();
    if (P == 1) t1_today = t_today, t1_sub = t_sub;
    const double e = fixed_N ? double(P) : 1.0;  // strong scaling: ideal is t1 / P
    std::printf("| %lld | %s | %s | %d | %.1f | %.2f | %.1f | %.1f | %.1f (%.1f) | %.1f | %.1f | %.1f | %.1f | "
                "%.0f%% / %.0f%% | %.1f / %.1f |\n",
                (long long)P, tokens(N).c_str(), tokens(N / P).c_str(), sub.spanning, sub.local_ms,
                sub.span_ms, sub.pass_ms, today.comm_ms(), sub.comm_ms(), sub.latency_ms, sub.longest_ms, t_today,
                sub.serial_ms(), t_sub, 100 * t1_today / (e * t_today), 100 * t1_sub / (e * t_sub),
                attention_gib(N, P, 8, kToday, fit), attention_gib(N, P, 8, kSubOverlap, fit));
  }
  std::printf("\n");
}

void print_lm_tables(const KernelFit& fit) {
  std::printf("## charlm step, 1M tokens per GPU (2 layers, H 4, width 256)\n\n");
  std::printf("| P | N | today ms | today GiB | sub-group overlapped ms | M tok/s | GiB |\n|---|---|---|---|---|---|---|\n");
  for (int64_t P : gpu_counts()) {
    const int64_t N = kMi * P;
    const Step t = lm_step(N, P, kToday, fit), s = lm_step(N, P, kSubOverlap, fit);
    std::printf("| %lld | %s | %.0f | %.1f | %.0f | %.4g | %.1f |\n", (long long)P, tokens(N).c_str(), t.ms,
                t.gib, s.ms, double(N) / (s.ms * 1e-3) / 1e6, s.gib);
  }
  std::printf("\n## charlm step (sub-group, overlapped) over N x P: ms / GiB per GPU (* = over %.0f GiB)\n\n",
              kCapacityGiB);
  const std::vector<int64_t> Ns = {kMi, 8 * kMi, 64 * kMi, 256 * kMi, int64_t(1) << 30};
  const std::vector<int64_t> Ps = {1, 8, 64, 128, 256, 512, 1024};
  std::printf("| N \\ P |");
  for (int64_t P : Ps) std::printf(" %lld |", (long long)P);
  std::printf("\n|---|");
  for (size_t i = 0; i < Ps.size(); ++i) std::printf("---|");
  std::printf("\n");
  for (int64_t N : Ns) {
    std::printf("| %s |", tokens(N).c_str());
    for (int64_t P : Ps) {
      const Step s = lm_step(N, P, kSubOverlap, fit);
      std::printf(" %.0f / %.1f%s |", s.ms, s.gib, s.gib > kCapacityGiB ? "*" : "");
    }
    std::printf("\n");
  }
  std::printf("\nlargest chunk per GPU within %.0f GiB: charlm %.2f M tokens, attention layer (H 8) %.2f M\n",
              kCapacityGiB, kCapacityGiB / kLmGiBPerMi, kCapacityGiB / kAttnGiBPerMi);
  std::printf("fewest GPUs for 1G tokens: charlm %.0f, attention layer %.0f\n\n",
              std::ceil(1024 * kLmGiBPerMi / kCapacityGiB), std::ceil(1024 * kAttnGiBPerMi / kCapacityGiB));
}

// The first P (up to 2^16) where weak scaling at 1M tokens per GPU falls
// below 90% efficiency, and every term at 1G tokens on 1024 GPUs.
void print_break_points(const KernelFit& fit) {
  std::printf("## Where weak scaling (1M tokens per GPU) falls below 90%% efficiency\n\n");
  for (const Variant* v : {&kToday, &kSubSerial, &kSubOverlap}) {
    const double a1 = attention_ms(kMi, 1, 8, *v, fit), l1 = lm_step(kMi, 1, *v, fit).ms;
    int64_t pa = 0, pl = 0;
    for (int64_t P = 2; P <= 65536 && (!pa || !pl); P *= 2) {
      if (!pa && a1 / attention_ms(kMi * P, P, 8, *v, fit) < 0.9) pa = P;
      if (!pl && l1 / lm_step(kMi * P, P, *v, fit).ms < 0.9) pl = P;
    }
    std::printf("%s: attention layer (H 8) from P = %lld, charlm step from P = %lld\n", v->name, (long long)pa,
                (long long)pl);
  }
  const int64_t N = int64_t(1) << 30, P = 1024;
  std::printf("\n1G tokens on 1024 GPUs, one attention layer (H 8), slowest rank:\n");
  for (Gather how : {Gather::AllRanks, Gather::SubGroups}) {
    const Attention a = attention(N, P, 8, how, how == Gather::SubGroups, fit);
    std::printf("%s: gather %.1f ms + scatter %.1f ms (latency %.1f ms), %.1f MiB moved per rank; longest "
                "segment %.1f ms; buffers %.2f GiB kept + %.2f GiB transient\n",
                how == Gather::AllRanks ? "all-rank gather" : "sub-group gathers", a.gather_ms, a.scatter_ms,
                a.latency_ms, a.bytes / kMiB, a.longest_ms, a.saved_bytes / kGiB, a.transient_bytes / kGiB);
    if (how == Gather::SubGroups)
      std::printf("local kernels: forward %.1f ms, backward %.1f ms; each us of per-step latency adds %.1f ms\n",
                  a.local_ms * kLargeFwdMs / kLargeMs, a.local_ms * (1 - kLargeFwdMs / kLargeMs),
                  a.latency_ms / (kInfiniBand.latency_s * 1e6));
  }
  std::printf("\n");
}

// ---------------------------------------------------------------------------
// The plot: four panels.

using minidl::plot::Figure;
using minidl::plot::Series;

Figure panel(const std::string& title, const std::string& ylabel) {
  Figure f;
  f.title = title;
  f.x.label = "GPUs P";
  f.y.label = ylabel;
  f.x.log = f.y.log = true;
  for (int64_t P : gpu_counts()) f.x.ticks.push_back(double(P));
  f.x.min = 0.85;  // room for the markers at P = 1
  f.x.max = 1200;
  f.width = 780;
  f.height = 520;
  return f;
}

// y(P) at P = 1, 2, 4, ..., 1024.
Series curve(const std::string& label, const std::function<double(int64_t)>& y) {
  Series s{.label = label};
  for (int64_t P : gpu_counts()) {
    s.x.push_back(double(P));
    s.y.push_back(y(P));
  }
  return s;
}

// A measured point at P = 1, drawn as a black dot.
Series marker(const std::string& label, double y) {
  return Series{.label = label, .x = {1.0}, .y = {y}, .color = minidl::plot::Color{0, 0, 0}, .markers = true};
}

void save_plot(const std::string& path, const KernelFit& fit) {
  const int64_t strong_N = 8 * kMi;
  auto weak_attn = [&](const Variant& v) {
    return [&fit, &v](int64_t P) { return attention_ms(kMi * P, P, 8, v, fit); };
  };
  auto strong_attn = [&](const Variant& v) {
    return [&fit, &v, strong_N](int64_t P) { return attention_ms(strong_N, P, 8, v, fit); };
  };

  Figure weak = panel("weak: attention, 1M tokens/GPU", "ms per layer fwd+bwd (H 8)");
  for (const Variant* v : {&kToday, &kSubSerial, &kSubOverlap}) weak.series.push_back(curve(v->name, weak_attn(*v)));
  // The op on LongNet's family to w = N (the curves' configuration).
  weak.series.push_back(marker("measured, H200 (bench_dist wN, P = 1)", kOpWNMs));
  weak.y.min = 30;
  weak.y.max = 500;

  Figure strong = panel("strong: attention, one 8M sequence", "ms per layer fwd+bwd (H 8)");
  for (const Variant* v : {&kToday, &kSubSerial, &kSubOverlap})
    strong.series.push_back(curve(v->name, strong_attn(*v)));
  const double t1 = attention_ms(strong_N, 1, 8, kSubOverlap, fit);
  strong.series.push_back(curve("ideal: t(1) / P", [t1](int64_t P) { return t1 / double(P); }));

  Figure lm = panel("weak: charlm step, 1M tokens/GPU", "ms per step (2 layers, H 4)");
  for (const Variant* v : {&kToday, &kSubSerial, &kSubOverlap})
    lm.series.push_back(curve(v->name, [&fit, v](int64_t P) { return lm_step(kMi * P, P, *v, fit).ms; }));
  lm.series.push_back(marker("measured, H200", 1e3 * double(kMi) / kLmTokPerS));
  lm.y.min = 60;
  lm.y.max = 600;

  Figure mem = panel("memory per GPU", "GiB");
  mem.series.push_back(curve("charlm weak, today", [&fit](int64_t P) { return lm_step(kMi * P, P, kToday, fit).gib; }));
  mem.series.push_back(
      curve("charlm weak, sub-group", [&fit](int64_t P) { return lm_step(kMi * P, P, kSubOverlap, fit).gib; }));
  mem.series.push_back(curve("charlm strong 8M, sub-group",
                             [&fit, strong_N](int64_t P) { return lm_step(strong_N, P, kSubOverlap, fit).gib; }));
  mem.series.push_back(curve("attention weak (H 8), sub-group",
                             [&fit](int64_t P) { return attention_gib(kMi * P, P, 8, kSubOverlap, fit); }));
  mem.series.push_back(Series{.label = "H200 capacity", .x = {1, 1024}, .y = {kCapacityGiB, kCapacityGiB},
                              .color = minidl::plot::Color{120, 120, 120}});
  mem.series.push_back(marker("measured 1M: charlm, op (H200)", kLmGiBPerMi));
  mem.series.push_back(Series{.x = {1.0}, .y = {kAttnGiBPerMi}, .color = minidl::plot::Color{0, 0, 0},
                              .markers = true});
  mem.y.min = 0.1;
  mem.y.max = 300;

  minidl::plot::save_png({weak, strong, lm, mem}, 2, path);
  std::printf("wrote %s\n", path.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  std::string plot_path;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--plot=", 7) == 0) {
      plot_path = argv[i] + 7;
    } else {
      std::fprintf(stderr, "usage: %s [--plot=FILE.png]\n", argv[0]);
      return 2;
    }
  }
  const KernelFit fit = fit_kernel();
  print_calibration(fit);
  print_attention_table("Weak scaling: 1M tokens per GPU", kMi, 0, fit);
  print_attention_table("Strong scaling: one 8M-token sequence", 0, 8 * kMi, fit);
  print_lm_tables(fit);
  print_break_points(fit);
  if (!plot_path.empty()) save_plot(plot_path, fit);
  return 0;
}
