#pragma once
// Ctrl-C and SIGTERM ask a training run to stop: the current step finishes,
// last.ckpt is saved, and the program exits non-zero. A second signal ends
// the program at once (the handler is one-shot); the checkpoint on disk is
// then still the previous, complete one (saves are atomic).

namespace charlm {

void install_stop_handlers();
// The signal number that asked to stop, or 0.
int stop_signal();
// 128 + signal, the shell's convention for a program ended by that signal.
int exit_code_for_signal(int signal);
const char* signal_name(int signal);

}  // namespace charlm
