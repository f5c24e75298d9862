#pragma once
// Ctrl-C and SIGTERM ask a training run to stop: the current step (NCCL
// ranks: the steps up to the next log row; or the evaluation under way,
// which is abandoned) ends, last.ckpt is saved with the
// last completed step, and the program exits 128 + the signal. The first
// signal says so on stderr. A second signal (either of the two) ends the
// program at once: the handlers are one-shot, and the checkpoint on disk is
// then still the previous, complete one (saves are atomic).

namespace charlm {

void install_stop_handlers();
// The signal number that asked to stop, or 0.
int stop_signal();
// 128 + signal, the shell's convention for a program ended by that signal.
int exit_code_for_signal(int signal);
const char* signal_name(int signal);

}  // namespace charlm
