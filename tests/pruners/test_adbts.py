"""AD-BTS (METHODS.md, AD-BTS): gate, routing, fusion branch, selection branch, on hand-made inputs."""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.export.lint import lint
from edgeprune.export.pruner_graph import export_pruner
from edgeprune.pruners import Pruner, Selection, available, build
from edgeprune.pruners import _registry
from edgeprune.pruners.uniform import uniform_positions

UNIT = {"pixel_mean": (0.0, 0.0, 0.0), "pixel_std": (1.0, 1.0, 1.0)}  # pixels are the [0, 1] image itself


def gray_pixels(img) -> torch.Tensor:
    """[h, w] or [B, h, w] gray image in [0, 1] -> [B, 3, h, w] with R = G = B (gray = the image)."""
    x = torch.as_tensor(img, dtype=torch.float32)
    x = x.unsqueeze(0) if x.dim() == 2 else x
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def checkerboard(h: int, w: int) -> torch.Tensor:
    return ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2).float()


def signals_for(pixels: torch.Tensor, grid=(4, 4), dim=8, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, n = pixels.shape[0], grid[0] * grid[1]
    return {"tokens": torch.randn(b, n, dim, generator=g), "attn": torch.rand(b, n, generator=g),
            "pixels": pixels, "grid": grid}


# -- gate: steps 1-3 (de-normalise, grayscale, forward differences) and S_flat ------------------------
def test_gradient_by_hand():
    img = [[0.0, 0.5, 0.5],
           [0.0, 0.0, 1.0],
           [0.25, 0.25, 0.25]]
    # |dI/du| (next column) + |dI/dv| (next row); the last column has no du, the last row no dv
    expected = torch.tensor([[0.5 + 0.0, 0.0 + 0.5, 0.0 + 0.5],
                             [0.0 + 0.25, 1.0 + 0.25, 0.0 + 0.75],
                             [0.0, 0.0, 0.0]])
    grad = build("adbts", keep=1, selection="attention", **UNIT).gradient(gray_pixels(img))
    torch.testing.assert_close(grad[0], expected, atol=1e-6, rtol=0)


def test_grayscale_weights_and_denormalisation():
    # only red changes, 0.2 -> 0.6 in [0, 1]: the gradient at (0, 0) is 0.299 * 0.4, once normalisation is undone
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 2.0)
    raw = torch.tensor([[[[0.2, 0.6]], [[0.7, 0.7]], [[0.1, 0.1]]]])             # [1, 3, 1, 2]
    pixels = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    pruner = build("adbts", keep=1, selection="attention", pixel_mean=mean, pixel_std=std)
    torch.testing.assert_close(pruner.gradient(pixels)[0, 0], torch.tensor([0.299 * 0.4, 0.0]), atol=1e-6, rtol=0)
    # green alone: weight 0.587
    raw_g = torch.tensor([[[[0.5, 0.5]], [[0.3, 0.8]], [[0.1, 0.1]]]])
    pixels_g = (raw_g - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(pruner.gradient(pixels_g)[0, 0, 0], torch.tensor(0.587 * 0.5), atol=1e-6, rtol=0)
    # without undoing the normalisation (unit mean/std) the same pixels give a 4x larger red step
    unit = build("adbts", keep=1, selection="attention", **UNIT)
    torch.testing.assert_close(unit.gradient(pixels)[0, 0, 0], torch.tensor(0.299 * 1.6), atol=1e-6, rtol=0)


def test_gate_flat_image_is_one():
    flat = gray_pixels(torch.full((28, 28), 0.3))
    assert build("adbts", keep=4, **UNIT).gate(flat).tolist() == [1.0]
    # the default CLIP mean/std: a normalised constant image is still flat
    assert build("adbts", keep=4).gate(torch.full((1, 3, 28, 28), -1.2)).tolist() == [1.0]


def test_gate_checkerboard_counts_only_the_corner():
    # every pixel differs from its right or lower neighbour by 1, except the bottom-right corner,
    # which has neither neighbour (forward differences are zero there)
    s_flat = build("adbts", keep=4, **UNIT).gate(gray_pixels(checkerboard(28, 28)))
    assert s_flat.dtype == torch.float32 and s_flat.shape == (1,)
    assert s_flat.item() == pytest.approx(1 / (28 * 28), abs=1e-9)


def test_gate_tau():
    ramp = gray_pixels(torch.arange(10.0).repeat(10, 1) * 0.04)    # du = 0.04 except the last column
    assert build("adbts", keep=1, tau=0.05, **UNIT).gate(ramp).item() == pytest.approx(1.0)
    assert build("adbts", keep=1, tau=0.03, **UNIT).gate(ramp).item() == pytest.approx(0.1)  # last column only


# -- routing: S_flat > threshold -> fusion, otherwise the selection method, per row -----------------
def test_flat_row_takes_fusion_textured_row_takes_selection():
    pixels = torch.cat([gray_pixels(torch.full((56, 56), 0.5)), gray_pixels(checkerboard(56, 56))])
    sig = signals_for(pixels)
    pruner = build("adbts", keep=5, selection="uniform", **UNIT)
    sel = pruner(**sig)
    anchors = torch.sort(torch.topk(sig["attn"][0], 5).indices).values
    assert sel.positions[0].tolist() == anchors.tolist()                         # fusion: top-K attn anchors
    assert sel.positions[1].tolist() == uniform_positions(5, (4, 4))             # selection: uniform's lattice
    fused_pos, fused_tok, _ = pruner.fuse(sig["tokens"], sig["attn"])
    torch.testing.assert_close(sel.tokens[0], fused_tok[0])
    torch.testing.assert_close(sel.tokens[1], sig["tokens"][1, uniform_positions(5, (4, 4))])
    assert sel.extras["gate"].tolist() == pytest.approx([1.0, 1 / 56**2])


def test_threshold_routes_each_row():
    # left half flat, right half checkerboard: S_flat = (28*27 + 1) / (28*56) = 0.483 (the flat half's last
    # column steps into the checkerboard, and the checkerboard's corner is flat)
    half = torch.cat([torch.full((28, 28), 0.2), checkerboard(28, 28)], dim=1)
    pixels = torch.cat([gray_pixels(half), gray_pixels(torch.zeros(28, 56)), gray_pixels(checkerboard(28, 56))])
    sig = signals_for(pixels)
    for threshold, route in ((0.4, [True, True, False]), (0.6, [False, True, False])):
        pruner = build("adbts", keep=3, selection="uniform", threshold=threshold, **UNIT)
        sel = pruner(**sig)
        fusion_pos, _, _ = pruner.fuse(sig["tokens"], sig["attn"])
        pruner_pos = torch.tensor(uniform_positions(3, (4, 4)))
        for b, fused in enumerate(route):
            expected = fusion_pos[b] if fused else pruner_pos
            assert sel.positions[b].tolist() == expected.tolist(), (threshold, b)
    assert sel.extras["gate"][0].item() == pytest.approx((28 * 27 + 1) / (28 * 56))


# -- fusion branch --------------------------------------------------------------------------------
def test_fusion_is_the_anchor_when_others_are_orthogonal():
    tokens = 20.0 * torch.eye(6).unsqueeze(0)                  # a.x_j = 0 for j != anchor, 400 for itself
    attn = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3]])
    positions, fused, _ = build("adbts", keep=2, selection="attention").fuse(tokens, attn)
    assert positions.tolist() == [[1, 3]]                      # anchors: top-2 attn, ascending
    torch.testing.assert_close(fused, tokens[:, [1, 3]], atol=1e-6, rtol=0)


