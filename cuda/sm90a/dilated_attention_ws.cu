// Hopper (sm_90a) warp-specialised forward and backward (head dim 64 or 128)
// for one dilated-attention branch: the FlashAttention-3 structure
// (docs/kernel-notes.md, "ws"). At head dim 128 the forward's key tiles hold
// 64 keys (O takes 64 registers), and every tile is two 64-column atoms.
//
// The forward is persistent (one block per SM): a block takes work items,
// each 128 kept query rows of one (batch, head, segment), and runs three
// warpgroups:
// - a producer, whose first warp loads each item's Q (double-buffered) and
//   streams K and V tiles (128 keys at head dim 64, 64 at 128) with TMA into
//   a kStages-deep ring that runs on across items; each slot has
//   "full" mbarriers (K and V apart, so S can start before V lands) and an
//   "empty" mbarrier the consumers release it on;
// - two consumer warpgroups of 64 query rows each. Within a warpgroup,
//   S(j) = Q K(j)^T is issued before O += P(j-1) V(j-1), and the softmax of
//   tile j runs while that product is in flight. Q's wgmma fragments stay
//   in registers for the item (issue_s_rs).
// setmaxnreg gives the producer's registers to the consumers. Attention
// dropout (core/dilated.h) draws the mask words of each 64-key half of a tile
// within its softmax (8 live words per lane, not 16: the consumers' registers
// are full).
//
// A branch's kept rows are a strided row set (stride r rows). The tensor maps
// see the (B, N) positions of q/k/v flattened to P = b N + pos and split as
// P = o + r j: dims (d, head, o < r, j < J), so the rows of one (batch, head,
// segment) are the boxes at (64 a, h, o, j0 + t) for each 64-column atom a. J = floor(B N / r) keeps every
// address the map can form inside the tensor; the few tail rows past J (the
// last r - 1 positions) are gathered by the producer warp with plain loads.
#include <cudaTypedefs.h>

#include <algorithm>

#include "cuda/dilated_attention_mma.cuh"
#include "cuda/dilated_attention_tiles.cuh"
#include "cuda/hopper.cuh"
#include "cuda/runtime.h"
#include "cuda/sm90a/ws_trace.cuh"
#include "cuda/wgmma.cuh"

namespace minidl::cuda::attn {
namespace {

constexpr int kBr = 128;  // query rows per block: two consumer warpgroups x 64
constexpr int kStages = 4;  // K/V ring depth: the producer runs up to three tiles ahead
constexpr int kThreads = 3 * 128;
constexpr int kProducerRegs = 56, kConsumerRegs = 224;
static_assert(hopper::split_fits(kThreads, kProducerRegs, kConsumerRegs), "the forward's register split fits the block's pool");
constexpr int kConsumerWarps = 8;

// A tile of Rows rows x kD bf16 columns as TMA's 128-byte swizzle lays out
// boxes of 64 columns: one [Rows][64] atom per 64 columns, 16-byte chunk c
// of a row's atom at c ^ (row % 8). At kD = 64, mma::SmemTile's layout.
template <int Rows, int kD>
struct AtomTile {
  static constexpr int kAtoms = kD / 64;
  static constexpr int kChunks = kD / 8;
  static constexpr int kAtomBytes = Rows * 128;
  static constexpr int kBytes = kAtoms * kAtomBytes;
  static __device__ __forceinline__ char* at(char* base, int row, int chunk) {
    return base + (chunk / 8) * kAtomBytes + row * 128 + ((chunk % 8) ^ (row & 7)) * 16;
  }
};

// The address a lane gives ldmatrix / stmatrix .x4 for one 16-column k-step
// kk of a warpgroup's 64 rows in the mma.m16n8k16 fragment layout: lane l
// addresses row l % 8 of matrix l / 8, and matrix i is row half i % 2 and
// 16-byte chunk 2 kk + i / 2 (row: within the warpgroup's rows).
struct FragmentLane {
  int row, chunk_half;
  __device__ __forceinline__ FragmentLane() {
    const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4;
    row = warp * 16 + ((lane / 8) % 2) * 8 + lane % 8;
    chunk_half = lane / 16;
  }
  __device__ __forceinline__ int chunk(int kk) const { return 2 * kk + chunk_half; }
};

// Stores a warpgroup's 64 rows x kD columns of bf16, held as packed pairs in
// the accumulator layout (rows[h][c]: the lane's row warp * 16 + lane / 4 +
// 8 h, columns 8 c + 2 (lane % 4) and + 1), into a swizzled AtomTile<64, kD>
// by stmatrix (FragmentLane), for one TMA store; per-lane stores of 4 bytes to 8 rows at a time cost an
// item thousands of cycles (kernel-notes, session 18).
template <int kD>
__device__ __forceinline__ void store_rows_tile(char* tile, const uint32_t (&rows)[2][kD / 8]) {
  const FragmentLane f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
    hopper::stmatrix_x4(AtomTile<64, kD>::at(tile, f.row, f.chunk(kk)), rows[0][2 * kk], rows[1][2 * kk],
                        rows[0][2 * kk + 1], rows[1][2 * kk + 1]);
}

// A warpgroup's tile out through the TMA unit, one bulk group per call:
// thread 0 waits until the group kPending groups back has read its buffer,
// the warpgroup writes the tile (`write`, shared-memory stores) and makes the
// writes visible to the async proxy, and thread 0 issues the stores
// (`issue`). `barrier`: the warpgroup's named barrier.
template <int kPending, class Write, class Issue>
__device__ __forceinline__ void tile_out(int barrier, Write write, Issue issue) {
  if (threadIdx.x % 128 == 0) hopper::bulk_wait_read<kPending>();
  hopper::named_sync(barrier, 128);
  write();
  wgmma::fence_proxy_async();  // st.shared, read next by the TMA unit
  hopper::named_sync(barrier, 128);
  if (threadIdx.x % 128 == 0) {
    issue();
    hopper::bulk_commit();
  }
}

// The forward's shape at head dim kD: 128-key tiles at 64 (S is one m64n128
// accumulator per warpgroup), 64-key tiles at 128 (O takes 64 registers).
template <int kD>
struct FwdShape {
  static constexpr int kBc = kD == 64 ? 128 : 64;  // keys per tile
  using QTile = AtomTile<kBr, kD>;
  using KTile = AtomTile<kBc, kD>;
  static constexpr int kQ = 0;                         // [2]: the current item's and the next one's
  static constexpr int kK = kQ + 2 * QTile::kBytes;
  static constexpr int kV = kK + kStages * KTile::kBytes;
  static constexpr int kBars = kV + kStages * KTile::kBytes;
  static constexpr int kNumBars = 4 + 3 * kStages;  // q_full[2], q_empty[2], k_full[], v_full[], empty[]
  static constexpr int kItems = kBars + kNumBars * 8;  // [2] FwdItem: the item in each Q slot
  // TMA's and wgmma's 128-byte swizzle repeats every 1024 bytes of absolute
  // address: tiles start on a 1024-byte boundary, hence the slack.
  static constexpr int kBytes = kItems + 2 * 64 + 1024;
  // The finishing branch without dropout at head dim 64 (out_tiles) writes a
  // warpgroup's 64 bf16 output rows through shared memory, by one TMA store:
  // the tiles lie past the rest, so only its launches ask for the room
  // (kernel-notes, session 18: the other modes' code and L1 lost with it).
  using OutTile = AtomTile<64, kD>;
  static constexpr int kOut = (kItems + 2 * 64 + 1023) / 1024 * 1024;  // [2 warpgroups]
  static constexpr int kBytesOut = kOut + 2 * OutTile::kBytes + 1024;
};

// Whether a forward instantiation writes its output rows through FwdShape's
// tiles (where the launch's map reaches them: WsParams::out_map). With dropout
// it spilled and lost (kernel-notes, sessions 18 and 22).
template <int kD, MergeMode kMode, bool kDropout>
constexpr bool out_tiles = kD == 64 && kMode == MergeMode::kFinish && !kDropout;

struct WsParams {
  BranchGrid g;
  Operand<BFloat16> q, k, v;  // for the tail rows the maps cannot reach
  int64_t map_rows;           // J
  float scale_log2;
  BranchDropout drop;
  float *o_acc, *lse;
  BFloat16* out;
  bool out_map;         // out_tiles: omap reaches out (rows of stride 1, aligned)
  int64_t batch_heads;  // B H
  int64_t items;        // segments x tiles_per_segment x B H
  int64_t group;        // (segment, batch-head) pairs whose K/V share L2: fwd_item
  int* work;            // [2] zero at launch: items handed out, blocks done (the last one zeroes both)
  BranchPairs pairs;    // kWeighted: the branch's share of pairs nested branches share (core/dilated.h)
};

// Every barrier a producer warp completes takes one arrival per lane: each
// lane's own plain stores (gathered rows, row statistics) are then released
// by its own arrival, which the consumers' wait acquires.
constexpr uint32_t kLoadArrivals = 32;

// Loads rows [t_first, t_first + kRows) of a row set into a swizzled tile and
// completes `bar`: one TMA box per 64 columns when the map reaches every valid
// row, else the warp gathers the rows (zeros past the row set) and arrives itself.
template <int kRows, int kD>
__device__ __forceinline__ void load_rows(char* dst, const CUtensorMap* map, const Operand<BFloat16>& x,
                                          uint64_t* bar, int64_t map_rows, int64_t batch, int64_t head,
                                          const RowSet& rows, int o, int64_t j0, int64_t t_first) {
  using Tile = AtomTile<kRows, kD>;
  const int lane = threadIdx.x % 32;
  const int64_t t_end = min(t_first + kRows, rows.count);
  if (j0 + t_end - 1 < map_rows) {
    if (lane == 0) {
      hopper::mbar_arrive_expect_tx(bar, Tile::kBytes);
#pragma unroll
      for (int a = 0; a < Tile::kAtoms; ++a)
        hopper::tma_load_4d(dst + a * Tile::kAtomBytes, map, bar, 64 * a, static_cast<int>(head), o,
                            static_cast<int>(j0 + t_first));
    } else {
      hopper::mbar_arrive(bar);
    }
    return;
  }
  for (int i = lane; i < kRows * Tile::kChunks; i += 32) {
    const int r = i / Tile::kChunks, c = i % Tile::kChunks;
    const int64_t t = t_first + r;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (t < rows.count) val = *reinterpret_cast<const uint4*>(x.row(batch, rows.base + t * rows.stride, head) + c * 8);
    *reinterpret_cast<uint4*>(Tile::at(dst, r, c)) = val;
  }
  wgmma::fence_proxy_async();  // ordinary stores, read next by wgmma (async proxy)
  hopper::mbar_arrive(bar);
}

// The top bytes of four words as one word, w[0]'s lowest: the last step of
// the keep-bit gathers below, where a multiply has moved eight decisions
// into each word's top byte.
__device__ __forceinline__ uint32_t top_bytes(const uint32_t (&w)[4]) {
  return __byte_perm(__byte_perm(w[0], w[1], 0x0073), __byte_perm(w[2], w[3], 0x0073), 0x5410);
}

// Saves a lane's keep decisions of one 64-key half (dropout_words_rows'
// words for its two rows, keep[a][g]: byte 2 h + e of word g keeps key
// 16 g + 8 h + 2 (lane % 4) + e of row a) into a block of DropoutBits, whose
// layout is the backward's: a backward lane holds two keys with equal
// (lane % 4, e) of this warp and, of each, the query pair (2 i', 2 i' + 1)
// of the rows' lane / 4. So the lanes of a row pair (lane ^ 4) swap the
// halves of their decisions (e = 0 to the even row's lane, e = 1 to the odd
// one's), and each writes one byte per 16-key group g: byte `warp` of word
// 32 g + 4 (2 (lane % 4) + e) + lane / 8, bit 4 a + 2 h + (row % 2), when
// `store` (the block exists: causal blocks stop at the diagonal). The shuffle
// is outside the branch, so the warp never splits around it.
__device__ __forceinline__ void save_keep_bits(const uint32_t (&keep)[2][4], uint8_t* block, int lane, bool store) {
  uint32_t top[4];  // the top byte of top[g]: bit 4 a + 2 h + e (a multiply gathers the bytes' top bits)
#pragma unroll
  for (int g = 0; g < 4; ++g)
    top[g] = ((keep[1][g] & 0x80808080u) | ((keep[0][g] >> 4) & 0x08080808u)) * 0x00204081u;
  const uint32_t bits = top_bytes(top);
  const bool odd = lane & 4;  // this lane's rows are odd: it keeps e = 1
  const uint32_t own = odd ? 0xAAAAAAAAu : 0x55555555u;
  const uint32_t other = __shfl_xor_sync(0xffffffffu, bits & ~own, 4);  // the pair row's, same e as own
  const uint32_t out = (bits & own) | (odd ? other >> 1 : other << 1);
  if (store)
#pragma unroll
    for (int g = 0; g < 4; ++g) block[g * 128] = static_cast<uint8_t>(out >> (8 * g));
}

// The backward's keep word of a 64-query tile, drawn (for a backward whose
// forward kept no bits): the word the forward's save_keep_bits stores for
// this lane, bit 4 c + e keeping S^T element [4 c + e] (key kt + i + 8 (e >> 1),
// i = lane / 4; query q0 + 8 c + 2 (lane % 4) + (e & 1)). dropout_words_keys
// gives each query's word holding the lane's keys, in bytes (i & 1) and
// 2 + (i & 1); rows: the queries' mask rows, count the row set's size
// (queries past it take row 0's draws; their weights are zero). The bits are
// gathered as save_keep_bits gathers them: two words' decisions into bits 6
// and 7 of each byte, the lane's bytes of two such words into one register,
// and a multiply that moves its eight decisions into the top byte in order.
__device__ __forceinline__ uint32_t draw_keep_word(const AttentionDropout& d, const AttentionMaskRows& rows,
                                                   int64_t count, int64_t q0, int64_t kt, int lane) {
  const KeepBytesTest test = keep_bytes_test(d.threshold);
  const uint32_t lane_bytes = (lane >> 2) & 1 ? 0x7531u : 0x6420u;  // bytes 1, 3 (else 0, 2) of both words
  uint32_t top[4];  // the top byte of top[k]: bits 8 k .. 8 k + 7 of the word
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint32_t words[8];
    dropout_words_keys(
        d, kt, lane, half,
        [&](int u) {
          const int64_t tq = q0 + 8 * (u / 2) + 2 * (lane % 4) + (u % 2);
          return rows.at(uint64_t(tq < count ? tq : 0));
        },
        words);
#pragma unroll
    for (int k = 0; k < 2; ++k) {  // columns c = 4 half + 2 k and c + 1
      uint32_t m[2];  // bit 7 of each byte: words[2 c' + 1]'s decision (e odd), bit 6 words[2 c']'s
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int c = 2 * k + u;  // c % 4
        m[u] = (keep_bytes(words[2 * c + 1], test) & 0x80808080u) |
               ((keep_bytes(words[2 * c], test) >> 1) & 0x7F7F7F7Fu);
      }
      // bytes [c lo, c hi, c + 1 lo, c + 1 hi], bits 6 and 7 each, to bits 24 .. 31 in that order
      top[2 * half + k] = (__byte_perm(m[0], m[1], lane_bytes) & 0xC0C0C0C0u) * 0x00041041u;
    }
  }
  return top_bytes(top);
}

