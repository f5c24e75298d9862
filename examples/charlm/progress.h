#pragma once
// The progress line of a training run: updated in place (carriage return)
// on a terminal, one plain line per update otherwise (logs, pipes, CI).
//
//   step  250/5000 | train 1.5012 | val 1.4823 (new best) | lr 9.70e-04 | 1.02M tok/s | 4m10s left
//   step  260/5000 | train 1.4950 | val 1.4823 (step 250) | lr 9.69e-04 | 1.03M tok/s | 4m05s left
//
// The validation loss is shown bare on the line of the evaluation that
// measured it, and with its step on the lines after it.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>

namespace charlm {

struct ProgressState {
  int64_t step = 0, iters = 0;
  double train_loss = NAN;  // NaN: none yet
  double val_loss = NAN;    // latest measured; NaN: none yet
  int64_t val_step = -1;    // the step val_loss was measured at; -1: unknown (older checkpoints)
  bool new_best = false;    // val_loss, measured at this step, is the best so far
  double lr = NAN;
  double tokens_per_s = NAN;
  double seconds_left = NAN;
};

class Progress {
 public:
  // `prefix` starts every line (e.g. "[dilated] "); output goes to stdout.
  explicit Progress(std::string prefix);
  void update(const ProgressState& state);
  // An evaluation at `step` has measured `done` of `total` batches (call with
  // done = 0 when it starts). On a terminal the line shows the count, redrawn
  // a few times a second; otherwise a line is printed only for a slow
  // evaluation (after 10 s, then every 30 s), so logs of fast runs stay short.
  void evaluating(int64_t step, int64_t iters, int64_t done, int64_t total);
  // Ends the in-place line so it stays on screen (after an evaluation).
  void keep();
  // Prints a message on its own line, clearing any in-place line first.
  void message(const std::string& text);

 private:
  using Clock = std::chrono::steady_clock;
  std::string step_text(int64_t step, int64_t iters) const;
  void show(const std::string& line);  // in place on a terminal, a plain line otherwise

  std::string prefix_;
  bool tty_;
  Clock::time_point eval_start_, eval_shown_;
};

// Ends an in-place progress line left open on the terminal (before an error
// message, which then starts on a line of its own); does nothing otherwise.
void end_progress_line();

// "45s", "12m03s", "2h05m".
std::string format_duration(double seconds);

}  // namespace charlm
