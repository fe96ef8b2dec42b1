"""The torch reference pipeline on the tiny preset: pruning, positions passed to the LLM, batching,
stopping, sampling and bad input."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from edgeprune import models
from edgeprune.errors import EdgepruneError, ModelError
from edgeprune.pruners import build_for_model
from edgeprune.reference import generate

PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny-llava")


@pytest.fixture(scope="module")
def images():
    return [data.astronaut(), data.coffee()]


def _capture(monkeypatch, adapter) -> list[dict]:
    """Record the position_ids / input shapes of every LLM call."""
    calls = []
    forward = adapter.llm.forward

    def spy(*args, **kw):
        calls.append({"position_ids": kw["position_ids"].clone(), "length": kw["inputs_embeds"].shape[1],
                      "mask": kw["attention_mask"].shape})
        return forward(*args, **kw)

    monkeypatch.setattr(adapter.llm, "forward", spy)
    return calls


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_keep_n_equals_unpruned(tiny, images, positions):
    plain = generate(tiny, None, images[0], PROMPT, max_new_tokens=16, positions=positions)
    pruner = build_for_model("attention", 576, tiny.pruner_options())
    full = generate(tiny, pruner, images[0], PROMPT, max_new_tokens=16, positions=positions)
    assert len(plain.ids[0]) == 16 and tiny.eos_token_ids[0] not in plain.ids[0]
    assert full.ids == plain.ids and full.num_image_tokens == plain.num_image_tokens == 576


def test_pruning_changes_the_answer_and_image_matters(tiny, images):
    plain = generate(tiny, None, images, PROMPT, max_new_tokens=16)
    assert plain.ids[0] != plain.ids[1]           # the image reaches the LLM
    pruned = generate(tiny, build_for_model("attention", 16, tiny.pruner_options()), images, PROMPT, max_new_tokens=16)
    assert pruned.num_image_tokens == 16 and pruned.ids != plain.ids


def test_original_positions_passed_to_llm(tiny, images, monkeypatch):
    calls = _capture(monkeypatch, tiny)
    pruner = build_for_model("attention", 64, tiny.pruner_options())
    r = generate(tiny, pruner, images[0], PROMPT, max_new_tokens=3, positions="original")
    prefix, suffix = r.prompt_ids
    p, k, n = len(prefix), 64, 576
    ids = calls[0]["position_ids"][0].numpy()
    assert calls[0]["length"] == p + k + len(suffix)
    assert ids[:p].tolist() == list(range(p))
    assert ids[p:p + k].tolist() == (p + r.image_positions[0]).tolist()          # gaps allowed
    assert r.image_positions[0].tolist() != list(range(k))                      # attention kept a sparse set
    assert ids[p + k:].tolist() == list(range(p + n, p + n + len(suffix)))       # text after the image at P + N
    last = p + n + len(suffix) - 1
    assert [int(c["position_ids"][0, 0]) for c in calls[1:]] == [last + 1, last + 2]
    assert [c["mask"][1] for c in calls[1:]] == [p + k + len(suffix) + 1, p + k + len(suffix) + 2]


def test_compact_positions_passed_to_llm(tiny, images, monkeypatch):
    calls = _capture(monkeypatch, tiny)
    pruner = build_for_model("attention", 64, tiny.pruner_options())
    r = generate(tiny, pruner, images[0], PROMPT, max_new_tokens=2, positions="compact")
    prefix, suffix = r.prompt_ids
    p, k = len(prefix), 64
    ids = calls[0]["position_ids"][0].numpy()
    assert ids.tolist() == list(range(p + k + len(suffix)))                     # text after the image at P + K
    assert int(calls[1]["position_ids"][0, 0]) == p + k + len(suffix)


@pytest.mark.parametrize("method", [None, "attention", "visionzip"])
def test_batch_equals_rows_run_separately(tiny, images, method):
    pruner = None if method is None else build_for_model(method, 32, tiny.pruner_options())
    both = generate(tiny, pruner, images, PROMPT, max_new_tokens=12)
    for i, image in enumerate(images):
        one = generate(tiny, pruner, image, PROMPT, max_new_tokens=12)
        assert one.ids[0] == both.ids[i]
        assert np.array_equal(one.image_positions[0], both.image_positions[i])


def test_rows_stop_at_eos_independently(tiny, images, monkeypatch):
    eos = tiny.eos_token_ids[0]
    step = {"n": 0}

    def force_eos(module, inputs, output):   # row 0 emits EOS at decode step 2, row 1 never
        if step["n"] == 2:
            output[0, :, eos] = 1e4
        step["n"] += 1
        return output

    handle = tiny.llm.lm_head.register_forward_hook(force_eos)
    try:
        r = generate(tiny, None, images, PROMPT, max_new_tokens=6)
    finally:
        handle.remove()
    assert r.ids[0][-1] == eos and len(r.ids[0]) == 3
    assert len(r.ids[1]) == 6 and eos not in r.ids[1]
    assert r.text[0] == tiny.tokenizer.decode(r.ids[0][:2])


def test_on_token_streams_every_step(tiny, images):
    seen = []
    r = generate(tiny, None, images, PROMPT, max_new_tokens=4, on_token=lambda t, ids: seen.append((t, ids.tolist())))
    assert [t for t, _ in seen] == [0, 1, 2, 3]
    assert [row for _, row in seen] == [[a, b] for a, b in zip(r.ids[0], r.ids[1])]


def test_sampling_is_seeded(tiny, images):
    kw = dict(max_new_tokens=12, do_sample=True, top_p=0.9, temperature=1.5)
    a = generate(tiny, None, images[0], PROMPT, seed=3, **kw)
    b = generate(tiny, None, images[0], PROMPT, seed=3, **kw)
    c = generate(tiny, None, images[0], PROMPT, seed=4, **kw)
    assert a.ids == b.ids and a.ids != c.ids
    tiny_p = generate(tiny, None, images[0], PROMPT, seed=5, max_new_tokens=12, do_sample=True, top_p=1e-9)
    assert tiny_p.ids == generate(tiny, None, images[0], PROMPT, max_new_tokens=12).ids   # top-1 = greedy


def test_text_only_prompt(tiny):
    r = generate(tiny, None, None, PROMPT, max_new_tokens=4)
    assert r.num_image_tokens == 0 and r.position_ids.shape[1] == sum(map(len, r.prompt_ids))


def test_bad_input(tiny, images):
    with pytest.raises(ModelError, match="image placeholder"):
        generate(tiny, None, images[0], "look: <image>", max_new_tokens=2)
    with pytest.raises(EdgepruneError, match="positions='diagonal'"):
        generate(tiny, None, images[0], PROMPT, positions="diagonal")
    with pytest.raises(EdgepruneError, match="max_new_tokens=0"):
        generate(tiny, None, images[0], PROMPT, max_new_tokens=0)
    with pytest.raises(EdgepruneError, match="top_p=0"):
        generate(tiny, None, images[0], PROMPT, do_sample=True, top_p=0)
    with pytest.raises(ModelError, match="position ids up to"):
        generate(tiny, None, images[0], PROMPT, max_new_tokens=5000)
    with pytest.raises(ModelError, match="no image given"):
        generate(tiny, None, [], PROMPT)


# -- runtime/sampling.py: the next-token rule shared with the ORT runtime --------------------------
class _FixedRng:
    """Stands in for numpy's Generator: returns the given uniforms in order."""

    def __init__(self, *u):
        self.u = list(u)

    def random(self):
        return self.u.pop(0)


