#pragma once
// The training log, DIR/log.csv: one row per logging step,
//   step,train_loss,val_loss,lr,tokens_per_s
// with empty cells where a value was not measured (val_loss between
// evaluations; train_loss and tokens_per_s at step 0). train_loss is the
// mean loss of the training steps since the previous row; lr is the rate of
// the row's last step. Rows are flushed as they are written.
#include <cmath>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace charlm {

struct LogRow {
  int64_t step = 0;
  double train_loss = NAN;  // NaN: not measured
  double val_loss = NAN;
  double lr = NAN;
  double tokens_per_s = NAN;
};

std::string format_row(const LogRow& row);
// Throws minidl::Error naming the file and line of a malformed row.
std::vector<LogRow> read_log(const std::string& path);

class LogWriter {
 public:
  // Rewrites `path` with the header and `rows` (on resume: the rows up to
  // the checkpoint's step), then appends.
  LogWriter(const std::string& path, const std::vector<LogRow>& rows);
  void append(const LogRow& row);

 private:
  std::string path_;
  std::ofstream out_;
};

// DIR/loss.png: train and validation loss against step.
void write_loss_plot(const std::vector<LogRow>& rows, const std::string& path, const std::string& title);

}  // namespace charlm
