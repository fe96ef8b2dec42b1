"""AutoSelect (METHODS.md, AutoSelect): scorer, top-K, checkpoints, on hand-made inputs."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeprune.errors import PrunerConfigError
from edgeprune.export.lint import lint
from edgeprune.export.pruner_graph import export_pruner
from edgeprune.pruners import build
from edgeprune.pruners.autoselect import DEFAULT_DEPTH, DEFAULT_WIDTH, Scorer, default_heads, load_scorer, save_scorer


def first_channel_scorer(dim: int = 4, depth: int = 2) -> Scorer:
    """A Scorer whose blocks are identities (zero output projections) and whose head reads channel 0."""
    scorer = Scorer(dim, depth=depth, heads=2)
    with torch.no_grad():
        for block in scorer.blocks:
            for layer in (block.proj, block.mlp[2]):
                layer.weight.zero_()
                layer.bias.zero_()
        scorer.head.weight.copy_(torch.eye(dim)[:1])
        scorer.head.bias.zero_()
    return scorer.eval()


def hand_signals():
    # channel 0 of feats is the score; tokens carry their own index so the gather is visible
    score = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.5],
                          [0.6, 0.6, 0.1, 0.2, 0.6, 0.9, 0.3, 0.0]])   # row 1: a three-way tie at 0.6
    feats = torch.zeros(2, 8, 4)
    feats[..., 0] = score
    feats[..., 1] = 1.0
    tokens = torch.arange(8.0).view(1, 8, 1).expand(2, 8, 3) + torch.tensor([[[0.0]], [[100.0]]])
    return {"tokens": tokens, "feats": feats}


def test_scorer_shape_and_heads():
    assert Scorer(24).heads == 8 and Scorer(24)(torch.randn(2, 5, 24)).shape == (2, 5)
    narrow = Scorer(24, depth=1, width=8)                      # Down: Linear(24, 8), then one block at 8
    assert narrow.down.weight.shape == (8, 24) and narrow.heads == 8 and narrow(torch.randn(2, 5, 24)).shape == (2, 5)
    assert not hasattr(Scorer(24, width=24), "down")            # width = dim: no down-projection
    with pytest.raises(PrunerConfigError, match="heads=3 does not divide width=8"):
        Scorer(24, width=8, heads=3)
    assert [default_heads(d) for d in (1024, 1152, 18, 9, 10, 7)] == [8, 8, 6, 3, 2, 1]
    with pytest.raises(PrunerConfigError, match="heads=5 does not divide dim=24"):
        Scorer(24, heads=5)


def test_hand_set_scorer_selects_exact_top_k():
    sig = hand_signals()
    pruner = build("autoselect", keep=3, scorer=first_channel_scorer())
    torch.testing.assert_close(pruner.scorer(sig["feats"]), sig["feats"][..., 0])
    sel = pruner(**sig)
    # row 0: 0.9 (1), 0.8 (3), 0.7 (5); row 1: 0.9 (5) then the tie at 0.6 goes to the lowest indices 0, 1
    assert sel.positions.tolist() == [[1, 3, 5], [0, 1, 5]]
    assert sel.tokens[..., 0].tolist() == [[1.0, 3.0, 5.0], [100.0, 101.0, 105.0]]  # gathered from `tokens`


def test_scorer_given_as_any_module():
    class SecondChannel(nn.Module):
        def forward(self, feats):
            return feats[..., 1]

    sig = hand_signals()
    sig["feats"][..., 1] = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    sel = build("autoselect", keep=2, scorer=SecondChannel())(**sig)
    assert sel.positions.tolist() == [[6, 7], [6, 7]]


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    scorer = Scorer(8, depth=1, heads=2).eval()
    path = save_scorer(scorer, tmp_path / "scorer.safetensors")
    loaded = load_scorer(path)
    assert loaded.config() == {"dim": 8, "depth": 1, "heads": 2, "width": 8} and not loaded.training
    assert loaded.recipe is None
    feats = torch.randn(2, 10, 8)
    assert torch.equal(loaded(feats), scorer(feats))
    sig = {"tokens": torch.randn(2, 10, 5), "feats": feats}
    from_path = build("autoselect", keep=4, scorer=str(path))(**sig)
    from_module = build("autoselect", keep=4, scorer=scorer)(**sig)
    assert torch.equal(from_path.positions, from_module.positions)


def test_narrow_checkpoint_round_trip_with_recipe_and_record(tmp_path):
    torch.manual_seed(0)
    scorer = Scorer(12, depth=2, width=4, heads=2).eval()
    path = save_scorer(scorer, tmp_path / "narrow.safetensors", recipe="test-recipe-7")
    loaded = load_scorer(path)
    assert loaded.config() == {"dim": 12, "depth": 2, "heads": 2, "width": 4} and loaded.recipe == "test-recipe-7"
    feats = torch.randn(1, 9, 12)
    assert torch.equal(loaded(feats), scorer(feats))
    import hashlib

    record = build("autoselect", keep=3, scorer=path).scorer_record()
    assert record == {"file": "narrow.safetensors", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "recipe": "test-recipe-7", "trained": True}


def test_format_1_checkpoint_without_width_still_loads(tmp_path):
    """Files written before the narrow scorer (format 1: dim, depth, heads only) keep loading at full width."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    old = Scorer(8, depth=1, heads=2)
    path = tmp_path / "old.safetensors"
    save_file(old.state_dict(), str(path), metadata={"edgeprune.scorer.dim": "8", "edgeprune.scorer.depth": "1",
                                                     "edgeprune.scorer.heads": "2", "edgeprune.scorer.format": "1"})
    feats = torch.randn(1, 5, 8)
    assert torch.equal(load_scorer(path)(feats), old(feats))


