// Dilated attention on CUDA: the kernel dispatcher and the launchers. The
// kernel versions live in their own files: the portable SIMT kernels
// (cuda/dilated_attention_simt.cu, the fallback for both dtypes), mma.sync
// bf16 (cuda/dilated_attention_mma.cu), TF32 float32
// (cuda/dilated_attention_tf32.cu) and the Hopper ones (cuda/sm90a/).
//
// Branches run as one launch each and merge in place into fp32 (O, L)
// accumulators with the log-sum-exp rule (rows of one launch are disjoint: no
// atomics); a lone branch keeping every row writes the output directly (when
// it computes all its pairs; on the ws kernels also a share of them), and the
// ws plan finishes the output and dK/dV in the branch that keeps every row
// (WsFinish). Where the branches nest, every version computes each pair
// several branches share once, weighted (ws_nested_pairs for the ws kernels'
// plan, branch_pairs for the per-branch launches).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string_view>
#include <vector>

#include "core/allocator.h"
#include "cuda/dilated_attention.h"
#include "cuda/dilated_attention_common.cuh"
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/dilated_attention_simt.cuh"
#include "cuda/elementwise.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

using namespace attn;

Tensor fp32_buffer(const Tensor& like) {
  return Tensor::empty(like.shape(), {DType::Float32, like.device(), false});
}

void zero(const Tensor& t) { backend::zero_bytes(t.raw_data(), t.device(), t.nbytes()); }

// The pairs each branch computes on the per-branch kernels (mma.sync, TF32,
// SIMT), config order: where the branches nest and dropout, if on, is per
// pair, each branch's share (nested_pairs: a pair the branches share once,
// by its owner, weighted by the branches holding it); else all of each
// branch's pairs. Per-copy dropout needs every copy.
std::vector<BranchPairs> branch_pairs(const DilatedAttentionConfig& config, int64_t n) {
  std::vector<BranchPairs> pairs = sharing_pairs(config, n);
  // The kernels find spans in 32 bits (span_lo_of); dropout needs fewer
  // positions anyway (mask rows below 2^32, which the ops check).
  const bool per_pair = config.dropout.enabled() && !pairs.empty();
  MINIDL_CHECK(!per_pair || n <= int64_t(UINT32_MAX), "dilated_attention (cuda): per-pair attention dropout over ",
               n, " positions; the kernels take at most 2^32 - 1");
  if (n > int64_t(UINT32_MAX)) pairs.clear();
  pairs.resize(config.branches.size());  // plain where none nest
  return pairs;
}

// The branches' launch order on the per-branch kernels: a branch with
// dilation 1 first (it keeps every row, so it overwrites the accumulators
// and no init pass is needed), then the others as listed; a branch whose
// pairs all belong to smaller ones is left out (nothing to add).
std::vector<size_t> branch_launch_order(const DilatedAttentionConfig& config, const Shape4& s,
                                        const std::vector<BranchPairs>& pairs) {
  std::vector<size_t> order;
  for (size_t i = 0; i < config.branches.size(); ++i) {
    const BranchGrid g = branch_grid(s, config.branches[i], kMmaRows);
    if (!pairs[i].shares_all(max_kept_rows(g.w, g.r))) order.push_back(i);
  }
  auto dense = std::find_if(order.begin(), order.end(), [&](size_t i) { return config.branches[i].dilation == 1; });
  if (dense != order.end()) std::rotate(order.begin(), dense, dense + 1);
  return order;
}

// The tensor-core kernels (TF32 for float32, mma.sync, wgmma and ws for
// bfloat16) take a problem only when every operand's rows are 16-byte
// aligned: views at odd offsets run SIMT (a misaligned cp.async would fault).
bool tensor_cores_take(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* dout = nullptr) {
  for (const Tensor* t : {&q, &k, &v, dout}) {
    if (!t) continue;
    const bool aligned = t->dtype() == DType::Float32    ? rows_aligned(operand<float>(*t))
                         : t->dtype() == DType::BFloat16 ? rows_aligned(operand<BFloat16>(*t))
                                                         : false;
    if (!aligned) return false;
  }
  return true;
}

