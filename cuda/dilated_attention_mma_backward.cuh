#pragma once
// The mma.sync backward for one branch, one flow for bf16 (MmaBf16, from
// cuda/dilated_attention_mma.cu) and float32 on TF32 (MmaTf32, from
// cuda/dilated_attention_tf32.cu); internal to those two files.
//
// FlashAttention-2 style but key-major: a block owns 64 kept key rows (16 per
// warp) of one (batch, head, segment) and walks the 64-query tiles that see
// them. Each warp computes S^T = K Q^T and dP^T = V dO^T directly in the
// (key, query) orientation, so P^T and dS^T are already A fragments for
// dV += P^T dO and dK += dS^T Q; dS^T goes through shared memory once so the
// block can form dQ = dS K, which is added to global memory with atomics.
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/dilated_attention_tiles.cuh"
#include "cuda/mma.cuh"
#include "cuda/runtime.h"

namespace minidl::cuda::attn {

// Shared memory of the backward. bf16 double-buffers Q, dO and the row stats
// (the next tile's loads are issued at the top of the loop); fp32 tiles are
// twice the bytes, so TF32 single-buffers them: the next tile's loads are
// issued once dV and dK are done with the current one, and run under dQ.
template <class Tr, int D>
struct MmaBwdSmem {
  static constexpr int kBuffers = sizeof(typename Tr::Elem) == 2 ? 2 : 1;
  using Tile = typename Tr::template Tile<64, D>;
  using STile = typename Tr::template Tile<64, 64>;  // dS^T: 64 keys x 64 queries
  static constexpr int kK = 0;
  static constexpr int kV = kK + Tile::kBytes;
  static constexpr int kQ = kV + Tile::kBytes;
  static constexpr int kDO = kQ + kBuffers * Tile::kBytes;
  static constexpr int kDS = kDO + kBuffers * Tile::kBytes;
  static constexpr int kL = kDS + STile::kBytes;             // kBuffers x 64 floats
  static constexpr int kDelta = kL + kBuffers * 64 * 4;      // kBuffers x 64 floats
  static constexpr int kBytes = kDelta + kBuffers * 64 * 4;  // TF32: D = 64: 86 KiB, D = 128: 150 KiB
};

// d[n0 + h] += a b_h for the Tr::kNB n-tiles h of one B load (b[2h], b[2h + 1]).
// Written out rather than as a loop over h: the loop leads nvcc to number the
// bf16 kernel's accumulators differently, and ptxas then schedules it differently.
template <class Tr, int N>
__device__ __forceinline__ void mma_ntiles(float (&d)[N][4], int n0, const uint32_t (&a)[4],
                                           const uint32_t (&b)[2 * Tr::kNB]) {
  static_assert(Tr::kNB == 1 || Tr::kNB == 2);
  Tr::mma_sync(d[n0], a, b[0], b[1]);
  if constexpr (Tr::kNB == 2) Tr::mma_sync(d[n0 + 1], a, b[2], b[3]);
}

// Tr: MmaBf16 or MmaTf32 (cuda/dilated_attention_tiles.cuh). kMinBlocks: the
// launch bound's blocks per SM (0: none, ptxas's own register choice).
// kNested: `pairs` is the branch's share of nested pairs (a query tile
// inside the keys' span is left out, one reaching into it masked, each pair
// weighted); a separate instantiation, since its spans and weights would
// cost the plain kernel registers.
template <class Tr, int D, bool kCausal, int kMinBlocks, bool kDropout, bool kNested>
__global__ __launch_bounds__(kMmaWarps * 32, kMinBlocks) void backward_mma_kernel(
    Operand<typename Tr::Elem> q, Operand<typename Tr::Elem> k, Operand<typename Tr::Elem> v,
    Operand<typename Tr::Elem> dout, const float* __restrict__ lse, const float* __restrict__ delta, BranchGrid g,
    float scale, BranchDropout drop, BranchPairs pairs, float* __restrict__ dq_acc, float* __restrict__ dk_acc,
    float* __restrict__ dv_acc) {
  using L = MmaBwdSmem<Tr, D>;
  using T = typename L::Tile;
  using ST = typename L::STile;
  constexpr int kThreads = kMmaWarps * 32;
  constexpr bool kDouble = L::kBuffers == 2;
  constexpr int kSteps = D / Tr::kK;    // k-steps of S^T and dP^T
  constexpr int kQSteps = 64 / Tr::kK;  // k-steps over a query tile (dV, dK) or key tile (dQ)
  constexpr int kNB = Tr::kNB;
  constexpr int kDTiles = D / 8;
  constexpr int kQRows = 64;  // queries per tile
  extern __shared__ __align__(128) char smem[];
  drop.mask = resolved_dropout<kDropout>(drop.mask);  // the graph offset read once

  const BlockRows block = block_rows<false>(g, 64);
  const int64_t batch = block.batch, head = block.head, kt0 = block.t0;
  const RowSet rows = block.rows;
  if (kt0 >= rows.count) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = scale * kLog2e;

  const SpanWalk<kQRows> walk = query_walk<64, kQRows, kCausal, kNested>(pairs, kt0, rows.count);
  const int n_tiles = walk.n;
  if (kNested && n_tiles == 0) return;  // every pair of these keys belongs to a smaller branch
  float* l2s = reinterpret_cast<float*>(smem + L::kL);
  float* dls = reinterpret_cast<float*>(smem + L::kDelta);
  char* ks_tile = smem + L::kK;
  char* vs_tile = smem + L::kV;
  char* ds_tile = smem + L::kDS;

  Tr::template load_tile<64, D, kThreads>(ks_tile, k, batch, head, rows, kt0);
  Tr::template load_tile<64, D, kThreads>(vs_tile, v, batch, head, rows, kt0);
  Tr::template load_tile<64, D, kThreads>(smem + L::kQ, q, batch, head, rows, walk.row(0));
  Tr::template load_tile<64, D, kThreads>(smem + L::kDO, dout, batch, head, rows, walk.row(0));
  mma::cp_async_commit();
  load_row_stats<kThreads>(l2s, dls, lse, delta, g, batch, head, rows, walk.row(0));

  float dk[kDTiles][4], dv[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const int kw = warp * 16;                      // this warp's keys in the tile
  const int64_t key_row0 = kt0 + kw + lane / 4;  // this lane's keys: key_row0, key_row0 + 8
  // Dropout: mask row of kept row tq is drop_rows.at(tq) (core/dilated.h);
  // this warp's 16 keys are one group; this lane's keys are bytes key_byte and key_byte + 2.
  const AttentionMaskRows drop_rows = kDropout ? dropout_kept_rows(drop, batch, head, rows) : AttentionMaskRows{};
  const int key_byte = (lane / 4) & 1;
  // Nested pairs: the lane's log2 pair weights.
  float bias[2] = {0.f, 0.f};
  if constexpr (kNested) pair_log2_weights(pairs, head, lane, bias);

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = kDouble ? j & 1 : 0;
    const int64_t q0 = walk.row(j);
    const int64_t q_next = walk.row(j + 1);  // read when j + 1 < n_tiles
    if constexpr (kDouble) {
      if (j + 1 < n_tiles) {
        Tr::template load_tile<64, D, kThreads>(smem + L::kQ + (buf ^ 1) * T::kBytes, q, batch, head, rows,
                                                q_next);
        Tr::template load_tile<64, D, kThreads>(smem + L::kDO + (buf ^ 1) * T::kBytes, dout, batch, head, rows,
                                                q_next);
        mma::cp_async_commit();
        load_row_stats<kThreads>(l2s + (buf ^ 1) * 64, dls + (buf ^ 1) * 64, lse, delta, g, batch, head, rows,
                                 q_next);
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait<0>();
      }
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();  // Q, dO and the row stats of tile j are in; dQ of tile j - 1 is done with dS^T
    char* qs = smem + L::kQ + buf * T::kBytes;
    char* dos = smem + L::kDO + buf * T::kBytes;
    float* l2 = l2s + buf * 64;
    float* dl = dls + buf * 64;

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x 64 queries per warp.
    float s[8][4], dp[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t kf[4], vf[4];
      Tr::template load_a<T>(kf, ks_tile, kw, ks, lane);
      Tr::template load_a<T>(vf, vs_tile, kw, ks, lane);
#pragma unroll
      for (int n0 = 0; n0 < 8; n0 += kNB) {
        uint32_t b[2 * kNB];
        Tr::template load_b<T>(b, qs, n0, ks, lane);
        mma_ntiles<Tr>(s, n0, kf, b);
        Tr::template load_b<T>(b, dos, n0, ks, lane);
        mma_ntiles<Tr>(dp, n0, vf, b);
      }
    }
    // Dropout mask words, drawn per half of the n-tiles (8 live words):
    // keep_words[2 (nt % 4) + e] is this lane's word of query q0 + 8nt + 2 * (lane % 4) + e.
    uint32_t keep_words[8];
    const int64_t drop_tq0 = q0 + 2 * (lane % 4);
    // P^T = exp2(S^T * scale_log2 - L2[q]), dS^T = P^T (dP^T - delta[q]).
    const bool need_mask = kt0 + 64 > rows.count || q0 + kQRows > rows.count || (kCausal && q0 < kt0 + 63) ||
                           (kNested && walk.reaches(q0));
    SpanCols own[2];  // the queries in each key's span
    if constexpr (kNested)
      if (walk.reaches(q0)) fragment_span_cols<kQRows>(own, pairs, key_row0, q0);
    uint32_t pf[kQSteps][4], dsf[kQSteps][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      if constexpr (kDropout) {
        if (nt % 4 == 0) {
          dropout_words_keys(
              drop.mask, kt0 + kw, lane, nt / 4,
              [&](int u) {
                const int64_t tq = drop_tq0 + 8 * (u >> 1) + (u & 1);
                return drop_rows.at(uint64_t(tq < rows.count ? tq : 0));
              },
              keep_words);
        }
      }
      float p[4], dsv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
        // With weights: exp2(s - (L - bias)), the weight 2^bias.
        float x = exp2f(s[nt][e] * scale_log2 - (kNested ? l2[col] - bias[e & 1] : l2[col]));
        if (need_mask) {
          const int64_t tk = key_row0 + (e >> 1) * 8, tq = q0 + col;
          if (tk >= rows.count || tq >= rows.count || (kCausal && tq < tk) || (kNested && own[e >> 1].excludes(col)))
            x = 0.f;
        }
        // With dropout: dV uses P * M, dS = P (M dP' - D) (core/dilated.h).
        float m = 1.f;
        if constexpr (kDropout)
          m = attention_keep_byte(keep_words[2 * (nt % 4) + (e & 1)], 2 * (e >> 1) + key_byte, drop.mask.threshold)
                  ? drop.mask.scale
                  : 0.f;
        p[e] = x * m;
        dsv[e] = x * (m * dp[nt][e] - dl[col]);
      }
      Tr::acc_to_a(pf, nt, p);
      Tr::acc_to_a(dsf, nt, dsv);
      // dS^T to shared memory for dQ: rows = keys, columns = queries.
      Tr::template store_acc<ST>(ds_tile, dsf, nt, kw, lane);
    }
    // dV += P^T dO and dK += dS^T Q (B operands: dO and Q rows, transposed).
#pragma unroll
    for (int kk = 0; kk < kQSteps; ++kk) {
#pragma unroll
      for (int n0 = 0; n0 < kDTiles; n0 += kNB) {
        uint32_t b[2 * kNB];
        Tr::template load_b_trans<T>(b, dos, kk, n0, lane);
        mma_ntiles<Tr>(dv, n0, pf[kk], b);
        Tr::template load_b_trans<T>(b, qs, kk, n0, lane);
        mma_ntiles<Tr>(dk, n0, dsf[kk], b);
      }
    }
    __syncthreads();  // dS^T complete (single buffer: Q, dO and the row stats of tile j are no longer read)

    // Single buffer: tile j + 1's Q and dO by cp.async, its row stats into
    // registers; both land during dQ.
    const bool more = j + 1 < n_tiles;
    float next_l2 = INFINITY, next_dl = 0.f;  // +inf makes P = 0 for padding rows
    if constexpr (!kDouble) {
      if (more) {
        Tr::template load_tile<64, D, kThreads>(qs, q, batch, head, rows, q_next);
        Tr::template load_tile<64, D, kThreads>(dos, dout, batch, head, rows, q_next);
        mma::cp_async_commit();
        const int64_t t = q_next + threadIdx.x;
        if (threadIdx.x < 64 && t < rows.count) {
          const int64_t ri = kept_row_index(g, batch, head, rows, t);
          next_l2 = lse[ri] * kLog2e;
          next_dl = delta[ri];
        }
      }
    }

    // dQ (this warp's 16 queries x D) = dS K, A from dS^T (transposed).
    float dq[kDTiles][4];
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kQSteps; ++kk) {
      uint32_t a[4];
      Tr::template load_a_trans<ST>(a, ds_tile, kk, warp, lane);
#pragma unroll
      for (int n0 = 0; n0 < kDTiles; n0 += kNB) {
        uint32_t b[2 * kNB];
        Tr::template load_b_trans<T>(b, ks_tile, kk, n0, lane);
        mma_ntiles<Tr>(dq, n0, a, b);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t tq = q0 + warp * 16 + lane / 4 + r * 8;
      if (tq >= rows.count) continue;
      float* dst = dq_acc + kept_row_index(g, batch, head, rows, tq) * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int col = dt * 8 + 2 * (lane % 4);
        mma::red_add_v2(dst + col, scale * dq[dt][2 * r], scale * dq[dt][2 * r + 1]);
      }
    }
    if constexpr (kDouble) {
      __syncthreads();  // buffers of this iteration are reused
    } else if (more && threadIdx.x < 64) {
      l2s[threadIdx.x] = next_l2;
      dls[threadIdx.x] = next_dl;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t tk = key_row0 + r * 8;
    if (tk >= rows.count) continue;
    const int64_t ri = kept_row_index(g, batch, head, rows, tk);
    float* dkr = dk_acc + ri * D;
    float* dvr = dv_acc + ri * D;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const int col = dt * 8 + 2 * (lane % 4);
      float2 a = *reinterpret_cast<float2*>(dkr + col), b = *reinterpret_cast<float2*>(dvr + col);
      *reinterpret_cast<float2*>(dkr + col) =
          make_float2(a.x + scale * dk[dt][2 * r], a.y + scale * dk[dt][2 * r + 1]);
      *reinterpret_cast<float2*>(dvr + col) = make_float2(b.x + dv[dt][2 * r], b.y + dv[dt][2 * r + 1]);
    }
  }
}