def test_no_scorer_is_a_clear_error_and_random_is_explicit():
    with pytest.raises(PrunerConfigError, match=r"needs a trained scorer.*--scorer.*`edgeprune train`.*scorer='random'"):
        build("autoselect", keep=4)
    random = build("autoselect", keep=4, scorer="random")
    assert not random.trained and random.label() == "autoselect (untrained)"
    assert random.scorer_record() == {"file": None, "sha256": None, "recipe": "random", "trained": False, "seed": 0}
    trained = build("autoselect", keep=4, scorer=first_channel_scorer())
    assert trained.trained and trained.label() == "autoselect"


def test_bad_checkpoint_is_clear(tmp_path):
    with pytest.raises(PrunerConfigError, match="missing.safetensors' does not exist"):
        build("autoselect", keep=2, scorer=tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PrunerConfigError, match="is not a readable safetensors file"):
        load_scorer(garbage)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(Scorer(8, depth=1).state_dict(), str(bare))           # no config in the metadata
    with pytest.raises(PrunerConfigError, match="has no scorer config in its metadata"):
        load_scorer(bare)
    lying = tmp_path / "lying.safetensors"
    save_file(Scorer(8, depth=1, heads=2).state_dict(), str(lying),
              metadata={"edgeprune.scorer.dim": "16", "edgeprune.scorer.depth": "1", "edgeprune.scorer.heads": "2"})
    with pytest.raises(PrunerConfigError, match="does not match its config"):
        load_scorer(lying)


def test_width_mismatch_is_clear():
    sig = {"tokens": torch.randn(1, 6, 4), "feats": torch.randn(1, 6, 24)}
    with pytest.raises(PrunerConfigError, match="feats have C=24, the scorer expects C=8"):
        build("autoselect", keep=2, scorer="random", dim=8)(**sig)
    with pytest.raises(PrunerConfigError, match="dim=16 but the scorer's width is 8"):
        build("autoselect", keep=2, scorer=Scorer(8), dim=16)
    with pytest.raises(PrunerConfigError, match="scorer=3, expected a checkpoint path, an nn.Module"):
        build("autoselect", keep=2, scorer=3)