// Attention dropout's saved keep bits (DropoutBits), one region per branch
// in config order: the words of branch `branch`'s region start at the
// returned offset (branch = the branch count: the total).
int64_t dropout_bits_offset(const DilatedAttentionConfig& config, const Shape4& s, size_t branch) {
  int64_t words = 0;
  for (size_t i = 0; i < branch; ++i)
    words += DropoutBits::words_for(branch_grid(s, config.branches[i], kMmaRows), s.b, config.causal);
  return words;
}

// The branch's dropout with its region of the saved keep bits, when `bits` holds them.
BranchDropout branch_dropout(const DilatedAttentionConfig& config, size_t branch, const Shape4& s,
                                const Tensor& bits) {
  BranchDropout drop = branch_dropout(config, branch, s);
  if (bits.defined())
    drop.bits = {static_cast<uint32_t*>(bits.raw_data()) + dropout_bits_offset(config, s, branch),
                 DropoutBits::side_for(branch_grid(s, config.branches[branch], kMmaRows)), config.causal};
  return drop;
}

#if MINIDL_WGMMA
// The most of the device's memory that the attention-dropout bits alive at
// once may take: each forward's live until its backward, so a model of many
// layers holds all of theirs. A forward whose bits would pass it (e.g. dense
// attention over 256K rows with 8 heads, 34 GB, or the later layers of a deep
// model at long context) keeps none, and its backward draws the mask again.
constexpr double kDropoutBitsBudget = 1.0 / 16;

// The storages of the bits kept so far on each device, as weak references:
// the bytes of those still alive count against the budget.
class LiveDropoutBits {
 public:
  // A fresh bits tensor of `words` words on `device`, or an undefined one
  // when they would not fit the budget beside the bits alive there.
  Tensor keep(Device device, int64_t words) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& kept = kept_[device.index];
    double live = 0;
    std::erase_if(kept, [&](const std::weak_ptr<Storage>& w) {
      std::shared_ptr<Storage> st = w.lock();
      if (st) live += static_cast<double>(st->nbytes());
      return !st;
    });
    if (live + 4.0 * static_cast<double>(words) > kDropoutBitsBudget * static_cast<double>(device_memory_bytes()))
      return Tensor();
    Tensor bits = Tensor::empty({words}, {DType::Int32, device, false});
    kept.push_back(bits.storage());
    return bits;
  }

 private:
  std::mutex mutex_;
  std::map<int, std::vector<std::weak_ptr<Storage>>> kept_;
};
LiveDropoutBits& live_dropout_bits() {
  static auto* live = new LiveDropoutBits();  // leaked: used until exit
  return *live;
}

// The order in which the ws kernels run a config's branches when one of them
// keeps every row (dilation 1): the others first, as listed, then that one,
// which finishes every row in the output's dtype (the forward's O and lse,
// the backward's dK and dV), so that no accumulator is zeroed or converted
// (WsFinish::kWrites; see there for the plans with spans). Empty when no
// branch keeps every row.
std::vector<size_t> finishing_order(const DilatedAttentionConfig& config) {
  const auto& branches = config.branches;
  const auto dense = std::find_if(branches.begin(), branches.end(), [](const DilatedBranch& b) { return b.dilation == 1; });
  if (dense == branches.end()) return {};
  const size_t last = static_cast<size_t>(dense - branches.begin());
  std::vector<size_t> order;
  for (size_t i = 0; i < branches.size(); ++i)
    if (i != last) order.push_back(i);
  order.push_back(last);
  return order;
}

// The pairs each branch computes on the ws kernels' plan (ws_nested_pairs),
// or empty where per-pair dropout needs the branches' shares and the ws
// kernels do not take them: the per-branch kernels' plan (branch_pairs) then
// runs it, forward and backward alike. Without per-pair dropout the shares
// are taken only where the finishing branch computes all its pairs
// (WsFinish::kWrites), else every branch computes all of its own.
std::vector<BranchPairs> ws_plan_pairs(const DilatedAttentionConfig& config, int64_t n, size_t finishing_branch) {
  std::vector<BranchPairs> pairs = ws_nested_pairs(config, n);
  const bool plain = std::all_of(pairs.begin(), pairs.end(), [](const BranchPairs& p) { return p.plain(); });
  if (dropout_per_pair(config, n)) return plain ? std::vector<BranchPairs>{} : pairs;
  if (pairs[finishing_branch].span != 0) return std::vector<BranchPairs>(pairs.size());
  return pairs;
}

