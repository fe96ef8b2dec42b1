"""Memory probes: process RSS (always), GPU memory via NVML, Jetson unified memory via tegrastats.

Each probe reads what the machine offers and says so when it cannot (`available` False plus a
reason); nothing here fails because a tool is missing. Torch-free.
"""
from __future__ import annotations

import re
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil

__all__ = ["rss_bytes", "peak_rss_bytes", "RssSampler", "gpu_memory", "jetson_memory", "ProbeResult"]


@dataclass
class ProbeResult:
    available: bool
    used_bytes: int | None = None
    total_bytes: int | None = None
    source: str = ""
    reason: str = ""
    details: dict = field(default_factory=dict)


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples RSS in a background thread: the peak within a window (ru_maxrss only grows, so it
    cannot tell the peak of one stage from an earlier one)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RssSampler":
        self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def gpu_memory(index: int = 0) -> ProbeResult:
    """Used/total memory of GPU `index` through NVML (package nvidia-ml-py), when present."""
    try:
        import pynvml
    except ImportError:
        return ProbeResult(False, source="nvml", reason="pynvml (nvidia-ml-py) is not installed")
    try:
        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            return ProbeResult(True, used_bytes=int(info.used), total_bytes=int(info.total), source="nvml")
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # NVMLError subclasses: no driver, no device
        return ProbeResult(False, source="nvml", reason=f"NVML unavailable: {err}")


_TEGRA_RAM = re.compile(r"RAM (\d+)/(\d+)MB")


def parse_tegrastats(line: str) -> ProbeResult:
    """'RAM 2345/7620MB (lfb ...) ...' -> used/total bytes of the unified memory."""
    match = _TEGRA_RAM.search(line)
    if not match:
        return ProbeResult(False, source="tegrastats", reason=f"no RAM field in {line[:80]!r}")
    used, total = (int(v) * 1024**2 for v in match.groups())
    return ProbeResult(True, used_bytes=used, total_bytes=total, source="tegrastats")


def jetson_memory(timeout_s: float = 3.0) -> ProbeResult:
    """One reading of Jetson unified memory from tegrastats (or jtop), when present."""
    exe = shutil.which("tegrastats")
    if exe:
        try:
            proc = subprocess.Popen([exe, "--interval", "100"], stdout=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    line = proc.stdout.readline()
                    if line:
                        return parse_tegrastats(line)
            finally:
                proc.terminate()
                proc.wait(timeout=2)
        except OSError as err:
            return ProbeResult(False, source="tegrastats", reason=f"tegrastats failed: {err}")
        return ProbeResult(False, source="tegrastats", reason="tegrastats printed nothing in time")
    try:
        from jtop import jtop
    except ImportError:
        return ProbeResult(False, source="tegrastats", reason="not a Jetson: neither tegrastats nor jtop found")
    with jtop() as jetson:
        ram = jetson.memory["RAM"]
        return ProbeResult(True, used_bytes=int(ram["used"]) * 1024, total_bytes=int(ram["tot"]) * 1024, source="jtop")
