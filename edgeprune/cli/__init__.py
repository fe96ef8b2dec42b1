"""The `edgeprune` command. Subcommands are listed once, here; each is a module of this package
with `add_parser(subparsers)` and `run(args) -> int` (STYLE.md section 3).

Heavy imports (torch, onnx) happen inside each `run()`: building the parser imports neither torch
nor the pruners (method names come from the static cli/method_names.py), so `edgeprune --help` starts
at once and `edgeprune run` works on a runtime-only install (tests/cli/test_startup.py checks both).
A subcommand whose module cannot be imported still shows up and explains.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading

from edgeprune import __version__
from edgeprune.errors import EdgepruneError

# name -> module under edgeprune.cli (the module's docstring first line is the --help summary)
SUBCOMMANDS: dict[str, str] = {
    "methods": "methods",
    "generate": "generate",
    "export": "export",
    "run": "run",
    "inspect": "inspect",
    "build-engine": "build_engine",
    "train": "train",
    "profile": "profile",
    "sweep": "sweep",
    "plan": "plan",
    "eval": "eval",
    "calibrate": "calibrate",
    "serve": "serve",
    "triton-repo": "triton_repo",
    "bench-serve": "bench_serve",
}

log = logging.getLogger("edgeprune")


class _MissingSubcommand:
    """Stands in for a subcommand whose module failed to import (e.g. a dependency is absent)."""

    def __init__(self, name: str, error: Exception):
        self.name, self.error = name, error
        self.__doc__ = f"(unavailable: {error})"

    def add_parser(self, subparsers):
        p = subparsers.add_parser(self.name, help=self.__doc__, add_help=True)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return p

    def run(self, args) -> int:
        raise EdgepruneError(f"'{self.name}' is unavailable here: {self.error}")


def _load(name: str, module: str):
    try:
        return importlib.import_module(f"edgeprune.cli.{module}")
    except ImportError as err:
        return _MissingSubcommand(name, err)


def build_parser() -> argparse.ArgumentParser:
    from edgeprune.cli import args as common

    parser = argparse.ArgumentParser(
        prog="edgeprune", description="Visual-token pruning compiled into the exported vision graph of VLMs.")
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        mod = _load(name, module)
        sub = mod.add_parser(subparsers)
        common.add_logging_args(sub)
        sub.set_defaults(_run=mod.run)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so what a command cleans up on an
    interrupt (an export's temp folder, a lock) is cleaned up on `kill` too."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 an error (one line on stderr), 2 a usage error (argparse), 130 Ctrl-C,
    141 the reader of stdout went away (`edgeprune inspect B | head`: quiet, as for any Unix tool),
    143 SIGTERM. Ctrl-C and SIGTERM are caught from the start (parser included), so neither prints a
    traceback; log lines are written through the progress bars while the command runs."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    command = "command"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        from edgeprune.cli.args import setup_logging

        setup_logging(args)
        with _logs_through_progress_bars():
            code = int(args._run(args) or 0)
        sys.stdout.flush()   # a closed pipe fails here, inside the handlers, not at interpreter exit
        return code
    except EdgepruneError as err:
        print(f"edgeprune {command}: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Python's recipe: point stdout at devnull so the flush at interpreter exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:   # the machine's, not the input's: a full or read-only disk, a permission
        print(f"edgeprune {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _logs_through_progress_bars():
    """Log lines are written with tqdm.write while the command runs, so they never share a line with a
    progress bar (tqdm's own redirect). A runtime-only install may lack tqdm: plain logging then."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        return contextlib.nullcontext()
    return logging_redirect_tqdm()


if __name__ == "__main__":
    sys.exit(main())
