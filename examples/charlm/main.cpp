// charlm: train, sample from and compare character-level language models
// built on minidl. See `charlm --help` and `charlm <command> --help`.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "args.h"
#include "commands.h"

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
    "\n"
    "Run 'charlm <command> --help' for the command's flags. Example:\n"
    "  charlm train --data data/tinyshakespeare.txt --out runs/shakespeare\n"
    "  charlm sample --ckpt runs/shakespeare/best.ckpt --prompt 'ROMEO:' --tokens 300\n";

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
    throw charlm::UsageError("unknown command '" + command + "' (commands: train, sample, compare; see charlm --help)");
  } catch (const charlm::UsageError& e) {
    const bool known = command == "train" || command == "sample" || command == "compare";
    std::fprintf(stderr, "%s: %s\n", known ? ("charlm " + command).c_str() : "charlm", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "\ncharlm %s: error: %s\n", command.c_str(), e.what());
    return 1;
  }
}
