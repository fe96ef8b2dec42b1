"""The AutoSelect training loop on a planted synthetic task: learning works, an untrained Scorer fails the
same check, the VLM stays frozen, checkpoints round-trip, resume continues the schedule, and the trained
Scorer exports to ONNX with ORT parity.

The task: N = 32 tokens of C = 16 channels, K = 4. In each example P = 4 planted tokens at random
positions carry a marker (+4 on channel 0) and the code of the answer class y (+3 on channel 1 + y);
the 28 distractors carry the code of a random class and no marker. The frozen "VLM" projects with the
identity and its "LLM" reads class logits from the running sum of channels 1..V: the answer depends
on the planted tokens only, and the distractors, which mislead it, can only be removed by the gate.
"""
from __future__ import annotations

import types

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeprune.export.pruner_graph import export_pruner
from edgeprune.pruners import build
from edgeprune.pruners.autoselect import Scorer, load_scorer
from edgeprune.pruners.ops import topk_indices
from edgeprune.train.denoiser import Denoiser
from edgeprune.train.trainer import Batch, TrainConfig, Trainer, gated_features, lr_at, state_path, tau_at

N, C, V, P, K = 32, 16, 4, 4, 4
MARK, CODE, BETA = 4.0, 3.0, 0.3
STEPS, BATCH = 150, 16


class SumReadout(nn.Module):
    """A frozen causal "LLM": logits at position t = BETA * (sum of inputs_embeds[:t+1])[channels 1..V]."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(BETA))  # a parameter, so freezing has something to freeze

    def forward(self, inputs_embeds, position_ids=None, use_cache=False, logits_to_keep=None):
        logits = self.scale * inputs_embeds.cumsum(dim=1)[..., 1:1 + V]          # [B, L, V]
        return types.SimpleNamespace(logits=logits[:, logits_to_keep])


class PlantedVLM(nn.Module):
    """The adapter surface the trainer uses: project, embed (text carries nothing), llm."""

    default_positions = "original"

    def __init__(self):
        super().__init__()
        self.projector = nn.Linear(C, C)
        with torch.no_grad():
            self.projector.weight.copy_(torch.eye(C))
            self.projector.bias.zero_()
        self.llm = SumReadout()

    def project(self, feats):
        return self.projector(feats)

    def embed(self, ids):
        return torch.zeros(*ids.shape, C)


def planted_batch(step: int, batch: int = BATCH, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(batch, N, C, generator=g)
    y = torch.randint(0, V, (batch,), generator=g)
    planted = torch.rand(batch, N, generator=g).argsort(dim=-1)[:, :P]
    mask = torch.zeros(batch, N, dtype=torch.bool).scatter(1, planted, True)
    classes = torch.where(mask, y[:, None], torch.randint(0, V, (batch, N), generator=g))
    x[..., 0] += MARK * mask
    x.scatter_add_(2, 1 + classes.unsqueeze(-1), torch.full((batch, N, 1), CODE))
    return Batch(feats=x, prefix=[[]] * batch, suffix=[[0]] * batch, answer=[[int(v)] for v in y],
                 meta={"planted": mask})


def planted_precision(scorer: nn.Module) -> float:
    """Fraction of the Scorer's hard top-K that are planted tokens, on 512 held-out examples (chance K/N)."""
    hits = total = 0
    with torch.no_grad():
        for i in range(8):
            b = planted_batch(10_000 + i, batch=64, seed=1)
            chosen = topk_indices(scorer(b.feats), K)
            hits += int(b.meta["planted"].gather(1, chosen).sum())
            total += chosen.numel()
    return hits / total


def recovers_planted(scorer: nn.Module) -> bool:
    return planted_precision(scorer) >= 0.8


def make_trainer(steps: int = STEPS, seed: int = 0, init_seed: int = 0, vlm: nn.Module | None = None,
                 regularizer=None, **options) -> Trainer:
    torch.manual_seed(init_seed)
    scorer, denoiser = Scorer(C, depth=1, heads=2), Denoiser(C)
    config = TrainConfig(keep=K, steps=steps, lr=3e-3, batch_size=BATCH, seed=seed, **options)
    return Trainer(vlm or PlantedVLM(), scorer, denoiser, config, lambda step: planted_batch(step, seed=seed),
                   regularizer=regularizer)


