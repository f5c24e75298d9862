#pragma once
// Checkpoints: named tensors plus a string->string metadata table in one
// self-checking binary file (docs/checkpoint-format.md). Saving is atomic:
// the file is written to "<path>.tmp", flushed, fsynced and renamed over
// <path>, so a crash leaves either the old checkpoint or the new one.
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/device.h"
#include "nn/state_dict.h"

namespace minidl {
class Generator;
}

namespace minidl::nn {

class Module;
class MixedPrecision;
class Optimizer;

constexpr uint32_t kCheckpointFormatVersion = 1;

struct Checkpoint {
  StateDict tensors;
  std::map<std::string, std::string> metadata;
};

// Tensors may live on any device (they are copied to the host); any dtype
// and strides. Throws minidl::Error naming the path on I/O failure.
void save_checkpoint(const std::string& path, const StateDict& tensors,
                     const std::map<std::string, std::string>& metadata = {});

// Reads and verifies a checkpoint, placing the tensors on `device`. Errors
// name the path and the problem: not a minidl checkpoint (bad magic), an
// unsupported format version, a truncated file (expected vs actual size), a
// checksum mismatch, or a malformed table.
Checkpoint load_checkpoint(const std::string& path, Device device = Device::cpu());

// ---- train state ----

// Everything a training run resumes from, as one checkpoint:
//   "model.<name>"   the model's parameters and buffers (the float32 masters
//                    under mixed precision),
//   "optim.<key>"    the optimizer's state dict,
//   metadata "rng.<name>.seed" / "rng.<name>.offset" for each generator,
//   plus the caller's own tensors (under their names) and metadata.
// The layout is the one charlm checkpoints have always had, so they load.
// Pointers are not owned; null (or empty) parts are skipped.
struct TrainState {
  Module* model = nullptr;
  // Instead of `model` with mixed precision: its masters are saved as the
  // model, and loading refreshes the compute model.
  MixedPrecision* mixed_precision = nullptr;
  Optimizer* optimizer = nullptr;
  std::vector<std::pair<std::string, Generator*>> generators;
  // Saved as they are; loading copies into them in place (same shapes).
  StateDict tensors;
  // Saved; on load, read them from the returned checkpoint.
  std::map<std::string, std::string> metadata;
};

// One atomic save_checkpoint of the whole state. Throws if a name of
// `tensors` or `metadata` collides with the library's keys.
void save_train_state(const std::string& path, const TrainState& state);

// Restores the parts of `state` from a checkpoint already read (e.g. on the
// CPU, to see its metadata first). Throws naming every missing or mismatched
// key; nothing is restored when the checkpoint lacks a part.
void restore_train_state(const Checkpoint& checkpoint, const TrainState& state);

// load_checkpoint + restore_train_state; returns the checkpoint for the
// caller's own metadata and tensors.
Checkpoint load_train_state(const std::string& path, const TrainState& state,
                            Device device = Device::cpu());

// FNV-1a 64-bit hash of `n` bytes, continuing from `hash` (the checkpoint
// checksum; exposed for tests and tools).
constexpr uint64_t kFnv1aOffsetBasis = 0xcbf29ce484222325ull;
uint64_t fnv1a64(const void* data, size_t n, uint64_t hash = kFnv1aOffsetBasis);

}  // namespace minidl::nn
