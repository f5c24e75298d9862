// Hopper (sm_90a) forward for one dilated-attention branch at head dim 64.
// The same algorithm as the mma.sync kernel (cuda/dilated_attention_mma.cu),
// but each warpgroup (4 warps) owns 64 query rows and issues its matrix
// products as asynchronous warpgroup MMAs: S = Q K^T reads Q and K straight
// from shared memory (no ldmatrix), and O += P V takes P from registers. That
// frees the issue slots the fragment loads took, which ncu showed to be the
// forward's limit (docs/kernel-notes.md). Built only for sm_90a (see the root
// CMakeLists.txt); the host picks it on compute capability 9.0.
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/dilated_attention_tiles.cuh"
#include "cuda/runtime.h"
#include "cuda/wgmma.cuh"

namespace minidl::cuda::attn {
namespace {

constexpr int D = 64;
constexpr int kGroups = 2;  // warpgroups per block, 64 query rows each
constexpr int kThreads = kGroups * 128;
constexpr int kBr = kGroups * 64;
// 64-key tiles: S is one m64n64 accumulator (32 registers), which keeps the
// kernel at 128 registers for two blocks per SM. 128-key tiles (one block per
// SM) were slower on the H100: 4.51 against 4.19 ms dense, 24.9 against
// 21.4 ms dilated (docs/kernel-notes.md).
constexpr int kBc = 64;

struct WgShape {
  using QTile = SmemTile<kBr, D>;
  using KTile = SmemTile<kBc, D>;
  static constexpr int kQ = 0;
  static constexpr int kK = QTile::kBytes;           // two buffers
  static constexpr int kV = kK + 2 * KTile::kBytes;  // two buffers
  // wgmma's 128-byte swizzle repeats every 1024 bytes and is applied to the
  // absolute address, so tiles start on a 1024-byte boundary: slack for that.
  static constexpr int kSmem = kV + 2 * KTile::kBytes + 1024;
};

template <bool kCausal, MergeMode kMode, bool kDropout>
__global__ __launch_bounds__(kThreads, 2) void forward_wgmma_kernel(
    Operand<BFloat16> q, Operand<BFloat16> k, Operand<BFloat16> v, BranchGrid g, float scale_log2,
    BranchDropout drop, float* o_acc, float* lse, BFloat16* out) {
  using F = WgShape;
  using KT = typename F::KTile;
  extern __shared__ __align__(128) char smem_raw[];
  char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  drop.mask = resolved_dropout<kDropout>(drop.mask);  // the graph offset read once

  const BlockRows block = block_rows<true>(g, kBr);
  const int64_t batch = block.batch, head = block.head, t0 = block.t0;
  const RowSet rows = block.rows;
  if (t0 >= rows.count) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = warp / 4;
  const int64_t group_row0 = t0 + group * 64;  // first query row of this warpgroup
  const int64_t key_end = kCausal ? min(t0 + kBr, rows.count) : rows.count;
  const int n_tiles = static_cast<int>((key_end + kBc - 1) / kBc);

  load_tile_async<kBr, D, kThreads>(smem + F::kQ, q, batch, head, rows, t0);
  load_tile_async<kBc, D, kThreads>(smem + F::kK, k, batch, head, rows, 0);
  load_tile_async<kBc, D, kThreads>(smem + F::kV, v, batch, head, rows, 0);
  mma::cp_async_commit();

  float o[D / 8][4];
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float(&o_flat)[32] = reinterpret_cast<float(&)[32]>(o);
  const int64_t q_row0 = t0 + warp * 16 + lane / 4;  // this lane's rows: q_row0, q_row0 + 8
  // Dropout: mask row of kept row tq is drop_rows.at(tq) (core/dilated.h).
  const AttentionMaskRows drop_rows = kDropout ? dropout_kept_rows(drop, batch, head, rows) : AttentionMaskRows{};
  const char* q_tile = smem + F::kQ + group * 64 * 128;

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {  // prefetch the next tile into the other buffer
      load_tile_async<kBc, D, kThreads>(smem + F::kK + (buf ^ 1) * KT::kBytes, k, batch, head, rows,
                                        int64_t(j + 1) * kBc);
      load_tile_async<kBc, D, kThreads>(smem + F::kV + (buf ^ 1) * KT::kBytes, v, batch, head, rows,
                                        int64_t(j + 1) * kBc);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    wgmma::fence_proxy_async();  // cp.async wrote through the generic proxy
    __syncthreads();
    const char* ks_tile = smem + F::kK + buf * KT::kBytes;
    const char* vs_tile = smem + F::kV + buf * KT::kBytes;
    const int64_t k0 = int64_t(j) * kBc;
    // Causal: a warpgroup whose rows all precede this tile has nothing to do.
    if (!kCausal || k0 <= group_row0 + 63) {
      // S = Q K^T for this warpgroup's 64 rows and the kBc keys.
      float s[32];
      wgmma::fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const uint64_t da = wgmma::desc_sw128(q_tile + ks * 32), db = wgmma::desc_sw128(ks_tile + ks * 32);
        if (ks == 0) wgmma::mma_64x64x16_ss<false>(s, da, db);
        else wgmma::mma_64x64x16_ss<true>(s, da, db);
      }
      wgmma::commit();
      // The dropout mask words of this lane's two rows, drawn while the
      // tensor cores compute S: keep_words[r][kk] decides keys
      // kk * 16 + c * 8 + 2 * (lane % 4) + e of row r in byte 2c + e.
      uint32_t keep_words[2][4];
      if constexpr (kDropout) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t tq = q_row0 + r * 8;
          dropout_words_rows(drop.mask, drop_rows.at(uint64_t(tq < rows.count ? tq : 0)), k0,
                             lane, keep_words[r]);
        }
      }
      wgmma::wait<0>();
      wgmma::fence_operands(s);