@pytest.fixture(scope="module")
def trained():
    trainer = make_trainer()
    before = planted_precision(trainer.scorer)
    untrained_passes = recovers_planted(trainer.scorer)
    vlm_before = {k: v.clone() for k, v in trainer.adapter.state_dict().items()}
    trainer.train()
    return types.SimpleNamespace(trainer=trainer, before=before, untrained_passes=untrained_passes,
                                 after=planted_precision(trainer.scorer), vlm_before=vlm_before)


def test_training_recovers_the_planted_tokens(trained):
    print(f"planted-token precision {trained.before:.3f} -> {trained.after:.3f} (chance {K / N:.3f})")
    assert trained.after >= 0.8


def test_untrained_scorer_fails_the_same_check(trained):
    assert not trained.untrained_passes and trained.before < 0.5


def test_training_lowers_the_loss(trained):
    losses = trained.trainer.losses
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss {first:.3f} (first 10 steps) -> {last:.3f} (last 10)")
    assert len(losses) == STEPS and last < 0.5 * first


def test_several_budgets_and_few_llm_tokens_still_learn():
    """The options of the shipped recipe: budgets in turn (keeps) and only the ceil(2K) top-scored tokens
    in the "LLM" (llm_tokens=2) still find the planted tokens."""
    trainer = make_trainer(keeps=(2, 4, 6), llm_tokens=2.0)
    seen = []
    trainer.adapter.llm.register_forward_hook(lambda m, args, kw, out: seen.append(kw["inputs_embeds"].shape[1]),
                                              with_kwargs=True)
    trainer.train()
    # sequence = M image tokens + suffix (1 token; the answer's last token is only a target)
    assert seen[:6] == [4 + 1, 8 + 1, 12 + 1] * 2
    print(f"planted-token precision with keeps (2, 4, 6), llm_tokens 2: {planted_precision(trainer.scorer):.3f}")
    assert recovers_planted(trainer.scorer)


def test_gated_features_keeps_only_the_top_scored_tokens():
    feats = torch.randn(2, 10, C)
    feats[..., 0] = torch.tensor([[0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5], [5, 4, 6, 3, 7, 2, 8, 1, 9, 0]])
    scorer = lambda x: x[..., 0]                                                    # noqa: E731
    gen = torch.Generator().manual_seed(0)
    out, alpha, positions = gated_features(scorer, nn.Identity(), feats, keep=2, tau=1e-3, generator=gen, count=4)
    assert positions.tolist() == [[1, 3, 5, 7], [2, 4, 6, 8]]                      # top-4 scores, ascending
    assert out.shape == (2, 4, C) and alpha.shape == (2, 10)
    torch.testing.assert_close(alpha.sum(-1), torch.tensor([2.0, 2.0]))
    # the two best (alpha ~ 1) pass unchanged; the other two kept ones are noise (alpha ~ 0)
    torch.testing.assert_close(out[0, [0, 1]], feats[0, [1, 3]], atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1, [2, 3]], feats[1, [6, 8]], atol=1e-3, rtol=0)
    assert (out[0, 2:] - feats[0, [5, 7]]).abs().max() > 0.1
    assert gated_features(scorer, nn.Identity(), feats, keep=2, tau=1e-3, generator=gen, count=10)[2] is None