// The online-softmax step of one tile for a lane's two rows: masks S, updates
// m and l, and returns P as bf16 A fragments and the factor that rescales O.
// With dropout the dropped weights are zeroed after l counts them (the
// normaliser is that of the undropped scores); the store applies the scale.
// mask_rows: the dropout mask rows of the lane's two rows; bits_row: this
// lane's byte in the rows' first DropoutBits block (key block 0), whose key
// blocks up to kb_last get the decisions. kMask: the tile
// reaches past the row set or across the causal diagonal (a separate
// instantiation: predicated, the mask would cost every tile its issue slots).
// kWeighted: each weight is 2^bias (pair_log2_weights) times the softmax's.
template <int kBc, bool kCausal, bool kDropout, bool kMask, bool kWeighted>
__device__ __forceinline__ void softmax_tile(const float (&s_in)[kBc / 2], uint32_t (&pf)[kBc / 16][4], float (&corr)[2],
                                             float (&m_row)[2], float (&l_row)[2], int64_t k0, int64_t q_row0,
                                             int64_t group_row0, int64_t count, float scale_log2,
                                             const AttentionDropout& drop, const uint64_t (&mask_rows)[2],
                                             uint8_t* bits_row, int kb_last, const float (&bias)[2]) {
  const int lane = threadIdx.x % 32;
  // s[4c + e]: key 8c + 2 (lane % 4) + (e & 1) of the tile, row q_row0 + 8 (e >> 1). The
  // mask is computed in 32-bit from offsets clamped to the tile. It goes into
  // a copy: the S accumulators are written by wgmma only, since the forward
  // keeps an item's first S in flight across the loop (a plain write to them
  // anywhere makes ptxas serialise every wgmma, C7515); unmasked, the copy is
  // a renaming.
  float s[kBc / 2];
#pragma unroll
  for (int i = 0; i < kBc / 2; ++i) s[i] = s_in[i];
  if constexpr (kMask) {
    const int64_t left = count - k0, ahead = q_row0 - k0;
    const int limit = left < kBc ? static_cast<int>(left) : kBc;
    // key col > diag (+ 8 for the lane's second row) is in the row's future
    const int diag = ahead > kBc ? kBc : ahead < -16 ? -16 : static_cast<int>(ahead);
#pragma unroll
    for (int i = 0; i < kBc / 2; ++i) {
      const int col = (i / 4) * 8 + 2 * (lane % 4) + (i & 1);
      if (col >= limit || (kCausal && col > diag + ((i >> 1) & 1) * 8)) s[i] = -INFINITY;
    }
  }
  float m_scaled[2];
  online_softmax_max<kBc / 8, true>(s, m_row, l_row, m_scaled, corr, scale_log2);
  // The exponent's offset: per row, and with weights per row and column parity.
  float shift[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int x = 0; x < 2; ++x) shift[r][x] = kWeighted ? bias[x] - m_scaled[r] : -m_scaled[r];
  // keep[r][g]: keys 16 g + 8 c + 2 (lane % 4) + e of the half, row r, in byte 2 c + e.
  uint32_t keep[2][4];
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) {
    if constexpr (kDropout)
      if (kk % 4 == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) dropout_words_rows(drop, mask_rows[r], k0 + 16 * kk, lane, keep[r]);
        const int kb = static_cast<int>(k0 / 64) + kk / 4;
        save_keep_bits(keep, bits_row + kb * 512, lane, kb <= kb_last);
      }
    float p[2][4];
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[c][e] = mma::exp2_ftz(fmaf(s[4 * (2 * kk + c) + e], scale_log2, shift[e >> 1][e & 1]));
        l_row[e >> 1] += p[c][e];
      }
    pf[kk][0] = mma::pack_bf16(p[0][0], p[0][1]);
    pf[kk][1] = mma::pack_bf16(p[0][2], p[0][3]);
    pf[kk][2] = mma::pack_bf16(p[1][0], p[1][1]);
    pf[kk][3] = mma::pack_bf16(p[1][2], p[1][3]);
    if constexpr (kDropout) drop_packed_weights(pf[kk], keep[0][kk % 4], keep[1][kk % 4]);
  }
}

// q_desc, k_desc, v_desc: descriptors of the tiles' first atoms
// (wgmma::desc_sw128); the k-steps past column 64 read the next atom.
template <int kD, int kBc>
__device__ __forceinline__ void issue_s(float (&s)[kBc / 2], uint64_t q_desc, uint64_t k_desc) {
  using S = FwdShape<kD>;
  wgmma::fence();
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    const uint64_t da = wgmma::desc_offset(q_desc, (ks / 4) * S::QTile::kAtomBytes + (ks % 4) * 32);
    const uint64_t db = wgmma::desc_offset(k_desc, (ks / 4) * S::KTile::kAtomBytes + (ks % 4) * 32);
    if constexpr (kBc == 128) {
      if (ks == 0) wgmma::mma_64x128x16_ss<false>(s, da, db);
      else wgmma::mma_64x128x16_ss<true>(s, da, db);
    } else {
      if (ks == 0) wgmma::mma_64x64x16_ss<false>(s, da, db);
      else wgmma::mma_64x64x16_ss<true>(s, da, db);
    }
  }
  wgmma::commit();
}

// A warpgroup's 64 Q rows (its half of the item's QTile) as wgmma A
// fragments (the mma.m16n8k16 A layout), one ldmatrix.x4 per 16-column k-step.
template <int kD>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[kD / 16][4], char* q_tile, int consumer) {
  const FragmentLane f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
    mma::ldmatrix_x4(qf[kk], FwdShape<kD>::QTile::at(q_tile, consumer * 64 + f.row, f.chunk(kk)));
}

// S = Q K^T with Q's fragments in registers, for S(j > 0): Q is read from
// shared memory once per item instead of once per key tile, a third fewer
// operand bytes per S at head dim 64 (m64n128; 16 registers), half at 128
// (m64n64; 32 registers). S(0) stays SS (issue_s): it is issued under the
// previous item's epilogue, while qf still holds that item's Q (kernel-notes,
// sessions 38 and 42). Past column 64 the k-steps read K's next atom.
template <int kD, int kBc>
__device__ __forceinline__ void issue_s_rs(float (&s)[kBc / 2], const uint32_t (&qf)[kD / 16][4], uint64_t k_desc) {
  using S = FwdShape<kD>;
  static_assert(S::kBc == kBc);
  wgmma::fence();
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    const uint64_t db = wgmma::desc_offset(k_desc, (ks / 4) * S::KTile::kAtomBytes + (ks % 4) * 32);
    if constexpr (kBc == 128) {
      if (ks == 0) wgmma::mma_64x128x16_rs<false>(s, qf[ks], db);
      else wgmma::mma_64x128x16_rs<true>(s, qf[ks], db);
    } else {
      if (ks == 0) wgmma::mma_64x64x16_rs<false>(s, qf[ks], db);
      else wgmma::mma_64x64x16_rs<true>(s, qf[ks], db);
    }
  }
  wgmma::commit();
}

// O += P V; at head dim 128 V's two atoms are one MN-major operand (the
// descriptor's lbo steps between them).
template <int kD, int kBc>
__device__ __forceinline__ void issue_pv(float (&o)[kD / 2], const uint32_t (&pf)[kBc / 16][4], uint64_t v_desc) {
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) {
    if constexpr (kD == 128) wgmma::mma_64x128x16_rs_mn(o, pf[kk], wgmma::desc_offset(v_desc, kk * 16 * 128));
    else wgmma::mma_64x64x16_rs_mn(o, pf[kk], wgmma::desc_offset(v_desc, kk * 16 * 128));
  }
  wgmma::commit();
}

// One work item of the persistent forward: a 128-row query tile of one
// (batch, head, segment). Items come in groups of p.group (segment,
// batch-head) pairs, as many as keep their K and V within about a quarter of L2
// (tiles of one pair read the same K/V); inside a group the causal tile rank
// is the slowest index, heaviest first, so the last items handed out are the
// shortest. n_tiles: key tiles; 0: nothing to do (the tile lies past the row
// set, or a nested branch's tile has no pairs of its own: causal, in the
// first span; else in a segment of one span); -1: no items left (the
// producer's stop mark to the consumers).
struct FwdItem {
  int64_t batch, head, t0;
  int64_t span0;  // a nested branch's query tile: the first kept row of its span (else 0)
  RowSet rows;
  int n_tiles;
};
static_assert(sizeof(FwdItem) <= 64, "FwdShape's kItems reserves 64 bytes per item");

// Item `item` of a persistent launch's list (forward or backward: the params'
// g, batch_heads and group): its (segment, batch-head) pair and its rank, the
// tile's position in the heaviest-first order inside the group.
struct ItemPlace {
  int64_t segment, bh, rank;
};

template <class Params>
__device__ __forceinline__ ItemPlace item_place(const Params& p, int64_t item) {
  const BranchGrid& g = p.g;
  const int64_t pairs = g.segments * p.batch_heads, per_group = p.group * g.tiles_per_segment;
  const int64_t first_pair = item / per_group * p.group, in_group = item % per_group;
  const int64_t group_pairs = min(p.group, pairs - first_pair);
  const int64_t pair = first_pair + in_group % group_pairs;
  return {pair / p.batch_heads, pair % p.batch_heads, in_group / group_pairs};
}

// An item's row set in DropoutBits' order, segment B H + batch H + head
// (derived, not carried in the item: a larger item spills the producer's
// registers; positions fit 32 bits, ws_takes).
template <class Params>
__device__ __forceinline__ int64_t dropout_row_set(const Params& p, int64_t batch, int64_t head, const RowSet& rows) {
  const int64_t segment = static_cast<uint32_t>(rows.base) / static_cast<uint32_t>(p.g.w);
  return segment * p.batch_heads + batch * p.g.heads + head;
}

// The producer warp's next item after its first (blockIdx.x): lane 0 takes
// one from the launch's counter, the warp shares it.
__device__ __forceinline__ int64_t next_item(int* work, int lane) {
  int64_t next = 0;
  if (lane == 0) next = gridDim.x + int64_t(atomicAdd(&work[0], 1));
  return __shfl_sync(0xffffffffu, next, 0);
}

// The producer warp's last act: the last block out zeroes the counters for
// the next launch (every block's last take precedes its count here).
__device__ __forceinline__ void finish_items(int* work, int lane) {
  if (lane != 0) return;
  __threadfence();
  if (atomicAdd(&work[1], 1) == static_cast<int>(gridDim.x) - 1) {
    __threadfence();  // every other block's takes and counts before the reset
    work[0] = 0;
    work[1] = 0;
  }
}