      // s[4c + e]: key 8c + 2*(lane%4) + (e&1) of the tile, row q_row0 + 8*(e>>1).
      const bool need_mask = k0 + kBc > rows.count || (kCausal && k0 + kBc - 1 > group_row0);
      if (need_mask) {
        const int64_t limit = rows.count - k0;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          int col = (i / 4) * 8 + 2 * (lane % 4) + (i & 1);
          int64_t tq = q_row0 + ((i >> 1) & 1) * 8;
          if (col >= limit || (kCausal && k0 + col > tq)) s[i] = -INFINITY;
        }
      }
      float m_scaled[2], corr[2];
      online_softmax_max<8>(s, m_row, l_row, m_scaled, corr, scale_log2);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][0] *= corr[0];
        o[dt][1] *= corr[0];
        o[dt][2] *= corr[1];
        o[dt][3] *= corr[1];
      }
      // P as bf16 A fragments: k-step kk covers chunks 2kk and 2kk + 1.
      uint32_t pf[kBc / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBc / 16; ++kk) {
        float p[2][4];
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            p[c][e] = exp2f(fmaf(s[4 * (2 * kk + c) + e], scale_log2, -m_scaled[e >> 1]));
            l_row[e >> 1] += p[c][e];  // the normaliser counts every key
          }
        pf[kk][0] = mma::pack_bf16(p[0][0], p[0][1]);
        pf[kk][1] = mma::pack_bf16(p[0][2], p[0][3]);
        pf[kk][2] = mma::pack_bf16(p[1][0], p[1][1]);
        pf[kk][3] = mma::pack_bf16(p[1][2], p[1][3]);
        // Dropped weights are zeroed; the kept ones' scale is applied at the store.
        if constexpr (kDropout) drop_packed_weights(pf[kk], keep_words[0][kk], keep_words[1][kk]);
      }
      // O += P V.
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kBc / 16; ++kk)
        wgmma::mma_64x64x16_rs_mn(o_flat, pf[kk], wgmma::desc_sw128(vs_tile + kk * 16 * 128));
      wgmma::commit();
      wgmma::wait<0>();
      wgmma::fence_operands(o_flat);
    }
    __syncthreads();  // this buffer is refilled next iteration
  }
  store_branch_rows<D, kMode>(o, m_row, l_row, q_row0, scale_log2, g, batch, head, rows, o_acc, lse, out,
                              kDropout ? drop.mask.scale : 1.f);
}


template <bool kCausal, MergeMode kMode>
void launch(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v, BranchGrid g,
            int64_t batch, float scale_log2, const BranchDropout& drop, float* o_acc, float* lse,
            BFloat16* out) {
  constexpr int smem = WgShape::kSmem;
  auto plain = forward_wgmma_kernel<kCausal, kMode, false>;
  auto dropout = forward_wgmma_kernel<kCausal, kMode, true>;
  allow_dynamic_smem(smem, plain, dropout);
  g.tiles_per_segment = (max_kept_rows(g.w, g.r) + kBr - 1) / kBr;
  const dim3 grid = grid_of(g, batch);
  (drop.mask.enabled() ? dropout : plain)<<<grid, kThreads, smem, stream()>>>(q, k, v, g, scale_log2, drop,
                                                                             o_acc, lse, out);
  MINIDL_CUDA_LAUNCH_CHECK();
}


template <bool kCausal>
void launch_mode(MergeMode mode, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                 const Operand<BFloat16>& v, const BranchGrid& g, int64_t batch, float scale_log2,
                 const BranchDropout& drop, float* o_acc, float* lse, BFloat16* out) {
  switch (mode) {
    case MergeMode::kWrite: return launch<kCausal, MergeMode::kWrite>(q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
    case MergeMode::kMerge: return launch<kCausal, MergeMode::kMerge>(q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
    case MergeMode::kSingle: return launch<kCausal, MergeMode::kSingle>(q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
    case MergeMode::kFinish: MINIDL_FAIL("dilated_attention (cuda, wgmma): kFinish is the ws kernel's");
  }
}

}  // namespace

void forward_wgmma(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                   const BranchGrid& g, int64_t batch, bool causal, float scale_log2,
                   const BranchDropout& drop, MergeMode mode, float* o_acc, float* lse, BFloat16* out) {
  if (causal) launch_mode<true>(mode, q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
  else launch_mode<false>(mode, q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
}

}  // namespace minidl::cuda::attn
