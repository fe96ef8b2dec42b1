"""The one vision step (models/vision_step.py): the exported graph's module, the torch reference and the
LLaVA-NeXT per-view path run the same code, so their tokens are identical, not merely close."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from edgeprune.export.validate import seeded_images
from edgeprune.export.vision import VisionGraph
from edgeprune.models import load
from edgeprune.models.vision_step import prune_and_project, signals_needed
from edgeprune.pruners import PrunerLike, build_for_model
from edgeprune.reference import encode_and_prune

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llava():
    return load("tiny-llava")


@pytest.fixture(scope="module")
def llava_next():
    return load("tiny-llava-next")


def _pixels(adapter, seed=5):
    return adapter.preprocess(seeded_images(adapter.preprocess_config.size, 2, seed=seed))


@pytest.mark.parametrize("model, method, keep", [
    ("llava", "attention", 16),      # tokens-space pruner
    ("llava", "visionzip", 16),      # feats-space pruner: projected after pruning
    ("llava", None, None),           # no pruner: all N tokens
    ("llava_next", "dart", 100),     # multi-view: K split across 5 views + 16 newlines
    ("llava_next", "visionzip", 100),
])
@torch.no_grad()
def test_graph_module_and_reference_give_identical_tokens(model, method, keep, request):
    adapter = request.getfixturevalue(model)
    pruner = adapter.build_pruner(method, keep) if method else None
    pixels = _pixels(adapter)
    ref_tokens, ref_positions = encode_and_prune(adapter, pruner, pixels)
    if pruner is None:
        assert ref_tokens.shape[1] == adapter.num_image_tokens
        return
    tokens, positions, *extras = VisionGraph(adapter, pruner).eval()(pixels)
    assert torch.equal(tokens, ref_tokens) and torch.equal(positions, ref_positions)
    assert positions.dtype == torch.int64 and tokens.shape == (2, keep, adapter.llm.config.hidden_size)


@torch.no_grad()
def test_prune_and_project_is_what_a_view_gets(llava_next):
    """A view of the multi-view pruner gets exactly what its method gives that view alone."""
    pixels = _pixels(llava_next)
    view_pruner = llava_next.build_pruner("visionzip", 100)
    signals = llava_next.encode(pixels, signals_needed(view_pruner))
    n = view_pruner.view_tokens
    base = {name: getattr(signals, name)[:, :n] for name in ("feats", "keys", "attn")}   # view 0: the base view
    sel = prune_and_project(view_pruner.pruners[0], {**base, "grid": view_pruner.view_grid}, llava_next.project)
    tokens, positions = encode_and_prune(llava_next, view_pruner, pixels)
    k0 = view_pruner.pruners[0].keep
    assert torch.equal(tokens[:, :k0], sel.tokens) and torch.equal(positions[:, :k0], sel.positions)


def test_signals_needed():
    assert signals_needed(None) == ("tokens",)
    assert signals_needed(build_for_model("attention", 8, {})) == ("tokens", "attn")
    assert signals_needed(build_for_model("visionzip", 8, {})) == ("feats", "keys", "attn")
    assert signals_needed(build_for_model("dart", 8, {})) == ("tokens",)


def test_multi_view_pruner_is_pruner_like(llava, llava_next):
    assert isinstance(llava.build_pruner("dart", 16), PrunerLike)
    view = llava_next.build_pruner("dart", 100)
    assert isinstance(view, PrunerLike) and view.keep == 100 and view.name == "dart"
    assert not isinstance(torch.nn.Linear(2, 2), PrunerLike)


def test_the_step_is_written_once():
    """The three callers (graph, reference, the tiled models' per-view pruner) compose encode -> prune ->
    project only through models/vision_step.py."""
    for rel in ("export/vision.py", "edgeprune/reference.py", "edgeprune/models/_tiles.py"):
        tree = ast.parse((ROOT / rel).read_text())
        calls = {node.func.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert "project" not in calls, f"{rel} projects pruned tokens itself"
        assert names & {"vision_step", "prune_and_project"}, rel