template <int kBc, bool kCausal, bool kWeighted>
__device__ __forceinline__ FwdItem fwd_item(const WsParams& p, int64_t item) {
  const BranchGrid& g = p.g;
  const ItemPlace at = item_place(p, item);
  const int64_t segment = at.segment, bh = at.bh, rank = at.rank;
  FwdItem w;
  w.batch = bh / g.heads;
  w.head = bh % g.heads;
  w.rows = kept_rows(g.n, g.w, g.r, w.head, segment);
  w.t0 = (g.tiles_per_segment - 1 - rank) * kBr;
  int64_t key_end = kCausal ? min(w.t0 + kBr, w.rows.count) : w.rows.count;
  // A nested branch's query tile lies in one span (a multiple of kBr rows,
  // ws_nested_pairs) and sees, causal, the whole spans before it (none in the
  // first span), else every other span (fwd_key0). The span's start is
  // computed here, once per item: per key tile, its 64-bit division cost the
  // non-causal items ~3% (kernel-notes, session 37).
  w.span0 = 0;
  if constexpr (kWeighted)
    if (p.pairs.span > 0) {
      w.span0 = p.pairs.span_start(w.t0);
      key_end = kCausal ? w.span0 : p.pairs.rows_outside_span(w.span0, w.rows.count);
    }
  w.n_tiles = w.t0 < w.rows.count ? static_cast<int>((key_end + kBc - 1) / kBc) : 0;
  return w;
}

// The first key of an item's key tile j. A nested branch without causality
// skips the query tile's own span (whole tiles) in its list of keys.
template <int kBc, bool kCausal, bool kWeighted>
__device__ __forceinline__ int64_t fwd_key0(const WsParams& p, const FwdItem& w, int j) {
  const int64_t k0 = int64_t(j) * kBc;
  if constexpr (kWeighted && !kCausal)
    if (p.pairs.span > 0) return p.pairs.row_outside_span(w.span0, k0);
  return k0;
}

// Persistent: each block walks work items, its first one blockIdx.x, the next
// ones from a device counter (dynamic: a block takes the next item when it
// can start it). Q is double-buffered and the K/V ring runs on across items,
// so the producer loads the next item's Q and first K/V tiles while the
// consumers finish the current one (its last products, its epilogue).
template <int kD, bool kCausal, MergeMode kMode, bool kDropout, bool kWeighted>
__global__ __launch_bounds__(kThreads, 1) void forward_ws_kernel(const __grid_constant__ CUtensorMap qmap,
                                                                 const __grid_constant__ CUtensorMap kmap,
                                                                 const __grid_constant__ CUtensorMap vmap,
                                                                 const __grid_constant__ CUtensorMap omap,
                                                                 const WsParams p) {
  using Smem = FwdShape<kD>;
  using QTile = typename Smem::QTile;
  using KTile = typename Smem::KTile;
  constexpr int kBc = Smem::kBc;
  extern __shared__ __align__(128) char smem_raw[];
  char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Smem::kBars);
  uint64_t* q_full = bars;
  uint64_t* q_empty = bars + 2;
  uint64_t* k_full = bars + 4;
  uint64_t* v_full = bars + 4 + kStages;
  uint64_t* empty = bars + 4 + 2 * kStages;
  FwdItem* item_of_slot = reinterpret_cast<FwdItem*>(smem + Smem::kItems);  // written by the producer's lane 0
  const BranchGrid& g = p.g;

  if (threadIdx.x == 0) {
    for (int q = 0; q < 2; ++q) {
      hopper::mbar_init(&q_full[q], kLoadArrivals);
      hopper::mbar_init(&q_empty[q], kConsumerWarps * 32);
    }
    for (int s = 0; s < kStages; ++s) {
      hopper::mbar_init(&k_full[s], kLoadArrivals);
      hopper::mbar_init(&v_full[s], kLoadArrivals);
      hopper::mbar_init(&empty[s], kConsumerWarps);
    }
    hopper::mbar_fence_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // producer
    hopper::regs_dec<kProducerRegs>();
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    int64_t item = blockIdx.x;
    int ring = 0;  // K/V tiles loaded so far
    for (int n = 0;; ++n) {
      FwdItem w{};
      while (item < p.items && (w = fwd_item<kBc, kCausal, kWeighted>(p, item)).n_tiles == 0) item = next_item(p.work, lane);
      if (item >= p.items) w.n_tiles = -1;
      const int slot = n & 1;
      hopper::mbar_wait(&q_empty[slot], ((n >> 1) & 1) ^ 1);
      // Decoded once, here: the consumers read it after q_full[slot] (each
      // lane's arrival releases its own stores; lane 0 made these).
      if (lane == 0) item_of_slot[slot] = w;
      if (item >= p.items) {  // none left: the consumers stop at this slot
        hopper::mbar_arrive(&q_full[slot]);
        break;
      }
      const int64_t first = w.batch * g.n + w.rows.base;  // flattened position of row t = 0
      const int o = static_cast<int>(first % g.r);
      const int64_t j0 = first / g.r;
      load_rows<kBr, kD>(smem + Smem::kQ + slot * QTile::kBytes, &qmap, p.q, &q_full[slot], p.map_rows, w.batch, w.head,
                     w.rows, o, j0, w.t0);
      for (int j = 0; j < w.n_tiles; ++j, ++ring) {
          const int s = ring % kStages;
          const int64_t k0 = fwd_key0<kBc, kCausal, kWeighted>(p, w, j);
          hopper::mbar_wait(&empty[s], ((ring / kStages) & 1) ^ 1);
          load_rows<kBc, kD>(smem + Smem::kK + s * KTile::kBytes, &kmap, p.k, &k_full[s], p.map_rows, w.batch, w.head,
                         w.rows, o, j0, k0);
          load_rows<kBc, kD>(smem + Smem::kV + s * KTile::kBytes, &vmap, p.v, &v_full[s], p.map_rows, w.batch, w.head,
                         w.rows, o, j0, k0);
      }
      item = next_item(p.work, lane);
    }
    finish_items(p.work, lane);
    return;
  }

  hopper::regs_inc<kConsumerRegs>();
  // Broadcast from lane 0, the compiler knows the index is warp-uniform: the
  // tile descriptors below then live in uniform registers.
  const int consumer = __shfl_sync(0xffffffffu, warpgroup, 0) - 1;
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const AttentionDropout drop = resolved_dropout<kDropout>(p.drop.mask);
  const uint64_t k_desc0 = wgmma::desc_sw128(smem + Smem::kK);
  // At head dim 128, lbo steps P V's n from V's first atom to its second.
  const uint64_t v_desc0 = wgmma::desc_sw128(smem + Smem::kV, 1024, kD == 128 ? KTile::kAtomBytes : 0);
  auto k_desc = [&](int s) { return wgmma::desc_offset(k_desc0, s * KTile::kBytes); };
  auto v_desc = [&](int s) { return wgmma::desc_offset(v_desc0, s * KTile::kBytes); };

  int ring = 0;  // K/V tiles consumed so far
  // S of an item's first key tile is issued before the item begins, under
  // the previous item's epilogue (finish, below), the first item's here.
  float s[kBc / 2];
  auto q_desc_of = [&](int slot) {
    return wgmma::desc_sw128(smem + Smem::kQ + slot * QTile::kBytes + consumer * 64 * 128);
  };
  // Issued whether or not an item follows (if none, on stale tiles, the
  // result unused): a wgmma issued on one path only makes ptxas wait for it
  // where the paths join (C7517). The branch is on the tiles' wait. The
  // producer never hands out an item without tiles (it skips them), so an
  // item slot holds one with n_tiles > 0 or the end mark -1. With no item at
  // all the stale operands are shared memory never written: harmless, unused.
  auto issue_first_s = [&](int slot, int ring_at, bool loaded) {
    if (loaded) hopper::mbar_wait(&k_full[ring_at % kStages], (ring_at / kStages) & 1);
    issue_s<kD, kBc>(s, q_desc_of(slot), k_desc(ring_at % kStages));
  };
  hopper::mbar_wait(&q_full[0], 0);
  issue_first_s(0, 0, item_of_slot[0].n_tiles > 0);
  WS_TRACE_STATE(consumer);
  for (int n = 0;; ++n) {
    const int slot = n & 1;
    // Already complete (waited before S(0)'s issue); the acquire for item_of_slot.
    hopper::mbar_wait(&q_full[slot], (n >> 1) & 1);
    const FwdItem w = item_of_slot[slot];
    if (w.n_tiles < 0) break;
    WS_TRACE(0, 1, w.n_tiles);
    const int64_t batch = w.batch, head = w.head;
    const RowSet& rows = w.rows;
    const int n_tiles = w.n_tiles;
    const int64_t group_row0 = w.t0 + consumer * 64;
    const int64_t q_row0 = group_row0 + warp * 16 + lane / 4;  // this lane's rows: q_row0, q_row0 + 8

    float o[kD / 8][4];
    float(&o_flat)[kD / 2] = reinterpret_cast<float(&)[kD / 2]>(o);
    float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
    float corr[2];
    uint32_t pf[kBc / 16][4];
    // Dropout: mask row of kept row tq is drop_rows.at(tq) (core/dilated.h).
    uint64_t mask_rows[2] = {0, 0};
    if constexpr (kDropout) {
      const AttentionMaskRows drop_rows = dropout_kept_rows(p.drop, batch, head, rows);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t tq = q_row0 + 8 * r;
        mask_rows[r] = drop_rows.at(uint64_t(tq < rows.count ? tq : 0));
      }
    }
    // The keep bits, saved for the backward (DropoutBits) when the launch has
    // a buffer for them: this lane's byte in the first block of its
    // warpgroup's 64 rows; the blocks reach key block qb (causal) or the row
    // set's last one (none past the row set, none without a buffer).
    uint8_t* bits_row = nullptr;
    int kb_last = -1;
    if constexpr (kDropout)
      if (p.drop.bits.words) {
        const int64_t qb = group_row0 / 64;
        bits_row = reinterpret_cast<uint8_t*>(p.drop.bits.words +
                                              p.drop.bits.word(dropout_row_set(p, batch, head, rows), qb, 0)) +
                   4 * (4 * (2 * (lane % 4) + ((lane >> 2) & 1)) + lane / 8) + warp;
        if (group_row0 < rows.count) kb_last = static_cast<int>(kCausal ? qb : (rows.count - 1) / 64);
      }

    float bias[2] = {0.f, 0.f};
    if constexpr (kWeighted) pair_log2_weights(p.pairs, head, lane, bias);
    auto softmax = [&](int64_t k0, uint32_t(&p_out)[kBc / 16][4]) {
      if (k0 + kBc > rows.count || (kCausal && k0 + kBc - 1 > group_row0))
        softmax_tile<kBc, kCausal, kDropout, true, kWeighted>(s, p_out, corr, m_row, l_row, k0, q_row0, group_row0,
                                                              rows.count, p.scale_log2, drop, mask_rows, bits_row,
                                                              kb_last, bias);
      else
        softmax_tile<kBc, kCausal, kDropout, false, kWeighted>(s, p_out, corr, m_row, l_row, k0, q_row0, group_row0,
                                                               rows.count, p.scale_log2, drop, mask_rows, bits_row,
                                                               kb_last, bias);
    };
    auto key0 = [&](int j) { return fwd_key0<kBc, kCausal, kWeighted>(p, w, j); };
    // Ring slot and phase of this item's key tile j.
    auto stage = [&](int j) { return (ring + j) % kStages; };
    auto phase = [&](int j) { return static_cast<uint32_t>(((ring + j) / kStages) & 1); };

    wgmma::wait<0>();
    wgmma::fence_operands(s);
    WS_TRACE(0, 2, 0);
    // After the wait: the previous item's last RS product has read qf.
    uint32_t qf[kD / 16][4];
    load_q_fragments<kD>(qf, smem + Smem::kQ + slot * QTile::kBytes, consumer);
    // Zeroed only now: a plain write to an accumulator while a wgmma (S(0),
    // issued ahead) is in flight makes ptxas serialise every wgmma (C7515).
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    softmax(key0(0), pf);
    WS_TRACE(0, 3, 0);

    // Tile j: S(j) and O += P(j-1) V(j-1) in flight together, then softmax(j)
    // into the other P buffer. The loop is unrolled by two so that the buffers
    // swap roles without a register copy (a copy into a wgmma operand makes
    // ptxas serialise the wgmma: warning C7513).
    auto step = [&](int j, const uint32_t(&p_in)[kBc / 16][4], uint32_t(&p_out)[kBc / 16][4]) {
      const int sj = stage(j), sp = stage(j - 1);
      WS_TRACE(0, 4, j);
      hopper::mbar_wait(&k_full[sj], phase(j));
      issue_s_rs<kD, kBc>(s, qf, k_desc(sj));
      hopper::mbar_wait(&v_full[sp], phase(j - 1));
      issue_pv<kD, kBc>(o_flat, p_in, v_desc(sp));
      wgmma::wait<1>();
      wgmma::fence_operands(s);
      WS_TRACE(0, 5, j);
      softmax(key0(j), p_out);
      WS_TRACE(0, 6, j);
      wgmma::wait<0>();
      wgmma::fence_operands(o_flat);
      if (lane == 0) hopper::mbar_arrive(&empty[sp]);  // K(j-1), V(j-1) read
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        o[dt][0] *= corr[0];
        o[dt][1] *= corr[0];
        o[dt][2] *= corr[1];
        o[dt][3] *= corr[1];
      }
      WS_TRACE(0, 7, j);
    };
    // kMerge, kFinish: the rows' lse, loaded now, and accumulators, under the last product.
    MergeInputs<kD> merge_in;
    if constexpr (kMode == MergeMode::kMerge || kMode == MergeMode::kFinish)
      load_merge_lse<kD>(merge_in, q_row0, g, batch, head, rows, p.lse);
    // The last tile: every S is done, so Q's slot goes back to the producer
    // (the item after next loads there); then O += P V, and after it the
    // next item's S(0), which runs under this item's epilogue. Its Q and K
    // tiles were loaded while this item's last tiles ran (the producer works
    // up to three tiles ahead), so the waits for them rarely block.
    auto finish = [&](const uint32_t(&p_last)[kBc / 16][4]) {
      WS_TRACE(0, 8, n_tiles);
      hopper::mbar_arrive(&q_empty[slot]);  // every thread: its own reads of item_of_slot[slot] done
      const int sl = stage(n_tiles - 1);
      hopper::mbar_wait(&v_full[sl], phase(n_tiles - 1));
      issue_pv<kD, kBc>(o_flat, p_last, v_desc(sl));
      if constexpr (kMode == MergeMode::kMerge || kMode == MergeMode::kFinish)
        load_merge_acc<kD>(merge_in, q_row0, g, batch, head, rows, p.o_acc);
      // Queued behind P V, so that the tensor cores go on without waiting
      // for this warpgroup: from here to the next item's wait nothing may
      // write an accumulator (ptxas would serialise every wgmma: C7515).
      hopper::mbar_wait(&q_full[slot ^ 1], ((n + 1) >> 1) & 1);
      issue_first_s(slot ^ 1, ring + n_tiles, item_of_slot[slot ^ 1].n_tiles > 0);  // else -1: no item left
      wgmma::wait<1>();  // P V (groups complete in order)
      wgmma::fence_operands(o_flat);
      if (lane == 0) hopper::mbar_arrive(&empty[sl]);
    };
    uint32_t pn[kBc / 16][4];
    int j = 1;
    for (; j + 1 < n_tiles; j += 2) {
      step(j, pf, pn);
      step(j + 1, pn, pf);
    }
    if (j < n_tiles) {
      step(j, pf, pn);
      finish(pn);
    } else {
      finish(pf);
    }
    WS_TRACE(0, 9, n_tiles);
    bool by_tile = false;
    if constexpr (out_tiles<kD, kMode, kDropout>) by_tile = p.out_map && group_row0 + 64 <= rows.count;
    if (by_tile) {
      // The warpgroup's 64 rows, all in the row set (of stride 1: kFinish is
      // the dilation-1 branch), merged as store_branch_rows does, leave by
      // one TMA store; their lse by the quads' first lanes.
      uint32_t packed[2][kD / 8];
      __syncwarp();  // the quad has read lse (load_merge_lse) before lane 0 of it rewrites it
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const RowFinish f = finish_row<kMode>(m_row[r], l_row[r], p.scale_log2, 1.f, merge_in.lse[r]);
#pragma unroll
        for (int dt = 0; dt < kD / 8; ++dt)
          packed[r][dt] = mma::pack_bf16(f.w_old * merge_in.acc[r][dt].x + f.w_new * o[dt][2 * r],
                                         f.w_old * merge_in.acc[r][dt].y + f.w_new * o[dt][2 * r + 1]);
        if (lane % 4 == 0) p.lse[merge_row(q_row0 + 8 * r, g, batch, head, rows)] = f.lse;
      }
      char* tile = smem + Smem::kOut + consumer * Smem::OutTile::kBytes;
      // After the last item's store has read the tile.
      tile_out<0>(
          2 + consumer, [&] { store_rows_tile<kD>(tile, packed); },
          [&] {
            const int position = static_cast<int>(batch * g.n + rows.base + group_row0);  // ws_takes: < 2^31
            hopper::tma_store_3d(&omap, tile, 0, static_cast<int>(head), position);
          });
    } else {
      store_branch_rows<kD, kMode>(o, m_row, l_row, q_row0, p.scale_log2, g, batch, head, rows, p.o_acc, p.lse,
                                   p.out, kDropout ? p.drop.mask.scale : 1.f,
                                   kMode == MergeMode::kMerge || kMode == MergeMode::kFinish ? &merge_in : nullptr);
    }
    WS_TRACE(0, 10, n_tiles);
    ring += n_tiles;
  }
  wgmma::wait<0>();  // the unused last issue
  if (out_tiles<kD, kMode, kDropout> && threadIdx.x % 128 == 0)
    hopper::bulk_wait_all();  // shared memory must outlive the stores
}

