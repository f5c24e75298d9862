// Random windows of a token sequence: the batches of a language model,
// sampled where the tokens live, so that a CUDA training step uploads
// nothing and the CPU and CUDA draw the same windows for a generator state.
#include "cpu/random_windows.h"
#include "cuda/random_windows.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {

std::pair<Tensor, Tensor> random_windows(const Tensor& tokens, int64_t batch, int64_t length, Generator* gen) {
  const char* name = "random_windows";
  detail::check_defined(name, tokens, "tokens");
  MINIDL_CHECK(tokens.dim() == 1 && tokens.dtype() == DType::Int32, name,
               ": tokens must be a 1-D int32 tensor, got ", detail::describe(tokens));
  MINIDL_CHECK(batch > 0 && length > 0, name, ": batch and length must be positive, got ", batch, " and ",
               length);
  const int64_t n = tokens.numel();
  MINIDL_CHECK(n >= length + 1, name, ": ", n, " tokens hold no window of length + 1 = ", length + 1);
  MINIDL_CHECK(static_cast<uint64_t>(n - length) <= (uint64_t{1} << 32), name, ": ", n - length,
               " start positions, more than the 2^32 a 32-bit random word can address (", n, " tokens, length ",
               length, ")");
  Generator& g = gen ? *gen : default_generator();
  const Tensor src = tokens.contiguous();
  const TensorOptions options{tokens.dtype(), tokens.device(), false};
  Tensor x = Tensor::empty({batch, length}, options), y = Tensor::empty({batch, length}, options);
  MINIDL_DISPATCH(src.device(), random_windows, src, g.seed(), g.next_offset(), x, y);
  return {x, y};
}

}  // namespace minidl::ops
