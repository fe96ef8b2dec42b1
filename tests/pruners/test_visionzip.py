"""visionzip, one test per METHODS.md step (VisionZip-style), exact indices on hand-made inputs."""
from __future__ import annotations

import pytest
import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners import build
from edgeprune.pruners.visionzip import split_budget
from tests.conftest import make_signals


def run(keep, feats, keys, attn, **cfg):
    return build("visionzip", keep=keep, **cfg)(feats=feats, keys=keys, attn=attn)


def test_default_split_54_plus_10_at_64():
    assert split_budget(64) == (54, 10)
    assert split_budget(128) == (108, 20)
    assert split_budget(1) == (0, 1)        # K = 1: a single contextual token
    assert split_budget(64, contextual=3) == (61, 3)
    pruner = build("visionzip", keep=64)
    assert (pruner.dominant_count, pruner.contextual_count) == (54, 10)


def test_default_split_in_forward():
    """At K = 64 on N = 576: the 54 top-attn tokens unchanged + 10 targets at the R // Kc spacing."""
    s = make_signals(batch=1, grid=(24, 24), seed=5)
    sel = run(64, s["feats"], s["keys"], s["attn"])
    top = torch.sort(s["attn"][0], descending=True, stable=True).indices[:54].tolist()
    rest = [i for i in range(576) if i not in set(top)]
    targets = rest[::522 // 10][:10]                                     # step 52
    assert sel.positions[0].tolist() == sorted(top + targets)
    dominant = [sel.positions[0].tolist().index(i) for i in top]
    assert torch.equal(sel.tokens[0, dominant], s["feats"][0, top])


@pytest.mark.parametrize("contextual", [0, 5, True, 1.5])
def test_bad_contextual_is_clear_error(contextual):
    with pytest.raises(PrunerConfigError, match=rf"visionzip: contextual={contextual!r}, expected"):
        build("visionzip", keep=4, contextual=contextual)


def test_step1_dominant_top_attn_ties_to_lowest_index():
    n = 12
    attn = torch.zeros(1, n)
    attn[0, [4, 1, 3, 7]] = torch.tensor([0.9, 0.5, 0.5, 0.5])          # top-3: 4, then 1 and 3 (7 loses the tie)
    feats = torch.arange(n * 2, dtype=torch.float32).view(1, n, 2)
    keys = torch.ones(1, n, 3)
    sel = run(4, feats, keys, attn, contextual=1)                        # Kd = 3, Kc = 1
    # R = 9 remaining, the only target is the first of them: token 0.
    assert sel.positions.tolist() == [[0, 1, 3, 4]]
    assert torch.equal(sel.tokens[0, 1:], feats[0, [1, 3, 4]])           # dominant feats as they are


def test_step2_targets_every_r_div_kc_th_remaining():
    n = 12
    attn = torch.zeros(1, n)
    attn[0, [0, 5]] = 1.0                                                # dominant {0, 5}
    feats, keys = torch.randn(1, n, 4), torch.ones(1, n, 3)
    sel = run(5, feats, keys, attn, contextual=3)                        # Kd = 2, Kc = 3
    # remaining [1, 2, 3, 4, 6, 7, 8, 9, 10, 11], R = 10, step 10 // 3 = 3: ranks 0, 3, 6
    assert sel.positions.tolist() == [[0, 1, 4, 5, 8]]


def test_step3_members_join_the_most_key_similar_target():
    n = 8
    attn = torch.zeros(1, n)
    attn[0, 7] = 1.0                                                     # dominant {7}
    keys = torch.tensor([[[1.0, 0.0],    # 0 target A (R = 7, step 3: ranks 0, 3)
                          [1.0, 0.1],    # 1 -> A
                          [0.1, 1.0],    # 2 -> B
                          [0.0, 1.0],    # 3 target B
                          [2.0, 0.5],    # 4 -> A (cosine, not dot product)
                          [0.2, 3.0],    # 5 -> B
                          [1.0, 1.0],    # 6 tie -> A, the lower target
                          [0.0, 1.0]]])  # 7 dominant: joins nothing although B-like
    feats = torch.eye(n).unsqueeze(0)                                    # one-hot: a mean shows its members
    sel = run(3, feats, keys, attn, contextual=2)
    assert sel.positions.tolist() == [[0, 3, 7]]
    expected_a = torch.zeros(n)
    expected_a[[0, 1, 4, 6]] = 0.25
    expected_b = torch.zeros(n)
    expected_b[[2, 3, 5]] = 1 / 3
    torch.testing.assert_close(sel.tokens[0, 0], expected_a)
    torch.testing.assert_close(sel.tokens[0, 1], expected_b)
    assert torch.equal(sel.tokens[0, 2], feats[0, 7])


def test_step4_contextual_token_is_the_true_mean_not_doubled():
    attn = torch.tensor([[0.0, 0.0, 0.0, 1.0]])                          # dominant {3}
    feats = torch.tensor([[[2.0], [4.0], [6.0], [100.0]]])
    keys = torch.ones(1, 4, 2)
    sel = run(2, feats, keys, attn, contextual=1)                        # target 0, members 1, 2
    assert sel.positions.tolist() == [[0, 3]]
    # (2 + 4 + 6) / 3 = 4; the official code would give 2 + (4 + 6) / 2 = 7.
    assert sel.tokens[0, :, 0].tolist() == [4.0, 100.0]


def test_keep_one_is_the_mean_of_all_tokens_at_position_0():
    s = make_signals(batch=2, grid=(3, 4), seed=3)
    sel = run(1, s["feats"], s["keys"], s["attn"])
    assert sel.positions.tolist() == [[0], [0]]
    torch.testing.assert_close(sel.tokens[:, 0], s["feats"].mean(dim=1))
