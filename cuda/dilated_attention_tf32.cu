// float32 dilated attention on TF32 tensor cores: forward and backward for
// one branch (cuda/dilated_attention_mma.cuh). Split from the bf16 mma.sync
// kernels (cuda/dilated_attention_mma.cu), whose tile helpers it shares; the
// backward is their kernel with the MmaTf32 traits
// (cuda/dilated_attention_mma_backward.cuh).
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/dilated_attention_mma_backward.cuh"
#include "cuda/dilated_attention_tiles.cuh"
#include "cuda/mma.cuh"
#include "cuda/runtime.h"

// ---------------------------------------------------------------------------
// float32 on TF32 tensor cores (mma.sync m16n8k8, sm_80+), the library's
// float32 matmul policy (cuBLAS CUBLAS_COMPUTE_32F_FAST_TF32) applied to
// attention: every operand of the seven products is rounded to tf32
// (cvt.rna) as its fragment is loaded, P and dS included; accumulation, the
// softmax, lse, the merge and the dropout mask are fp32 and the same as the
// bf16 kernels'. The m16n8k8 accumulator layout is that of m16n8k16, so the
// masking, online softmax, dropout words and epilogues are the bf16 code's.
// Its A layout is not (lane l holds columns l%4 and l%4 + 4, not 2(l%4) and
// 2(l%4) + 1): a product whose A comes from an accumulator (P V, P^T dO,
// dS^T Q) permutes its reduction index instead, A slot c <-> column 2c and
// slot c + 4 <-> column 2c + 1 within each 8-wide k-step, and its B fragment
// reads the same rows (2(l%4) and 2(l%4) + 1); dQ = dS K does the same so
// that its K loads are bank-conflict free. fp32 tiles are twice the bytes of
// bf16 ones, so K and V (forward) and Q and dO (backward) are single-buffered,
// each refilled as soon as the block is done with it.
namespace minidl::cuda::attn {
namespace {

using namespace mma;

constexpr int kThreads = kMmaWarps * 32;

// Forward: 64 query rows per block (16 per warp), 64-key tiles.
template <int D>
struct Tf32FwdSmem {
  using Tile = F32Tile<64, D>;
  static constexpr int kQ = 0;
  static constexpr int kK = Tile::kBytes;
  static constexpr int kV = 2 * Tile::kBytes;
  static constexpr int kBytes = 3 * Tile::kBytes;  // D = 64: 52 KiB, D = 128: 99 KiB
};

// kNested: `pairs` is a share of nested pairs (forward_mma_kernel's).
template <int D, bool kCausal, MergeMode kMode, bool kDropout, bool kNested>
__global__ __launch_bounds__(kThreads) void forward_tf32_kernel(Operand<float> q, Operand<float> k,
                                                                Operand<float> v, BranchGrid g,
                                                                float scale_log2, BranchDropout drop,
                                                                BranchPairs pairs, float* o_acc, float* lse) {
  static_assert(kMode != MergeMode::kSingle, "float32 writes its output as the fp32 accumulator (kWrite)");
  using L = Tf32FwdSmem<D>;
  using T = typename L::Tile;
  constexpr int kBr = 64, kBc = 64;
  constexpr int kSteps = D / 8;   // k-steps of Q K^T
  constexpr int kDTiles = D / 8;  // n-tiles of the output
  constexpr int kNTiles = kBc / 8;
  extern __shared__ __align__(128) char smem[];
  drop.mask = resolved_dropout<kDropout>(drop.mask);  // the graph offset read once

  const BlockRows block = block_rows<true>(g, kBr);
  const int64_t batch = block.batch, head = block.head, t0 = block.t0;
  const RowSet rows = block.rows;
  if (t0 >= rows.count) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lr = lane / 4, lc = lane % 4;  // fragment row and column of this lane
  const SpanWalk<kBc> walk = key_walk<kBr, kBc, kCausal, kNested>(pairs, t0, rows.count);
  const int n_tiles = walk.n;

  // cp.async groups, in order: {Q, K_0}, {V_0}, then K_{j+1} after S_j and
  // V_{j+1} after P_j V_j, so "all but the newest group" is always the tile
  // about to be read.
  if (!kNested || n_tiles > 0) {
    load_tile_f32_async<kBr, D, kThreads>(smem + L::kQ, q, batch, head, rows, t0);
    load_tile_f32_async<kBc, D, kThreads>(smem + L::kK, k, batch, head, rows, walk.row(0));
    cp_async_commit();
    load_tile_f32_async<kBc, D, kThreads>(smem + L::kV, v, batch, head, rows, walk.row(0));
    cp_async_commit();
  }

  uint32_t qf[kSteps][4];
  float o[kDTiles][4];
  // Row maxima in raw score units, as in the bf16 kernel.
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  // This lane's rows: q_row0 and q_row0 + 8.
  const int64_t q_row0 = t0 + warp * 16 + lr;
  const AttentionMaskRows drop_rows = kDropout ? dropout_kept_rows(drop, batch, head, rows) : AttentionMaskRows{};
  // Nested pairs: the lane's log2 pair weights.
  float bias[2] = {0.f, 0.f};
  if constexpr (kNested) pair_log2_weights(pairs, head, lane, bias);
  char* qs = smem + L::kQ;
  char* ks_tile = smem + L::kK;
  char* vs_tile = smem + L::kV;

  for (int j = 0; j < n_tiles; ++j) {
    const int64_t k0 = walk.row(j);
    cp_async_wait<1>();  // K_j (and Q)
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const int r = warp * 16 + lr, c = ks * 8 + lc;
        qf[ks][0] = to_tf32(*T::at(qs, r, c));
        qf[ks][1] = to_tf32(*T::at(qs, r + 8, c));
        qf[ks][2] = to_tf32(*T::at(qs, r, c + 4));
        qf[ks][3] = to_tf32(*T::at(qs, r + 8, c + 4));
      }
    }
    // Dropout mask words of this lane's rows (layout: the bf16 kernel's).
    uint32_t keep_words[2][4];
    if constexpr (kDropout) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t tq = q_row0 + r * 8;
        dropout_words_rows(drop.mask, drop_rows.at(uint64_t(tq < rows.count ? tq : 0)), k0, lane,
                           keep_words[r]);
      }
    }
    // S = Q K^T: B[d][key] = K[key][d].
    float s[kNTiles][4];
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
        mma_tf32(s[nt], qf[ks], to_tf32(*T::at(ks_tile, nt * 8 + lr, ks * 8 + lc)),
                 to_tf32(*T::at(ks_tile, nt * 8 + lr, ks * 8 + lc + 4)));
    __syncthreads();  // every warp is done with K_j
    if (j + 1 < n_tiles) {
      load_tile_f32_async<kBc, D, kThreads>(ks_tile, k, batch, head, rows, walk.row(j + 1));
      cp_async_commit();
    }

    // Mask (only tiles that cross the causal diagonal, the end or a span of
    // the block's rows), then the online softmax: two rows per lane, reduced
    // over the quad.
    const bool need_mask =
        k0 + kBc > rows.count || (kCausal && k0 + kBc - 1 > t0) || (kNested && walk.reaches(k0));
    if (need_mask) {
      const int64_t limit = rows.count - k0;  // keys at index >= limit do not exist
      SpanCols own[2];  // the keys in each row's span (found here: a rare tile)
      if constexpr (kNested) fragment_span_cols<kBc>(own, pairs, q_row0, k0);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int col = nt * 8 + 2 * lc + (e & 1);
          int64_t tq = q_row0 + (e >> 1) * 8;
          if (col >= limit || (kCausal && k0 + col > tq) || (kNested && own[e >> 1].excludes(col)))
            s[nt][e] = -INFINITY;
        }
    }
    float m_scaled[2], corr[2];
    online_softmax_max<kNTiles>(reinterpret_cast<const float(&)[kNTiles * 4]>(s), m_row, l_row, m_scaled, corr,
                                scale_log2);
    // The exponent's offset per row and column parity: the weight 2^bias.
    const float offset[2][2] = {{kNested ? bias[0] - m_scaled[0] : -m_scaled[0], kNested ? bias[1] - m_scaled[0] : -m_scaled[0]},
                                {kNested ? bias[0] - m_scaled[1] : -m_scaled[1], kNested ? bias[1] - m_scaled[1] : -m_scaled[1]}};
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      o[dt][0] *= corr[0];
      o[dt][1] *= corr[0];
      o[dt][2] *= corr[1];
      o[dt][3] *= corr[1];
    }
    // P as tf32 A fragments: n-tile nt is k-step nt of P V, with its columns
    // (keys) 2c, 2c + 1 in A slots c, c + 4.
    uint32_t pf[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = exp2f(fmaf(s[nt][e], scale_log2, offset[e >> 1][e & 1]));
        l_row[e >> 1] += p[e];  // the normaliser counts every key
        // Dropped weights are zeroed; the kept ones' scale is applied at the store.
        if constexpr (kDropout)
          if (!keep_bytes_kept(keep_words[e >> 1][nt / 2], 2 * (nt % 2) + (e & 1))) p[e] = 0.f;
      }
      pf[nt][0] = to_tf32(p[0]);  // (row lr, key 2lc)
      pf[nt][1] = to_tf32(p[2]);  // (row lr + 8, key 2lc)
      pf[nt][2] = to_tf32(p[1]);  // (row lr, key 2lc + 1)
      pf[nt][3] = to_tf32(p[3]);  // (row lr + 8, key 2lc + 1)
    }
    if (j + 1 < n_tiles) cp_async_wait<1>();  // V_j (K_{j+1} may still be in flight)
    else cp_async_wait<0>();
    __syncthreads();
    // O += P V: B[slot][d] = V[key of slot][d].
