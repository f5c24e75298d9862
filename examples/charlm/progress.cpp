#include "progress.h"

#include <unistd.h>

#include <cstdio>

namespace charlm {

namespace {

// Whether an in-place line is on the terminal, not yet ended by a newline
// (one stdout, so one flag for every Progress).
bool g_line_open = false;

std::string rate(double tokens_per_s) {
  char buf[32];
  if (tokens_per_s >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", tokens_per_s / 1e6);
  else if (tokens_per_s >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", tokens_per_s / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", tokens_per_s);
  return buf;
}

double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(s));
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  else std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(s / 3600), static_cast<long long>(s / 60 % 60));
  return buf;
}

void end_progress_line() {
  if (!g_line_open) return;
  std::fputs("\n", stdout);
  std::fflush(stdout);
  g_line_open = false;
}

Progress::Progress(std::string prefix) : prefix_(std::move(prefix)), tty_(::isatty(STDOUT_FILENO) == 1) {}

std::string Progress::step_text(int64_t step, int64_t iters) const {
  char buf[64];
  const int width = static_cast<int>(std::to_string(iters).size());
  std::snprintf(buf, sizeof buf, "step %*lld/%lld", width, static_cast<long long>(step),
                static_cast<long long>(iters));
  return prefix_ + buf;
}

void Progress::show(const std::string& line) {
  if (tty_) {
    std::fputs(("\r\033[K" + line).c_str(), stdout);
    g_line_open = true;
  } else {
    std::fputs((line + "\n").c_str(), stdout);
  }
  std::fflush(stdout);
}

void Progress::update(const ProgressState& s) {
  char buf[64];
  std::string line = step_text(s.step, s.iters);
  auto loss = [](double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.4f", v);
    return std::isnan(v) ? std::string("-") : std::string(b);
  };
  line += " | train " + loss(s.train_loss) + " | val " + loss(s.val_loss);
  if (!std::isnan(s.val_loss)) {
    if (s.val_step >= 0 && s.val_step != s.step) line += " (step " + std::to_string(s.val_step) + ")";
    else if (s.new_best) line += " (new best)";
  }
  std::snprintf(buf, sizeof buf, " | lr %.2e", s.lr);
  line += buf;
  if (!std::isnan(s.tokens_per_s)) line += " | " + rate(s.tokens_per_s) + " tok/s";
  if (!std::isnan(s.seconds_left)) line += " | " + format_duration(s.seconds_left) + " left";
  show(line);
}

void Progress::evaluating(int64_t step, int64_t iters, int64_t done, int64_t total) {
  const Clock::time_point now = Clock::now();
  if (done == 0) eval_start_ = eval_shown_ = now;
  const double running = seconds(now - eval_start_), since_shown = seconds(now - eval_shown_);
  const bool due = tty_ ? done == 0 || since_shown >= 0.25
                        : running >= 10 && (since_shown >= 30 || eval_shown_ == eval_start_);
  if (!due) return;
  eval_shown_ = now;
  show(step_text(step, iters) + " | evaluating: " + std::to_string(done) + "/" + std::to_string(total) +
       " validation batches (" + format_duration(running) + ")");
}

void Progress::keep() {
  end_progress_line();
  std::fflush(stdout);
}

void Progress::message(const std::string& text) {
  if (tty_ && g_line_open) std::fputs("\r\033[K", stdout);
  g_line_open = false;
  std::fputs((prefix_ + text + "\n").c_str(), stdout);
  std::fflush(stdout);
}

}  // namespace charlm
