"""One writer per run directory: an exclusive `fcntl.flock` on `<run_dir>/.lock`, held for the run's life.

    lock = RunLock(path)
    lock.acquire()      # RunDirError naming the directory and the holder's pid when another process holds it
    ...                 # the run
    lock.release()      # or let the process die: the OS drops a flock with the last open descriptor

Why flock: the kernel releases it when the holding process exits, however it exits (kill -9, OOM), so
there is never a stale lock to clean up by hand, and it also excludes two writers inside one process
(each `RunLock` opens its own descriptor). The file stays in the directory (deleting it would let a
third process lock a new inode while the second still waits on the old one); it holds the holder's
pid and host for the error message only. Readers (`migu report`, `compare`) never take it.
Under torchrun only rank 0 writes, so only rank 0 locks (see `RunDir.lock`). Network file systems:
Linux NFSv4 maps flock to a byte-range lock the server enforces; other network file systems may not.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from migu.integrity import RunDirError

LOCK = ".lock"


class RunLock:
    """The exclusive writer lock of one run directory."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, record: bool = True) -> None:
        """Take the lock without waiting; `RunDirError` naming the directory and holder when it is taken.

        `record`: write this process's pid into the file (for a later writer's error message).
        """
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise RunDirError(f"cannot lock run directory {self.path.parent}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"run directory {self.path.parent} is in use by another migu process ({holder}); "
                              "wait for it to finish or stop it — two writers would mix their files") from None
        except OSError as err:
            os.close(fd)
            raise RunDirError(f"cannot lock run directory {self.path.parent}: {err.strerror}") from None
        self._fd = fd
        if not record:
            return
        try:  # who holds it, for the second writer's message (best effort: a full disk must not stop the lock)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass

    def probe(self) -> None:
        """RunDirError when another process holds the lock now (taken and dropped at once; creates no file)."""
        if self._fd is None and self.path.is_file():
            self.acquire(record=False)
            self.release()

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown: it has only just started"
