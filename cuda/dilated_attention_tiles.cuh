#pragma once
// Device helpers shared by the tensor-core kernels (mma.sync in
// cuda/dilated_attention_mma.cu, wgmma in cuda/sm90a/): tile loads, the
// dropout mask words, and the forward epilogue that stores or merges a branch.
#include "core/philox.h"
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/mma.cuh"

namespace minidl::cuda::attn {

using mma::SmemTile;

// Issues cp.async for rows [t0, t0 + Rows) of a row set into a swizzled tile.
template <int Rows, int D, int Threads>
__device__ __forceinline__ void load_tile_async(char* tile, const Operand<BFloat16>& x, int64_t batch,
                                                int64_t head, const RowSet& rows, int64_t t0) {
  using Tile = SmemTile<Rows, D>;
  for (int i = threadIdx.x; i < Rows * Tile::kChunks; i += Threads) {
    int r = i / Tile::kChunks, c = i % Tile::kChunks;
    int64_t t = t0 + r;
    bool valid = t < rows.count;
    const BFloat16* src = valid ? x.row(batch, rows.base + t * rows.stride, head) + c * 8 : x.ptr;
    mma::cp_async_16(Tile::at(tile, r, c), src, valid);
  }
}

// A tile of `Rows` rows of D floats (float32 kernels, TF32 mma) with a row
// stride of D + 4 floats: the scalar fragment loads of m16n8k8, rows r + l/4
// and columns c + l%4 (or rows r + 2(l%4), columns c + l/4), then touch 32
// different banks.
template <int Rows, int D>
struct F32Tile {
  static constexpr int kStride = D + 4;  // floats
  static constexpr int kBytes = Rows * kStride * 4;
  static __device__ __forceinline__ float* at(char* base, int row, int col) {
    return reinterpret_cast<float*>(base) + row * kStride + col;
  }
};

// Issues cp.async for rows [t0, t0 + Rows) of a float32 row set into an
// F32Tile (rows past the set are zero-filled). Rows of x must be 16-byte
// aligned (rows_aligned).
template <int Rows, int D, int Threads>
__device__ __forceinline__ void load_tile_f32_async(char* tile, const Operand<float>& x, int64_t batch,
                                                    int64_t head, const RowSet& rows, int64_t t0) {
  constexpr int kChunks = D / 4;
  for (int i = threadIdx.x; i < Rows * kChunks; i += Threads) {
    int r = i / kChunks, c = i % kChunks;
    int64_t t = t0 + r;
    bool valid = t < rows.count;
    const float* src = valid ? x.row(batch, rows.base + t * rows.stride, head) + c * 4 : x.ptr;
    mma::cp_async_16(F32Tile<Rows, D>::at(tile, r, c * 4), src, valid);
  }
}

// Element-type traits of the mma.sync kernels that share one flow for bf16
// (mma.m16n8k16, swizzled SmemTile, ldmatrix) and float32 on TF32
// (mma.m16n8k8, F32Tile, scalar loads rounded by cvt.rna): the k-step kK, the
// n-tiles one B load covers (kNB), the tile, the mma and the fragment loads.
// "n-tile n" is columns 8n..8n+7 of a product; `lane` is the lane in the warp.
// An A fragment built from an accumulator (acc_to_a) orders its reduction
// index as the accumulator's columns for bf16, and permuted within each
// 8-wide k-step for TF32 (slot c = column 2c, slot c + 4 = column 2c + 1,
// the m16n8k8 A layout): its B comes from load_b_trans, which reads rows in
// that same order, as load_a_trans does for an A read back from a tile that
// store_acc wrote.
struct MmaBf16 {
  using Elem = BFloat16;
  static constexpr int kK = 16;
  static constexpr int kNB = 2;  // ldmatrix.x4: two n-tiles of a 16-wide k-step
  template <int Rows, int D>
  using Tile = SmemTile<Rows, D>;
  template <int Rows, int D, int Threads>
  static __device__ __forceinline__ void load_tile(char* tile, const Operand<Elem>& x, int64_t batch,
                                                   int64_t head, const RowSet& rows, int64_t t0) {
    load_tile_async<Rows, D, Threads>(tile, x, batch, head, rows, t0);
  }
  static __device__ __forceinline__ void mma_sync(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
    mma::mma_bf16(d, a, b0, b1);
  }
  // A[m][k] = X[row0 + m][ks * kK + k], m < 16.
  template <class T>
  static __device__ __forceinline__ void load_a(uint32_t (&a)[4], char* x, int row0, int ks, int lane) {
    mma::ldmatrix_x4(a, T::at(x, row0 + lane % 16, 2 * ks + lane / 16));
  }
  // B of n-tiles n0, n0 + 1 (b[2h], b[2h + 1] for n-tile n0 + h): B[k][n] = X[8 n0 + n][ks * kK + k].
  template <class T>
  static __device__ __forceinline__ void load_b(uint32_t (&b)[4], char* x, int n0, int ks, int lane) {
    mma::ldmatrix_x4(b, T::at(x, n0 * 8 + lane % 8 + (lane / 16) * 8, 2 * ks + (lane / 8) % 2));
  }
  // B of n-tiles n0, n0 + 1: B[k][n] = X[ks * kK + k][8 n0 + n].
  template <class T>
  static __device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], char* x, int ks, int n0, int lane) {
    mma::ldmatrix_x4_trans(b, T::at(x, ks * 16 + lane % 8 + ((lane / 8) % 2) * 8, n0 + lane / 16));
  }
  // A[m][k] = X[ks * kK + k][16 mt + m], m < 16 (X written by store_acc).
  template <class T>
  static __device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], char* x, int ks, int mt, int lane) {
    mma::ldmatrix_x4_trans(a, T::at(x, ks * 16 + lane % 8 + (lane / 16) * 8, mt * 2 + (lane / 8) % 2));
  }
  // n-tile nt of an accumulator (its 4 values p) into the A fragments f of
  // the product that reduces over its columns: n-tiles 2kk, 2kk + 1 form k-step kk.
  template <int N>
  static __device__ __forceinline__ void acc_to_a(uint32_t (&f)[N][4], int nt, const float (&p)[4]) {
    const int kk = nt / 2, h = nt % 2;
    f[kk][2 * h] = mma::pack_bf16(p[0], p[1]);
    f[kk][2 * h + 1] = mma::pack_bf16(p[2], p[3]);
  }
  // Stores n-tile nt of f (acc_to_a's) as X[row0 + m][8 nt + n], m < 16.
  template <class T, int N>
  static __device__ __forceinline__ void store_acc(char* x, const uint32_t (&f)[N][4], int nt, int row0, int lane) {
    const int kk = nt / 2, h = nt % 2, row = row0 + lane / 4, col = nt * 8 + 2 * (lane % 4);
    *reinterpret_cast<uint32_t*>(T::at(x, row, col / 8) + (col % 8) * 2) = f[kk][2 * h];
    *reinterpret_cast<uint32_t*>(T::at(x, row + 8, col / 8) + (col % 8) * 2) = f[kk][2 * h + 1];
  }
};