def test_fusion_is_the_softmax_convex_combination():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(1, 7, 4, generator=g)
    attn = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    positions, fused, _ = build("adbts", keep=1, selection="attention").fuse(tokens, attn)
    a = tokens[0, 4]
    w = [math.exp(float(a @ tokens[0, j]) / 2.0) for j in range(7)]   # sqrt(D) = 2
    expected = sum(wj * tokens[0, j] for j, wj in enumerate(w)) / sum(w)
    assert positions.tolist() == [[4]]
    torch.testing.assert_close(fused[0, 0], expected, atol=1e-6, rtol=1e-6)
    # convex: inside the per-dimension range of the tokens
    assert bool((fused[0, 0] <= tokens[0].max(0).values + 1e-6).all())
    assert bool((fused[0, 0] >= tokens[0].min(0).values - 1e-6).all())


# -- configuration ----------------------------------------------------------------------------------
def test_default_selection_is_divprune_and_requires_follow_the_method():
    pruner = build("adbts", keep=4)
    assert pruner.selection == "divprune" and type(pruner.selector) is _registry._PRUNERS["divprune"]
    assert available()["adbts"].requires == ("tokens", "attn", "pixels")
    assert build("adbts", keep=4, selection="uniform").requires == ("tokens", "attn", "pixels", "grid")
    auto = build("adbts", keep=4, selection="autoselect", selection_options={"scorer": "random"})
    assert auto.requires == ("tokens", "attn", "pixels", "feats")
    assert build("adbts", keep=4, selection="random", selection_options={"seed": 3}).selector.seed == 3


