#pragma once
// How this process was launched: alone, or as one rank of several processes
// (the environment variables RANK, WORLD_SIZE and LOCAL_RANK, as torchrun and
// most cluster launchers set them). dist::nccl_from_env joins the ranks.
namespace minidl::dist {

struct ProcessRank {
  int rank = 0, world = 1;
  int local = 0;  // this process's GPU on its node: LOCAL_RANK, else RANK modulo the visible GPUs; 0 without WORLD_SIZE
};

// Rank 0 of 1 when WORLD_SIZE is unset; else RANK (required when WORLD_SIZE
// > 1) of WORLD_SIZE.
// Throws, naming the variable, when a value is not a non-negative integer or
// RANK is not below WORLD_SIZE.
ProcessRank process_rank_from_env();

}  // namespace minidl::dist