#pragma unroll
    for (int kk = 0; kk < kNTiles; ++kk)
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        mma_tf32(o[dt], pf[kk], to_tf32(*T::at(vs_tile, kk * 8 + 2 * lc, dt * 8 + lr)),
                 to_tf32(*T::at(vs_tile, kk * 8 + 2 * lc + 1, dt * 8 + lr)));
    __syncthreads();  // every warp is done with V_j
    if (j + 1 < n_tiles) {
      load_tile_f32_async<kBc, D, kThreads>(vs_tile, v, batch, head, rows, walk.row(j + 1));
      cp_async_commit();
    }
  }
  store_branch_rows<D, kMode>(o, m_row, l_row, q_row0, scale_log2, g, batch, head, rows, o_acc, lse,
                              nullptr, kDropout ? drop.mask.scale : 1.f);
}

template <int D, bool kCausal, MergeMode kMode>
void launch_forward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v,
                         BranchGrid g, int64_t batch, float scale_log2, const BranchDropout& drop,
                         const BranchPairs& pairs, float* o_acc, float* lse) {
  constexpr int smem = Tf32FwdSmem<D>::kBytes;
  const bool nested = !pairs.plain();
  auto kernel = drop.mask.enabled() ? nested ? forward_tf32_kernel<D, kCausal, kMode, true, true>
                                             : forward_tf32_kernel<D, kCausal, kMode, true, false>
                : nested ? forward_tf32_kernel<D, kCausal, kMode, false, true>
                         : forward_tf32_kernel<D, kCausal, kMode, false, false>;
  allow_dynamic_smem(smem, forward_tf32_kernel<D, kCausal, kMode, true, true>,
                     forward_tf32_kernel<D, kCausal, kMode, true, false>,
                     forward_tf32_kernel<D, kCausal, kMode, false, true>,
                     forward_tf32_kernel<D, kCausal, kMode, false, false>);
  g.tiles_per_segment = (max_kept_rows(g.w, g.r) + 63) / 64;
  const dim3 grid = grid_of(g, batch);
  kernel<<<grid, kThreads, smem, stream()>>>(q, k, v, g, scale_log2, drop, pairs, o_acc, lse);
  MINIDL_CUDA_LAUNCH_CHECK();
}

