#include "signals.h"

#include <unistd.h>

#include <csignal>
#include <cstring>

namespace charlm {

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
// Whether stderr is a terminal, where the notice first ends the progress line.
volatile std::sig_atomic_t g_stderr_tty = 0;

void set_default_action(int signal) {
  struct sigaction action = {};
  action.sa_handler = SIG_DFL;
  sigemptyset(&action.sa_mask);
  sigaction(signal, &action, nullptr);
}

extern "C" void on_stop_signal(int signal) {
  g_stop_signal = signal;
  // The next SIGINT or SIGTERM takes the default action: the program ends at once.
  set_default_action(SIGINT);
  set_default_action(SIGTERM);
  // Only async-signal-safe calls here: write(2) of a fixed text.
  const char* text = g_stderr_tty ? "\n[charlm] stopping: saving the last completed step (Ctrl-C again quits at once)\n"
                                  : "[charlm] stopping: saving the last completed step (a second signal quits at once)\n";
  ssize_t ignored = ::write(STDERR_FILENO, text, std::strlen(text));
  (void)ignored;
}

}  // namespace

void install_stop_handlers() {
  g_stderr_tty = ::isatty(STDERR_FILENO) == 1;
  struct sigaction action = {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  // Neither signal interrupts the handler of the other.
  sigaddset(&action.sa_mask, SIGINT);
  sigaddset(&action.sa_mask, SIGTERM);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

int stop_signal() { return g_stop_signal; }

int exit_code_for_signal(int signal) { return 128 + signal; }

const char* signal_name(int signal) {
  return signal == SIGINT ? "SIGINT" : signal == SIGTERM ? "SIGTERM" : "a signal";
}

}  // namespace charlm
