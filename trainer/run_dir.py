"""One run per run folder: a folder holding an earlier run's checkpoints is not overwritten
without ``trainer.resume``, and a running job holds a lock on its folder."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import warnings
from pathlib import Path

from trainer.checkpoint import checkpoints

LOCK = "run.lock"


def check_fresh(run_dir: Path, resume: str) -> None:
    """A new run (``trainer.resume=none``) in a folder with checkpoints would wipe the old
    run's metrics and, pruning by step number, delete its own checkpoints in favour of the
    old run's: refuse it."""
    if resume != "none":
        return
    found = checkpoints(run_dir)
    if found:
        raise ValueError(
            f"trainer.run_dir={str(run_dir)!r} holds the checkpoints of an earlier run "
            f"({len(found)}, newest {found[-1].name}): continue it with trainer.resume=auto, "
            f"or start afresh in another trainer.run_dir"
        )


class RunLock:
    """An exclusive ``flock`` on ``run_dir/run.lock``, which names its holder (host, PID).

    The kernel drops the lock when its process dies, however it dies, so a stale lock is
    taken over without guessing whether a PID on another node still lives (NFS v4 and Lustre
    mounted with ``flock`` support it across nodes). The file itself stays; only the lock on
    it means something. On a file system without locks the run goes on, with a warning."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ValueError(
                f"trainer.run_dir={str(self.path.parent)!r} is in use by PID "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')} ({self.path}): wait "
                f"for that run to end, or use another trainer.run_dir"
            ) from None
        except OSError as err:  # no locks on this file system (e.g. Lustre without flock)
            os.close(fd)
            warnings.warn(
                f"cannot lock {self.path} ({err.strerror}); running without", stacklevel=2
            )
            return self
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}