// ---- backward ----
//
// Persistent, as the forward: a block takes work items, each 128 kept key
// rows (two consumer warpgroups x 64) of one (batch, head, segment), and walks
// the 64-row query tiles that see them; the producer warp streams each item's
// K and V (into one of kKvSlots buffers, so at head dim 64 the next item's
// load while this one runs), then Q, dO (TMA) and the rows' L and D (plain
// loads) into a kBwdStages-deep ring that runs on across items. Per tile each
// consumer warpgroup computes, with wgmma, S^T = K Q^T and dP^T = V dO^T (keys
// x queries), then P^T and dS^T in registers, dV += P^T dO and dK += dS^T Q (A
// from registers), and dQ = dS K over all 128 keys with both warpgroups' dS^T
// read back from shared memory: at head dim 64 the warpgroups take the tiles'
// dQ in turns, at 128 each its half of the columns. dQ goes to the fp32
// accumulator by TMA bulk reductions (per-thread vector reductions where the
// map cannot reach). dK and dV stay in registers across the query loop.

constexpr int kBwdKeys = 128;  // key rows per block
constexpr int kBm = 64;        // query rows per tile
// A dQ box: 64 queries x 32 fp32 columns, 128-byte rows with TMA's 128-byte
// swizzle (16-byte chunk c of row r at c ^ (r % 8)); the kDQCols columns of
// dQ a warpgroup computes are kDQCols / 32 boxes.
constexpr int kDQBoxBytes = kBm * 32 * 4;

// The backward's shape at head dim kD. The producer walks work items
// (persistent launch); at 64 it keeps 56 registers (a few words of its item
// bookkeeping spill) so that the consumers have 224 for dQ in turns. At 128,
// dK and dV take 128 of a consumer's registers: it gets 232 (the producer 40,
// and spills there: 16-150 bytes), the next tile's S^T and dP^T are not issued
// ahead (they would be live beside dQ), and shared memory (227 KB) holds three
// Q/dO stages, one dQ buffer and one K/V pair.
template <int kD>
struct BwdShape {
  static constexpr int kStages = 3;  // Q, dO ring depth
  static constexpr int kDQBuffers = kD == 64 ? 2 : 1;
  static constexpr bool kAhead = kD == 64;
  // At 64 the warpgroups take the tiles' dQ in turns, each all 64 columns over
  // the 128 keys (m64n64k16: a third less of dS^T and K read from shared
  // memory than two m64n32k16 halves); at 128 each takes its 64 columns.
  static constexpr bool kDQTurns = kD == 64;
  static constexpr int kDQCols = kDQTurns ? kD : kD / 2;  // dQ columns a warpgroup computes
  static constexpr int kProducerRegs = kD == 64 ? 56 : 40, kConsumerRegs = kD == 64 ? 224 : 232;
  static_assert(hopper::split_fits(kThreads, kProducerRegs, kConsumerRegs), "the backward's register split fits the block's pool");
  using KTile = AtomTile<kBwdKeys, kD>;  // K, V
  using RowTile = AtomTile<kBm, kD>;     // a Q or dO tile
  using DsTile = AtomTile<kBwdKeys, kBm>;  // dS^T: keys x queries
  static constexpr int kDQBoxes = kD / 64;  // per warpgroup and buffer (kDQTurns: a tile's two are one buffer)
  // K/V buffers: at 64 two, so the next item's K and V load during this one
  // (persistent launch); at 128 one (no room), loaded after it.
  static constexpr int kKvSlots = kD == 64 ? 2 : 1;
  static constexpr int kK = 0;                                     // [kKvSlots]
  static constexpr int kV = kK + kKvSlots * KTile::kBytes;         // [kKvSlots]
  static constexpr int kQ = kV + kKvSlots * KTile::kBytes;         // [kStages]
  static constexpr int kDO = kQ + kStages * RowTile::kBytes;       // [kStages]
  static constexpr int kDS = kDO + kStages * RowTile::kBytes;      // [2 buffers]
  static constexpr int kDQ = kDS + 2 * DsTile::kBytes;             // [kDQBuffers][2 warpgroups][kDQBoxes]
  // At 64, the last branch's bf16 dK and dV leave through shared memory, one
  // TMA store per warpgroup and tensor (at 128 there is no room).
  static constexpr bool kStoreTiles = kD == 64;
  using OutTile = AtomTile<64, kD>;  // a warpgroup's 64 key rows of dK or dV
  static constexpr int kOut = kDQ + kDQBuffers * 2 * kDQBoxes * kDQBoxBytes;  // [2 warpgroups][dK, dV]
  static constexpr int kStats = kOut + (kStoreTiles ? 4 * OutTile::kBytes : 0);  // [kStages][L2 64, D 64] floats
  static constexpr int kBars = kStats + kStages * 2 * kBm * 4;
  static constexpr int kNumBars = 2 * kKvSlots + 2 * kStages;      // kv_full[], kv_empty[], q_full[], empty[]
  static constexpr int kItems = kBars + kNumBars * 8;              // [kKvSlots] BwdItem: the item of each K/V slot
  static constexpr int kBytes = kItems + kKvSlots * 64 + 1024;
  static_assert(kBytes <= 227 * 1024, "shared memory per block");
};

struct WsBwdParams {
  BranchGrid g;
  Operand<BFloat16> q, k, v, dout;
  int64_t map_rows;
  const float *lse, *delta;
  float scale;
  BranchDropout drop;
  float *dq_acc, *dk_acc, *dv_acc;
  BFloat16 *dk_out, *dv_out;  // kDirect: dK and dV written once here, in bf16
  int64_t out_sn;             // their position stride (elements)
  uint8_t* kv_written;        // rows whose dK/dV accumulators hold data, or null: all (backward_ws)
  bool out_maps;              // kDirect: dkmap and dvmap reach them (rows of stride 1, aligned)
  int64_t batch_heads;        // B H
  int64_t items;              // segments x tiles_per_segment x B H
  int64_t group;              // (segment, batch-head) pairs whose Q/dO share L2: item_place
  int* work;                  // [2] zero at launch (the forward's scheme)
  BranchPairs pairs;          // kWeighted: as the forward's
};

// One work item of the persistent backward: a 128-key block of one (batch,
// head, segment); heaviest first in a group (causal: the first key block sees
// every query tile). n_tiles: query tiles; 0: nothing to do (past the row
// set, or no pairs of its own, as the forward's); -1: stop. tile0: the
// query tile it runs first (bwd_tile).
struct BwdItem {
  int64_t batch, head, kt0;
  RowSet rows;
  int n_tiles, tile0;
};
static_assert(sizeof(BwdItem) <= 64, "BwdShape::kItems reserves 64 bytes per item");

// The first query of a key block's query tile j (a multiple of kBm): the
// tiles run from the block's own first row (causal) or row 0; for a nested
// branch (the block lies in one span: a multiple of kBwdKeys rows,
// ws_nested_pairs) from the next span (causal) or over the other spans.
// The weighted consumers find the span's start again per tile (ptxas
// rematerialises it: a 64-bit remainder, ~20 uniform-datapath instructions of
// a tile's ~960). A BwdItem field for it, as the forward's, took that out but
// spilled 32-48 more bytes per item and measured no gain (kernel-notes,
// session 37).
template <bool kCausal, bool kWeighted>
__device__ __forceinline__ int64_t bwd_q0(const WsBwdParams& p, int64_t kt0, int j) {
  const int64_t i = int64_t(j) * kBm;
  if constexpr (kWeighted)
    if (p.pairs.span > 0)
      return kCausal ? p.pairs.span_start(kt0) + p.pairs.span + i
                     : p.pairs.row_outside_span(p.pairs.span_start(kt0), i);
  return (kCausal ? kt0 : 0) + i;
}