struct MmaTf32 {
  using Elem = float;
  static constexpr int kK = 8;
  static constexpr int kNB = 1;
  template <int Rows, int D>
  using Tile = F32Tile<Rows, D>;
  template <int Rows, int D, int Threads>
  static __device__ __forceinline__ void load_tile(char* tile, const Operand<Elem>& x, int64_t batch,
                                                   int64_t head, const RowSet& rows, int64_t t0) {
    load_tile_f32_async<Rows, D, Threads>(tile, x, batch, head, rows, t0);
  }
  static __device__ __forceinline__ void mma_sync(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
    mma::mma_tf32(d, a, b0, b1);
  }
  template <class T>
  static __device__ __forceinline__ void load_a(uint32_t (&a)[4], char* x, int row0, int ks, int lane) {
    const int r = row0 + lane / 4, c = ks * 8 + lane % 4;
    a[0] = mma::to_tf32(*T::at(x, r, c));
    a[1] = mma::to_tf32(*T::at(x, r + 8, c));
    a[2] = mma::to_tf32(*T::at(x, r, c + 4));
    a[3] = mma::to_tf32(*T::at(x, r + 8, c + 4));
  }
  template <class T>
  static __device__ __forceinline__ void load_b(uint32_t (&b)[2], char* x, int n0, int ks, int lane) {
    const int r = n0 * 8 + lane / 4, c = ks * 8 + lane % 4;
    b[0] = mma::to_tf32(*T::at(x, r, c));
    b[1] = mma::to_tf32(*T::at(x, r, c + 4));
  }
  // Rows in acc_to_a's order: slots c, c + 4 = rows 2c, 2c + 1 of the k-step.
  template <class T>
  static __device__ __forceinline__ void load_b_trans(uint32_t (&b)[2], char* x, int ks, int n0, int lane) {
    const int r = ks * 8 + 2 * (lane % 4), c = n0 * 8 + lane / 4;
    b[0] = mma::to_tf32(*T::at(x, r, c));
    b[1] = mma::to_tf32(*T::at(x, r + 1, c));
  }
  // X holds tf32 values already (store_acc): read as they are.
  template <class T>
  static __device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], char* x, int ks, int mt, int lane) {
    const int r = ks * 8 + 2 * (lane % 4), c = mt * 16 + lane / 4;
    a[0] = __float_as_uint(*T::at(x, r, c));
    a[1] = __float_as_uint(*T::at(x, r, c + 8));
    a[2] = __float_as_uint(*T::at(x, r + 1, c));
    a[3] = __float_as_uint(*T::at(x, r + 1, c + 8));
  }
  // n-tile nt is k-step nt: columns 2c, 2c + 1 in A slots c, c + 4.
  template <int N>
  static __device__ __forceinline__ void acc_to_a(uint32_t (&f)[N][4], int nt, const float (&p)[4]) {
    f[nt][0] = mma::to_tf32(p[0]);
    f[nt][1] = mma::to_tf32(p[2]);
    f[nt][2] = mma::to_tf32(p[1]);
    f[nt][3] = mma::to_tf32(p[3]);
  }
  template <class T, int N>
  static __device__ __forceinline__ void store_acc(char* x, const uint32_t (&f)[N][4], int nt, int row0, int lane) {
    const int row = row0 + lane / 4, col = nt * 8 + 2 * (lane % 4);
    *reinterpret_cast<uint2*>(T::at(x, row, col)) = make_uint2(f[nt][0], f[nt][2]);
    *reinterpret_cast<uint2*>(T::at(x, row + 8, col)) = make_uint2(f[nt][1], f[nt][3]);
  }
};

