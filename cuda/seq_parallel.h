#pragma once
// Row movements of sequence-parallel dilated attention (ops/seq_parallel.h):
// the kept rows of k and v packed for a gather, a piece's query rows laid out
// for the attention kernel, its results merged back into the union softmax,
// gradients added to their rows. Every tensor is addressed as contiguous rows
// of `width` elements from its data pointer (a view's offset included).
#include <cstdint>

#include "core/tensor.h"

namespace minidl::cuda {

// Which rows move: pair i goes from src row src[i] to dst row dst[i] (device
// int32 arrays of `count` entries). Without arrays the pairs are affine: src
// row i, dst row (i / per) * dst_stride + dst_offset + i % per (a run of
// rows per batch). Within one call no dst row appears twice (no atomics: the
// results do not depend on timing).
struct RowPairs {
  int64_t count = 0;
  const int32_t* dst = nullptr;
  const int32_t* src = nullptr;
  int64_t per = 1, dst_stride = 0, dst_offset = 0;
};

// dst[dst row] = src[src row]; dst and src of one dtype.
void copy_rows(const Tensor& dst, const Tensor& src, int64_t width, const RowPairs& rows);
// dst[dst row] += src[src row]; each float32 or bfloat16, summed in float32
// (a bfloat16 dst rounds once per call).
void add_rows(const Tensor& dst, const Tensor& src, int64_t width, const RowPairs& rows);
// One softmax over the union: merges the partial (o, l) of each src row into
// the accumulated (O, L) of its dst row, O = (e^(L - L') O + e^(l - L') o),
// L' = log(e^L + e^l); a partial with l = -inf changes nothing. L, l
// float32 (one element per row); O and o float32 or bfloat16, the sum in
// float32 (a bfloat16 O rounds once per call).
void merge_rows(const Tensor& O, const Tensor& L, const Tensor& o, const Tensor& l, int64_t width,
                const RowPairs& rows);

}  // namespace minidl::cuda
