// dist/launch.h: the launcher's environment variables.
#include "dist/launch.h"

#include <cstdlib>

#include "core/device.h"
#include "core/error.h"

namespace minidl::dist {
namespace {

// The variable's value; `fallback` when unset (a negative fallback: required).
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) {
    MINIDL_CHECK(fallback >= 0, "dist: the environment variable ", name, " is not set (WORLD_SIZE > 1 is)");
    return fallback;
  }
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  MINIDL_CHECK(*end == '\0' && x >= 0 && x < (1L << 30), "dist: the environment variable ", name, "='", v,
               "' is not a non-negative integer");
  return static_cast<int>(x);
}

}  // namespace

ProcessRank process_rank_from_env() {
  ProcessRank p;
  const char* world = std::getenv("WORLD_SIZE");
  if (!world || !*world) return p;
  p.world = env_int("WORLD_SIZE", -1);
  p.rank = env_int("RANK", p.world == 1 ? 0 : -1);
  MINIDL_CHECK(p.world >= 1 && p.rank < p.world, "dist: RANK=", p.rank, " is not a rank of WORLD_SIZE=", p.world);
  const int visible = cuda_device_count();
  p.local = env_int("LOCAL_RANK", visible > 0 ? p.rank % visible : 0);
  return p;
}

}  // namespace minidl::dist
