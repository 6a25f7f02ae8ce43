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
    mounted with ``flock`` support it across nodes); a killed job's file stays, and only the
    lock on it means something. A run that ends removes the file, while still holding the
    lock, and a run that takes the lock checks that the file it locked is still the one at
    the path (else it raced a removal, and locks the new one). On a file system without
    locks the run goes on, with a warning. The run folder is created here, after every
    check, so a refused run leaves none behind."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self._fd: int | None = None
        self.created: Path | None = None
        """The outermost folder ``acquire`` created (None: ``run_dir`` existed)."""

    def acquire(self) -> RunLock:
        self.created = next((p for p in reversed(self.path.parents) if not p.exists()), None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise ValueError(
                    f"trainer.run_dir={str(self.path.parent)!r} is in use by PID "
                    f"{holder.get('pid', '?')} on {holder.get('host', '?')} ({self.path}): "
                    f"wait for that run to end, or use another trainer.run_dir"
                ) from None
            except OSError as err:  # no locks on this file system (e.g. Lustre without flock)
                os.close(fd)
                warnings.warn(
                    f"cannot lock {self.path} ({err.strerror}); running without", stacklevel=2
                )
                return self
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it as we opened it: lock the new file
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self, remove_created: bool = False) -> None:
        """Remove the lock file and drop the lock; ``remove_created``: also remove the
        folders ``acquire`` created, if nothing else was put in them (a refused run)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while locked: nobody else holds this file
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if remove_created and self.created is not None:
            folder = self.path.parent
            while folder != self.created.parent:
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    break
                folder = folder.parent


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}