// How the ws plan's finishing branch (finishing_order's last) ends it.
enum class WsFinish {
  // It has a pair in every row (no span; alone, maybe weighted: a spanning
  // sequence-parallel piece of the smallest branch): it writes the forward's
  // output and the backward's dK and dV in their dtype, adding what the
  // others left in fp32 accumulators.
  kWrites,
  // Alone, with spans (a spanning sequence-parallel piece): the same, over
  // outputs zeroed first, which the rows without a pair of its own keep.
  kWritesZeroed,
  // With spans beside other branches (a dilation-1 branch that is not the
  // smallest): every branch merges into zeroed fp32 accumulators, converted
  // once at the end.
  kMerges,
};
WsFinish ws_finish(const std::vector<BranchPairs>& pairs, const std::vector<size_t>& finish) {
  if (pairs[finish.back()].span == 0) return WsFinish::kWrites;
  return finish.size() == 1 ? WsFinish::kWritesZeroed : WsFinish::kMerges;
}

#endif

// bfloat16 (and float32 as TF32) on tensor cores, one launch per branch
// (branch_launch_order: a dilation-1 branch first overwrites the
// accumulators); a lone branch keeping every row (vanilla attention) writes
// the bf16 output directly, unless it computes a share of a larger problem's
// nested pairs (config.pairs: a sequence-parallel piece), which the kernels
// weigh only in their merging modes (kWrite, kMerge). The dropout mask of a
// branch is keyed by its index in config.branches, not by its place in the
// launch order.
// dropout_bits: as dilated_attention_forward's.
void forward_tensor_cores(AttentionKernel kernel, const Tensor& q, const Tensor& k, const Tensor& v,
                          const DilatedAttentionConfig& config, const Tensor& out, const Tensor& lse,
                          Tensor* dropout_bits) {
  Shape4 s = shape_of(q);
  const bool fp32 = q.dtype() == DType::Float32;
  const float scale_log2 = static_cast<float>(config.scale) * kLog2e;
  auto* lse_ptr = static_cast<float*>(lse.raw_data());
  auto* out_ptr = fp32 ? nullptr : static_cast<BFloat16*>(out.raw_data());
  if (dropout_bits) *dropout_bits = Tensor();
#if MINIDL_WGMMA
  // ws, bfloat16, several branches, one keeping every row, or one such
  // branch with a share of a larger problem's pairs: the ws kernels' plan,
  // when it takes the problem (ws_plan_pairs).
  const std::vector<size_t> finish = finishing_order(config);
  std::vector<BranchPairs> ws_pairs;
  if (!fp32 && kernel == AttentionKernel::kWarpSpecialized && !finish.empty()) {
    const Operand<BFloat16> qo = operand<BFloat16>(q), ko = operand<BFloat16>(k), vo = operand<BFloat16>(v);
    bool ws = true;
    for (size_t i : finish) ws = ws && ws_takes(qo, ko, vo, branch_grid(s, config.branches[i], kMmaRows), s.b);
    if (ws) ws_pairs = ws_plan_pairs(config, s.n, finish.back());
    // A lone branch with all its pairs (vanilla attention) runs kSingle below.
    if (ws_pairs.size() == 1 && ws_pairs[0].plain()) ws_pairs.clear();
  }
  // The pairs of the per-branch launches, when the ws plan does not run.
  const std::vector<BranchPairs> pairs = ws_pairs.empty() ? branch_pairs(config, s.n) : std::vector<BranchPairs>{};
  // For a backward to come (dropout_bits), the ws forward keeps attention
  // dropout's mask as it draws it, every branch in its region, when the ws
  // kernels run the problem (the ws plan, or forward_mma for every branch's
  // pairs) and the bits fit kDropoutBitsBudget beside those still alive.
  Tensor bits;
  if (dropout_bits && config.dropout.enabled() && !fp32 &&
      ws_forward_runs(kernel, operand<BFloat16>(q), operand<BFloat16>(k), operand<BFloat16>(v),
                      branch_grid(s, config.branches[0], kMmaRows), s.b) &&
      (!ws_pairs.empty() || std::all_of(pairs.begin(), pairs.end(), [](const BranchPairs& p) { return p.plain(); }))) {
    const int64_t words = dropout_bits_offset(config, s, config.branches.size());
    bits = live_dropout_bits().keep(q.device(), words);
  }
  if (dropout_bits) *dropout_bits = bits;
#else
  const std::vector<BranchPairs> pairs = branch_pairs(config, s.n);
  Tensor bits;
#endif
  auto drop_of = [&](size_t branch) { return branch_dropout(config, branch, s, bits); };
#if MINIDL_WGMMA
  // The ws plan: the other branches write and merge into the fp32
  // accumulators the rows they keep (lse -inf marks the rows none has
  // written: their accumulators are never read), then the finishing branch
  // merges every row and writes the output (MergeMode::kFinish), or as
  // ws_finish says.
  if (!ws_pairs.empty()) {
    const Operand<BFloat16> qo = operand<BFloat16>(q), ko = operand<BFloat16>(k), vo = operand<BFloat16>(v);
    const WsFinish how = ws_finish(ws_pairs, finish);
    // Alone, kFinish reads no accumulator (every lse -inf).
    Tensor o_acc = finish.size() == 1 ? Tensor() : fp32_buffer(out);
    if (how == WsFinish::kMerges) zero(o_acc);
    if (how == WsFinish::kWritesZeroed) zero(out);
    unary(UnaryOp::Fill, lse, -INFINITY, lse);
    for (size_t i = 0; i < finish.size(); ++i) {
      BranchGrid g = branch_grid(s, config.branches[finish[i]], kMmaRows);
      grid_of(g, s.b);  // size check
      // A branch whose pairs all belong to smaller ones has nothing to add
      // (kMerge takes rows no launch wrote: lse -inf).
      if (ws_pairs[finish[i]].shares_all(max_kept_rows(g.w, g.r))) continue;
      const MergeMode mode = i + 1 == finish.size() && how != WsFinish::kMerges ? MergeMode::kFinish
                             : i == 0                                           ? MergeMode::kWrite
                                                                                : MergeMode::kMerge;
      forward_ws(qo, ko, vo, g, s.b, config.causal, scale_log2, drop_of(finish[i]), mode,
                 o_acc.defined() ? static_cast<float*>(o_acc.raw_data()) : nullptr, lse_ptr, out_ptr,
                 ws_pairs[finish[i]]);
    }
    if (how == WsFinish::kMerges) copy(o_acc, out);
    return;
  }
#endif
  const std::vector<size_t> order = branch_launch_order(config, s, pairs);
  const bool covers = !order.empty() && config.branches[order.front()].dilation == 1;
  if (!fp32 && config.branches.size() == 1 && covers && pairs[0].plain()) {
    BranchGrid g = branch_grid(s, config.branches[0], kMmaRows);
    grid_of(g, s.b);  // size check
    forward_mma(kernel, operand<BFloat16>(q), operand<BFloat16>(k), operand<BFloat16>(v), g, s.b, s.d,
                config.causal, scale_log2, drop_of(0), MergeMode::kSingle, nullptr, lse_ptr, out_ptr);
    return;
  }
  // The fp32 accumulator: float32's output itself (TF32), else a buffer.
  Tensor o_acc = fp32 ? out : fp32_buffer(out);
  if (!covers) {
    zero(o_acc);
    unary(UnaryOp::Fill, lse, -INFINITY, lse);
  }
  for (size_t i = 0; i < order.size(); ++i) {
    BranchGrid g = branch_grid(s, config.branches[order[i]], kMmaRows);
    grid_of(g, s.b);
    const MergeMode mode = i == 0 && covers ? MergeMode::kWrite : MergeMode::kMerge;
    const BranchDropout drop = drop_of(order[i]);
    auto* acc = static_cast<float*>(o_acc.raw_data());
    if (fp32)
      forward_tf32(operand<float>(q), operand<float>(k), operand<float>(v), g, s.b, s.d, config.causal, scale_log2,
                   drop, mode, acc, lse_ptr, pairs[order[i]]);
    else
      forward_mma(kernel, operand<BFloat16>(q), operand<BFloat16>(k), operand<BFloat16>(v), g, s.b, s.d,
                  config.causal, scale_log2, drop, mode, acc, lse_ptr, out_ptr, pairs[order[i]]);
  }
  if (!fp32) copy(o_acc, out);
}

}  // namespace

