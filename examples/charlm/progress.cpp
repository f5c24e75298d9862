#include "progress.h"

#include <unistd.h>

#include <cstdio>

namespace charlm {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(s));
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  else std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(s / 3600), static_cast<long long>(s / 60 % 60));
  return buf;
}

namespace {

std::string rate(double tokens_per_s) {
  char buf[32];
  if (tokens_per_s >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", tokens_per_s / 1e6);
  else if (tokens_per_s >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", tokens_per_s / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", tokens_per_s);
  return buf;
}

}  // namespace

Progress::Progress(std::string prefix) : prefix_(std::move(prefix)), tty_(::isatty(STDOUT_FILENO) == 1) {}

void Progress::update(const ProgressState& s) {
  char buf[256];
  std::string line = prefix_;
  const int width = static_cast<int>(std::to_string(s.iters).size());
  std::snprintf(buf, sizeof buf, "step %*lld/%lld", width, static_cast<long long>(s.step),
                static_cast<long long>(s.iters));
  line += buf;
  auto loss = [](double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.4f", v);
    return std::isnan(v) ? std::string("-") : std::string(b);
  };
  line += " | train " + loss(s.train_loss) + " | val " + loss(s.val_loss) + (s.new_best ? "*" : "");
  std::snprintf(buf, sizeof buf, " | lr %.2e", s.lr);
  line += buf;
  if (!std::isnan(s.tokens_per_s)) line += " | " + rate(s.tokens_per_s) + " tok/s";
  if (!std::isnan(s.seconds_left)) line += " | " + format_duration(s.seconds_left) + " left";
  if (tty_) {
    std::fputs(("\r\033[K" + line).c_str(), stdout);
    line_open_ = true;
  } else {
    std::fputs((line + "\n").c_str(), stdout);
  }
  std::fflush(stdout);
}

void Progress::keep() {
  if (tty_ && line_open_) std::fputs("\n", stdout);
  line_open_ = false;
  std::fflush(stdout);
}

void Progress::message(const std::string& text) {
  if (tty_ && line_open_) std::fputs("\r\033[K", stdout);
  line_open_ = false;
  std::fputs((prefix_ + text + "\n").c_str(), stdout);
  std::fflush(stdout);
}

}  // namespace charlm