// Calls f(std::integral_constant<int, D>{}) for a head dim the kernels take.
template <typename F>
void with_head_dim(const char* op, int64_t d, F&& f) {
  switch (d) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: MINIDL_FAIL(op, ": no tensor-core kernel for head dim ", d);
  }
}

}  // namespace

void forward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v, const BranchGrid& g,
                  int64_t batch, int64_t d, bool causal, float scale_log2, const BranchDropout& drop,
                  MergeMode mode, float* o_acc, float* lse, const BranchPairs& pairs) {
  MINIDL_CHECK(mode != MergeMode::kSingle, "dilated_attention (cuda, tf32): kSingle is bf16 only; float32 "
               "writes its output with kWrite");
  with_head_dim("dilated_attention (cuda, tf32)", d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    auto run = [&](auto causal_tag) {
      constexpr bool kCausal = decltype(causal_tag)::value;
      if (mode == MergeMode::kWrite)
        launch_forward_tf32<D, kCausal, MergeMode::kWrite>(q, k, v, g, batch, scale_log2, drop, pairs, o_acc, lse);
      else
        launch_forward_tf32<D, kCausal, MergeMode::kMerge>(q, k, v, g, batch, scale_log2, drop, pairs, o_acc, lse);
    };
    if (causal) run(std::true_type{});
    else run(std::false_type{});
  });
}

void backward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v,
                   const Operand<float>& dout, const float* lse, const float* delta, const BranchGrid& g,
                   int64_t batch, int64_t d, bool causal, float scale, const BranchDropout& drop, float* dq_acc,
                   float* dk_acc, float* dv_acc, const BranchPairs& pairs) {
  with_head_dim("dilated_attention backward (cuda, tf32)", d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    // No minimum of blocks per SM: ptxas's own register choice (the bf16 cap does not apply).
    if (causal) launch_backward_mma<MmaTf32, D, true, 0>(q, k, v, dout, lse, delta, g, batch, scale, drop, pairs, dq_acc, dk_acc, dv_acc);
    else launch_backward_mma<MmaTf32, D, false, 0>(q, k, v, dout, lse, delta, g, batch, scale, drop, pairs, dq_acc, dk_acc, dv_acc);
  });
}

}  // namespace minidl::cuda::attn