const char* attention_kernel_name(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kSimt: return "simt";
    case AttentionKernel::kMmaSync: return "mma";
    case AttentionKernel::kWgmma: return "wgmma";
    case AttentionKernel::kWarpSpecialized: return "ws";
  }
  return "?";
}

namespace {

constexpr AttentionKernel kAllKernels[] = {AttentionKernel::kSimt, AttentionKernel::kMmaSync,
                                           AttentionKernel::kWgmma, AttentionKernel::kWarpSpecialized};

// MINIDL_ATTENTION_KERNEL, read at every call so that a test can switch it.
AttentionKernel kernel_cap() {
  const char* e = std::getenv("MINIDL_ATTENTION_KERNEL");
  if (!e || !*e) return AttentionKernel::kWarpSpecialized;
  for (AttentionKernel k : kAllKernels)
    if (std::string_view(e) == attention_kernel_name(k)) return k;
  MINIDL_FAIL("MINIDL_ATTENTION_KERNEL='", e, "' is not a kernel version (simt, mma, wgmma, ws)");
}

// Whether `kernel` implements `pass` for this problem on the current device.
bool handles(AttentionKernel kernel, DType dtype, int64_t d, AttentionPass pass) {
#if MINIDL_WGMMA
  const bool hopper = compute_capability() == 90;  // the sm_90a kernels are built and can run
#else
  const bool hopper = false;
#endif
  const bool forward = pass == AttentionPass::kForward;
  switch (kernel) {
    case AttentionKernel::kSimt: return true;
    case AttentionKernel::kMmaSync:  // float32 as TF32 (mma.sync m16n8k8, sm_80+)
      return mma_head_dim(d) && (dtype == DType::BFloat16 || (dtype == DType::Float32 && compute_capability() >= 80));
    case AttentionKernel::kWgmma: return forward && hopper && dtype == DType::BFloat16 && d == 64;
    case AttentionKernel::kWarpSpecialized:  // (views it cannot map run the older kernels)
      return hopper && dtype == DType::BFloat16 && (d == 64 || d == 128);
  }
  return false;
}

}  // namespace

