"""Atomic file writes (stdlib only, so the torch-free runtime and profiler can use it too)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


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
