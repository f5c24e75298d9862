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
  std::string run_id;
  int64_t step = 0;              // steps completed
  double final_val_loss = NAN;   // at the last evaluation
  double best_val_loss = NAN;
  int64_t best_step = -1;
  double tokens_per_s = NAN;     // training tokens / training time, over the whole run (from the log)
  size_t peak_bytes = 0;         // memory_stats(device).peak_allocated, the most of any process of the run
  double elapsed_seconds = 0;    // the run's wall-clock seconds, summed over resumes
  int stop_signal = 0;           // non-zero when a signal stopped the run
  std::vector<LogRow> log;       // the whole log.csv
};

// Trains into options.out, writing log.csv, last.ckpt, best.ckpt and
// loss.png there. A fresh run (refused when options.out holds any run
// artifact) unless `resume` is given: the run directory's last.ckpt, which
// it continues after checking that the directory's files belong to that run.
// A fresh run takes options.run_id, or a new id when it is empty; a resumed
// run keeps its checkpoint's and refuses a different non-empty
// options.run_id. `label` prefixes the progress lines ("" or "[dilated] ");
// `resume_command` is the command the interruption message suggests
// (default: charlm train --resume DIR).
RunSummary train_run(const TrainOptions& options, const minidl::nn::Checkpoint* resume,
                     const std::string& label, const std::string& resume_command = "");

// A run to resume: DIR/last.ckpt and the options it continues with (its
// recipe, plus the run-level flags given; see with_run_flags). Throws
// UsageError when DIR/last.ckpt is missing or the device is unavailable.
struct ResumedRun {
  minidl::nn::Checkpoint checkpoint;
  TrainOptions options;
};
ResumedRun load_resumed_run(const std::string& dir, const FlagSet& flags, const TrainOptions& requested);

// Undoes a fresh run directory when an exception ends the run before it has
// anything to resume (`resumable`, a name in `dir`, does not exist), so that
// the same --out can be used again: removes `files` from `dir`, then `dir`
// itself if it did not exist when the guard was made and is now empty.
class FreshDirGuard {
 public:
  FreshDirGuard(std::string dir, std::vector<std::string> files, std::string resumable);
  ~FreshDirGuard();
  FreshDirGuard(const FreshDirGuard&) = delete;
  FreshDirGuard& operator=(const FreshDirGuard&) = delete;

 private:
  std::string dir_;
  std::vector<std::string> files_;
  std::string resumable_;
  bool created_;
  int exceptions_;  // std::uncaught_exceptions() when made
};

// The names of the files and folders charlm train and compare write into a
// run directory, and those of them that `dir` holds.
const std::vector<std::string>& run_artifact_names();
std::vector<std::string> run_artifacts(const std::string& dir);

// 16 hex digits, fresh for every run: tells one run's files from another's.
std::string new_run_id();

// Flag registration shared by train (and, without the run-directory flags,
// compare).
void add_train_command_flags(FlagSet& flags, TrainOptions& options);

// The whole file; throws UsageError naming --data when it cannot be read, is
// a directory or is empty.
std::string read_data_file(const std::string& path);

}  // namespace charlm