// The order of a key block's query tiles: tile bwd_tile(w, j) is the j-th
// it runs. Causal blocks run theirs in row order: they start at their own
// rows, so the blocks running at once are spread over the query tiles
// already. Other blocks start at tile w.tile0 = kt0 / kBm mod n_tiles
// (bwd_item) and wrap around: in row order the blocks of one row set running
// at once would all reduce into its first dQ tile, then all into the next,
// and so on.
template <bool kCausal>
__device__ __forceinline__ int bwd_tile(const BwdItem& w, int j) {
  if constexpr (kCausal) {
    return j;
  } else {
    const int t = j + w.tile0;
    return t >= w.n_tiles ? t - w.n_tiles : t;
  }
}

// How many of the row set's `count` queries a key block's tiles hold.
template <bool kCausal, bool kWeighted>
__device__ __forceinline__ int64_t bwd_queries(const WsBwdParams& p, int64_t kt0, int64_t count) {
  if constexpr (kWeighted && !kCausal)
    if (p.pairs.span > 0) return p.pairs.rows_outside_span(p.pairs.span_start(kt0), count);
  return count - bwd_q0<kCausal, kWeighted>(p, kt0, 0);
}

template <bool kCausal, bool kWeighted>
__device__ __forceinline__ BwdItem bwd_item(const WsBwdParams& p, int64_t item) {
  const BranchGrid& g = p.g;
  const ItemPlace at = item_place(p, item);
  BwdItem w;
  w.batch = at.bh / g.heads;
  w.head = at.bh % g.heads;
  w.rows = kept_rows(g.n, g.w, g.r, w.head, at.segment);
  w.kt0 = at.rank * kBwdKeys;
  const int64_t queries = bwd_queries<kCausal, kWeighted>(p, w.kt0, w.rows.count);
  w.n_tiles = w.kt0 < w.rows.count && queries > 0 ? static_cast<int>((queries + kBm - 1) / kBm) : 0;
  w.tile0 = !kCausal && w.n_tiles > 0 ? static_cast<int>((w.kt0 / kBm) % w.n_tiles) : 0;
  return w;
}

