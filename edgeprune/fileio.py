"""Atomic file writes and a writer's lock (stdlib only, so the torch-free runtime and profiler can use them too)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from edgeprune.errors import EdgepruneError

__all__ = ["atomic_write", "FileLock", "LockedError"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Create `path` by calling `write(tmp)` on a temp file beside it, then renaming it into place, so a
    reader never sees half a file. The temp name keeps the suffix (np.save and savefig read it) and
    the file gets the umask's usual mode (mkstemp makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class LockedError(EdgepruneError):
    """Another process holds the lock: it is writing the same thing right now."""


class FileLock:
    """An exclusive, non-blocking advisory lock (flock) on the file `path`, which is created for it and removed
    on release. The kernel drops the lock when its holder dies, so a killed process leaves at most an empty
    unlocked file behind, which the next writer takes over.

    Removing the file while holding it is safe because `acquire` checks, after locking, that the path still
    names the file it locked (a rival that opened the old file before the removal locks a file nobody sees)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, busy: str) -> "FileLock":
        """Take the lock or raise LockedError(`busy`) at once."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(busy) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self.fd = fd
                return self
            os.close(fd)           # the previous holder removed it between our open and lock: try again

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
