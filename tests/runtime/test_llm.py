"""runtime/llm.py: OrtLLM greedy/sampled generation vs a torch loop on a tiny seeded Llama; no torch at import."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.export.llm import export_llm
from edgeprune.runtime.llm import OrtLLM
from edgeprune.runtime.format import Graph, Keys
from edgeprune.runtime.sampling import make_rng, next_tokens

POSITIONS = [0, 1, 2, 3, 10, 12, 20, 21, 22, 23, 24, 25]  # gaps, as after pruning


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["plain", "fused"])
def ort_llm(request, llm, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"llm-{request.param}")
    entries = export_llm(llm, out, attention=request.param, validate=False)
    ort_llm = OrtLLM(out, entries, threads=1)
    ort_llm.entries = entries   # for the tests that edit them
    return ort_llm


@pytest.fixture(scope="module")
def prompt(llm):
    ids = torch.randint(0, 256, (2, len(POSITIONS)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids)
    return embeds.numpy(), np.array([POSITIONS] * 2)


@torch.no_grad()
def torch_generate(llm, embeds, positions, steps: int, do_sample=False, top_p=1.0, temperature=1.0, seed=0):
    """The reference loop: HF forward with its KV cache, decode token t at position positions[:, -1] + 1 + t."""
    rng = make_rng(seed)
    x, pos = torch.from_numpy(embeds), torch.from_numpy(positions)
    mask = torch.ones(pos.shape, dtype=torch.int64)
    out = llm(inputs_embeds=x, position_ids=pos, attention_mask=mask, use_cache=True)
    tokens = []
    for t in range(steps):
        nxt = next_tokens(out.logits[:, -1].numpy(), do_sample, rng, top_p=top_p, temperature=temperature)
        tokens.append(nxt)
        mask = torch.ones(pos.shape[0], mask.shape[1] + 1, dtype=torch.int64)
        out = llm(inputs_embeds=llm.get_input_embeddings()(torch.from_numpy(nxt)[:, None]),
                  position_ids=pos[:, -1:] + 1 + t, attention_mask=mask, cache=out.cache,
                  use_cache=True)
    return np.stack(tokens, axis=1)


def test_greedy_16_tokens_match_torch(ort_llm, llm, prompt):
    embeds, positions = prompt
    gen = ort_llm.generate(embeds, positions, max_new_tokens=16, eos_token_ids=None)
    assert gen.ids.shape == (2, 16) and gen.ids.dtype == np.int64
    np.testing.assert_array_equal(gen.ids, torch_generate(llm, embeds, positions, 16))
    assert len(set(gen.ids.ravel().tolist())) > 2  # not a degenerate repeat of one token


def test_batch_rows_are_independent(ort_llm, prompt):
    embeds, positions = prompt
    both = ort_llm.generate(embeds, positions, max_new_tokens=6, eos_token_ids=None).ids
    second = ort_llm.generate(embeds[1:], positions[1:], max_new_tokens=6, eos_token_ids=None).ids
    np.testing.assert_array_equal(both[1:], second)


@pytest.mark.parametrize("cut", [(12, 7), (5, 12), (12, 2)])
def test_rows_of_different_lengths_equal_each_row_alone(ort_llm, llm, prompt, cut):
    """Right-padded rows (the server's batches of different prompts): each row's greedy tokens equal the row
    run alone at its own length, and the torch loop's; the padding's contents do not matter."""
    embeds, positions = prompt
    lengths = np.array(cut)
    padded = embeds.copy()
    for b, n in enumerate(lengths):
        padded[b, n:] = 99.0                                          # junk in the padding
    gen = ort_llm.generate(padded, positions, max_new_tokens=10, eos_token_ids=None, lengths=lengths)
    for b, n in enumerate(lengths):
        alone = ort_llm.generate(embeds[b:b + 1, :n], positions[b:b + 1, :n], max_new_tokens=10, eos_token_ids=None)
        np.testing.assert_array_equal(gen.ids[b], alone.ids[0], err_msg=f"row {b} of lengths {cut}")
        np.testing.assert_array_equal(gen.ids[b], torch_generate(llm, embeds[b:b + 1, :n], positions[b:b + 1, :n],
                                                                 10)[0])
    assert gen.num_prompt_tokens == 12


def test_padded_lengths_are_checked(ort_llm, prompt):
    embeds, positions = prompt
    for lengths in ([12], [11, 10], [12, 1], [13, 12]):
        with pytest.raises(EdgepruneError, match="lengths"):
            ort_llm.generate(embeds, positions, max_new_tokens=2, eos_token_ids=None, lengths=lengths)


def test_top_p_sampling_matches_torch_with_same_seed(ort_llm, llm, prompt):
    embeds, positions = prompt
    kw = dict(do_sample=True, top_p=0.9, temperature=0.7, seed=3)
    gen = ort_llm.generate(embeds, positions, max_new_tokens=8, eos_token_ids=None, **kw)
    np.testing.assert_array_equal(gen.ids, torch_generate(llm, embeds, positions, 8, **kw))
    other = ort_llm.generate(embeds, positions, max_new_tokens=8, eos_token_ids=None, **dict(kw, seed=4))
    assert not np.array_equal(gen.ids, other.ids)


def test_stops_when_every_row_emitted_eos_and_finished_rows_keep_it(ort_llm, prompt):
    embeds, positions = prompt
    free = ort_llm.generate(embeds, positions, max_new_tokens=16, eos_token_ids=None).ids  # [2, 16]
    eos = {int(free[0, 2]), int(free[1, 5])}
    first = [next(t for t in range(16) if free[b, t] in eos) for b in range(2)]           # per row
    gen = ort_llm.generate(embeds, positions, max_new_tokens=16, eos_token_ids=sorted(eos))
    assert gen.ids.shape == (2, max(first) + 1)
    for b in range(2):
        np.testing.assert_array_equal(gen.ids[b, :first[b] + 1], free[b, :first[b] + 1])
        assert (gen.ids[b, first[b]:] == free[b, first[b]]).all()   # the row repeats its own EOS


def test_streaming_timings_and_kv_bytes(ort_llm, prompt):
    embeds, positions = prompt
    seen = []
    gen = ort_llm.generate(embeds, positions, max_new_tokens=5, eos_token_ids=None,
                           on_token=lambda step, ids: seen.append((step, ids.copy())))
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.stack([ids for _, ids in seen], axis=1), gen.ids)
    assert gen.num_prompt_tokens == 12 and gen.prefill_s > 0
    assert len(gen.decode_s) == 4  # no decoder call after the last token
    # present KV after the last decoder call: 12 prompt + 4 fed tokens, 2 layers x (k, v), fp32
    assert gen.kv_bytes == 2 * 2 * 2 * (12 + 4) * 2 * 16 * 4


def test_bad_input_and_bundle_errors(ort_llm, prompt, tmp_path):
    embeds, positions = prompt
    with pytest.raises(EdgepruneError, match="max_new_tokens=0"):
        ort_llm.generate(embeds, positions, max_new_tokens=0, eos_token_ids=None)
    with pytest.raises(EdgepruneError, match=r"position_ids \(2, 11\)"):
        ort_llm.generate(embeds, positions[:, :11], max_new_tokens=2, eos_token_ids=None)
    with pytest.raises(BundleError, match="graph not found"):
        OrtLLM(tmp_path, {**ort_llm.entries, Keys.LLM_DECODER_GRAPH: {Graph.FILE: "missing.onnx"}})
    with pytest.raises(BundleError, match="llm.head_dim"):
        OrtLLM(tmp_path, {k: v for k, v in ort_llm.entries.items() if k != Keys.LLM_HEAD_DIM})


def test_runtime_imports_without_torch(tmp_path):
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import edgeprune.runtime.llm
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