template <int kD, bool kCausal, bool kDirect, bool kDropout, bool kWeighted, bool kDraw = false>
__global__ __launch_bounds__(kThreads, 1) void backward_ws_kernel(const __grid_constant__ CUtensorMap qmap,
                                                                  const __grid_constant__ CUtensorMap kmap,
                                                                  const __grid_constant__ CUtensorMap vmap,
                                                                  const __grid_constant__ CUtensorMap dmap,
                                                                  const __grid_constant__ CUtensorMap dqmap,
                                                                  const __grid_constant__ CUtensorMap dkmap,
                                                                  const __grid_constant__ CUtensorMap dvmap,
                                                                  const __grid_constant__ WsBwdParams p) {
  static_assert(kDropout || !kDraw, "kDraw: the dropout mask drawn, not read from the forward's bits");
  using L = BwdShape<kD>;
  using KTile = typename L::KTile;
  using RowTile = typename L::RowTile;
  using DsTile = typename L::DsTile;
  constexpr int kBwdStages = L::kStages;
  extern __shared__ __align__(128) char smem_raw[];
  char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  constexpr int kKvSlots = L::kKvSlots;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::kBars);
  uint64_t* kv_full = bars;                  // [kKvSlots]
  uint64_t* kv_empty = bars + kKvSlots;      // [kKvSlots]
  uint64_t* q_full = bars + 2 * kKvSlots;    // [kBwdStages]
  uint64_t* empty = q_full + kBwdStages;     // [kBwdStages]
  float* stats = reinterpret_cast<float*>(smem + L::kStats);
  BwdItem* item_of_slot = reinterpret_cast<BwdItem*>(smem + L::kItems);  // written by the producer's lane 0
  const BranchGrid& g = p.g;

  if (threadIdx.x == 0) {
    for (int k = 0; k < kKvSlots; ++k) {
      hopper::mbar_init(&kv_full[k], 2 * kLoadArrivals);
      hopper::mbar_init(&kv_empty[k], kConsumerWarps * 32);
    }
    for (int s = 0; s < kBwdStages; ++s) {
      hopper::mbar_init(&q_full[s], kLoadArrivals);
      hopper::mbar_init(&empty[s], kConsumerWarps * 32);
    }
    hopper::mbar_fence_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // producer
    hopper::regs_dec<L::kProducerRegs>();
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    const float delta_scale = kDropout ? 1.f / p.drop.mask.scale : 1.f;  // D / s (the consumers leave s out)
    int64_t item = blockIdx.x;
    int ring = 0;  // Q/dO tiles loaded so far, all items
    for (int n = 0;; ++n) {
      BwdItem w{};
      while (item < p.items && (w = bwd_item<kCausal, kWeighted>(p, item)).n_tiles == 0) item = next_item(p.work, lane);
      if (item >= p.items) w.n_tiles = -1;
      const int slot = n % kKvSlots;
      hopper::mbar_wait(&kv_empty[slot], ((n / kKvSlots) & 1) ^ 1);
      // Decoded once, here: the consumers read it after kv_full[slot] (lane
      // 0's arrival releases its store).
      if (lane == 0) item_of_slot[slot] = w;
      if (item >= p.items) {  // none left: the consumers stop at this slot (2 x 32 arrivals)
        hopper::mbar_arrive(&kv_full[slot]);
        hopper::mbar_arrive(&kv_full[slot]);
        break;
      }
      const int64_t batch = w.batch, head = w.head, kt0 = w.kt0;
      const RowSet rows = w.rows;
      // The tensor maps' coordinates of row t = 0 (see the top comment).
      const int64_t first = batch * g.n + rows.base;
      const int o = static_cast<int>(first % g.r);
      const int64_t j0 = first / g.r;
      // K and V: 32 arrivals each on kv_full[slot] (count 2 x 32).
      load_rows<kBwdKeys, kD>(smem + L::kK + slot * KTile::kBytes, &kmap, p.k, &kv_full[slot], p.map_rows, batch,
                              head, rows, o, j0, kt0);
      load_rows<kBwdKeys, kD>(smem + L::kV + slot * KTile::kBytes, &vmap, p.v, &kv_full[slot], p.map_rows, batch,
                              head, rows, o, j0, kt0);
      for (int j = 0; j < w.n_tiles; ++j, ++ring) {
      const int s = ring % kBwdStages;
      const int64_t q0 = bwd_q0<kCausal, kWeighted>(p, kt0, bwd_tile<kCausal>(w, j));
      hopper::mbar_wait(&empty[s], ((ring / kBwdStages) & 1) ^ 1);
      // L (log2 units; +inf for padding rows, so P = 0) and D of the tile's
      // rows (with dropout D / s: the consumers' element-wise pass leaves s out).
      float* st = stats + s * 2 * kBm;
      for (int i = lane; i < kBm; i += 32) {
        const int64_t t = q0 + i;
        float l2 = INFINITY, dd = 0.f;
        if (t < rows.count) {
          const int64_t ri = kept_row_index(g, batch, head, rows, t);
          l2 = p.lse[ri] * kLog2e;
          dd = p.delta[ri] * delta_scale;
        }
        st[i] = l2;
        st[kBm + i] = dd;
      }
      // Q and dO complete q_full[s] with the lanes' arrivals (each releasing
      // its own L, D stores): TMA when the maps reach every valid row, else
      // gathered by the warp.
      const int64_t t_end = min(q0 + kBm, rows.count);
      if (j0 + t_end - 1 < p.map_rows) {
        if (lane == 0) {
          hopper::mbar_arrive_expect_tx(&q_full[s], 2 * RowTile::kBytes);
#pragma unroll
          for (int a = 0; a < RowTile::kAtoms; ++a) {
            const int at = s * RowTile::kBytes + a * RowTile::kAtomBytes;
            hopper::tma_load_4d(smem + L::kQ + at, &qmap, &q_full[s], 64 * a, int(head), o, int(j0 + q0));
            hopper::tma_load_4d(smem + L::kDO + at, &dmap, &q_full[s], 64 * a, int(head), o, int(j0 + q0));
          }
        } else {
          hopper::mbar_arrive(&q_full[s]);
        }
      } else {
        for (int i = lane; i < kBm * RowTile::kChunks; i += 32) {
          const int r = i / RowTile::kChunks, c = i % RowTile::kChunks;
          const int64_t t = q0 + r;
          uint4 qv = make_uint4(0, 0, 0, 0), dv = qv;
          if (t < rows.count) {
            const int64_t pos = rows.base + t * rows.stride;
            qv = *reinterpret_cast<const uint4*>(p.q.row(batch, pos, head) + c * 8);
            dv = *reinterpret_cast<const uint4*>(p.dout.row(batch, pos, head) + c * 8);
          }
          *reinterpret_cast<uint4*>(RowTile::at(smem + L::kQ + s * RowTile::kBytes, r, c)) = qv;
          *reinterpret_cast<uint4*>(RowTile::at(smem + L::kDO + s * RowTile::kBytes, r, c)) = dv;
        }
        wgmma::fence_proxy_async();
        hopper::mbar_arrive(&q_full[s]);
      }
      }
      item = next_item(p.work, lane);
    }
    finish_items(p.work, lane);
    return;
  }

  hopper::regs_inc<L::kConsumerRegs>();
  const int consumer = __shfl_sync(0xffffffffu, warpgroup, 0) - 1;  // warp-uniform, as in the forward
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const float scale_log2 = p.scale * kLog2e;
  const AttentionDropout drop = resolved_dropout<kDraw>(p.drop.mask);  // kDraw: the graph offset read once
  // With dropout the element-wise pass leaves out the keep scale s (it forms
  // dS / s and P M / s; the producer stores D / s): dQ, dK and dV take s at
  // their stores, beside the softmax scale, for no instruction of their own.
  const float keep_scale = kDropout ? p.drop.mask.scale : 1.f;
  const float ds_scale = p.scale * keep_scale;  // dQ = dS K and dK = dS^T Q
  // Tile descriptors, built once and stepped by constants (wgmma::desc_offset);
  // K's and V's per slot below.
  const uint64_t k_desc0 = wgmma::desc_sw128(smem + L::kK + consumer * 64 * 128);
  const uint64_t v_desc0 = wgmma::desc_sw128(smem + L::kV + consumer * 64 * 128);
  // dQ's B: at head dim 64 all of K (kDQTurns), at 128 this warpgroup's atom of it.
  const uint64_t k_cols_desc0 = wgmma::desc_sw128(smem + L::kK + (L::kDQTurns ? 0 : consumer * KTile::kAtomBytes));
  const uint64_t q_desc0 = wgmma::desc_sw128(smem + L::kQ), do_desc0 = wgmma::desc_sw128(smem + L::kDO);
  // Q and dO as dK's and dV's MN-major B: at 128, lbo steps n to the second atom.
  constexpr uint32_t kMnLbo = kD == 128 ? RowTile::kAtomBytes : 0;
  const uint64_t q_mn_desc0 = wgmma::desc_sw128(smem + L::kQ, 1024, kMnLbo);
  const uint64_t do_mn_desc0 = wgmma::desc_sw128(smem + L::kDO, 1024, kMnLbo);
  const uint64_t ds_desc0 = wgmma::desc_sw128(smem + L::kDS);

  // S^T = K Q^T and dP^T = V dO^T of ring tile t (64 keys x 64 queries) with
  // the K and V of slot kv; at head dim 64 issued one tile ahead: tile j + 1's
  // run on the tensor cores while tile j's dQ goes out (its shared-memory
  // tile, the bulk reduction), and an item's first under the last one's epilogue.
  float st[32], dpt[32];
  // loaded: the tiles are real (wait for them); else the products run on
  // stale tiles and their results go unused (see the ahead issue below).
  // Items never come without tiles (the producer skips them): an item slot
  // holds n_tiles > 0 or the end mark -1, so `loaded` means an item follows.
  auto issue_sdp = [&](int kv, int t, bool loaded = true) {
    const int s = t % kBwdStages;
    const uint64_t q_desc = wgmma::desc_offset(q_desc0, s * RowTile::kBytes);
    const uint64_t do_desc = wgmma::desc_offset(do_desc0, s * RowTile::kBytes);
    const uint64_t k_desc = wgmma::desc_offset(k_desc0, kv * KTile::kBytes);
    const uint64_t v_desc = wgmma::desc_offset(v_desc0, kv * KTile::kBytes);
    if (loaded) hopper::mbar_wait(&q_full[s], (t / kBwdStages) & 1);
    wgmma::fence();
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      const uint64_t a = wgmma::desc_offset(k_desc, (ks / 4) * KTile::kAtomBytes + (ks % 4) * 32);
      const uint64_t b = wgmma::desc_offset(q_desc, (ks / 4) * RowTile::kAtomBytes + (ks % 4) * 32);
      if (ks == 0) wgmma::mma_64x64x16_ss<false>(st, a, b);
      else wgmma::mma_64x64x16_ss<true>(st, a, b);
    }
    // Not issued ahead: S^T its own group, so P^T's exponentials run under dP^T.
    if constexpr (!L::kAhead) wgmma::commit();
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      const uint64_t a = wgmma::desc_offset(v_desc, (ks / 4) * KTile::kAtomBytes + (ks % 4) * 32);
      const uint64_t b = wgmma::desc_offset(do_desc, (ks / 4) * RowTile::kAtomBytes + (ks % 4) * 32);
      if (ks == 0) wgmma::mma_64x64x16_ss<false>(dpt, a, b);
      else wgmma::mma_64x64x16_ss<true>(dpt, a, b);
    }
    wgmma::commit();
  };
  int ring = 0;         // Q/dO tiles consumed so far, all items
  int n = 0;            // items begun
  hopper::mbar_wait(&kv_full[0], 0);
  BwdItem w = item_of_slot[0];
  // kAhead: an item's first S^T and dP^T are in flight when it begins (the
  // first item's issued here, the others under the previous epilogue).
  if constexpr (L::kAhead) issue_sdp(0, 0, w.n_tiles >= 0);
  WS_TRACE_STATE(consumer);
  while (w.n_tiles >= 0) {
    WS_TRACE(1, 1, w.n_tiles);
    const int slot = n % kKvSlots;
    const int64_t batch = w.batch, head = w.head, kt0 = w.kt0;
    const RowSet rows = w.rows;
    const int n_tiles = w.n_tiles;
    float bias[2] = {0.f, 0.f};  // kWeighted: the lane's keys' pairs with its query columns of parity x
    if constexpr (kWeighted) pair_log2_weights(p.pairs, head, lane, bias);
    // The tensor maps' coordinates of row t = 0 (see the top comment).
    const int64_t first = batch * g.n + rows.base;
    const int o = static_cast<int>(first % g.r);
    const int64_t j0 = first / g.r;
    const int64_t key0 = kt0 + consumer * 64;             // this warpgroup's first key row
    const int64_t key_row0 = key0 + warp * 16 + lane / 4;  // this lane's keys: key_row0, key_row0 + 8
    // The flattened (b, pos) of this lane's key r, or -1 past the row set.
    auto key_position = [&](int r) -> int64_t {
      const int64_t tk = key_row0 + r * 8;
      return tk < rows.count ? first + tk * rows.stride : -1;
    };
    // Whether each of those rows adds to what earlier branches left in the
    // dK/dV accumulators: kDirect adds only rows kv_written marks (none
    // without it), the others unless it says the row holds nothing yet. Read
    // here, used in the epilogue: only the rows that add load an accumulator.
    bool adds[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t pos = key_position(r);
      const int64_t ri = pos * g.heads + head;
      adds[r] = pos >= 0 && (kDirect ? p.kv_written && p.kv_written[ri] : !p.kv_written || p.kv_written[ri]);
    }
    const uint64_t k_cols_desc = wgmma::desc_offset(k_cols_desc0, slot * KTile::kBytes);
    // Dropout: the keep bits the forward saved (DropoutBits), a word per lane
    // and tile, loaded a tile ahead (0 where no key of the warpgroup sees the tile).
    const int64_t row_set = kDropout && !kDraw ? dropout_row_set(p, batch, head, rows) : 0;
    // kDraw (the forward kept no bits): the same words drawn per tile instead.
    const AttentionMaskRows drop_rows = kDraw ? dropout_kept_rows(p.drop, batch, head, rows) : AttentionMaskRows{};
    auto tile_bits = [&](int jj) -> uint32_t {
      if (jj >= n_tiles || key0 >= rows.count) return 0u;
      const int64_t qb = bwd_q0<kCausal, kWeighted>(p, kt0, bwd_tile<kCausal>(w, jj)) / kBm,
                    kb = key0 / 64;  // dropout: never weighted
      if (kCausal && kb > qb) return 0u;
      return __ldcs(p.drop.bits.words + p.drop.bits.word(row_set, qb, kb) + 32 * warp + lane);
    };
    uint32_t kept_next = 0;
    if constexpr (kDropout && !kDraw) kept_next = tile_bits(0);
    float dk[kD / 2], dv[kD / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] = dv[i] = 0.f;

    for (int j = 0; j < n_tiles; ++j) {
      const int t = ring + j;  // the tile's place in the Q/dO ring and the dS and dQ buffers
      WS_TRACE(1, 2, j);
      if constexpr (!L::kAhead) issue_sdp(slot, t);
      const int s = t % kBwdStages;
      const int64_t q0 = bwd_q0<kCausal, kWeighted>(p, kt0, bwd_tile<kCausal>(w, j));
      const uint64_t q_mn_desc = wgmma::desc_offset(q_mn_desc0, s * RowTile::kBytes);
      const uint64_t do_mn_desc = wgmma::desc_offset(do_mn_desc0, s * RowTile::kBytes);
      const uint64_t ds_desc = wgmma::desc_offset(ds_desc0, (t & 1) * DsTile::kBytes);
      const float* l2 = stats + s * 2 * kBm;
      const float* dl = l2 + kBm;
      char* ds_tile = smem + L::kDS + (t & 1) * DsTile::kBytes;  // this warpgroup writes keys 64 c .. 64 c + 63
      const bool has_next = j + 1 < n_tiles;
      const bool dq_here = !L::kDQTurns || (t & 1) == consumer;

      // The tile's keep bits: bit 4c + e keeps element [4c + e] (below).
      uint32_t kept = 0;
      if constexpr (kDraw) {
        kept = draw_keep_word(drop, drop_rows, rows.count, q0, key0 + warp * 16, lane);
      } else if constexpr (kDropout) {
        kept = kept_next;
        kept_next = tile_bits(j + 1);
      }
      wgmma::wait<L::kAhead ? 0 : 1>();  // S^T (at head dim 64 one group with dP^T)
      wgmma::fence_operands(st);
      WS_TRACE(1, 3, j);

      // P^T = exp2(S^T scale_log2 - L2[q]), dS^T = P^T (dP^T - D[q]); element
      // [4c + e]: key key_row0 + 8 (e >> 1), query q0 + 8c + 2 (lane % 4) + (e & 1).
      const bool need_mask = key0 + 64 > rows.count || q0 + kBm > rows.count || (kCausal && q0 < key0 + 63);
      uint32_t pt[4][4], dst[4][4];
      // kMask: the tile reaches past the row set or across the causal diagonal
      // (a separate instantiation, as softmax_tile's in the forward).
      auto elementwise = [&](auto mask_tag) {
        constexpr bool kMask = decltype(mask_tag)::value;
        int krow_limit = 16, qcol_limit = kBm, causal_from = 16;
        if constexpr (kMask) {
          const int64_t key_left = rows.count - key_row0, q_left = rows.count - q0, ahead = q0 - key_row0;
          krow_limit = key_left > 16 ? 16 : static_cast<int>(key_left);  // valid iff 8 (e >> 1) < krow_limit
          qcol_limit = q_left > kBm ? kBm : static_cast<int>(q_left);    // valid iff col < qcol_limit
          // valid iff col + causal_from >= 8 (e >> 1)
          causal_from = ahead > 16 ? 16 : ahead < -kBm ? -kBm : static_cast<int>(ahead);
        }
        // P^T in place of S^T (probs), then dV's and dK's operands (grads), a
        // column chunk c at a time: fused at head dim 64 (dP^T is there), at
        // 128 all of P^T first, while dP^T finishes on the tensor cores.
        auto probs = [&](int c) {
          float2 lc = *reinterpret_cast<const float2*>(l2 + c * 8 + 2 * (lane % 4));
          if constexpr (kWeighted) {  // weight 2^bias: exp2(s - (L - bias))
            lc.x -= bias[0];
            lc.y -= bias[1];
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = mma::exp2_ftz(st[4 * c + e] * scale_log2 - (e & 1 ? lc.y : lc.x));
            if constexpr (kMask) {
              const int col = c * 8 + 2 * (lane % 4) + (e & 1), kr = (e >> 1) * 8;
              if (kr >= krow_limit || col >= qcol_limit || (kCausal && col + causal_from < kr)) x = 0.f;
            }
            st[4 * c + e] = x;
          }
        };
        auto grads = [&](int c) {
          const float2 dc = *reinterpret_cast<const float2*>(dl + c * 8 + 2 * (lane % 4));
          float pv[4], dsv[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = st[4 * c + e];
            // With dropout: dV uses P M, dS = P (M dP' - D) (core/dilated.h),
            // M = s keep; here without s, which the stores apply (dc is D / s).
            if constexpr (kDropout) {
              const float xk = (kept >> (4 * c + e)) & 1 ? x : 0.f;
              pv[e] = xk;
              dsv[e] = fmaf(xk, dpt[4 * c + e], -x * (e & 1 ? dc.y : dc.x));
            } else {
              pv[e] = x;
              dsv[e] = x * (dpt[4 * c + e] - (e & 1 ? dc.y : dc.x));
            }
          }
          const int kk = c / 2, h = c % 2;
          pt[kk][2 * h] = mma::pack_bf16(pv[0], pv[1]);
          pt[kk][2 * h + 1] = mma::pack_bf16(pv[2], pv[3]);
          dst[kk][2 * h] = mma::pack_bf16(dsv[0], dsv[1]);
          dst[kk][2 * h + 1] = mma::pack_bf16(dsv[2], dsv[3]);
        };
        if constexpr (L::kAhead) {
          wgmma::fence_operands(dpt);
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            probs(c);
            grads(c);
          }
        } else {
#pragma unroll
          for (int c = 0; c < 8; ++c) probs(c);
          wgmma::wait<0>();
          wgmma::fence_operands(dpt);
#pragma unroll
          for (int c = 0; c < 8; ++c) grads(c);
        }
      };
      if (need_mask) elementwise(std::true_type{});
      else elementwise(std::false_type{});
      // dS^T to shared memory for dQ (rows = keys, columns = queries): matrix i
      // of k-step kk's stmatrix is dst[kk][i] (FragmentLane).
      {
        const FragmentLane f;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          hopper::stmatrix_x4(DsTile::at(ds_tile, consumer * 64 + f.row, f.chunk(kk)), dst[kk][0], dst[kk][1],
                              dst[kk][2], dst[kk][3]);
      }
      wgmma::fence_proxy_async();  // dS^T stores, read next by wgmma
      WS_TRACE(1, 4, j);
      // dV += P^T dO, dK += dS^T Q (A from registers; B = dO, Q rows, MN-major).
      auto issue_dkv = [&] {
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kBm / 16; ++kk) {
          if constexpr (kD == 128) {
            wgmma::mma_64x128x16_rs_mn(dv, pt[kk], wgmma::desc_offset(do_mn_desc, kk * 16 * 128));
            wgmma::mma_64x128x16_rs_mn(dk, dst[kk], wgmma::desc_offset(q_mn_desc, kk * 16 * 128));
          } else {
            wgmma::mma_64x64x16_rs_mn(dv, pt[kk], wgmma::desc_offset(do_mn_desc, kk * 16 * 128));
            wgmma::mma_64x64x16_rs_mn(dk, dst[kk], wgmma::desc_offset(q_mn_desc, kk * 16 * 128));
          }
        }
        wgmma::commit();
      };
      // At 64 issued before the barrier: the tensor cores start on them while
      // the other warpgroup still finishes its element-wise pass (the next
      // tile's S^T/dP^T then fill the dQ epilogue). At 128, where nothing is
      // issued ahead, after dQ: they run under the dQ epilogue instead.
      if constexpr (L::kAhead) issue_dkv();
      // Both warpgroups' dS^T complete (double-buffered: the barrier of the next
      // tile also orders this tile's reads before the buffer's next write).
      // kDQTurns: only the warpgroup taking dQ waits, the other arrives and
      // may run a tile ahead, so consecutive tiles use two barriers (ids 1
      // and 4; 2 and 3 are the dQ epilogue's).
      if (dq_here) hopper::named_sync(L::kDQTurns ? 1 + 3 * (t & 1) : 1, 256);
      else hopper::named_arrive(1 + 3 * (t & 1), 256);
      WS_TRACE(1, 5, j);

      // dQ = dS K over all 128 keys, L::kDQCols columns of it (A = dS^T from
      // shared memory, MN-major; B = K rows, MN-major): each dQ element is
      // reduced into global memory once per tile, not once per warpgroup.
      float dq[L::kDQCols / 2];
      if (dq_here) {
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kBwdKeys / 16; ++kk) {
          const uint64_t da = wgmma::desc_offset(ds_desc, kk * 16 * 128);
          const uint64_t db = wgmma::desc_offset(k_cols_desc, kk * 16 * 128);
          if (kk == 0) wgmma::mma_64x64x16_ss<false, 1, 1>(dq, da, db);
          else wgmma::mma_64x64x16_ss<true, 1, 1>(dq, da, db);
        }
        wgmma::commit();
      }
      if constexpr (L::kAhead) {
        // The next tile's S^T and dP^T behind them; then wait for all but those.
        if (has_next) {
          issue_sdp(slot, t + 1);
          wgmma::wait<1>();
        } else {
          wgmma::wait<0>();
        }
        wgmma::fence_operands(dv);
        wgmma::fence_operands(dk);
        hopper::mbar_arrive(&empty[s]);  // Q, dO, L, D of this stage read (each thread: its own L, D loads)
      } else {
        issue_dkv();
        wgmma::wait<1>();  // dQ's group: dV and dK may still run
      }
      wgmma::fence_operands(dq);
      WS_TRACE(1, 6, j);

      // dQ: where the map reaches the tile's rows, the warpgroup writes its
      // 64 x kDQCols tile to shared memory and one thread adds it to dq_acc with
      // one TMA reduction per 32-column box (full 128-byte lines, no per-thread
      // atomics); past the map, per-thread vector reductions. Padding rows of a
      // tile hold dQ = 0 (their P is 0), so adding them to the next segment's
      // rows changes nothing.
      const int64_t t_end = min(q0 + kBm, rows.count);
      const int dq_col0 = L::kDQTurns ? 0 : consumer * (kD / 2);
      if (!dq_here) {
        // kDQTurns: the other warpgroup has this tile's dQ.
      } else if (j0 + t_end - 1 < p.map_rows) {
        // The reduction issued from this buffer kDQBuffers tiles ago has read it.
        // kDQTurns: tile t's buffer is both warpgroups' halves of buffer t % 2,
        // which only the warpgroup taking the dQ of t's parity uses: its last
        // reduction (two tiles ago) has read it.
        constexpr int kBoxes = L::kDQCols / 32;
        const int buffer_half = L::kDQTurns ? 0 : consumer;
        char* dq_tile = smem + L::kDQ + ((t % L::kDQBuffers) * 2 + buffer_half) * L::kDQBoxes * kDQBoxBytes;
        if (threadIdx.x % 128 == 0) hopper::bulk_wait_read<L::kDQTurns ? 0 : L::kDQBuffers - 1>();
        hopper::named_sync(2 + consumer, 128);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = warp * 16 + lane / 4 + r * 8;
#pragma unroll
          for (int c = 0; c < L::kDQCols / 8; ++c) {  // box c / 4, its 8-column chunk c % 4
            const int chunk = (2 * (c % 4) + (lane % 4) / 2) ^ (row % 8);
            *reinterpret_cast<float2*>(dq_tile + (c / 4) * kDQBoxBytes + row * 128 + chunk * 16 + (lane % 2) * 8) =
                make_float2(ds_scale * dq[4 * c + 2 * r], ds_scale * dq[4 * c + 2 * r + 1]);
          }
        }
        wgmma::fence_proxy_async();  // st.shared, read next by the TMA unit
        hopper::named_sync(2 + consumer, 128);
        if (threadIdx.x % 128 == 0) {
#pragma unroll
          for (int b = 0; b < kBoxes; ++b)
            hopper::tma_reduce_add_4d(&dqmap, dq_tile + b * kDQBoxBytes, dq_col0 + 32 * b, int(head), o,
                                      int(j0 + q0));
          hopper::bulk_commit();
        }
      } else {
        // An empty bulk group keeps the groups in step with the tiles, so that
        // bulk_wait_read above covers the reduction of tile t - kDQBuffers
        // when this tail tile ends an item and a mapped one follows.
        if (threadIdx.x % 128 == 0) hopper::bulk_commit();
        // dQ rows: q0 + warp * 16 + lane / 4 (+ 8), in the accumulator layout.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t tq = q0 + warp * 16 + lane / 4 + r * 8;
          if (tq >= rows.count) continue;
          float* dst_row = p.dq_acc + kept_row_index(g, batch, head, rows, tq) * kD;
#pragma unroll
          for (int c = 0; c < L::kDQCols / 8; ++c)
            mma::red_add_v2(dst_row + dq_col0 + c * 8 + 2 * (lane % 4), ds_scale * dq[4 * c + 2 * r],
                            ds_scale * dq[4 * c + 2 * r + 1]);
        }
      }
      if constexpr (!L::kAhead) {
        wgmma::wait<0>();
        wgmma::fence_operands(dv);
        wgmma::fence_operands(dk);
        hopper::mbar_arrive(&empty[s]);  // Q, dO, L, D of this stage read (each thread: its own L, D loads)
      }
      WS_TRACE(1, 7, j);
    }
    ring += n_tiles;
    // K and V of this slot are read (the last tile's products are waited): back to the producer.
    hopper::mbar_arrive(&kv_empty[slot]);
    // The next item: at head dim 64 its first S^T and dP^T run on the tensor
    // cores under this item's epilogue; at 128 (one K/V buffer, loaded once
    // this item released it) the epilogue runs while its K and V load.
    ++n;
    const int next_slot = n % kKvSlots;
    BwdItem next;
    auto take_next = [&] {
      hopper::mbar_wait(&kv_full[next_slot], (n / kKvSlots) & 1);
      next = item_of_slot[next_slot];
    };
    if constexpr (L::kAhead) {
      take_next();
      // Issued whether or not an item follows (if none, on stale tiles, the
      // results unused): a wgmma issued on one path only made ptxas wait for
      // it where the paths join (C7517), right before the epilogue it is to
      // overlap. The branch is on the tiles' wait, not on the issue.
      issue_sdp(next_slot, ring, next.n_tiles >= 0);
    }
    WS_TRACE(1, 8, n_tiles);
    // dK (scaled) and dV of this item's keys. kDirect: the last branch, keeping
    // every row, writes them once in bf16, adding the accumulators of the rows
    // earlier branches wrote; else they go into the accumulators, added where an
    // earlier branch wrote the row (adds[r]; rows of one launch are disjoint).
    // At head dim 64, kDirect with all 64 of the warpgroup's keys in the row
    // set: the bf16 rows go through shared memory and out by one TMA store per
    // tensor, where per-thread stores of 4 bytes to 8 rows at a time cost the
    // item ~3,000 cycles (kernel-notes, session 18).
    if (L::kStoreTiles && kDirect && p.out_maps && key0 + 64 <= rows.count) {
      using OutTile = typename L::OutTile;
      char* dk_tile = smem + L::kOut + consumer * 2 * OutTile::kBytes;
      char* dv_tile = dk_tile + OutTile::kBytes;
      uint32_t pk[2][kD / 8], pv[2][kD / 8];  // [row half][column chunk]: packed bf16 pairs
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float* dkr = p.dk_acc + (key_position(r) * g.heads + head) * kD;
        const float* dvr = p.dv_acc + (key_position(r) * g.heads + head) * kD;
        float2 dk0[kD / 8], dv0[kD / 8];
#pragma unroll
        for (int c = 0; c < kD / 8; ++c) {
          const int col = c * 8 + 2 * (lane % 4);
          dk0[c] = adds[r] ? *reinterpret_cast<const float2*>(dkr + col) : make_float2(0.f, 0.f);
          dv0[c] = adds[r] ? *reinterpret_cast<const float2*>(dvr + col) : make_float2(0.f, 0.f);
        }
#pragma unroll
        for (int c = 0; c < kD / 8; ++c) {
          pk[r][c] = mma::pack_bf16(ds_scale * dk[4 * c + 2 * r] + dk0[c].x, ds_scale * dk[4 * c + 2 * r + 1] + dk0[c].y);
          pv[r][c] = mma::pack_bf16(keep_scale * dv[4 * c + 2 * r] + dv0[c].x,
                                    keep_scale * dv[4 * c + 2 * r + 1] + dv0[c].y);
        }
      }
      // After the last item's stores have read the tiles.
      tile_out<0>(
          2 + consumer,
          [&] {
            store_rows_tile<kD>(dk_tile, pk);
            store_rows_tile<kD>(dv_tile, pv);
          },
          [&] {
            const int position = static_cast<int>(first + key0);  // rows of stride 1
            hopper::tma_store_3d(&dkmap, dk_tile, 0, static_cast<int>(head), position);
            hopper::tma_store_3d(&dvmap, dv_tile, 0, static_cast<int>(head), position);
          });
    } else {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t position = key_position(r);
      if (position < 0) continue;
      const int64_t ri = position * g.heads + head;  // (b, pos, head) row
      float* dkr = p.dk_acc + ri * kD;
      float* dvr = p.dv_acc + ri * kD;
      // The row's accumulators, loaded kPass column chunks at a time before
      // their stores: interleaved with the stores (which may alias them, for
      // all the compiler knows), each load waited for the one before it. At
      // head dim 128 a pass holds half a row (a whole one spilled, 5% slower).
      constexpr int kPass = kD == 64 ? 8 : 4;
#pragma unroll
      for (int c0 = 0; c0 < kD / 8; c0 += kPass) {
        float2 dk0[kPass], dv0[kPass];
#pragma unroll
        for (int i = 0; i < kPass; ++i) {
          const int col = (c0 + i) * 8 + 2 * (lane % 4);
          dk0[i] = adds[r] ? *reinterpret_cast<const float2*>(dkr + col) : make_float2(0.f, 0.f);
          dv0[i] = adds[r] ? *reinterpret_cast<const float2*>(dvr + col) : make_float2(0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < kPass; ++i) {
          const int c = c0 + i, col = c * 8 + 2 * (lane % 4);
          const float2 a = make_float2(ds_scale * dk[4 * c + 2 * r] + dk0[i].x,
                                       ds_scale * dk[4 * c + 2 * r + 1] + dk0[i].y);
          const float2 b = make_float2(keep_scale * dv[4 * c + 2 * r] + dv0[i].x,
                                       keep_scale * dv[4 * c + 2 * r + 1] + dv0[i].y);
          if constexpr (kDirect) {
            *reinterpret_cast<uint32_t*>(p.dk_out + position * p.out_sn + head * kD + col) = mma::pack_bf16(a.x, a.y);
            *reinterpret_cast<uint32_t*>(p.dv_out + position * p.out_sn + head * kD + col) = mma::pack_bf16(b.x, b.y);
          } else {
            *reinterpret_cast<float2*>(dkr + col) = a;
            *reinterpret_cast<float2*>(dvr + col) = b;
          }
        }
      }
    }
    }
    // Mark the rows written, once every lane of a quad has read their markers.
    if (!kDirect && p.kv_written) {
      __syncwarp();
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t position = key_position(r);
        if (position >= 0 && lane % 4 == 0) p.kv_written[position * g.heads + head] = 1;
      }
    }
    WS_TRACE(1, 9, n_tiles);
    if constexpr (!L::kAhead) take_next();
    w = next;
  }
  if constexpr (L::kAhead) wgmma::wait<0>();  // the unused last issue
  if (threadIdx.x % 128 == 0) hopper::bulk_wait_all();  // shared memory must outlive the reductions
}