def test_denoise_dropped_leaves_kept_tokens_as_they_are():
    """denoise="dropped": the Denoiser's change is weighted by 1 - alpha, so a kept token (alpha ~ 1) reaches the
    projector unchanged (as at inference) and a dropped one (alpha ~ 0) gets the Denoiser's full output."""
    feats = torch.randn(1, 6, C)
    feats[..., 0] = torch.tensor([[0.0, 9, 1, 8, 2, 7]])
    scorer = lambda x: x[..., 0]                                                    # noqa: E731
    shift = lambda x: x + 3.0                                                       # noqa: E731  a "Denoiser"
    args = dict(keep=2, tau=1e-3, count=4)
    noisy, alpha, positions = gated_features(scorer, nn.Identity(), feats, generator=torch.Generator().manual_seed(0),
                                             **args)
    out, _, _ = gated_features(scorer, shift, feats, generator=torch.Generator().manual_seed(0), denoise="dropped",
                               **args)
    everywhere, _, _ = gated_features(scorer, shift, feats, generator=torch.Generator().manual_seed(0), **args)
    assert positions.tolist() == [[1, 3, 4, 5]]                                     # top-4 scores 9, 8, 7, 2
    torch.testing.assert_close(out, noisy + 3.0 * (1 - alpha.gather(1, positions)).unsqueeze(-1))
    torch.testing.assert_close(out[0, :2], feats[0, [1, 3]], atol=1e-3, rtol=0)    # the top-2: kept, unchanged
    assert ((out[0, 2:] - noisy[0, 2:]) - 3.0).abs().max() < 1e-3                   # dropped: the full shift
    torch.testing.assert_close(everywhere, noisy + 3.0)                             # "all": METHODS.md
    from edgeprune.errors import EdgepruneError

    with pytest.raises(EdgepruneError, match="denoise='some', expected 'all' or 'dropped'"):
        TrainConfig(keep=2, steps=1, denoise="some")


def test_budget_schedule_and_llm_count():
    c = TrainConfig(keep=8, steps=10, keeps=(2, 4, 8), llm_tokens=2.0)
    assert [c.keep_at(s) for s in range(7)] == [2, 4, 8, 2, 4, 8, 2]
    assert [c.llm_count(k, 12) for k in (2, 4, 8)] == [4, 8, 12]                   # capped at N
    assert TrainConfig(keep=8, steps=1).keep_at(5) == 8 and TrainConfig(keep=8, steps=1).llm_count(8, 12) == 12
    assert TrainConfig(keep=8, steps=1, llm_tokens=1.5).llm_count(3, 12) == 5      # ceil(4.5)


def test_vlm_stays_frozen(trained):
    adapter = trained.trainer.adapter
    assert all(not p.requires_grad for p in adapter.parameters())
    for name, value in adapter.state_dict().items():
        assert torch.equal(value, trained.vlm_before[name]), name
    # the Denoiser did train (its zero-initialised output layer moved)
    assert float(trained.trainer.denoiser.mlp[2].weight.detach().abs().max()) > 0


def test_trainer_freezes_a_trainable_vlm():
    vlm = PlantedVLM()
    assert all(p.requires_grad for p in vlm.parameters())
    make_trainer(steps=1, vlm=vlm)
    assert not any(p.requires_grad for p in vlm.parameters())


def test_schedules():
    assert tau_at(0, 100) == pytest.approx(1.0)
    assert tau_at(50, 100) == pytest.approx(0.525)
    assert tau_at(100, 100) == pytest.approx(0.05)
    assert tau_at(25, 100) == pytest.approx(0.05 + 0.475 * (1 + np.cos(np.pi / 4)))
    taus = [tau_at(s, 100) for s in range(101)]
    assert taus == sorted(taus, reverse=True)
    c = TrainConfig(keep=4, steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(55, c) == pytest.approx(0.55e-3) and lr_at(100, c) == pytest.approx(1e-4)


def test_checkpoint_round_trip(trained, tmp_path):
    path = trained.trainer.save(tmp_path / "scorer.safetensors")
    assert path.is_file() and state_path(path).is_file()
    loaded = load_scorer(path)
    for name, value in trained.trainer.scorer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    feats = planted_batch(0, batch=3, seed=7).feats
    sel = build("autoselect", keep=K, scorer=str(path))(tokens=feats, feats=feats)
    expected = topk_indices(trained.trainer.scorer(feats), K).sort(dim=-1).values
    assert torch.equal(sel.positions, expected)


def test_resume_continues_the_schedule(tmp_path):
    straight = make_trainer(steps=12)
    straight.train()
    ckpt = tmp_path / "s.safetensors"
    first = make_trainer(steps=12)
    first.train(checkpoint=ckpt, until=5)
    assert first.step == 5
    resumed = make_trainer(steps=12, init_seed=123)     # different initial weights: all must come from the file
    resumed.resume(ckpt)
    assert resumed.step == 5 and resumed.tau == pytest.approx(tau_at(5, 12))
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(first.optimizer.param_groups[0]["lr"])
    resumed.train()
    assert resumed.step == 12 and resumed.tau == pytest.approx(0.05)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)
    for name, value in straight.scorer.state_dict().items():
        torch.testing.assert_close(resumed.scorer.state_dict()[name], value, atol=1e-6, rtol=1e-5)


