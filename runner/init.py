"""``--init``: a small PID 1 that reaps zombies and forwards signals (what tini does).

Without it CMD is PID 1, and PID 1 of a pid namespace is special: the kernel drops
signals it has no handler for (so ``docker stop`` needs SIGKILL for a plain
``sleep``), and orphans are reparented to it but never reaped if it does not wait
for them. This init blocks the signals it forwards, waits for them synchronously
with ``sigwaitinfo`` (no handler races), sends them to CMD, reaps every child that
exits, and exits with CMD's status (128+N when a signal killed it).

It is the forked Python process, already pivoted into the container: nothing here
may import a module after the pivot (the host's files are gone).
"""

from __future__ import annotations

import os
import signal

#: forwarded to CMD (tini's list: every signal but the synchronous/job-control ones)
FORWARDED = {
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGALRM,
    signal.SIGCONT,
    signal.SIGPIPE,
}
SIGNALS = FORWARDED | {signal.SIGCHLD}


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def reap_and_forward(child: int) -> None:
    """Never returns. Signals in SIGNALS must already be blocked (before the fork)."""
    while True:
        info = signal.sigwaitinfo(SIGNALS)
        if info.si_signo != signal.SIGCHLD:
            try:
                os.kill(child, info.si_signo)
            except ProcessLookupError:
                pass
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                os._exit(0)
            if pid == 0:
                break
            if pid == child:
                os._exit(exit_code(status))
