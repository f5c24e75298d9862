#pragma once
// The progress line of a training run: updated in place (carriage return)
// on a terminal, one plain line per update otherwise (logs, pipes, CI).
#include <cmath>
#include <cstdint>
#include <string>

namespace charlm {

struct ProgressState {
  int64_t step = 0, iters = 0;
  double train_loss = NAN, val_loss = NAN;  // latest measured; NaN: none yet
  bool new_best = false;                    // val_loss is the best so far
  double lr = NAN;
  double tokens_per_s = NAN;
  double seconds_left = NAN;
};

class Progress {
 public:
  // `prefix` starts every line (e.g. "[dilated] "); output goes to stdout.
  explicit Progress(std::string prefix);
  void update(const ProgressState& state);
  // Ends the in-place line so it stays on screen (after an evaluation).
  void keep();
  // Prints a message on its own line, clearing any in-place line first.
  void message(const std::string& text);

 private:
  std::string prefix_;
  bool tty_;
  bool line_open_ = false;
};

// "45s", "12m03s", "2h05m".
std::string format_duration(double seconds);

}  // namespace charlm
