"""LLM-free evaluation (eval/probe.py): re-run of the ViT on kept patches and the linear probe."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.eval.probe import probe_accuracy, rerun_cls, train_probe
from edgeprune.models.mini import MiniAdapter


class _TinyVit:
    """The two adapter hooks rerun_cls uses, on a seeded random 2-layer Dinov2Model (grid 4x4)."""

    _embed = MiniAdapter._embed
    _layers = MiniAdapter._layers

    def __init__(self):
        from transformers import Dinov2Config, Dinov2Model

        torch.manual_seed(0)
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                           image_size=56, patch_size=14, layerscale_value=1.0)
        cfg._attn_implementation = "sdpa"
        self.vision = Dinov2Model(cfg).eval()


@pytest.fixture(scope="module")
def vit():
    return _TinyVit()


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def test_rerun_all_patches_is_the_unpruned_forward(vit, pixels):
    full = vit.vision(pixel_values=pixels).pooler_output                        # transformers' own forward
    torch.testing.assert_close(rerun_cls(vit, pixels, None), full, rtol=1e-5, atol=1e-5)
    every = torch.arange(16).unsqueeze(0).expand(2, 16)                          # K = N
    torch.testing.assert_close(rerun_cls(vit, pixels, every), full, rtol=1e-5, atol=1e-5)


def test_rerun_kept_patches_carry_their_own_positions(vit, pixels):
    kept = torch.tensor([[1, 5, 9, 14], [0, 2, 3, 15]])
    shuffled = kept[:, [2, 0, 3, 1]]
    out = rerun_cls(vit, pixels, kept)
    # attention is permutation-invariant once each patch has its own position embedding
    torch.testing.assert_close(rerun_cls(vit, pixels, shuffled), out, rtol=1e-5, atol=1e-5)
    # and the patches are really dropped: a different subset gives a different [CLS]
    assert not torch.allclose(rerun_cls(vit, pixels, kept.flip(0)), out, atol=1e-3)
    # same as running the model on a hand-gathered sequence
    emb = vit._embed(pixels)
    seq = torch.stack([emb[b, [0] + (kept[b] + 1).tolist()] for b in range(2)])
    for layer in vit.vision.encoder.layer:
        seq = layer(seq, None)
    torch.testing.assert_close(out, vit.vision.layernorm(seq[:, 0]), rtol=1e-5, atol=1e-5)


def test_probe_learns_separable_classes_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    labels = np.repeat(np.arange(3), 20)
    x = centres[labels] + torch.randn(60, 8, generator=g) * 0.3
    a, b = train_probe(x, labels, classes=3, seed=0, epochs=100), train_probe(x, labels, classes=3, seed=0, epochs=100)
    assert probe_accuracy(a, x, labels) == 1.0
    torch.testing.assert_close(a.linear.weight, b.linear.weight, rtol=0, atol=0)
