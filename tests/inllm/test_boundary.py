"""The common steps of an in-LLM stage (METHODS_INLLM.md §1, §12) on a tiny seeded LLM (4 layers), through
the torch reference loop: identity, KV policies, positions, batch rows, and the errors that name values."""
from __future__ import annotations

import pytest
import torch

from edgeprune import models
from edgeprune.errors import EdgepruneError, PrunerConfigError
from edgeprune.inllm import build
from edgeprune.inllm.boundary import LLMParts, PrefillState, StageRunner
from edgeprune.inllm.loop import StagedLM
from edgeprune.runtime.positions import build_positions_rows, next_positions

S, K, GRID = 5, 24, (4, 6)   # prefix tokens, image slots, their grid
# (method, keep, layer) on a 4-layer LLM; multi-stage methods use every possible layer
CASES = [("fastv", [10], [1]), ("dart", [9], [2]), ("d2pruner", [8], [1]), ("polymorphic", [16, 11, 7], [1, 2, 3]),
         ("pdrop", [12, 6, 3], [1, 2, 3])]


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-qwen2-vl"])
def llm(request):
    adapter = models.load(request.param, llm_layers=4)
    return adapter.llm, adapter.rope


def prompt_batch(llm, rope: str, text_lens=(9, 6), seed: int = 0):
    """Rows [S prefix | K image slots | text], right-padded to the longest text; image slots sit at sorted
    random grid positions. -> (embeds, position_ids, mask, image_positions)."""
    g = torch.Generator().manual_seed(seed)
    b, m = len(text_lens), max(text_lens)
    embeds = torch.randn(b, S + K + m, llm.config.hidden_size, generator=g)
    mask = torch.ones(b, S + K + m, dtype=torch.int64)
    for row, length in enumerate(text_lens):
        mask[row, S + K + length:] = 0
    n = GRID[0] * GRID[1]
    image_positions = torch.stack([torch.sort(torch.randperm(n, generator=g)[:K]).values for _ in range(b)])
    pos = build_positions_rows(rope, S, image_positions.numpy(), [n] * b, [GRID] * b, list(text_lens), "original")
    return embeds, torch.from_numpy(pos), mask, image_positions


def runner(name, keep, layer, policy="uniform", num_layers=4, **cfg) -> StageRunner:
    return StageRunner(build(name, keep=keep, layer=layer, **cfg), num_image=K, num_layers=num_layers, image_start=S,
                       kv_policy=policy, grid=GRID)


def decode(lm: StagedLM, llm, pos, steps: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        emb = torch.randn(pos.shape[-2], 1, llm.config.hidden_size, generator=g)
        out.append(lm.step(emb, torch.from_numpy(next_positions(pos.numpy(), t))))
    return out


@pytest.mark.parametrize("name,keep,layer", CASES)
def test_identity_stage_gives_the_unpruned_logits(llm, name, keep, layer):
    model, rope = llm
    embeds, pos, mask, image_positions = prompt_batch(model, rope)
    plain = StagedLM(model)
    expected = plain.prefill(embeds, pos, mask)
    identity = StagedLM(model, runner(name, [K] * len(layer), layer))
    got = identity.prefill(embeds, pos, mask, image_positions)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert all(torch.equal(k, torch.arange(K).expand(2, K)) for k in identity.keeps)
    for a, b in zip(decode(identity, model, pos), decode(plain, model, pos)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_layer_loop_equals_the_hf_forward(llm):
    # the reference loop itself (no stage, equal lengths) against the model's own forward
    model, rope = llm
    embeds, pos, mask, _ = prompt_batch(model, rope, text_lens=(7, 7))
    ref = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).logits[:, -1].float()
    torch.testing.assert_close(StagedLM(model).prefill(embeds, pos, mask), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,keep,layer", CASES)
def test_uniform_and_faithful_share_the_prefill_and_differ_in_cache_lengths(llm, name, keep, layer):
    model, rope = llm
    embeds, pos, mask, image_positions = prompt_batch(model, rope)
    lms = {p: StagedLM(model, runner(name, keep, layer, p)) for p in ("uniform", "faithful")}
    logits = {p: lm.prefill(embeds, pos, mask, image_positions) for p, lm in lms.items()}
    assert torch.equal(logits["uniform"], logits["faithful"])
    assert all(torch.equal(a, b) for a, b in zip(lms["uniform"].keeps, lms["faithful"].keeps))
    total = embeds.shape[1]
    counts = [K] + keep
    expected_faithful = [total - K + counts[sum(1 for at in layer if at <= i)] for i in range(4)]
    assert [lms["faithful"].cache.layers[i].keys.shape[2] for i in range(4)] == expected_faithful
    assert [lms["uniform"].cache.layers[i].keys.shape[2] for i in range(4)] == [total - K + keep[-1]] * 4


def test_positions_and_mask_are_gathered_never_renumbered(llm):
    model, rope = llm
    embeds, pos, mask, image_positions = prompt_batch(model, rope)
    g = torch.Generator().manual_seed(7)
    keys = [torch.randn(2, 2, embeds.shape[1], 16, generator=g) for _ in range(4)]   # layers 0, 1: k, v
    r = runner("dart", [9], [2])
    state = PrefillState(hidden=embeds, layer_input=embeds, position_ids=pos, attention_mask=mask, presents=keys,
                         slots=r.initial_slots(image_positions), image_positions=image_positions)
    out = r.apply(2, state, LLMParts.of(model))
    keep = out.slots                                                                  # [B, 9] ascending
    assert bool((keep[:, 1:] > keep[:, :-1]).all())
    idx = torch.cat([torch.arange(S).expand(2, S), S + keep, torch.arange(S + K, embeds.shape[1]).expand(2, -1)], 1)
    assert torch.equal(out.position_ids, torch.gather(pos, -1, idx.expand_as(out.position_ids)) if pos.dim() == 2
                       else torch.gather(pos, 2, idx.unsqueeze(0).expand(3, -1, -1)))
    assert torch.equal(out.attention_mask, torch.gather(mask, 1, idx))
    assert torch.equal(out.hidden, torch.gather(embeds, 1, idx.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])))
    assert torch.equal(out.presents[0], torch.gather(keys[0], 2, idx[:, None, :, None].expand(-1, 2, -1, 16)))
    faithful = StageRunner(r.method, num_image=K, num_layers=4, image_start=S, kv_policy="faithful", grid=GRID)
    assert all(a is b for a, b in zip(faithful.apply(2, state, LLMParts.of(model)).presents, keys))
    # decode continues at the unpruned row's max id + 1, whatever was pruned (the text holds the max id)
    step = next_positions(pos.numpy(), 0)
    assert (step.reshape(-1, 2)[0] == pos.reshape(-1, 2, pos.shape[-1]).amax(dim=(0, 2)).numpy() + 1).all() \
        if pos.dim() == 3 else (step[:, 0] == pos[torch.arange(2), mask.sum(1) - 1].numpy() + 1).all()


