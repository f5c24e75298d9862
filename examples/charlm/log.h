#pragma once
// The training log, DIR/log.csv: one row per logging step,
//   step,train_loss,val_loss,lr,tokens_per_s,elapsed_s,run_id
// with empty cells where a value was not measured (val_loss between
// evaluations; train_loss and tokens_per_s at step 0). train_loss is the
// mean loss of the training steps since the previous row; lr is the rate of
// the row's last step; elapsed_s the wall-clock seconds the run has spent
// (training, evaluating, saving; summed over resumes, so not counting the
// time it was stopped) when the row was written; run_id the run's id, the
// same as in its checkpoints. Rows are flushed as they are written.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace charlm {

struct LogRow {
  int64_t step = 0;
  double train_loss = NAN;  // NaN: not measured
  double val_loss = NAN;
  double lr = NAN;
  double tokens_per_s = NAN;
  double elapsed_s = NAN;  // NaN in logs written before the column existed
  std::string run_id;      // empty in logs written before the column existed
};

std::string format_row(const LogRow& row);
// Reads a log, also one of the older format without elapsed_s and run_id.
// A last line without its newline (a row being written when the run
// stopped) is dropped, with a message on stderr. Throws minidl::Error naming
// the file and line of a malformed row.
std::vector<LogRow> read_log(const std::string& path);

class LogWriter {
 public:
  // Rewrites `path` with the header and `rows` (on resume: the rows up to
  // the checkpoint's step), then appends.
  LogWriter(const std::string& path, const std::vector<LogRow>& rows);
  ~LogWriter();
  LogWriter(const LogWriter&) = delete;
  LogWriter& operator=(const LogWriter&) = delete;
  void append(const LogRow& row);

 private:
  std::string path_;
  std::FILE* out_ = nullptr;
};

// Writes `text` to `path` atomically: into "<path>.tmp", then renamed over
// `path`. On failure the .tmp file is removed and minidl::Error names the
// file and the system's reason (errno).
void write_file_atomically(const std::string& path, const std::string& text);

// DIR/loss.png: train and validation loss against step.
void write_loss_plot(const std::vector<LogRow>& rows, const std::string& path, const std::string& title);

}  // namespace charlm