def test_greedy_ties_go_to_the_lowest_id():
    from edgeprune.runtime.sampling import greedy_next, next_tokens

    logits = np.array([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert greedy_next(logits).tolist() == [1, 0]
    assert next_tokens(logits, do_sample=False, rng=None).tolist() == [1, 0]


def test_sample_next_steps():
    from edgeprune.runtime.sampling import sample_next

    logits = np.log(np.array([[0.1, 0.4, 0.4, 0.1]]))
    # order by descending p, ties to the lower id: [1, 2, 0, 3]; cumulative [0.4, 0.8, 0.9, 1.0]
    picks = [int(sample_next(logits, _FixedRng(u))[0]) for u in (0.0, 0.39, 0.41, 0.85, 0.95, 0.999)]
    assert picks == [1, 1, 2, 0, 3, 3]
    # top_p = 0.5 keeps the first two (0.4 < 0.5 <= 0.8), renormalised to [0.5, 1.0]
    picks = [int(sample_next(logits, _FixedRng(u), top_p=0.5)[0]) for u in (0.49, 0.5, 0.99)]
    assert picks == [1, 2, 2]
    # a tiny temperature sharpens to the argmax; one draw per row
    rng = _FixedRng(0.99, 0.99)
    assert sample_next(np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]]), rng, temperature=1e-3).tolist() == [1, 0]
    assert rng.u == []


def test_sample_next_bad_options():
    from edgeprune.runtime.sampling import make_rng, sample_next

    with pytest.raises(EdgepruneError, match="temperature=0"):
        sample_next(np.zeros((1, 3)), make_rng(0), temperature=0)
    with pytest.raises(EdgepruneError, match="top_p=1.5"):
        sample_next(np.zeros((1, 3)), make_rng(0), top_p=1.5)


def test_generate_uses_the_current_cache_api(tiny, images, transformers_deprecations):
    """transformers 5.24 deprecates the `past_key_values` name (removed in 5.40): no notice may appear."""
    generate(tiny, None, images[0], PROMPT, max_new_tokens=3)
    assert not [m for m in transformers_deprecations() if "past_key_values" in m or "deprecated" in m]


def test_the_deprecation_fixture_sees_the_old_name(tiny, transformers_deprecations):
    """The check above can fail: the deprecated spelling is reported."""
    import torch

    embeds = tiny.embed(torch.tensor([[1, 2, 3]]))
    out = tiny.llm(inputs_embeds=embeds, use_cache=True)
    tiny.llm(inputs_embeds=embeds[:, :1], past_key_values=out.cache, use_cache=True)
    assert any("past_key_values" in m for m in transformers_deprecations())        # the FutureWarning
    out.past_key_values                                                            # the logged notice
    assert any("`past_key_values`/`cache_params` are deprecated" in m for m in transformers_deprecations())