// Launches backward_mma_kernel (the dropout instantiation when the mask is
// on, the nested one for a share of nested pairs): the contract of
// backward_mma / backward_tf32 for head dim D.
template <class Tr, int D, bool kCausal, int kMinBlocks>
void launch_backward_mma(const Operand<typename Tr::Elem>& q, const Operand<typename Tr::Elem>& k,
                         const Operand<typename Tr::Elem>& v, const Operand<typename Tr::Elem>& dout,
                         const float* lse, const float* delta, const BranchGrid& g, int64_t batch, float scale,
                         const BranchDropout& drop, const BranchPairs& pairs, float* dq_acc, float* dk_acc,
                         float* dv_acc) {
  const bool nested = !pairs.plain();
  auto kernel = drop.mask.enabled() ? nested ? backward_mma_kernel<Tr, D, kCausal, kMinBlocks, true, true>
                                             : backward_mma_kernel<Tr, D, kCausal, kMinBlocks, true, false>
                : nested ? backward_mma_kernel<Tr, D, kCausal, kMinBlocks, false, true>
                         : backward_mma_kernel<Tr, D, kCausal, kMinBlocks, false, false>;
  constexpr int smem = MmaBwdSmem<Tr, D>::kBytes;
  allow_dynamic_smem(smem, backward_mma_kernel<Tr, D, kCausal, kMinBlocks, true, true>,
                     backward_mma_kernel<Tr, D, kCausal, kMinBlocks, true, false>,
                     backward_mma_kernel<Tr, D, kCausal, kMinBlocks, false, true>,
                     backward_mma_kernel<Tr, D, kCausal, kMinBlocks, false, false>);
  const dim3 grid = grid_of(g, batch);
  kernel<<<grid, kMmaWarps * 32, smem, stream()>>>(q, k, v, dout, lse, delta, g, scale, drop, pairs, dq_acc,
                                                   dk_acc, dv_acc);
  MINIDL_CUDA_LAUNCH_CHECK();
}

}  // namespace minidl::cuda::attn
