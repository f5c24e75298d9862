#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "core/device.h"

int main(int argc, char** argv) {
  if (!minidl::cuda_is_available())
    std::printf("[minidl] no CUDA device: CUDA test cases are skipped\n");
  doctest::Context context(argc, argv);
  return context.run();
}