AttentionKernel choose_attention_kernel(DType dtype, int64_t head_dim, AttentionPass pass) {
  const AttentionKernel cap = kernel_cap();
  AttentionKernel chosen = AttentionKernel::kSimt;
  for (AttentionKernel k : kAllKernels)
    if (k <= cap && handles(k, dtype, head_dim, pass)) chosen = k;
  return chosen;
}

void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const DilatedAttentionConfig& config, const Tensor& out,
                               const Tensor& lse) {
  dilated_attention_forward(q, k, v, config, out, lse, nullptr);
}

void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const DilatedAttentionConfig& config, const Tensor& out, const Tensor& lse,
                               Tensor* dropout_bits) {
  if (dropout_bits) *dropout_bits = Tensor();
  const char* op = "dilated_attention (cuda)";
  Shape4 s = shape_of(q);
  const AttentionKernel kernel =
      choose_attention_kernel(q.dtype(), s.d, AttentionPass::kForward);
  if (s.b * s.n * s.h > 0 && kernel != AttentionKernel::kSimt && tensor_cores_take(q, k, v)) {
    forward_tensor_cores(kernel, q, k, v, config, out, lse, dropout_bits);
    return;
  }
  Tensor o_acc = out.dtype() == DType::Float32 ? out : fp32_buffer(out);
  zero(o_acc);
  unary(UnaryOp::Fill, lse, -INFINITY, lse);
  if (s.b * s.n * s.h == 0) return;
  attn::forward_simt(op, q, k, v, config, branch_pairs(config, s.n), o_acc, lse);
  if (o_acc.impl() != out.impl()) copy(o_acc, out);
}

void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                const Tensor& grad_lse, const DilatedAttentionConfig& config,
                                const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  dilated_attention_backward(q, k, v, out, lse, grad_out, grad_lse, config, dq, dk, dv, Tensor());
}

