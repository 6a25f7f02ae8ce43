"""Stopping a run on purpose: signals from a scheduler or a user, and the exit codes that
tell a launcher what happened."""

from __future__ import annotations

import signal
import sys
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written on a signal; rerun with resume=auto
EXIT_NONFINITE = 65  # EX_DATAERR: stopped on a non-finite loss; the last good state is saved
EXIT_IO_ERROR = 74  # EX_IOERR: a checkpoint could not be written (a full disk); the previous stays
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a second Ctrl-C, no checkpoint of the step it cut
# Written into the run folder (by rank 0) when the run stops on a signal with a checkpoint:
# torchrun turns the workers' exit code 75 into 1, so a launcher reads this file instead
# (launch/slurm.sbatch requeues only when it is there).
PREEMPTED_MARKER = "PREEMPTED"


class TrainingStopped(Exception):
    """The loop stopped early on purpose (signal, non-finite loss) after checkpointing."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequests:
    """SIGTERM and SIGUSR1 (SLURM's warning before the time limit, ``--signal``) and a first
    SIGINT ask the loop to checkpoint at the next step boundary and exit with
    ``EXIT_PREEMPTED``; a second SIGINT raises ``KeyboardInterrupt`` at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        again = "; Ctrl-C again to abort" if signum == signal.SIGINT else ""
        print(
            f"{signal.Signals(signum).name}: stopping at the next step boundary, with a "
            f"checkpoint{again}",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
