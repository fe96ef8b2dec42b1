"""Is there a shared libpython of exactly this interpreter's version where the system loader finds it?

Triton's Python backend runs models in a stub process linked against `libpython3.X.so.1.0`, found by the system
loader (not by the interpreter's own rpath), and that library then runs this interpreter's standard library and
site-packages: a different patch version fails at import time ("'_thread.RLock' object has no attribute
'_recursion_count'", NOTES.md). Stdlib only: scripts/setup.sh runs this file before any environment exists.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

__all__ = ["problem"]


def _loader_path(soname: str) -> str | None:
    for folder in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
        if os.path.exists(os.path.join(folder, soname)):
            return os.path.join(folder, soname)
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        cache = ""
    for line in cache.splitlines():
        if line.strip().startswith(soname + " ") and "=>" in line:
            return line.split("=>", 1)[1].strip()
    return None


def problem() -> str | None:
    """None if Triton's Python backend can run on this interpreter, else why not (one line)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    soname = f"libpython{version}.so.1.0"
    path = _loader_path(soname)
    if path is None:
        return f"no {soname} on the system loader's path (Debian: apt-get install libpython{version})"
    try:
        found = ctypes.c_ulong.in_dll(ctypes.CDLL(path), "Py_Version").value
    except (OSError, ValueError) as err:
        return f"{path}: cannot load it ({err})"
    if found != sys.hexversion:
        return (f"{path} is Python {found >> 24}.{(found >> 16) & 255}.{(found >> 8) & 255}, this interpreter "
                f"({sys.executable}) is {sys.version.split()[0]}: use the Python that library belongs to "
                f"(Debian: /usr/bin/python{version})")
    return None


if __name__ == "__main__":
    reason = problem()
    if reason:
        print(reason, file=sys.stderr)
    sys.exit(1 if reason else 0)