def test_bad_configuration_is_clear(monkeypatch):
    with pytest.raises(PrunerConfigError, match="selection='adbts'"):
        build("adbts", keep=4, selection="adbts")
    with pytest.raises(PrunerConfigError, match="selection='nope' is not a pruner; available: .*attention"):
        build("adbts", keep=4, selection="nope")
    with pytest.raises(PrunerConfigError, match=r"attention: unknown option\(s\) seed"):
        build("adbts", keep=4, selection="attention", selection_options={"seed": 1})
    with pytest.raises(PrunerConfigError, match=r"pixel_mean=\(0.5, 0.5\), expected 3 floats"):
        build("adbts", keep=4, pixel_mean=(0.5, 0.5))
    with pytest.raises(PrunerConfigError, match="pixel_std=.*expected 3 positive floats"):
        build("adbts", keep=4, pixel_std=(0.5, 0.0, 0.5))
    with pytest.raises(PrunerConfigError, match="threshold=1.5"):
        build("adbts", keep=4, threshold=1.5)

    class FeatsSpace(Pruner):
        requires = ("feats",)
        space = "feats"

    monkeypatch.setitem(_registry._PRUNERS, "featsspace", FeatsSpace)
    with pytest.raises(PrunerConfigError, match="selection='featsspace' outputs 'feats'-space tokens"):
        build("adbts", keep=4, selection="featsspace")


def test_keep_equals_n_still_reports_the_gate():
    pixels = torch.cat([gray_pixels(torch.zeros(14, 14)), gray_pixels(checkerboard(14, 14))])
    sig = signals_for(pixels, grid=(2, 2))
    sel = build("adbts", keep=4, selection="attention", **UNIT)(**sig)
    assert isinstance(sel, Selection) and torch.equal(sel.tokens, sig["tokens"])
    assert sel.extras["gate"].tolist() == pytest.approx([1.0, 1 / 196])


def test_onnx_mixed_batch_parity(tmp_path):
    """Both routes in one exported graph: per-row Where, the gate as an extra output."""
    pixels = torch.cat([gray_pixels(torch.full((56, 56), 0.4)), gray_pixels(checkerboard(56, 56))])
    sig = signals_for(pixels, dim=16)
    pruner = build("adbts", keep=5, selection="uniform", **UNIT)
    path = export_pruner(pruner, sig, tmp_path / "adbts.onnx")
    assert lint(path) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for order in ([0, 1], [1, 0, 1]):  # another batch size and row order than traced
        rows = {k: (v if k == "grid" else v[order]) for k, v in sig.items()}
        expected = pruner(**rows)
        tokens, positions, gate = session.run(None, {i.name: rows[i.name].numpy() for i in session.get_inputs()})
        np.testing.assert_array_equal(positions, expected.positions.numpy())
        np.testing.assert_allclose(tokens, expected.tokens.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(gate, expected.extras["gate"].numpy(), atol=1e-7, rtol=0)
