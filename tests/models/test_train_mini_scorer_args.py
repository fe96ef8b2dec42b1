"""scripts/train_mini_scorer.py: argument errors are one clear line naming the value (no model is loaded)."""
from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("train_mini_scorer")


@pytest.mark.parametrize("argv,message", [
    (["--train-images", "30:10"], "'30:10': expected START:STOP image indices, START < STOP"),
    (["--keeps", "16,x"], "'16,x': expected comma-separated integers"),
    (["--keeps", "16,0"], "'16,0': expected comma-separated integers >= 1"),
    (["--keeps", "16,1000"], "--keeps 16,1000: every K must be <= 576"),
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--lr", "0"], "--lr 0.0: expected > 0"),
    (["--llm-tokens", "0.5"], "--llm-tokens 0.5: expected 0 (all tokens) or >= 1"),
])
def test_argument_errors_name_the_value(script, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        script.parse_args(argv + ["--out", str(tmp_path / "s.safetensors")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_output_needs_force(script, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(SystemExit):
        script.parse_args(["--out", str(out)])
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err
    assert out.read_bytes() == b"x"                     # the user's file is untouched
    assert script.parse_args(["--out", str(out), "--force"]).out == out
