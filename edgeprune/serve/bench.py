"""`edgeprune bench-serve`: start `edgeprune serve` on loopback, drive it from concurrent clients, print a table.

The workload cycles over W distinct requests (an image + a prompt; prompts of different lengths, so batches mix
prompt lengths). Their single-request answers come first, one at a time through the same server (each alone in
its batch); then, per concurrency level, C client threads send `requests` requests between them (the levels
interleaved round-robin over `rounds` rounds), and every greedy answer must equal its single-request answer: a
request with no answer (error, timeout, out of time) is lost, one with another answer is mismatched. With `bad_every`, every n-th request is broken on purpose (corrupt image,
over-long prompt, bad parameter, in turn): it must fail alone, with an error, and counts as lost otherwise.
The server's RSS (its process and Triton's, psutil) is read before and after each round of each level.
Bounded in count and time: at most `requests` per level, MAX_CLIENTS clients, `time_limit_s` per level.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.serve.protocol import Limits

__all__ = ["BenchOptions", "run_bench", "ServerProcess", "workload", "free_ports"]

PROMPTS = ("What item of clothing is this?", "Describe the object.",
           "Look at the picture carefully and name the single garment or accessory that it shows.")
MAX_CLIENTS = 64


@dataclass(frozen=True)
class BenchOptions:
    clients: tuple[int, ...] = (1, 4, 16)
    requests: int = 100                 # per concurrency level
    distinct: int = 12                  # W: distinct requests in the workload
    max_new_tokens: int = 16
    rounds: int = 3                     # levels interleaved round-robin, each round a share of the requests
    time_limit_s: float = 900.0         # per level (over its rounds); requests not answered by then are lost
    request_timeout_s: float = 300.0
    bad_every: int = 0                  # 0: no broken requests
    server_args: tuple[str, ...] = ()   # passed to `edgeprune serve`
    limits: Limits = Limits()           # the server's (for the broken requests)


@dataclass
class Level:
    clients: int
    sent: int = 0
    latencies: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    lost: int = 0
    mismatched: int = 0
    bad_refused: int = 0
    wall_s: float = 0.0
    rss_mib: tuple[float, float] = (0.0, 0.0)
    problems: list[str] = field(default_factory=list)

    def add(self, part: "Level") -> None:
        """Fold one round of this level in (RSS: the first round's start, the last round's end)."""
        for name in ("sent", "lost", "mismatched", "bad_refused", "wall_s"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        self.latencies += part.latencies
        self.batches += part.batches
        self.problems += part.problems
        self.rss_mib = (self.rss_mib[0] if self.sent > part.sent else part.rss_mib[0], part.rss_mib[1])


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (bound then released: another process could take one meanwhile)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def workload(distinct: int) -> list[tuple[bytes, str]]:
    """W (PNG bytes, prompt) pairs: Fashion-MNIST test images where the Debian package is installed (what
    edgeprune-mini answers about), else seeded random images; prompts of three lengths in turn."""
    from edgeprune.eval.data import data_available, eval_indices, load_split

    if data_available():
        images, _ = load_split("test")
        pictures = [images[i] for i in eval_indices(distinct, seed=18)]
    else:
        rng = np.random.default_rng(18)
        pictures = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(distinct)]
    return [(_png(p), PROMPTS[i % len(PROMPTS)]) for i, p in enumerate(pictures)]


def request_tensors(image: bytes, prompt: str, max_new_tokens: int) -> dict:
    return {"image": np.array([[image]], dtype=object), "prompt": np.array([[prompt.encode()]], dtype=object),
            "max_new_tokens": np.array([[max_new_tokens]], dtype=np.int32)}


def broken_tensors(kind: int, image: bytes, prompt: str, limits: Limits, max_new_tokens: int) -> dict:
    """A request that must fail: 0 corrupt image, 1 over-long prompt, 2 bad parameter."""
    if kind == 0:
        return request_tensors(image[: len(image) // 3], prompt, max_new_tokens)
    if kind == 1:
        return request_tensors(image, "word " * (limits.max_prompt_tokens * 2), max_new_tokens)
    return request_tensors(image, prompt, limits.max_new_tokens + 1)


class ServerProcess:
    """`edgeprune serve BUNDLE` in a child process on loopback ports; stopped with SIGINT (a clean Triton stop)."""

    def __init__(self, bundle: str | Path, args: tuple[str, ...] = (), openai: bool = False,
                 log_path: str | Path | None = None, python: str | None = None):
        http, grpc, metrics, openai_port = free_ports(4)
        self.url = f"http://127.0.0.1:{http}"
        self.openai_url = f"http://127.0.0.1:{openai_port}/v1" if openai else None
        cmd = [python or sys.executable, "-m", "edgeprune.cli", "serve", str(bundle), "--host", "127.0.0.1",
               "--port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--openai-port", str(openai_port if openai else 0), *args]
        self.log_path = Path(log_path) if log_path else None
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EdgepruneError(f"the server exited with code {self.proc.returncode} before it was ready"
                                     + (f" (log: {self.log_path})" if self.log_path else ""))
            try:
                urls = [f"{self.url}/v2/models/edgeprune/ready"] + ([self.openai_url[:-3] + "/health"]
                                                                     if self.openai_url else [])
                if all(urllib.request.urlopen(u, timeout=2).status == 200 for u in urls):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise EdgepruneError(f"the server was not ready after {timeout_s:.0f} s")

    def rss_mib(self) -> float:
        """RSS of the server process and its children (Triton, its Python backend stub), MiB."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
        except psutil.Error:
            return float("nan")

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)   # its own session: Triton and the stub go with it
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _answer(client, tensors: dict) -> tuple[str | None, str, int]:
    """-> (text or None, error, batch size) of one request."""
    out = client.infer(tensors)
    error = out["error"].reshape(-1)[0].decode("utf-8")
    if error:
        return None, error, int(out["batch_size"].reshape(-1)[0])
    return out["text"].reshape(-1)[0].decode("utf-8"), "", int(out["batch_size"].reshape(-1)[0])


