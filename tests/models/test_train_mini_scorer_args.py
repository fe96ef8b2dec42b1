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
    (["--steps", "100", "--until", "101"], "--until 101: expected a step in 1..--steps (100)"),
    (["--until", "0"], "--until 0: expected a step in 1..--steps (360)"),
    (["--distill-weight", "-1"], "--distill-weight -1.0: expected >= 0"),
    (["--distill-rank", "600"], "--distill-rank 600: expected <= 576"),
    (["--objective", "distill", "--resume"], "--resume: a --objective distill run takes minutes and has no resume"),
    (["--init", "/nonexistent/s.safetensors"], "--init /nonexistent/s.safetensors: no such file"),
    (["--measured", "/nonexistent/results.json"], "--measured: "),
    (["--selection", "step 40"], "--selection: only with --measured"),
])
def test_argument_errors_name_the_value(script, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        script.parse_args(argv + ["--out", str(tmp_path / "s.safetensors")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_listmle_is_the_plackett_luce_nll_and_teaches_every_top_k(script):
    import torch

    scores, order = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.0]]), torch.tensor([[2, 0, 4, 1, 3]])
    by_hand = sum(torch.logsumexp(scores[0, order[0, i:]], 0) - scores[0, order[0, i]] for i in range(5)) / 5
    assert torch.allclose(script.listmle(scores, order), by_hand)
    # R < N: the 12 unranked tokens only sit in the denominators; minimising it makes top-K = order[:K] for all K
    order = torch.tensor([[7, 3, 15, 0, 9, 11, 2, 5]])
    free = torch.zeros(1, 20, requires_grad=True)
    opt = torch.optim.Adam([free], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        script.listmle(free, order).backward()
        opt.step()
    assert all(set(free.topk(k).indices[0].tolist()) == set(order[0, :k].tolist()) for k in range(1, 9))


def test_distillation_target_is_divprunes_order_and_overlap_counts_it(script):
    import torch
    from torch import nn

    from edgeprune.pruners import build

    class Identity:                     # the adapter surface divprune_orders uses: project
        project = staticmethod(lambda feats: feats)

    feats = torch.randn(3, 30, 8, generator=torch.Generator().manual_seed(0))
    orders = script.divprune_orders(Identity(), feats, 10, chunk=2)
    for k in (4, 10):                   # the first K of the order are DivPrune's K-selection
        assert orders[:, :k].sort(dim=-1).values.tolist() == build("divprune", keep=k)(tokens=feats).positions.tolist()

    class Fixed(nn.Module):             # a "scorer" that returns given scores
        def __init__(self, scores):
            super().__init__()
            self.scores = scores

        def forward(self, feats):
            return self.scores[:len(feats)]

    ideal = torch.zeros(3, 30).scatter(1, orders, torch.arange(10, 0, -1, dtype=torch.float).expand(3, 10))
    assert script.topk_overlap(Fixed(ideal), feats, orders, (1, 4, 10)) == {"1": 1.0, "4": 1.0, "10": 1.0}
    assert script.topk_overlap(Fixed(-ideal), feats, orders, (4,)) == {"4": 0.0}   # the order's tokens ranked last


def test_existing_output_needs_force(script, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(SystemExit):
        script.parse_args(["--out", str(out)])
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err
    assert out.read_bytes() == b"x"                     # the user's file is untouched
    assert script.parse_args(["--out", str(out), "--force"]).out == out