// Loads lse (as log2 units, +inf for padding rows) and delta of query rows
// [t0, t0 + 64) into shared memory (the block's kThreads threads).
template <int kThreads>
__device__ __forceinline__ void load_row_stats(float* l2s, float* ds, const float* lse,
                                               const float* delta, const BranchGrid& g,
                                               int64_t batch, int64_t head, const RowSet& rows,
                                               int64_t t0) {
  for (int i = threadIdx.x; i < 64; i += kThreads) {
    int64_t t = t0 + i;
    float l2 = INFINITY, dd = 0.f;
    if (t < rows.count) {
      int64_t ri = kept_row_index(g, batch, head, rows, t);
      l2 = lse[ri] * kLog2e;
      dd = delta[ri];
    }
    l2s[i] = l2;
    ds[i] = dd;
  }
}

// The online-softmax step of a lane's two rows (q_row, q_row + 8) in the
// mma.sync / wgmma accumulator layout: s holds the tile's scores as kN
// n-tiles of 4 (elements 2r and 2r + 1 of each belong to row r; the row's
// other columns are on the other lanes of the quad). Updates the running max
// m_row and rescales l_row; corr is the factor that rescales O, m_scaled the
// new max in log2 units (0 while a row has seen nothing visible, so that
// p = 0, not NaN). kFtz: exp2 flushing denormal results (mma::exp2_ftz).
template <int kN, bool kFtz = false>
__device__ __forceinline__ void online_softmax_max(const float (&s)[kN * 4], float (&m_row)[2], float (&l_row)[2],
                                                   float (&m_scaled)[2], float (&corr)[2], float scale_log2) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m_row[r];
