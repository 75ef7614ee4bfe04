"""Exclusive locks on directories (a training workdir, a features dir), held for a run's life.

The lock is an `fcntl.flock` on `DIR/.lock`, so the kernel releases it on every exit path,
SIGKILL included: a lock left by a dead process never blocks a restart. The file records who
holds it (host, pid, start time) for the message a second process gets. With several processes
in one run, only process 0 takes the lock and tells the others whether it got it, so there is
one lock per run, not per process.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import jax

LOCK_FILE = ".lock"


class LockedError(RuntimeError):
    """Another process holds the lock."""


class DirectoryLock:
    """`with DirectoryLock(directory, what="workdir"):` holds `directory/.lock` exclusively."""

    def __init__(self, directory: str | os.PathLike, what: str = "workdir"):
        self.directory, self.what = Path(directory), what
        self._file = None

    def __enter__(self) -> DirectoryLock:
        error = ""
        if jax.process_index() == 0:
            error = self._acquire()
        if jax.process_count() > 1:
            error = _broadcast(error)
        if error:
            raise LockedError(error)
        return self

    def _acquire(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        file = open(path, "a+")  # noqa: SIM115 - held open for the life of the lock
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _describe(file.read())
            file.close()
            return (
                f"{self.what} {self.directory} is in use by another run ({holder}); wait for "
                f"it to finish, stop it, or use another {self.what}"
            )
        file.seek(0)
        file.truncate()
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        file.write(json.dumps(holder) + "\n")
        file.flush()
        self._file = file
        return ""

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"host {holder['host']}, pid {holder['pid']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _broadcast(error: str) -> str:
    """Process 0's error message, on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.zeros(1024, np.uint8)
    encoded = error.encode()[:1024]
    data[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(data[data > 0]).decode(errors="replace")