def test_regularizer_joins_the_loss_and_resumes(tmp_path):
    """A regularizer on the raw scores (scripts/train_mini_scorer.py --distill-weight) is added to the NLL: one
    that ranks first the token with the largest last channel (noise, for the task) makes it the top score on
    held-out examples, which the NLL alone does not; its losses are kept and resumed with the run."""
    def last_first(scores, batch):
        return 5 * torch.nn.functional.cross_entropy(scores, batch.feats[..., -1].argmax(dim=1))

    def top1_is_last(trainer) -> float:
        feats = planted_batch(10_000, batch=64, seed=1).feats
        with torch.no_grad():
            return float((trainer.scorer(feats).argmax(dim=1) == feats[..., -1].argmax(dim=1)).float().mean())

    # without the regularizer, 60 steps of NLL reach 0.03 here (measured; chance 1/32)
    ckpt = tmp_path / "s.safetensors"
    first = make_trainer(steps=60, regularizer=last_first)
    assert top1_is_last(first) < 0.1
    first.train(checkpoint=ckpt, until=20)
    resumed = make_trainer(steps=60, regularizer=last_first)
    resumed.resume(ckpt)
    resumed.train()
    assert top1_is_last(resumed) >= 0.5                                     # measured 0.66
    assert len(resumed.regularizer_losses) == 60 and resumed.regularizer_losses[-1] < resumed.regularizer_losses[0]


def test_resume_refuses_another_keep(tmp_path):
    from edgeprune.errors import EdgepruneError

    ckpt = make_trainer(steps=1).save(tmp_path / "s.safetensors")
    other = make_trainer(steps=1)
    other.config = TrainConfig(keep=K + 1, steps=1)
    with pytest.raises(EdgepruneError, match=f"keep={K + 1}, the checkpoint was trained with keep={K}"):
        other.resume(ckpt)


def test_trained_scorer_exports_and_matches_ort(trained, tmp_path):
    pruner = build("autoselect", keep=K, scorer=trained.trainer.scorer)
    b = planted_batch(0, batch=3, seed=9)
    tokens = torch.randn(3, N, 8)
    path = export_pruner(pruner, {"tokens": tokens, "feats": b.feats, "grid": (4, 8)}, tmp_path / "p.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got_tokens, got_positions = sess.run(None, {n: {"tokens": tokens, "feats": b.feats}[n].numpy() for n in names})
    with torch.no_grad():
        ref = pruner(tokens=tokens, feats=b.feats)
    np.testing.assert_array_equal(got_positions, ref.positions.numpy())
    np.testing.assert_allclose(got_tokens, ref.tokens.numpy(), rtol=1e-5, atol=1e-6)
    # and the trained scorer picks the planted tokens in the graph too
    assert np.mean(np.take_along_axis(b.meta["planted"].numpy(), got_positions, axis=1)) >= 0.8


def test_resume_refuses_other_budgets(tmp_path):
    from edgeprune.errors import EdgepruneError

    ckpt = make_trainer(steps=1, keeps=(2, 4)).save(tmp_path / "s.safetensors")
    other = make_trainer(steps=1, keeps=(2, 8))
    with pytest.raises(EdgepruneError, match=r"keeps=\(2, 8\), the checkpoint was trained with keeps=\(2, 4\)"):
        other.resume(ckpt)


@pytest.mark.parametrize("kw,message", [({"keep": 0}, "keep=0, expected >= 1"),
                                        ({"keeps": (4, 0)}, r"keeps=\(4, 0\), expected integers >= 1"),
                                        ({"llm_tokens": 0.5}, r"llm_tokens=0.5, expected 0 \(all N\) or >= 1"),
                                        ({"tau_end": 2.0}, r"tau_end=2.0, expected in \(0, tau_start\]"),
                                        ({"lr": 0.0}, "lr=0.0, expected > 0")])
def test_config_errors(kw, message):
    from edgeprune.errors import EdgepruneError

    with pytest.raises(EdgepruneError, match=message):
        TrainConfig(**{"keep": 4, "steps": 10, **kw})