#pragma unroll
    for (int c = 0; c < kN; ++c) mx = fmaxf(mx, fmaxf(s[4 * c + 2 * r], s[4 * c + 2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    m_scaled[r] = mx == -INFINITY ? 0.f : mx * scale_log2;
    const float x = m_row[r] * scale_log2 - m_scaled[r];
    corr[r] = kFtz ? mma::exp2_ftz(x) : exp2f(x);
    m_row[r] = mx;
    l_row[r] *= corr[r];
  }
}

// ---- Nested pairs (SpanWalk and the rest in
// cuda/dilated_attention_common.cuh): the tensor-core kernels' weights.

// The log2 weights of a lane's pairs, which depend on the rows' kept index
// mod 8 only (BranchPairs). In the accumulator layout a lane's rows (queries
// forward, keys backward) are lane / 4 mod 8 and its columns 2 (lane % 4) + x,
// x = 0, 1, mod 8, since tiles start at multiples of 8: bias[x] for the
// columns of parity x, the same both ways (the weight is symmetric). 0 for
// plain pairs.
__device__ __forceinline__ void pair_log2_weights(const BranchPairs& pairs, int64_t head, int lane, float (&bias)[2]) {
  const int lane_row = lane / 4;
#pragma unroll
  for (int x = 0; x < 2; ++x) bias[x] = log2f(static_cast<float>(pairs.weight(head, lane_row, 2 * (lane % 4) + x)));
}

// ---- Dropout (core/dilated.h): one Philox block per (mask row, 16-key
// group), shared between lanes by shuffles. Word arrays stay statically
// indexed (a runtime index would put them in local memory).

__device__ __forceinline__ void block_words(const philox::U32x4& b, uint32_t (&a)[4]) {
  a[0] = b.x;
  a[1] = b.y;
  a[2] = b.z;
  a[3] = b.w;
}

// 4x4 transpose across the 4 lanes that differ in lane bits kHi and kLo
// (index = 2 * bit(kHi) + bit(kLo)): on entry a[] is the block of the lane
// with index i, on exit a[i] is word `index` of lane i's block. Two butterfly
// stages of 2 shuffles each; every lane of the warp must take part.
template <int kHi, int kLo>
__device__ __forceinline__ void transpose_words(uint32_t (&a)[4], int lane) {
  const bool hi = lane & kHi;
  uint32_t r0 = __shfl_xor_sync(0xffffffffu, hi ? a[0] : a[2], kHi);
  uint32_t r1 = __shfl_xor_sync(0xffffffffu, hi ? a[1] : a[3], kHi);
  if (hi) {
    a[0] = r0;
    a[1] = r1;
  } else {
    a[2] = r0;
    a[3] = r1;
  }
  const bool lo = lane & kLo;
  r0 = __shfl_xor_sync(0xffffffffu, lo ? a[0] : a[1], kLo);
  r1 = __shfl_xor_sync(0xffffffffu, lo ? a[2] : a[3], kLo);
  if (lo) {
    a[0] = r0;
    a[2] = r1;
  } else {
    a[1] = r0;
    a[3] = r1;
  }
}

// The mask of a packed bf16 pair whose low half is decided by byte kLo of
// keep_bytes' result and whose high half by byte kHi: each half all ones when
// kept, else zero (one prmt, its selector replicating each byte's top bit).
template <int kLo, int kHi>
__device__ __forceinline__ uint32_t keep_pair_mask(uint32_t kept) {
  constexpr uint32_t kSel = (8u | kLo) * 0x11u | (8u | kHi) * 0x1100u;
  uint32_t m;
  asm("prmt.b32 %0, %1, %1, %2;" : "=r"(m) : "r"(kept), "n"(kSel));
  return m;
}

// Row-major (accumulator) layout, for the forward: the keep decisions of one
// query row (mask row `row`, the same for the 4 lanes of a quad) over the
// 64-key tile starting at key k0 (a multiple of 16). On exit words[kk] is
// keep_bytes of word lane % 4 of group kk's block: the top bit of byte 2h + e
// keeps key kk*16 + 8h + 2*(lane%4) + e, i.e. n-tile 2kk + h, element e of that
// row. One Philox call per lane.
__device__ __forceinline__ void dropout_words_rows(const AttentionDropout& d, uint64_t row, int64_t k0,
                                                   int lane, uint32_t (&words)[4]) {
  block_words(attention_dropout_block(d, row, uint64_t(k0 + 16 * (lane % 4))), words);
  transpose_words<2, 1>(words, lane);
  const KeepBytesTest test = keep_bytes_test(d.threshold);
#pragma unroll
  for (int i = 0; i < 4; ++i) words[i] = keep_bytes(words[i], test);
}

// Dropout on one k-step of P as bf16 A fragments (pf[0], pf[2]: the lane's
// first row, keys 2 (lane % 4) + {0, 1} and + 8; pf[1], pf[3]: its second
// row), with the rows' dropout_words_rows words for the k-step: the dropped
// weights zeroed in place, two per mask (the bits of zeroing them before the
// pack), about half the issue slots of a test per weight.
__device__ __forceinline__ void drop_packed_weights(uint32_t (&pf)[4], uint32_t kept_row0, uint32_t kept_row1) {
  pf[0] &= keep_pair_mask<0, 1>(kept_row0);
  pf[1] &= keep_pair_mask<0, 1>(kept_row1);
  pf[2] &= keep_pair_mask<2, 3>(kept_row0);
  pf[3] &= keep_pair_mask<2, 3>(kept_row1);
}

// Key-major layout, for the backward (S^T: a warp's 16 keys form the group
// starting at key kt, a multiple of 16; lane = 4i + c holds keys kt + i and
// kt + i + 8 for the queries q0 + 8nt + 2c + e, nt < 8, e < 2). Half `half`
// (n-tiles 4 half .. 4 half + 3): on exit words[2 (nt % 4) + e] = word i / 2
// of that query's block; the lane's keys are bytes (i & 1) and 2 + (i & 1).
// `row_of(u)` gives the mask row of query q0 + 8 (u / 2) + 2c + (u % 2). One
// Philox call per lane per half (two per 64 x 16 tile, the floor: 64 blocks
// per warp): lanes with the same c and i & 1 transpose the blocks of 4
// queries, then swap with the lanes of the other i & 1.
template <typename RowOf>
__device__ __forceinline__ void dropout_words_keys(const AttentionDropout& d, int64_t kt, int lane, int half,
                                                   RowOf row_of, uint32_t (&words)[8]) {
  const int w = lane >> 3, b = (lane >> 2) & 1;
  uint32_t a[4];
  // This lane draws query u = 8 half + 4b + w.
  block_words(attention_dropout_block(d, row_of(8 * half + 4 * b + w), uint64_t(kt)), a);
  transpose_words<16, 8>(a, lane);  // a[j]: word w of query 8 half + 4b + j
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t other = __shfl_xor_sync(0xffffffffu, a[j], 4);  // query 8 half + 4(1-b) + j
    words[j] = b ? other : a[j];
    words[4 + j] = b ? a[j] : other;
  }
}