void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                const Tensor& grad_lse, const DilatedAttentionConfig& config,
                                const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                const Tensor& dropout_bits) {
  const char* op = "dilated_attention backward (cuda)";
  Shape4 s = shape_of(q);
  bool fp32 = q.dtype() == DType::Float32;
  int64_t rows = s.b * s.n * s.h;
  float scale = static_cast<float>(config.scale);
  if (dropout_bits.defined()) {
    const int64_t words = dropout_bits_offset(config, s, config.branches.size());
    MINIDL_CHECK(config.dropout.enabled() && dropout_bits.dtype() == DType::Int32 &&
                     dropout_bits.device() == q.device() && dropout_bits.is_contiguous() && dropout_bits.numel() == words,
                 op, ": dropout_bits are not the forward's for this problem (", dropout_bits.numel(), " ",
                 dtype_name(dropout_bits.dtype()), " words on ", dropout_bits.device().str(), "; the forward keeps ", words,
                 " contiguous int32 words on ", q.device().str(), ", with dropout on)");
  }
#if MINIDL_WGMMA
  // The ws kernels, when a branch keeps every row (vanilla attention, or
  // dilation 1 among the branches): that branch runs last and writes dK and
  // dV once in bf16 (rows of any stride: e.g. the parts of one fused q/k/v
  // gradient), adding what the others left in fp32 accumulators for the rows
  // they wrote (a byte per row marks them); only dQ (reduced across key blocks)
  // needs a zeroed accumulator (WsFinish: the plans with spans). With attention
  // dropout they read the mask's keep bits that the ws forward saved; without
  // those, they draw the mask.
  auto rows_of_heads = [&](const Tensor& t) {  // (B, N, H, D) with each position's H x D block dense
    return t.stride(3) == 1 && t.stride(2) == s.d && t.stride(0) == s.n * t.stride(1) && t.stride(1) % 2 == 0;
  };
  const std::vector<size_t> finish = finishing_order(config);
  if (rows > 0 && !fp32 && !finish.empty() &&
      choose_attention_kernel(q.dtype(), s.d, AttentionPass::kBackward) ==
          AttentionKernel::kWarpSpecialized &&
      out.is_contiguous() && grad_out.is_contiguous() && rows_of_heads(dk) && dk.strides() == dv.strides()) {
    const Operand<BFloat16> qo = operand<BFloat16>(q), ko = operand<BFloat16>(k), vo = operand<BFloat16>(v),
                            go = operand<BFloat16>(grad_out);
    // The ws plan, where it takes the problem (ws_plan_pairs; the forward's choice).
    const std::vector<BranchPairs> pairs = ws_takes(qo, ko, vo, branch_grid(s, config.branches[0], kMmaRows), s.b, &go)
                                               ? ws_plan_pairs(config, s.n, finish.back())
                                               : std::vector<BranchPairs>{};
    if (!pairs.empty()) {
      const WsFinish how = ws_finish(pairs, finish);
      Tensor dq_acc = fp32_buffer(dq);  // zeroed by backward_delta
      Tensor dk_acc, dv_acc, written;  // for the branches before the last, or all (kMerges)
      if (finish.size() > 1) {
        dk_acc = fp32_buffer(dk);
        dv_acc = fp32_buffer(dv);
      }
      if (how == WsFinish::kMerges) {  // (several branches)
        zero(dk_acc);
        zero(dv_acc);
      } else if (finish.size() > 1) {
        written = Tensor::empty({(rows + 3) / 4}, {DType::Int32, q.device(), false});  // a byte per row
        zero(written);
      }
      if (how == WsFinish::kWritesZeroed)
        for (const Tensor* t : {&dk, &dv}) unary(UnaryOp::Fill, *t, 0.0, *t);
      auto ptr = [](const Tensor& t) { return t.defined() ? static_cast<float*>(t.raw_data()) : nullptr; };
      Tensor delta = Tensor::empty({s.b, s.n, s.h}, {DType::Float32, q.device(), false});
      attn::backward_delta(op, out, grad_out, grad_lse, delta, dq_acc);
      for (size_t i = 0; i < finish.size(); ++i) {
        const BranchGrid g = branch_grid(s, config.branches[finish[i]], kMmaRows);
        grid_of(g, s.b);  // size check
        const bool last = i + 1 == finish.size() && how != WsFinish::kMerges;
        if (pairs[finish[i]].shares_all(max_kept_rows(g.w, g.r))) continue;  // as the forward's
        backward_ws(qo, ko, vo, go, static_cast<const float*>(lse.raw_data()),
                    static_cast<const float*>(delta.raw_data()), g, s.b, config.causal, scale,
                    branch_dropout(config, finish[i], s, dropout_bits), static_cast<float*>(dq_acc.raw_data()), ptr(dk_acc),
                    ptr(dv_acc), last ? static_cast<BFloat16*>(dk.raw_data()) : nullptr,
                    last ? static_cast<BFloat16*>(dv.raw_data()) : nullptr, dk.stride(1),
                    written.defined() ? static_cast<uint8_t*>(written.raw_data()) : nullptr,
                    pairs[finish[i]]);
      }
      copy(dq_acc, dq);
      if (how == WsFinish::kMerges) {
        copy(dk_acc, dk);
        copy(dv_acc, dv);
      }
      return;
    }
  }
#endif
  // Accumulators: the outputs themselves when float32 and contiguous, else
  // fp32 buffers copied into them at the end (bf16, or strided views such as
  // the parts of one fused q/k/v gradient).
  auto accumulator = [&](const Tensor& t) { return fp32 && t.is_contiguous() ? t : fp32_buffer(t); };
  Tensor dq_acc = accumulator(dq), dk_acc = accumulator(dk), dv_acc = accumulator(dv);
  zero(dk_acc);
  zero(dv_acc);
  if (rows == 0) {
    zero(dq_acc);
    return;
  }
  MINIDL_CHECK(out.is_contiguous() && grad_out.is_contiguous(), op,
               ": out and grad_out must be contiguous");
  const AttentionKernel kernel = choose_attention_kernel(q.dtype(), s.d, AttentionPass::kBackward);
  const bool tensor_cores = kernel != AttentionKernel::kSimt && tensor_cores_take(q, k, v, &grad_out);
  const std::vector<BranchPairs> pairs = branch_pairs(config, s.n);
  Tensor delta = Tensor::empty({s.b, s.n, s.h}, {DType::Float32, q.device(), false});
  attn::backward_delta(op, out, grad_out, grad_lse, delta, dq_acc);  // zeroes dq_acc
  const float* l = static_cast<const float*>(lse.raw_data());
  const float* dl = static_cast<const float*>(delta.raw_data());
  if (tensor_cores) {  // one launch per branch; each adds its share of nested pairs (branch_pairs)
    for (size_t i : branch_launch_order(config, s, pairs)) {
      BranchGrid g = branch_grid(s, config.branches[i], kMmaRows);
      grid_of(g, s.b);
      if (fp32)  // TF32
        backward_tf32(operand<float>(q), operand<float>(k), operand<float>(v), operand<float>(grad_out), l, dl, g,
                      s.b, s.d, config.causal, scale, branch_dropout(config, i, s),
                      static_cast<float*>(dq_acc.raw_data()), static_cast<float*>(dk_acc.raw_data()),
                      static_cast<float*>(dv_acc.raw_data()), pairs[i]);
      else
        backward_mma(kernel, operand<BFloat16>(q), operand<BFloat16>(k), operand<BFloat16>(v),
                     operand<BFloat16>(grad_out), l, dl, g, s.b, s.d, config.causal, scale,
                     branch_dropout(config, i, s, dropout_bits), static_cast<float*>(dq_acc.raw_data()),
                     static_cast<float*>(dk_acc.raw_data()), static_cast<float*>(dv_acc.raw_data()), pairs[i]);
    }
  } else {
    attn::backward_simt(q, k, v, grad_out, lse, delta, config, pairs, dq_acc, dk_acc, dv_acc);
  }
  for (auto [acc, grad] : {std::pair{dq_acc, dq}, std::pair{dk_acc, dk}, std::pair{dv_acc, dv}})
    if (acc.impl() != grad.impl()) copy(acc, grad);
}

}  // namespace minidl::cuda
