// charlm: train, sample from and compare character-level language models
// built on minidl. See `charlm --help` and `charlm <command> --help`.
#include <omp.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "args.h"
#include "commands.h"
#include "minidl.h"
#include "progress.h"

namespace {

constexpr const char* kUsage =
    "usage: charlm <command> [flags]\n"
    "\n"
    "Character-level transformer language models on minidl.\n"
    "\n"
    "commands:\n"
    "  train    train a model on a text file (or --resume a run)\n"
    "  sample   generate text from a checkpoint\n"
    "  compare  train vanilla and dilated attention side by side\n"
    "  info     show the devices charlm can use\n"
    "\n"
    "Run 'charlm <command> --help' for the command's flags. Example:\n"
    "  charlm train --data data/tinyshakespeare.txt --out runs/shakespeare\n"
    "  charlm sample --ckpt runs/shakespeare/best.ckpt --prompt 'ROMEO:' --tokens 300\n";

// `charlm info`: what this build can run on (scripts pick their recipe by it).
int cmd_info(const std::vector<std::string>& args) {
  if (!args.empty() && (args[0] == "--help" || args[0] == "-h")) {
    std::puts("usage: charlm info\n\nPrints the devices charlm can use: a line 'cuda: available (N devices)'\n"
              "when minidl was built with CUDA and sees a GPU, and the CPU threads.");
    return 0;
  }
  if (!args.empty()) throw charlm::UsageError("unexpected argument '" + args[0] + "'");
#ifdef MINIDL_WITH_CUDA
  const int gpus = minidl::cuda_is_available() ? minidl::cuda_device_count() : 0;
  if (gpus > 0) std::printf("cuda: available (%d device%s)\n", gpus, gpus == 1 ? "" : "s");
  else std::puts("cuda: not available (no usable GPU)");
#else
  std::puts("cuda: not available (minidl was built without CUDA)");
#endif
  std::printf("cpu: %d OpenMP threads\n", omp_get_max_threads());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string command = argv[1];
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  const std::vector<std::string> args(argv + 2, argv + argc);
  try {
    if (command == "train") return charlm::cmd_train(args);
    if (command == "sample") return charlm::cmd_sample(args);
    if (command == "compare") return charlm::cmd_compare(args);
    if (command == "info") return cmd_info(args);
    throw charlm::UsageError("unknown command '" + command +
                             "' (commands: train, sample, compare, info; see charlm --help)");
  } catch (const charlm::UsageError& e) {
    const bool known = command == "train" || command == "sample" || command == "compare" || command == "info";
    charlm::end_progress_line();
    std::fprintf(stderr, "%s: %s\n", known ? ("charlm " + command).c_str() : "charlm", e.what());
    return 2;
  } catch (const std::exception& e) {
    // The error gets a line of its own, without a blank line before it.
    charlm::end_progress_line();
    std::fprintf(stderr, "charlm %s: error: %s\n", command.c_str(), e.what());
    return 1;
  }
}