// What a merge reads for the two rows (q_row, q_row + 8) a lane holds: their
// lse and this lane's columns of their fp32 accumulators (zeros where the lse
// is -inf: the row holds nothing yet, and its accumulator may hold anything).
// A kernel loads them ahead of its epilogue, under its products: the lse when
// the item starts (load_merge_lse), the accumulators under its last products
// (load_merge_acc), only for rows whose lse says they hold something (in the
// finishing branch of LongNet's configurations, half of them do not).
template <int D>
struct MergeInputs {
  float lse[2];
  float2 acc[2][D / 8];
};

// The accumulator row of kept row tq (its first row where tq is past the row set).
__device__ __forceinline__ int64_t merge_row(int64_t tq, const BranchGrid& g, int64_t batch, int64_t head,
                                             const RowSet& rows) {
  return kept_row_index(g, batch, head, rows, tq < rows.count ? tq : 0);
}

template <int D>
__device__ __forceinline__ void load_merge_lse(MergeInputs<D>& in, int64_t q_row, const BranchGrid& g,
                                               int64_t batch, int64_t head, const RowSet& rows, const float* lse) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t tq = q_row + r * 8;
    in.lse[r] = tq < rows.count ? lse[merge_row(tq, g, batch, head, rows)] : -INFINITY;
  }
}

template <int D>
__device__ __forceinline__ void load_merge_acc(MergeInputs<D>& in, int64_t q_row, const BranchGrid& g,
                                               int64_t batch, int64_t head, const RowSet& rows,
                                               const float* o_acc) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // An offset, not a pointer, until a row reads: a lone branch with spans
    // (kFinish over zeroed outputs) passes no accumulator at all.
    const int64_t src = merge_row(q_row + r * 8, g, batch, head, rows) * D + 2 * (lane % 4);
    const bool holds = in.lse[r] != -INFINITY;  // also false past the row set
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      in.acc[r][dt] = holds ? *reinterpret_cast<const float2*>(o_acc + src + dt * 8) : make_float2(0.f, 0.f);
  }
}

// How one row of a branch finishes: the output row is w_old * (the
// accumulator's row) + w_new * o, and its lse becomes `lse`. m and l are the
// lane's online-softmax state of the row (l summed over the quad here: every
// lane of the warp calls this); out_scale as store_branch_rows'. kMerge and
// kFinish merge with lse_old by the log-sum-exp rule (-inf: the row holds
// nothing yet); the other modes take the branch alone (w_old = 0).
struct RowFinish {
  float w_old, w_new, lse;
};