@pytest.mark.parametrize("name,keep,layer", CASES)
def test_each_batch_row_equals_its_batch_one_run(llm, name, keep, layer):
    model, rope = llm
    embeds, pos, mask, image_positions = prompt_batch(model, rope, text_lens=(9, 5))
    both = StagedLM(model, runner(name, keep, layer))
    logits = both.prefill(embeds, pos, mask, image_positions)
    for row in range(2):
        length = int(mask[row].sum())
        one = StagedLM(model, runner(name, keep, layer))
        row_pos = pos[..., row:row + 1, :length]
        got = one.prefill(embeds[row:row + 1, :length], row_pos, mask[row:row + 1, :length],
                          image_positions[row:row + 1])
        for a, b in zip(one.keeps, both.keeps):
            assert torch.equal(a[0], b[row]), f"{name}: row {row} keeps other slots in the batch"
        torch.testing.assert_close(got[0], logits[row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="fastv", keep=[10], layer=[0]), r"fastv: stage 1 L=0, K=24 -> K2=10, T=4: expected 1 <= L <= T-1 = 3"),
    (dict(name="fastv", keep=[10], layer=[4]), r"L=4, K=24 -> K2=10, T=4: expected 1 <= L <= T-1"),
    (dict(name="d2pruner", keep=[25], layer=[1]), r"d2pruner: stage 1 L=1, K=24 -> K2=25, T=4: expected K2 <= K"),
    (dict(name="dart", keep=[3], layer=[2]), r"dart: stage 1 L=2, K=24 -> K2=3, T=4: expected K2 >= 4"),
    (dict(name="pdrop", keep=[12, 14], layer=[1, 2]), r"pdrop: stage 2 L=2, K=12 -> K2=14, T=4: expected K2 <= K"),
    (dict(name="pdrop", keep=[12, 6], layer=[2, 2]), r"stage layers must increase"),
    (dict(name="polymorphic", keep=[12, 6], layer=[1]), r"2 keep value\(s\) \[12, 6\] for 1 stage layer"),
])
def test_budget_errors_name_method_layer_and_counts(kwargs, match):
    with pytest.raises(PrunerConfigError, match=match):
        runner(kwargs.pop("name"), **kwargs)


def test_a_row_with_fewer_text_tokens_than_text_pivots_is_named(llm):
    model, rope = llm
    embeds, pos, mask, image_positions = prompt_batch(model, rope, text_lens=(9, 3))
    with pytest.raises(PrunerConfigError, match=r"dart: row\(s\) \[1\] have \[3\] text token\(s\) after the image, "
                                                r"expected >= 4"):
        StagedLM(model, runner("dart", [9], [2])).prefill(embeds, pos, mask, image_positions)


def test_impossible_layer_average_is_an_error():
    from edgeprune.inllm import keep_for_average
    with pytest.raises(EdgepruneError, match="a layer average of 16 visual tokens is impossible from K=576"):
        keep_for_average("dart", 576, 32, [2], 16)     # §1: B = 16 at L = 2 from 576 on 32 layers
    assert keep_for_average("dart", 576, 32, [2], 64) == (30,)   # the worked table: 576 -> 30 averages 64


def test_last_token_attention_equals_the_eager_attention_probabilities(llm):
    # the one query row the last-token methods read (fastv, d2pruner, pdrop), computed from layer l's q and
    # cached keys, against the model's own eager attention probabilities (head mean, last valid token per row)
    model, rope = llm
    embeds, pos, mask, _ = prompt_batch(model, rope)      # rows of 9 and 6 text tokens: different last tokens

    def attention(kind):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(kind)
        else:                                              # the Qwen2-VL text wrapper
            model.config._attn_implementation = kind

    before = model.config._attn_implementation
    attention("eager")
    try:
        with torch.no_grad():
            out = model.model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, output_attentions=True)
    finally:
        attention(before)
    last = mask.sum(dim=1) - 1
    for layer in (1, 2):
        expected = out.attentions[layer].float().mean(dim=1)[torch.arange(2), last]    # [B, Lt]
        got = StagedLM(model).last_attention(embeds, pos, mask, layer)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