// ---- host side ----

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    MINIDL_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
    MINIDL_CHECK(found == cudaDriverEntryPointSuccess && f,
                 "dilated_attention (cuda): the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The (d, head, o, j) map of one operand for dilation r (see the top comment),
// at head dim d: boxes of 64 columns (the 128-byte swizzle's width), one per
// AtomTile atom.
CUtensorMap rows_map(const Operand<BFloat16>& x, int64_t heads, int64_t r, int64_t map_rows, int box_rows,
                     int64_t d) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {cuuint64_t(d), cuuint64_t(heads), cuuint64_t(r), cuuint64_t(map_rows)};
  const cuuint64_t strides[3] = {cuuint64_t(x.sh) * 2, cuuint64_t(x.sn) * 2, cuuint64_t(r * x.sn) * 2};
  const cuuint32_t box[4] = {64, 1, 1, cuuint32_t(box_rows)};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  CUresult res = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<BFloat16*>(x.ptr), dims,
                                strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MINIDL_CHECK(res == CUDA_SUCCESS, "dilated_attention (cuda): cuTensorMapEncodeTiled failed (", int(res), ")");
  return map;
}

template <int kD, bool kCausal, MergeMode kMode>
void launch(const WsParams& p, const CUtensorMap& qm, const CUtensorMap& km, const CUtensorMap& vm,
            const CUtensorMap& om, int64_t batch) {
  const bool drop = p.drop.mask.enabled();
  auto kernel = drop ? forward_ws_kernel<kD, kCausal, kMode, true, false>
                     : forward_ws_kernel<kD, kCausal, kMode, false, false>;
  // Nested branches: several branches (no kSingle); dropout only per pair (ws_nested_pairs).
  if constexpr (kMode != MergeMode::kSingle)
    if (!p.pairs.plain())
      kernel = drop ? forward_ws_kernel<kD, kCausal, kMode, true, true> : forward_ws_kernel<kD, kCausal, kMode, false, true>;
  const int bytes = drop ? FwdShape<kD>::kBytes
                         : out_tiles<kD, kMode, false> ? FwdShape<kD>::kBytesOut : FwdShape<kD>::kBytes;
  allow_dynamic_smem(bytes, kernel);
  require_launch_registers(hopper::split_launch_regs(kThreads, kProducerRegs, kConsumerRegs),
                           "dilated_attention (cuda): the ws forward", kernel);
  // Persistent: one block per SM (at most one item each when there are fewer).
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.items, multiprocessor_count()));
#if MINIDL_WS_TRACE
  const bool traced = trace::begin(0);