template <MergeMode kMode>
__device__ __forceinline__ RowFinish finish_row(float m, float l, float scale_log2, float out_scale,
                                                float lse_old) {
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  // A row with no pair of its own (nested pairs: the first span's, causal)
  // adds nothing: lse -inf, weight 0.
  const float lse2_branch = l > 0.f ? m * scale_log2 + log2f(l) : -INFINITY;  // the branch's lse, base 2
  const float inv_l = l > 0.f ? out_scale / l : 0.f;
  RowFinish f{0.f, inv_l, lse2_branch * kLn2};
  if constexpr (kMode == MergeMode::kMerge || kMode == MergeMode::kFinish) {
    if (lse_old != -INFINITY) {
      // In base 2 with the MUFU's approximations (relative error ~2^-22,
      // as every weight of the softmax has) rather than expf / log1pf's
      // accurate sequences, half of the instructions a merge added.
      const float a = lse_old * kLog2e;
      const float lse2 = fmaxf(a, lse2_branch) + __log2f(1.f + mma::exp2_ftz(-fabsf(a - lse2_branch)));
      f.lse = lse2 * kLn2;
      f.w_old = mma::exp2_ftz(a - lse2);
      f.w_new = mma::exp2_ftz(lse2_branch - lse2) * inv_l;
    }
  }
  return f;
}

// Finishes the two rows (q_row, q_row + 8) a lane holds in the accumulator
// layout (finish_row): stores the normalised output and lse
// (kSingle), or writes (kWrite) or log-sum-exp merges (kMerge) them into the
// fp32 accumulators, or merges them with the accumulators into the output
// (kFinish, which needs `pre`). o[dt] is 8-column chunk dt of both rows. The output is
// o * out_scale / l: out_scale is the dropout scale when o summed unscaled kept weights.
// kMerge reads `pre` when given (load_merge_lse, load_merge_acc), else loads its inputs here.
template <int D, MergeMode kMode>
__device__ __forceinline__ void store_branch_rows(const float (&o)[D / 8][4], const float (&m_row)[2],
                                                  const float (&l_row)[2], int64_t q_row, float scale_log2,
                                                  const BranchGrid& g, int64_t batch, int64_t head,
                                                  const RowSet& rows, float* o_acc, float* lse,
                                                  BFloat16* out, float out_scale = 1.f,
                                                  const MergeInputs<D>* pre = nullptr) {
  constexpr int kDTiles = D / 8;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t tq = q_row + r * 8;
    const bool valid = tq < rows.count;
    const int64_t ri = merge_row(tq, g, batch, head, rows);
    float lse_old = -INFINITY;
    if constexpr (kMode == MergeMode::kMerge || kMode == MergeMode::kFinish)
      lse_old = pre ? pre->lse[r] : valid ? lse[ri] : -INFINITY;
    const RowFinish f = finish_row<kMode>(m_row[r], l_row[r], scale_log2, out_scale, lse_old);
    if constexpr (kMode == MergeMode::kSingle) {
      if (valid) {
        BFloat16* dst = out + ri * D;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          int col = dt * 8 + 2 * (lane % 4);
          *reinterpret_cast<uint32_t*>(dst + col) = mma::pack_bf16(o[dt][2 * r] * f.w_new, o[dt][2 * r + 1] * f.w_new);
        }
        if (lane % 4 == 0) lse[ri] = f.lse;
      }
      continue;
    }
    __syncwarp();  // the quad has read lse before lane 0 of it rewrites it
    if constexpr (kMode == MergeMode::kFinish) {
      if (valid) {
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          const int col = dt * 8 + 2 * (lane % 4);
          const float2 prev = pre->acc[r][dt];
          *reinterpret_cast<uint32_t*>(out + ri * D + col) = mma::pack_bf16(
              f.w_old * prev.x + f.w_new * o[dt][2 * r], f.w_old * prev.y + f.w_new * o[dt][2 * r + 1]);
        }
        if (lane % 4 == 0) lse[ri] = f.lse;
      }
      continue;
    }
    if (valid) {
      float* dst = o_acc + ri * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        int col = dt * 8 + 2 * (lane % 4);
        float2 prev = kMode != MergeMode::kMerge ? make_float2(0.f, 0.f)
                      : pre                     ? pre->acc[r][dt]
                                                : *reinterpret_cast<float2*>(dst + col);
        *reinterpret_cast<float2*>(dst + col) = make_float2(
            f.w_old * prev.x + f.w_new * o[dt][2 * r], f.w_old * prev.y + f.w_new * o[dt][2 * r + 1]);
      }
      if (lane % 4 == 0) lse[ri] = f.lse;
    }
  }
}

}  // namespace minidl::cuda::attn
