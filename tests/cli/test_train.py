"""`edgeprune train`: a short run on tiny-llava, resume, the checkpoint the autoselect pruner loads, errors."""
from __future__ import annotations

import pytest
import torch

from edgeprune.cli import main
from edgeprune.pruners import build
from edgeprune.train.data import write_skimage_dataset
from edgeprune.train.trainer import state_path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_skimage_dataset(tmp_path_factory.mktemp("data"))


def test_train_then_resume_then_prune(data, tmp_path, capsys):
    out = tmp_path / "scorer.safetensors"
    common = ["train", "--model", "tiny-llava", "--data", str(data), "--keep", "64", "--out", str(out),
              "--batch-size", "1", "--lr", "1e-3", "--seed", "1", "--depth", "1", "--no-progress", "-q"]
    assert main([*common, "--steps", "2"]) == 0
    assert out.is_file() and state_path(out).is_file()
    assert f"--scorer {out} --keep 64" in capsys.readouterr().out
    assert torch.load(state_path(out), weights_only=True)["step"] == 2
    assert main([*common, "--steps", "3", "--resume"]) == 0
    state = torch.load(state_path(out), weights_only=True)
    assert state["step"] == 3 and len(state["losses"]) == 3 and state["config"]["steps"] == 3
    pruner = build("autoselect", keep=64, scorer=str(out))
    feats = torch.randn(1, 576, 64)
    sel = pruner(tokens=torch.randn(1, 576, 64), feats=feats)
    assert sel.positions.shape == (1, 64)
    # an existing run is not overwritten by accident
    assert main([*common, "--steps", "3"]) == 1
    assert "pass --resume" in capsys.readouterr().err


def test_errors_are_one_line(data, tmp_path, capsys):
    base = ["train", "--model", "tiny-llava", "--steps", "1", "--no-progress"]
    assert main([*base, "--data", str(data), "--keep", "64", "--out", str(tmp_path / "x.safetensors"),
                 "--resume"]) == 1
    assert "--resume: " in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "none.jsonl"), "--keep", "64",
                 "--out", str(tmp_path / "y.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main([*base, "--data", str(data), "--keep", "0", "--out", str(tmp_path / "z.safetensors")]) == 1
    assert "keep=0, expected >= 1" in capsys.readouterr().err
    assert main([*base, "--data", str(data), "--keep", "577", "--out", str(tmp_path / "w.safetensors")]) == 1
    assert "--keep 577: expected 1 <= keep <= N=576" in capsys.readouterr().err
