#pragma once
// The NCCL backend of dist::Communicator: one GPU per rank; every collective
// runs on a communication stream of the rank (high priority, shared by the
// communicators split from the same one, so a rank's NCCL calls keep their
// order), forked from minidl's stream at the call and joined back to it (the
// host does not wait, except in barrier()): the plain collectives at once, the async ones by
// Work::wait(), also inside a CUDA graph capture.
// Built when minidl is built with CUDA and nccl.h and libnccl are found;
// otherwise nccl_available() is false and the factories throw, saying so.
//
// Before creating a communicator minidl sets NCCL_NVLS_ENABLE=0 unless the
// environment already sets it (NVLink multicast stays off: DESIGN.md,
// "Scaling out").
#include <functional>
#include <memory>
#include <string>

#include "dist/communicator.h"

namespace minidl::dist {

// Whether this build of minidl has the NCCL backend.
bool nccl_available();

// One process, several GPUs: runs fn(comm) on num_gpus threads, thread i on
// CUDA device i (its current device) with rank i of one communicator made
// for devices 0..num_gpus-1 (ncclCommInitAll), and returns when all have. The
// exception of the rank that failed first is rethrown here. NCCL collectives cannot be
// cancelled, so after a failure on one rank the others may wait for it in a
// collective forever, and run_nccl never returns: when they have not
// returned 10 s after it failed, its message is printed on stderr.
void run_nccl(int num_gpus, const std::function<void(Communicator&)>& fn);

// Several processes (one GPU each, on one or many nodes): the rank, world
// size and device come from the environment (dist::process_rank_from_env,
// dist/launch.h; WORLD_SIZE must be set); the device becomes this thread's
// current device. Rank 0 writes NCCL's unique id to `id_file`,
// a path on a filesystem every rank sees (empty: $MINIDL_NCCL_ID_FILE); the
// others wait for it (up to 10 minutes). Use a fresh path per job: a file
// left by an earlier job would be read as this one's, so rank 0 refuses to
// start when the file exists (it removes it once every rank has joined).
std::unique_ptr<Communicator> nccl_from_env(const std::string& id_file = "");

}  // namespace minidl::dist