#endif
  kernel<<<grid, kThreads, bytes, stream()>>>(qm, km, vm, om, p);
  MINIDL_CUDA_LAUNCH_CHECK();
#if MINIDL_WS_TRACE
  if (traced) trace::end(0);
#endif
}

template <int kD, bool kCausal, bool kDirect>
void launch_backward(const WsBwdParams& p, const CUtensorMap& qm, const CUtensorMap& km, const CUtensorMap& vm,
                     const CUtensorMap& dm, const CUtensorMap& dqm, const CUtensorMap& dkm, const CUtensorMap& dvm,
                     int64_t batch) {
  auto plain = backward_ws_kernel<kD, kCausal, kDirect, false, false>;
  // With dropout: the forward's keep bits read, or without them the mask drawn.
  auto dropout = p.drop.bits.words ? backward_ws_kernel<kD, kCausal, kDirect, true, false>
                                   : backward_ws_kernel<kD, kCausal, kDirect, true, false, true>;
  constexpr int kBytes = BwdShape<kD>::kBytes;
  allow_dynamic_smem(kBytes, plain, dropout);
  using L = BwdShape<kD>;
  const int regs = hopper::split_launch_regs(kThreads, L::kProducerRegs, L::kConsumerRegs);
  require_launch_registers(regs, "dilated_attention (cuda): the ws backward", plain, dropout);
  // Nested branches: dropout only per pair (ws_nested_pairs).
  if (!p.pairs.plain()) {
    plain = backward_ws_kernel<kD, kCausal, kDirect, false, true>;
    dropout = p.drop.bits.words ? backward_ws_kernel<kD, kCausal, kDirect, true, true>
                                : backward_ws_kernel<kD, kCausal, kDirect, true, true, true>;
    allow_dynamic_smem(kBytes, plain, dropout);
    require_launch_registers(regs, "dilated_attention (cuda): the ws backward", plain, dropout);
  }
  // Persistent: one block per SM (at most one item each when there are fewer).
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.items, multiprocessor_count()));
#if MINIDL_WS_TRACE
  const bool traced = trace::begin(1);
#endif
  (p.drop.mask.enabled() ? dropout : plain)<<<grid, kThreads, kBytes, stream()>>>(qm, km, vm, dm, dqm, dkm, dvm, p);
  MINIDL_CUDA_LAUNCH_CHECK();
#if MINIDL_WS_TRACE
  if (traced) trace::end(1);
#endif
}

// The fp32 dQ accumulator (B, N, H, d contiguous) as the same (d, head, o, j)
// map, boxes of 32 columns x kBm rows with the 128-byte swizzle.
CUtensorMap dq_rows_map(float* dq_acc, int64_t heads, int64_t r, int64_t map_rows, int64_t d) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {cuuint64_t(d), cuuint64_t(heads), cuuint64_t(r), cuuint64_t(map_rows)};
  const cuuint64_t row = cuuint64_t(heads) * d * 4;
  const cuuint64_t strides[3] = {cuuint64_t(d) * 4, row, cuuint64_t(r) * row};
  const cuuint32_t box[4] = {32, 1, 1, kBm};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  CUresult res = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, dq_acc, dims, strides, box, elem,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MINIDL_CHECK(res == CUDA_SUCCESS, "dilated_attention (cuda): cuTensorMapEncodeTiled (dQ) failed (", int(res), ")");
  return map;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The last branch's bf16 rows, the forward's O or the backward's dK or dV
// (rows (b, pos, head) at `position_stride` elements per position, the heads'
// rows dense), as a (d, head, position) map, boxes of 64 columns x 64 rows
// with the 128-byte swizzle (FwdShape's and BwdShape's OutTile).
CUtensorMap out_rows_map(BFloat16* out, int64_t heads, int64_t positions, int64_t position_stride) {
  MINIDL_CHECK(position_stride % 8 == 0 && aligned16(out), "dilated_attention (cuda, ws): output rows not 16-byte aligned");
  CUtensorMap map;
  const cuuint64_t dims[3] = {64, cuuint64_t(heads), cuuint64_t(positions)};
  const cuuint64_t strides[2] = {64 * 2, cuuint64_t(position_stride) * 2};
  const cuuint32_t box[3] = {64, 1, 64};
  const cuuint32_t elem[3] = {1, 1, 1};
  CUresult res = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, out, dims, strides, box, elem,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MINIDL_CHECK(res == CUDA_SUCCESS, "dilated_attention (cuda, ws): cuTensorMapEncodeTiled (output rows) failed (",
               int(res), ")");
  return map;
}

// Work items come in groups of (segment, batch-head) pairs (item_place): as
// many pairs as keep the data their items share within ~12 MB, a quarter of
// the H200's L2 (measured: 12 MB beat 24 by 1-2% on the dilated 1M problem,
// 48 lost 6-10%, 4 and 8 were no better; kernel-notes, session 12).
int64_t pairs_in_l2(int64_t bytes_per_pair) {
  return std::max<int64_t>(1, (int64_t(12) << 20) / std::max<int64_t>(bytes_per_pair, 1));
}

}  // namespace

bool ws_takes(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v, const BranchGrid& g,
              int64_t batch, const Operand<BFloat16>* dout) {
  for (const Operand<BFloat16>* x : {&q, &k, &v, dout ? dout : &q})
    if (x->sb != g.n * x->sn || x->sh % 8 != 0 || x->sn % 8 != 0 || !aligned16(x->ptr)) return false;
  return batch * g.n < (int64_t(1) << 31) && g.heads < (int64_t(1) << 31);
}

std::vector<BranchPairs> ws_nested_pairs(const DilatedAttentionConfig& config, int64_t n) {
  const std::vector<BranchPairs> plain(config.branches.size());
  // Empty with dropout per copy: each branch computes all its pairs, each with its own decision.
  std::vector<BranchPairs> pairs = sharing_pairs(config, n);
  if (pairs.empty()) return plain;
  // A forward item's query rows and a backward item's keys lie in one span.
  static_assert(kBr == kBwdKeys && kBwdKeys % kBm == 0 && kBr % FwdShape<64>::kBc == 0 &&
                    kBr % FwdShape<128>::kBc == 0,
                "tiles of one span, and whole key tiles between spans (fwd_key0)");
  for (size_t i = 0; i < pairs.size(); ++i) {
    const DilatedBranch& b = config.branches[i];
    if (pairs[i].span % kBr != 0 && !pairs[i].shares_all(max_kept_rows(std::min(b.segment, n), b.dilation)))
      return plain;
  }
  return pairs;
}

void forward_ws(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v, const BranchGrid& g,
                int64_t batch, bool causal, float scale_log2, const BranchDropout& drop, MergeMode mode, float* o_acc,
                float* lse, BFloat16* out, const BranchPairs& pairs) {
  MINIDL_CHECK(pairs.plain() || mode != MergeMode::kSingle,
               "dilated_attention (cuda, ws): nested pairs need a merging launch");
  WsParams p{g, q, k, v, 0, scale_log2, drop, o_acc, lse, out};
  p.pairs = pairs;
  p.g.tiles_per_segment = (max_kept_rows(g.w, g.r) + kBr - 1) / kBr;
  p.batch_heads = batch * g.heads;
  p.items = p.g.segments * p.g.tiles_per_segment * p.batch_heads;
  // The items of a pair read its K and V (kept rows x d, bf16, twice).
  p.group = pairs_in_l2(max_kept_rows(g.w, g.r) * g.dim * 2 * 2);
  p.work = scheduler_counters();
  p.map_rows = batch * g.n / g.r;
  if (p.map_rows == 0) p.map_rows = 1;  // a map needs one row; the tail path loads everything then
  MINIDL_CHECK(g.dim == 64 || g.dim == 128, "dilated_attention (cuda, ws): head dim ", g.dim, " (64 or 128)");
  auto run = [&](auto dim, auto causal_tag) {
    constexpr int kD = decltype(dim)::value;
    constexpr bool kCausal = decltype(causal_tag)::value;
    constexpr int kBc = FwdShape<kD>::kBc;
    const CUtensorMap qm = rows_map(q, g.heads, g.r, p.map_rows, kBr, kD);
    const CUtensorMap km = rows_map(k, g.heads, g.r, p.map_rows, kBc, kD);
    const CUtensorMap vm = rows_map(v, g.heads, g.r, p.map_rows, kBc, kD);
    // out_tiles: the output (B, N, H, d contiguous) as a (d, head, position) map.
    p.out_map = out_tiles<kD, MergeMode::kFinish, false> && mode == MergeMode::kFinish && !drop.mask.enabled() &&
                g.r == 1 && aligned16(out);
    const CUtensorMap om = p.out_map ? out_rows_map(out, g.heads, batch * g.n, g.heads * kD) : qm;
    switch (mode) {
      case MergeMode::kWrite: return launch<kD, kCausal, MergeMode::kWrite>(p, qm, km, vm, om, batch);
      case MergeMode::kMerge: return launch<kD, kCausal, MergeMode::kMerge>(p, qm, km, vm, om, batch);
      case MergeMode::kSingle: return launch<kD, kCausal, MergeMode::kSingle>(p, qm, km, vm, om, batch);
      case MergeMode::kFinish: return launch<kD, kCausal, MergeMode::kFinish>(p, qm, km, vm, om, batch);
    }
  };
  auto with_dim = [&](auto dim) {
    if (causal) run(dim, std::true_type{});
    else run(dim, std::false_type{});
  };
  if (g.dim == 128) with_dim(std::integral_constant<int, 128>{});
  else with_dim(std::integral_constant<int, 64>{});
}

}  // namespace minidl::cuda::attn

namespace minidl::cuda::attn {

void backward_ws(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                 const Operand<BFloat16>& dout, const float* lse, const float* delta, const BranchGrid& g,
                 int64_t batch, bool causal, float scale, const BranchDropout& drop, float* dq_acc, float* dk_acc,
                 float* dv_acc, BFloat16* dk_out, BFloat16* dv_out, int64_t out_row_stride,
                 uint8_t* kv_written, const BranchPairs& pairs) {
  WsBwdParams p{g, q, k, v, dout, 0, lse, delta, scale, drop, dq_acc, dk_acc, dv_acc, dk_out, dv_out, out_row_stride,
                kv_written};
  p.pairs = pairs;
  p.g.tiles_per_segment = (max_kept_rows(g.w, g.r) + kBwdKeys - 1) / kBwdKeys;
  p.batch_heads = batch * g.heads;
  p.items = p.g.segments * p.g.tiles_per_segment * p.batch_heads;
  // The items of a pair read its Q and dO (kept rows x d, bf16) and add to its dQ (fp32).
  p.group = pairs_in_l2(max_kept_rows(g.w, g.r) * g.dim * (2 + 2 + 4));
  p.work = scheduler_counters();
  p.map_rows = batch * g.n / g.r;
  if (p.map_rows == 0) p.map_rows = 1;
  MINIDL_CHECK(g.dim == 64 || g.dim == 128, "dilated_attention backward (cuda, ws): head dim ", g.dim, " (64 or 128)");
  const CUtensorMap qm = rows_map(q, g.heads, g.r, p.map_rows, kBm, g.dim);
  const CUtensorMap km = rows_map(k, g.heads, g.r, p.map_rows, kBwdKeys, g.dim);
  const CUtensorMap vm = rows_map(v, g.heads, g.r, p.map_rows, kBwdKeys, g.dim);
  const CUtensorMap dm = rows_map(dout, g.heads, g.r, p.map_rows, kBm, g.dim);
  const CUtensorMap dqm = dq_rows_map(dq_acc, g.heads, g.r, p.map_rows, g.dim);
  const bool direct = dk_out != nullptr;
  // The direct branch's dK and dV by TMA stores (head dim 64, rows of stride 1).
  p.out_maps = direct && g.dim == 64 && g.r == 1 && aligned16(dk_out) && aligned16(dv_out) &&
               out_row_stride % 8 == 0;
  const CUtensorMap dkm = p.out_maps ? out_rows_map(dk_out, g.heads, batch * g.n, out_row_stride) : qm;
  const CUtensorMap dvm = p.out_maps ? out_rows_map(dv_out, g.heads, batch * g.n, out_row_stride) : qm;
  auto run = [&](auto dim) {
    constexpr int kD = decltype(dim)::value;
    if (causal) {
      if (direct) launch_backward<kD, true, true>(p, qm, km, vm, dm, dqm, dkm, dvm, batch);
      else launch_backward<kD, true, false>(p, qm, km, vm, dm, dqm, dkm, dvm, batch);
    } else {
      if (direct) launch_backward<kD, false, true>(p, qm, km, vm, dm, dqm, dkm, dvm, batch);
      else launch_backward<kD, false, false>(p, qm, km, vm, dm, dqm, dkm, dvm, batch);
    }
  };
  if (g.dim == 128) run(std::integral_constant<int, 128>{});
  else run(std::integral_constant<int, 64>{});
}

}  // namespace minidl::cuda::attn
