#pragma once
// Random state: a seed and an offset. Each random op uses the current offset
// as its Philox counter word and advances it by one, so the op sequence, not
// the element count, defines the stream. Saved in checkpoints for resume.
//
// CUDA graphs (nn::CudaGraph): a replayed graph cannot take new kernel
// arguments, so while a graph is captured the generator may be bound to a
// device word that holds its offset at the start of each replay. Ops whose
// kernels read a PhiloxOffset then get {that word, offset - offset at bind};
// the graph advances the word by the step's draws at its end.
#include <cstdint>

#include "core/macros.h"

namespace minidl {

// The counter word of one random op: *base + delta when base (a device
// address) is set, delta otherwise. Kernels read it once through value().
struct PhiloxOffset {
  const uint64_t* base = nullptr;
  uint64_t delta = 0;
  MINIDL_HD MINIDL_FORCEINLINE uint64_t value() const {
#if defined(__CUDA_ARCH__)
    return base ? __ldg(base) + delta : delta;
#else
    return base ? *base + delta : delta;
#endif
  }
};

class Generator {
 public:
  explicit Generator(uint64_t seed = 0x5eed) : seed_(seed) {}
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void manual_seed(uint64_t seed) {
    seed_ = seed;
    offset_ = 0;
  }
  void set_state(uint64_t seed, uint64_t offset) {
    seed_ = seed;
    offset_ = offset;
  }
  // Reserves one counter word for a random op; returns it. Throws while
  // bound to a device offset: the op's kernel would replay one stream.
  uint64_t next_offset();
  // Reserves one counter word for an op whose kernels take a PhiloxOffset:
  // {nullptr, offset} normally, {device word, offset - offset at bind} while bound.
  PhiloxOffset next_philox_offset();

  // Graph capture: binds `device_offset` (must hold offset() whenever the
  // captured work runs) until unbind_device_offset(), which returns the
  // number of offsets reserved meanwhile. offset() keeps counting as usual.
  void bind_device_offset(const uint64_t* device_offset);
  uint64_t unbind_device_offset();
  const uint64_t* device_offset() const { return device_offset_; }

 private:
  uint64_t seed_;
  uint64_t offset_ = 0;
  const uint64_t* device_offset_ = nullptr;
  uint64_t bound_at_ = 0;  // offset_ when bound
};

// The process-wide generator used when an op is given none.
Generator& default_generator();
void manual_seed(uint64_t seed);

}  // namespace minidl
