#pragma once
// `charlm train`: the training loop behind the train and compare commands.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "log.h"
#include "options.h"

namespace charlm {

struct RunSummary {
  std::string dir;
  int64_t step = 0;              // steps completed
  double final_val_loss = NAN;   // at the last evaluation
  double best_val_loss = NAN;
  int64_t best_step = -1;
  double tokens_per_s = NAN;     // training tokens / training time, this process
  size_t peak_bytes = 0;         // memory_stats(device).peak_allocated during the run
  double wall_seconds = 0;
  int stop_signal = 0;           // non-zero when a signal stopped the run
  std::vector<LogRow> log;       // the whole log.csv
};

// Trains into options.out, writing log.csv, last.ckpt, best.ckpt and
// loss.png there. A fresh run unless options.resume names a run directory,
// whose last.ckpt (loaded onto the training device as `resume`) it
// continues. `label` prefixes the progress lines ("" or "[dilated] ").
RunSummary train_run(const TrainOptions& options, const minidl::nn::Checkpoint* resume,
                     const std::string& label);

// Both take the arguments after the command name and return the exit code.
int cmd_train(const std::vector<std::string>& args);

// Flag registration shared by train (and, without the run-directory flags,
// compare).
void add_train_command_flags(FlagSet& flags, TrainOptions& options);

// The whole file; throws UsageError naming --data when it cannot be read or is empty.
std::string read_data_file(const std::string& path);

}  // namespace charlm
