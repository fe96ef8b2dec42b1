"""The CLI starts without torch: `edgeprune --help` and `edgeprune run --help` import neither torch nor
the pruners (asserted on sys.modules of a fresh process calling the real `cli.main`), the static
method table matches the registry, and logging follows -v / -q through tqdm."""
from __future__ import annotations

import json
import os
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeprune.cli import main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "onnx", "edgeprune.pruners", "edgeprune.models", "edgeprune.export")


def main_in_fresh_process(*argvs: list[str]) -> dict:
    """Call cli.main(argv) for each argv in one new interpreter; its exit codes and the heavy modules
    it imported (a name in HEAVY or below one)."""
    code = textwrap.dedent(f"""
        import json, sys
        from edgeprune.cli import main
        codes = []
        for argv in {[list(a) for a in argvs]!r}:
            try:
                codes.append(main(argv))
            except SystemExit as exit:          # --help exits through argparse
                codes.append(exit.code)
        heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY!r}))
        print(json.dumps({{"codes": codes, "heavy": heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stdout": proc.stdout, "stderr": proc.stderr}


def test_help_imports_neither_torch_nor_the_pruners():
    out = main_in_fresh_process(["--help"], ["run", "--help"], ["export", "--help"], ["sweep", "--help"])
    assert out["codes"] == [0, 0, 0, 0]
    assert out["heavy"] == []
    assert "usage: edgeprune run" in out["stdout"]
    assert "{adbts,attention,autoselect," in out["stdout"]          # export's --method choices, from the table


def test_method_table_matches_the_registry():
    from edgeprune.cli.method_names import METHOD_NAMES
    from edgeprune.pruners import available

    assert METHOD_NAMES == tuple(available()), (
        f"edgeprune/cli/method_names.py is out of date; set METHOD_NAMES = {tuple(available())!r}")


def test_stage_method_table_matches_the_inllm_registry():
    from edgeprune.cli.method_names import STAGE_METHOD_NAMES
    from edgeprune.inllm import available

    assert STAGE_METHOD_NAMES == tuple(available()), (
        f"edgeprune/cli/method_names.py is out of date; set STAGE_METHOD_NAMES = {tuple(available())!r}")


def test_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["export", "--method", "divprun", "--out", "x"])
    assert exit.value.code == 2
    assert "invalid choice: 'divprun'" in capsys.readouterr().err


@pytest.mark.parametrize("flags,shown,hidden", [
    ([], ["WARNING edgeprune.test: warn"], ["info", "debug"]),
    (["-v"], ["INFO edgeprune.test: info", "WARNING edgeprune.test: warn"], ["debug"]),
    (["-vv"], ["DEBUG edgeprune.test: debug"], []),
    (["-q"], [], ["warn", "info"]),
])
def test_log_level_and_lines_go_through_tqdm(monkeypatch, capsys, flags, shown, hidden):
    from edgeprune.cli import methods

    seen = {}

    def fake_run(args) -> int:
        log = logging.getLogger("edgeprune.test")
        log.debug("debug")
        log.info("info")
        log.warning("warn")
        seen["handlers"] = [type(h).__name__ for h in logging.getLogger().handlers]
        return 0

    monkeypatch.setattr(methods, "run", fake_run)
    assert main(["methods", *flags]) == 0
    assert seen["handlers"] == ["_TqdmLoggingHandler"]     # written with tqdm.write: never on a bar's line
    err = capsys.readouterr().err
    for line in shown:
        assert line in err
    for word in hidden:
        assert f": {word}" not in err


def test_a_closed_stdout_pipe_ends_quietly():
    """`edgeprune methods | head -0`: the reader is gone before the first line; exit 141 like a Unix
    tool killed by SIGPIPE, with nothing on stderr (no 'error: Broken pipe', no 'Exception ignored')."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeprune.cli", "methods"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=240)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")
