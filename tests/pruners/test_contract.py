"""The common contract of METHODS.md, checked for every registered pruner (a new one is tested on registration)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeprune.errors import PrunerConfigError
from edgeprune.export.lint import lint
from edgeprune.export.pruner_graph import export_pruner
from edgeprune.pruners import available, build
from tests.conftest import baseline_options, make_signals, row

METHODS = sorted(available())


def out_signal(name: str) -> str:
    return available()[name].space


def check_selection(sel, signals, name, keep):
    x = signals[out_signal(name)]
    b, n = x.shape[:2]
    assert sel.tokens.shape == (b, keep, x.shape[-1])
    assert sel.positions.shape == (b, keep) and sel.positions.dtype == torch.int64
    pos = sel.positions
    assert bool(((pos >= 0) & (pos < n)).all()), "positions out of range"
    assert bool((pos[:, 1:] > pos[:, :-1]).all()), "positions not strictly ascending (or not unique)"
    assert torch.isfinite(sel.tokens).all()


@pytest.mark.parametrize("name", METHODS)
def test_contract_shapes_and_positions(name, signals):
    sel = build(name, keep=64, **baseline_options(name))(**signals)
    check_selection(sel, signals, name, 64)
    assert set(sel.extras) == set(available()[name].extra_outputs)


@pytest.mark.parametrize("name", METHODS)
def test_keep_equals_n_returns_input(name):
    signals = make_signals(grid=(4, 5))
    sel = build(name, keep=20, **baseline_options(name))(**signals)
    x = signals[out_signal(name)]
    assert torch.equal(sel.tokens, x)
    assert torch.equal(sel.positions, torch.arange(20).expand(2, 20))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(METHODS), h=st.integers(2, 7), w=st.integers(2, 7), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16), data=st.data())
def test_properties(name, h, w, batch, seed, data):
    signals = make_signals(batch=batch, grid=(h, w), seed=seed)
    keep = data.draw(st.integers(1, h * w), label="keep")
    pruner = build(name, keep=keep, **baseline_options(name))
    sel = pruner(**signals)
    check_selection(sel, signals, name, keep)
    again = pruner(**signals)  # deterministic
    assert torch.equal(sel.positions, again.positions) and torch.equal(sel.tokens, again.tokens)
    for b in range(batch):     # rows are pruned independently
        alone = pruner(**row(signals, b))
        assert torch.equal(alone.positions[0], sel.positions[b])
        torch.testing.assert_close(alone.tokens[0], sel.tokens[b], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("keep", [0, -1, 577])
def test_bad_keep_is_clear_error(name, keep, signals):
    with pytest.raises(PrunerConfigError, match=rf"{name}: keep={keep}"):
        build(name, keep=keep, **baseline_options(name))(**signals)


@pytest.mark.parametrize("name", METHODS)
def test_missing_signal_is_named(name, signals):
    needed = [s for s in available()[name].requires if s != "grid"]
    partial = {k: v for k, v in signals.items() if k != needed[0]}
    with pytest.raises(PrunerConfigError, match=rf"missing signal\(s\) {needed[0]}"):
        build(name, keep=8, **baseline_options(name))(**partial)


@pytest.mark.parametrize("name", METHODS)
def test_wrong_rank_and_nan_are_named(name, signals):
    needed = [s for s in available()[name].requires if s != "grid"]
    bad = dict(signals, **{needed[0]: signals[needed[0]][0]})
    with pytest.raises(PrunerConfigError, match=rf"signal '{needed[0]}' has shape .* expected rank"):
        build(name, keep=8, **baseline_options(name))(**bad)
    poisoned = signals[needed[-1]].clone()
    poisoned.view(-1)[3] = float("nan")
    with pytest.raises(PrunerConfigError, match=rf"signal '{needed[-1]}' contains NaN"):
        build(name, keep=8, **baseline_options(name))(**dict(signals, **{needed[-1]: poisoned}))


@pytest.mark.parametrize("name,cfg", [(m, {}) for m in METHODS] + [("adbts", {"threshold": 0.0})])  # + the fusion branch
@pytest.mark.parametrize("keep", [1, 7, 64])
def test_weights_reproduce_the_tokens(name, cfg, keep, signals):
    """Selection.weights (or the gather at positions when None) applied to the space signal gives the tokens:
    what lets an adapter carry other per-token features through the same gather or merge (DeepStack)."""
    from edgeprune.pruners.ops import apply_selection

    sel = build(name, keep=keep, **baseline_options(name), **cfg)(**signals)
    x = signals[out_signal(name)]
    if sel.weights is not None:
        assert sel.weights.shape == (x.shape[0], keep, x.shape[1])
    torch.testing.assert_close(apply_selection(sel, x), sel.tokens, rtol=1e-5, atol=1e-5)
    wide = torch.stack([x, 2 * x], dim=2)                                  # [B, N, 2, D]: extra axes are carried
    torch.testing.assert_close(apply_selection(sel, wide)[:, :, 1], 2 * sel.tokens, rtol=1e-5, atol=1e-5)


def test_unknown_method_and_option():
    with pytest.raises(PrunerConfigError, match=r"unknown pruner 'divprun'; available: .*attention"):
        build("divprun", keep=4)
    with pytest.raises(PrunerConfigError, match=r"random: unknown option\(s\) sed; accepted: seed"):
        build("random", keep=4, sed=1)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("grid,keep", [((24, 24), 64), ((48, 48), 320)])
def test_onnx_parity_and_lint(name, grid, keep, tmp_path):
    """Torch vs ONNX Runtime: identical positions, tokens within 1e-5, a TensorRT-clean graph."""
    signals = make_signals(batch=2, grid=grid, dim=64, seed=1)
    pruner = build(name, keep=keep, **baseline_options(name))
    ref = pruner(**signals)
    path = export_pruner(pruner, signals, tmp_path / f"{name}.onnx")
    assert lint(path) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = make_signals(batch=3, grid=grid, dim=64, seed=2)  # a different batch size than traced
    for sig in (signals, other):
        expected = pruner(**sig)
        feeds = {i.name: sig[i.name].numpy() for i in session.get_inputs()}
        outputs = session.run(None, feeds)
        got_tokens, got_positions = outputs[:2]
        mismatch = np.nonzero((got_positions != expected.positions.numpy()).any(axis=1))[0]
        assert mismatch.size == 0, f"positions differ in rows {mismatch.tolist()}"
        err = np.abs(got_tokens - expected.tokens.numpy()).max(axis=(1, 2))
        assert err.max() <= 1e-5, f"worst row {int(err.argmax())}: max abs diff {err.max():.2e}"
        for name_out, value in zip(available()[name].extra_outputs, outputs[2:]):
            np.testing.assert_allclose(value, expected.extras[name_out].numpy(), atol=1e-5)
    del ref