def run_level(client, clients: int, indices: range, work: list, references: list[str], options: BenchOptions,
              limits: Limits, server: ServerProcess) -> Level:
    """Requests `indices` (request i asks work[i % W]) from `clients` concurrent clients."""
    level = Level(clients)
    lock = threading.Lock()
    counter = iter(indices)
    rss_start = server.rss_mib()
    start = time.perf_counter()
    deadline = start + options.time_limit_s / options.rounds

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            image, prompt = work[i % len(work)]
            bad = options.bad_every and (i + 1) % options.bad_every == 0
            tensors = (broken_tensors(i // options.bad_every % 3, image, prompt, limits, options.max_new_tokens)
                       if bad else request_tensors(image, prompt, options.max_new_tokens))
            t0 = time.perf_counter()
            try:
                text, error, batch = _answer(client, tensors)
            except Exception as err:  # timeout, connection reset: the request is lost
                text, error, batch = None, f"{type(err).__name__}: {err}", 0
            took = time.perf_counter() - t0
            with lock:
                level.sent += 1
                if bad:
                    level.bad_refused += bool(error)
                    if not error:
                        level.lost += 1
                        level.problems.append(f"request {i}: broken on purpose but answered {text!r}")
                    continue
                level.latencies.append(took)
                level.batches.append(batch)
                if text is None:
                    level.lost += 1
                    level.problems.append(f"request {i}: {error}")
                elif text != references[i % len(work)]:
                    level.mismatched += 1
                    level.problems.append(f"request {i}: {text!r} != single {references[i % len(work)]!r}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()) + options.request_timeout_s)
    level.wall_s = time.perf_counter() - start
    level.lost += len(indices) - level.sent            # never sent: out of time
    level.rss_mib = (rss_start, server.rss_mib())
    return level


def run_bench(bundle: str | Path, options: BenchOptions, out=sys.stdout, log_path: str | Path | None = None) -> int:
    """Run the benchmark, print the table; returns the count of lost or mismatched requests."""
    from edgeprune.serve.openai import TritonHttp

    if not options.clients or min(options.clients) < 1 or max(options.clients) > MAX_CLIENTS:
        raise EdgepruneError(f"--clients {','.join(map(str, options.clients))}: expected 1..{MAX_CLIENTS} each")
    if not 1 <= options.rounds <= options.requests:
        raise EdgepruneError(f"--requests {options.requests}, --rounds {options.rounds}: expected 1 <= rounds <= "
                             "requests")
    limits = options.limits
    work = workload(options.distinct)
    print(f"starting edgeprune serve {bundle} {' '.join(options.server_args)}", file=out, flush=True)
    with ServerProcess(bundle, options.server_args, log_path=log_path) as server:
        server.wait_ready()
        client = TritonHttp(server.url, timeout_s=options.request_timeout_s)
        references = []
        for image, prompt in work:
            text, error, _ = _answer(client, request_tensors(image, prompt, options.max_new_tokens))
            if text is None:
                raise EdgepruneError(f"single request failed: {error}")
            references.append(text)
        print(f"{len(work)} distinct requests answered one at a time (the references); e.g. {references[0]!r}",
              file=out, flush=True)
        levels = {clients: Level(clients) for clients in options.clients}
        print(HEADER, file=out, flush=True)
        for r in range(options.rounds):            # round-robin, so that load drifts hit every level alike
            share = range(r * options.requests // options.rounds, (r + 1) * options.requests // options.rounds)
            for clients in options.clients:
                part = run_level(client, clients, share, work, references, options, limits, server)
                levels[clients].add(part)
                print(f"{_row(part)}  (round {r + 1}/{options.rounds})", file=out, flush=True)
    levels = list(levels.values())
    _report(levels, options, out)
    return sum(level.lost + level.mismatched for level in levels)


HEADER = "clients  requests  req/s   p50 ms   p99 ms  mean batch  lost  mismatched  RSS MiB start -> end"


def _row(level: Level) -> str:
    lat = np.array(level.latencies) * 1000 if level.latencies else np.array([np.nan])
    rate = level.sent / level.wall_s if level.wall_s else float("nan")
    batch = float(np.mean(level.batches)) if level.batches else float("nan")
    return (f"{level.clients:7d}  {level.sent:8d}  {rate:5.2f}  {np.percentile(lat, 50):7.0f}  "
            f"{np.percentile(lat, 99):7.0f}  {batch:10.2f}  {level.lost:4d}  {level.mismatched:10d}  "
            f"{level.rss_mib[0]:.0f} -> {level.rss_mib[1]:.0f}")


def _report(levels: list[Level], options: BenchOptions, out) -> None:
    print(f"over {options.rounds} round(s):", file=out)
    print(HEADER, file=out)
    for level in levels:
        print(_row(level), file=out)
    rates = {level.clients: level.sent / level.wall_s for level in levels if level.wall_s}
    if len(rates) > 1:
        low, high = min(rates), max(rates)
        print(f"throughput at {high} clients / at {low}: {rates[high] / rates[low]:.2f}x", file=out)
    if options.bad_every:
        refused = sum(level.bad_refused for level in levels)
        print(f"broken requests (every {options.bad_every}th): {refused} refused with an error", file=out)
    for level in levels:
        for problem in level.problems[:5]:
            print(f"  {level.clients} clients: {problem}", file=out)
    total = options.requests * len(levels)
    bad = sum(level.lost + level.mismatched for level in levels)
    print(f"{total} requests, {bad} lost or mismatched", file=out, flush=True)
