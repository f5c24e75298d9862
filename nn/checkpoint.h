#pragma once
// Checkpoints: named tensors plus a string->string metadata table in one
// self-checking binary file (docs/checkpoint-format.md). Saving is atomic:
// the file is written to "<path>.tmp", flushed, fsynced and renamed over
// <path>, so a crash leaves either the old checkpoint or the new one.
#include <cstdint>
#include <map>
#include <string>

#include "core/device.h"
#include "nn/state_dict.h"

namespace minidl::nn {

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

// FNV-1a 64-bit hash of `n` bytes, continuing from `hash` (the checkpoint
// checksum; exposed for tests and tools).
constexpr uint64_t kFnv1aOffsetBasis = 0xcbf29ce484222325ull;
uint64_t fnv1a64(const void* data, size_t n, uint64_t hash = kFnv1aOffsetBasis);

}  // namespace minidl::nn
