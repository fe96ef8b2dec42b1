"""Smoke test of the real training path on the tiny-llava preset: JSONL -> cached CLIP features ->
Scorer/gate/Denoiser -> frozen projector and Llama -> answer NLL -> AdamW step, a few steps."""
from __future__ import annotations

import math

import pytest
import torch

from edgeprune.pruners import build
from edgeprune.pruners.autoselect import Scorer
from edgeprune.train.data import ExampleBatches, load_examples, write_skimage_dataset
from edgeprune.train.denoiser import Denoiser
from edgeprune.train.trainer import Batch, TrainConfig, Trainer, answer_nll


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-llava")


def test_answer_nll_is_the_llm_loss_on_the_answer(adapter):
    """The NLL equals transformers' own labels loss on the same full sequence (answer tokens only)."""
    torch.manual_seed(0)
    feats = torch.randn(1, adapter.num_image_tokens, 64)
    prefix, suffix, answer = [256, 85], [104, 105], [32, 99, 97, 116, 257]
    batch = Batch(feats=feats, prefix=[prefix], suffix=[suffix], answer=[answer])
    with torch.no_grad():
        image = adapter.project(feats)
        got = answer_nll(adapter, image, batch)
        ids = torch.tensor([prefix + suffix + answer])
        emb = adapter.embed(ids)
        embeds = torch.cat([emb[:, :2], image, emb[:, 2:]], dim=1)
        labels = torch.full(embeds.shape[:2], -100)
        labels[0, -len(answer):] = torch.tensor(answer)
        ref = adapter.llm(inputs_embeds=embeds, labels=labels).loss
        # a padded batch of two rows gives the mean over both rows' answer tokens
        batch2 = Batch(feats=feats.repeat(2, 1, 1), prefix=[prefix, []], suffix=[suffix, suffix + [33, 33]],
                       answer=[answer, answer[:2]])
        two = answer_nll(adapter, image.repeat(2, 1, 1), batch2)
        alone = answer_nll(adapter, image, Batch(feats=feats, prefix=[[]], suffix=[suffix + [33, 33]],
                                                 answer=[answer[:2]]))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, (5 * got + 2 * alone) / 7, rtol=1e-5, atol=1e-5)


def test_answer_nll_with_kept_positions_is_the_pruned_layout(adapter):
    """With `positions` (the --llm-tokens path), the sequence is the one the pruned runtime builds: only
    the M kept tokens, at their original position ids, the text after them continuing from prefix + N."""
    from edgeprune.runtime.positions import sequence_positions

    torch.manual_seed(1)
    n = adapter.num_image_tokens
    kept = torch.tensor([[3, 40, 41, 300, 575]])
    image = adapter.project(torch.randn(1, 5, 64))
    prefix, suffix, answer = [256, 85, 7], [104, 105], [32, 99, 257]
    batch = Batch(feats=torch.zeros(1, 5, 64), prefix=[prefix], suffix=[suffix], answer=[answer])
    with torch.no_grad():
        got = answer_nll(adapter, image, batch, positions=kept, num_image_tokens=n)
        emb = adapter.embed(torch.tensor([prefix + suffix + answer]))
        embeds = torch.cat([emb[:, :3], image, emb[:, 3:]], dim=1)
        pos = torch.from_numpy(sequence_positions(3, kept.numpy(), n, len(suffix) + len(answer), "original"))
        assert pos[0, 3:8].tolist() == [6, 43, 44, 303, 578] and pos[0, 8] == 3 + n
        labels = torch.full(embeds.shape[:2], -100)
        labels[0, -len(answer):] = torch.tensor(answer)
        ref = adapter.llm(inputs_embeds=embeds, position_ids=pos, labels=labels).loss
        wrong = adapter.llm(inputs_embeds=embeds, labels=labels).loss      # compact ids: a different loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert abs(float(wrong) - float(ref)) > 1e-4
    # the shared prefix served from its key/value cache (computed once, reused): the same loss, twice
    two = Batch(feats=torch.zeros(2, 5, 64), prefix=[prefix, prefix], suffix=[suffix, suffix + [33]],
                answer=[answer, answer[:2]])
    store = {}
    with torch.no_grad():
        plain = answer_nll(adapter, image.repeat(2, 1, 1), two, kept.repeat(2, 1), n)
        for _ in range(2):
            cached = answer_nll(adapter, image.repeat(2, 1, 1), two, kept.repeat(2, 1), n, prefix_cache=store)
            torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    assert len(store) == 1


def test_a_few_training_steps(adapter, tmp_path):
    examples = load_examples(write_skimage_dataset(tmp_path))[:4]
    batches = ExampleBatches(adapter, examples, batch_size=2, seed=0)
    torch.manual_seed(0)
    scorer, denoiser = Scorer(64, depth=1), Denoiser(64)
    start = {k: v.clone() for k, v in scorer.state_dict().items()}
    vlm = {k: v.clone() for k, v in adapter.state_dict().items()}
    trainer = Trainer(adapter, scorer, denoiser, TrainConfig(keep=64, steps=3, lr=1e-3, batch_size=2), batches)
    ckpt = tmp_path / "scorer.safetensors"
    losses = trainer.train(checkpoint=ckpt)
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    assert any(not torch.equal(v, start[k]) for k, v in scorer.state_dict().items())   # the Scorer learned
    assert all(torch.equal(v, vlm[k]) for k, v in adapter.state_dict().items())         # the VLM did not
    assert not any(p.requires_grad for p in adapter.parameters())
    # the checkpoint is what the pruner loads; at inference: Scorer + hard top-K only
    signals = adapter.encode(adapter.preprocess([str(examples[0].image)]), need=("tokens", "feats"))
    sel = build("autoselect", keep=64, scorer=ckpt)(tokens=signals.tokens, feats=signals.feats)
    assert sel.tokens.shape == (1, 64, signals.tokens.shape[-1]) and sel.positions.shape == (1, 64)
