"""scripts/align_mini_projector.py: the pieces that do not need the real model (fast)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import load_script


@pytest.fixture(scope="module")
def align():
    return load_script("align_mini_projector")


def test_stats_warm_start_matches_the_embedding_table(align):
    from edgeprune.models.mini import MiniProjector

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 49, 384, generator=gen).half() * 3 + 1          # [M, N, C], as cached
    table = torch.randn(1000, 576, generator=gen) * 0.05 + torch.linspace(-0.1, 0.1, 576)
    proj = MiniProjector.seeded(0)
    align.match_embedding_stats(proj, feats, table, torch.Generator().manual_seed(1), sample=294)
    with torch.no_grad():
        out = proj(feats.reshape(-1, 384).float())                          # all 294 tokens
    rms = lambda x: (x - x.mean(0)).pow(2).mean().sqrt()                    # noqa: E731
    # the sample drawn (with replacement) is not the whole set: close, not exact
    torch.testing.assert_close(out.mean(0), table.mean(0), atol=0.02, rtol=0)
    assert abs(rms(out) / rms(table) - 1) < 0.1


def test_sizes_spec(align):
    assert align.parse_sizes("336") == ([336], [1.0])
    assert align.parse_sizes("224:3,336:1") == ([224, 336], [3.0, 1.0])
    for bad in ("300", "224:0", "abc", "224:x"):
        with pytest.raises(SystemExit, match="--sizes"):
            align.parse_sizes(bad)


def test_refuses_to_overwrite_without_force(align, tmp_path):
    out = tmp_path / "projector.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="--force"):
        align.main(["--out", str(out)])
    assert out.read_bytes() == b"keep me"
