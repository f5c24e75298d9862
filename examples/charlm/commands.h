#pragma once
// The charlm subcommands. Each takes the arguments after its name and
// returns the exit code; a UsageError (exit 2) or any other exception
// (exit 1) is reported by main().
#include <string>
#include <vector>

namespace charlm {

int cmd_train(const std::vector<std::string>& args);    // train.cpp
int cmd_sample(const std::vector<std::string>& args);   // sample.cpp
int cmd_compare(const std::vector<std::string>& args);  // compare.cpp

}  // namespace charlm