def test_random_scorer_is_seeded_and_lazy():
    feats = torch.randn(2, 12, 24)
    sig = {"tokens": torch.randn(2, 12, 4), "feats": feats}
    lazy = build("autoselect", keep=5, scorer="random")
    assert lazy.scorer is None
    state = torch.random.get_rng_state()
    out = lazy(**sig)
    assert torch.equal(torch.random.get_rng_state(), state)          # the caller's RNG is untouched
    # the default architecture: narrow (width capped at C = 24 here), DEFAULT_DEPTH blocks
    assert lazy.scorer.config() == {"dim": 24, "depth": DEFAULT_DEPTH, "heads": 8, "width": min(DEFAULT_WIDTH, 24)}
    eager = build("autoselect", keep=5, scorer="random", dim=24)      # same seed, built up front: same scorer
    assert torch.equal(eager.scorer(feats), lazy.scorer(feats))
    assert torch.equal(eager(**sig).positions, out.positions)
    other = build("autoselect", keep=5, scorer="random", dim=24, seed=1)
    wide = build("autoselect", keep=5, scorer="random", dim=24, width=None, depth=2)     # METHODS.md's original
    assert wide.scorer.config() == {"dim": 24, "depth": 2, "heads": 8, "width": 24}
    assert not torch.equal(other.scorer(feats), lazy.scorer(feats))


def test_onnx_parity_with_a_deeper_scorer(tmp_path):
    torch.manual_seed(1)
    scorer = Scorer(32, depth=3, heads=4)
    g = torch.Generator().manual_seed(0)
    sig = {"tokens": torch.randn(2, 36, 16, generator=g), "feats": torch.randn(2, 36, 32, generator=g), "grid": (6, 6)}
    pruner = build("autoselect", keep=9, scorer=scorer)
    path = export_pruner(pruner, sig, tmp_path / "autoselect.onnx")
    assert lint(path) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens, positions = session.run(None, {"tokens": sig["tokens"].numpy(), "feats": sig["feats"].numpy()})
    expected = pruner(**sig)
    np.testing.assert_array_equal(positions, expected.positions.numpy())
    np.testing.assert_allclose(tokens, expected.tokens.numpy(), atol=1e-6, rtol=0)


def test_quality_notice_reads_the_recipe_measurement(tmp_path):
    import json

    from edgeprune.pruners.autoselect import quality_notice

    path = tmp_path / "s.safetensors"
    save_scorer(Scorer(16, depth=0), path)
    side = path.with_suffix(".json")
    assert quality_notice(path) is None                                 # no JSON beside it
    acc = {"autoselect": {"16": 0.2, "32": 0.5, "64": 0.6}, "divprune": {"16": 0.45, "32": 0.61, "64": 0.63},
           "uniform": {"16": 0.19, "32": 0.55}, "autoselect (untrained)": {"16": 0.9, "32": 0.9, "64": 0.9}}
    record = {"recipe_id": "r-1", "sha256": "abc", "measured": {"accuracy": acc, "n": 300, "see": "docs/x.md"}}
    side.write_text(json.dumps(record))
    # compared at the K every other method has (16, 32); the best of them over those K is divprune;
    # the untrained baseline is never "the better choice"
    assert quality_notice(path, "abc") == (
        "notice: the s.safetensors scorer (recipe r-1) measured 0.200 / 0.500 at K = 16 / 32 against divprune's "
        "0.450 / 0.610 (VLM exact match, n = 300 held-out images; docs/x.md): below the training-free methods; "
        "--method divprune is the more accurate choice")
    assert quality_notice(path, "another-sha") is None                  # the JSON describes another file
    acc["autoselect"].update({"16": 0.5, "32": 0.7})                    # at or above every method: no notice
    side.write_text(json.dumps(record))
    assert quality_notice(path, "abc") is None
