"""Hostile input to the Python API and the CLI: one-line errors naming the value, before any work, and the
context-length rule (issue 14, items 4, 8, 9). Each test first reproduces the failure the issue reported."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.cli import main
from edgeprune.errors import EdgepruneError, ModelError, PrunerConfigError
from edgeprune.pruners import build
from edgeprune.runtime.pipeline import Pipeline
from edgeprune.runtime.positions import largest_position
from edgeprune.runtime.prompt import encode_prompt

IMAGE = np.zeros((16, 16, 3), np.uint8)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline(tiny_bundle, threads=1)


@pytest.fixture
def no_graph_runs(pipe, monkeypatch):
    """Make any vision or LLM work fail loudly: the checks must come first."""
    def ran(*args, **kwargs):
        raise AssertionError("a graph ran before the request was refused")

    monkeypatch.setattr(pipe.runners[0], "run", ran)
    monkeypatch.setattr(pipe.llm, "step", ran)
    return pipe


# -- 4. the context length ------------------------------------------------------------------------------------
def test_the_bundle_records_the_context_length(pipe):
    assert pipe.llm.context_length == 2048          # tiny-llava's max_position_embeddings


def test_too_many_new_tokens_are_refused_before_any_work(no_graph_runs):
    with pytest.raises(ModelError, match=r"the prompt needs position ids up to \d+ and max_new_tokens=100000000 up to "
                                         r"\d+, the model's context length is 2048: at most \d+ new tokens fit"):
        no_graph_runs(IMAGE, "hi", max_new_tokens=100_000_000)


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(no_graph_runs):
    with pytest.raises(ModelError, match=r"position ids up to \d+ \(text and image tokens\).*context length is 2048: "
                                         r"shorten"):
        no_graph_runs(IMAGE, "x" * 3000, max_new_tokens=1)     # tiny-llava's tokenizer: about a token a character


def test_the_rule_counts_positions_not_only_tokens(pipe):
    """With original positions the image spans all N = 576 ids, whichever K = 8 are kept."""
    assert largest_position("1d", 5, 8, 576, (24, 24), 7, "compact") == 5 + 8 + 7 - 1
    assert largest_position("1d", 5, 8, 576, (24, 24), 7, "original") == 5 + 576 + 7 - 1
    assert largest_position("mrope", 5, 8, 64, (8, 8), 7, "original") == 5 + 8 + 7 - 1   # suffix after max(H, W)
    prefix, suffix = (len(p) for p in encode_prompt(pipe.tokenizer, pipe.bundle.chat_template, "hi"))
    fits = 2048 - (prefix + 8 + suffix - 1)       # new token t is fed at id top + 1 + t, the last one never
    assert len(pipe(IMAGE, "hi", max_new_tokens=fits).ids[0]) <= fits          # the limit itself runs
    with pytest.raises(ModelError, match=f"at most {fits} new tokens fit"):
        pipe(IMAGE, "hi", max_new_tokens=fits + 1)


def test_the_llm_checks_the_rule_itself(pipe):
    embeds = np.zeros((1, 10, pipe.llm.hidden_size), np.float32)
    positions = np.arange(2040, 2050)[None]                           # ids past the context
    with pytest.raises(ModelError, match="position ids up to 2049"):
        pipe.llm.generate(embeds, positions, max_new_tokens=1, eos_token_ids=[0])


# -- 8. the Python API: wrong types are one-line errors --------------------------------------------------------
@pytest.mark.parametrize("images, message", [
    (None, r"images=None: expected an image"),
    (42, r"images=42: expected an image"),
    ((x for x in [IMAGE]), r"images=<generator .*: expected an image"),
    ([], r"no image given"),
    (np.zeros((0, 0), np.uint8), r"image array of shape \(0, 0\): 0x0 pixels; expected at least 1x1"),
    (np.zeros((4, 4, 3), np.float32), r"dtype float32: expected uint8"),
    ([IMAGE, 3.5], r"image of type float: expected a file path, a PIL image or a uint8 array"),
])
def test_bad_images_are_one_line(no_graph_runs, images, message):
    with pytest.raises(ModelError, match=message):
        no_graph_runs(images, "hi", max_new_tokens=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 2.5}, r"max_new_tokens=2.5: expected an integer >= 1"),
    ({"max_new_tokens": None}, r"max_new_tokens=None: expected an integer >= 1"),
    ({"max_new_tokens": 0}, r"max_new_tokens=0: expected an integer >= 1"),
    ({"seed": -1, "do_sample": True}, r"seed=-1: expected an integer >= 0"),
    ({"seed": "x"}, r"seed='x': expected an integer >= 0"),
    ({"top_p": "0.9", "do_sample": True}, r"top_p='0.9', expected a number with 0 < top_p <= 1"),
    ({"temperature": math.nan, "do_sample": True}, r"temperature=nan, expected a finite number > 0"),
])
def test_bad_generation_options_are_one_line(no_graph_runs, kwargs, message):
    with pytest.raises(EdgepruneError, match=message):
        no_graph_runs(IMAGE, "hi", **{"max_new_tokens": 1, **kwargs})


@pytest.mark.parametrize("prompt, message", [
    ("a\udcff", r"prompt: character 1 \('\\udcff'\) is not valid text \(a lone surrogate"),
    (b"hi", r"prompt must be a str, got bytes"),
])
def test_bad_prompts_are_one_line(no_graph_runs, prompt, message):
    with pytest.raises(ModelError, match=message):
        no_graph_runs(IMAGE, prompt, max_new_tokens=1)


def test_generate_rows_checks_every_prompt(no_graph_runs):
    with pytest.raises(ModelError, match=r"prompts: expected a list of str, one per image, got str"):
        no_graph_runs.generate_rows([IMAGE], "hi", max_new_tokens=1)
    with pytest.raises(ModelError, match=r"prompt must be a str, got int"):
        no_graph_runs.generate_rows([IMAGE, IMAGE], ["hi", 3], max_new_tokens=1)


def test_the_bundle_argument_is_a_path():
    with pytest.raises(EdgepruneError, match=r"bundle=None: expected the path of a bundle folder"):
        Pipeline(None)


def test_providers_and_threads(tiny_bundle):
    assert Pipeline(tiny_bundle, providers="cpu", threads=1).llm.device == "CPUExecutionProvider"  # not 'c', 'p', 'u'
    with pytest.raises(EdgepruneError, match=r"provider 1: expected a name"):
        Pipeline(tiny_bundle, providers=[1])
    with pytest.raises(EdgepruneError, match=r"providers=\{'cpu'\}: expected a list of names"):
        Pipeline(tiny_bundle, providers={"cpu"})
    with pytest.raises(EdgepruneError, match=r"threads=-3: expected an integer >= 1"):
        Pipeline(tiny_bundle, threads=-3)


# -- 8/9. pruner inputs and options -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_signals_are_refused(bad):
    tokens = torch.randn(1, 16, 4)
    tokens[0, 3, 1] = bad
    with pytest.raises(PrunerConfigError, match=r"divprune: signal 'tokens' contains (Inf|NaN); expected finite"):
        build("divprune", 4)(tokens=tokens)


def test_random_seed_must_be_an_integer():
    with pytest.raises(PrunerConfigError, match=r"random: seed='x', expected an integer"):
        build("random", 4, seed="x")


def test_float16_feats_go_through_autoselect():
    g = torch.Generator().manual_seed(0)
    tokens, feats = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 12, generator=g)
    pruner = build("autoselect", 4, dim=12, scorer="random")
    want = pruner(tokens=tokens, feats=feats.half().float()).positions
    assert torch.equal(pruner(tokens=tokens, feats=feats.half()).positions, want)


# -- 8/9. the CLI ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "tiny-llava", "--device-profile", "cpu-generic", "--batch", "0"],
     "argument --batch: 0: expected an integer >= 1"),
    (["plan", "--model", "tiny-llava", "--device-profile", "cpu-generic", "--ttft-ms", "-5"],
     "argument --ttft-ms: -5: expected a finite number > 0"),
    (["plan", "--model", "tiny-llava", "--device-profile", "cpu-generic", "--ttft-ms", "nan"],
     "argument --ttft-ms: nan: expected a finite number > 0"),
    (["profile", "BUNDLE", "--soak", "-3"], "argument --soak: -3: expected an integer >= 1"),
    (["run", "BUNDLE", "--image", "x.png", "--prompt", "hi", "--threads", "-3"],
     "argument --threads: -3: expected an integer >= 1"),
    (["run", "BUNDLE", "--image", "x.png", "--prompt", "hi", "--sample", "--seed", "-1"],
     "argument --seed: -1: expected an integer >= 0"),
    (["serve", "BUNDLE", "--port", "70000"], "argument --port: 70000: expected a port number in 1..65535"),
    (["serve", "BUNDLE", "--max-batch", "0"], "argument --max-batch: 0: expected an integer >= 1"),
    (["bench-serve", "BUNDLE", "--requests", "-5"], "argument --requests: -5: expected an integer >= 1"),
    (["bench-serve", "BUNDLE", "--time-limit", "inf"], "argument --time-limit: inf: expected a finite number > 0"),
    (["triton-repo", "BUNDLE", "--out", "repo", "--instances", "0"],
     "argument --instances: 0: expected an integer >= 1"),
])
def test_cli_refuses_nonsense_counts_before_loading_anything(tiny_bundle, capsys, argv, message):
    argv = [str(tiny_bundle) if a == "BUNDLE" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_plan_and_soak_refuse_nonsense_through_the_api_too(tiny_bundle):
    from edgeprune.profiles.device import load_device_profile
    from edgeprune.profiles.planner import facts_from_bundle, plan
    from edgeprune.profiles.profiler import soak

    facts, device = facts_from_bundle(tiny_bundle), load_device_profile("cpu-generic")
    for kwargs, message in [({"batch": 0}, "--batch 0"), ({"ttft_ms": -5.0}, "--ttft-ms -5.0"),
                            ({"ttft_ms": 0}, "--ttft-ms 0"), ({"ttft_ms": math.nan}, "--ttft-ms nan")]:
        with pytest.raises(EdgepruneError, match=message):
            plan(facts, device, context=64, **kwargs)
    with pytest.raises(EdgepruneError, match="requests=-3: expected an integer >= 1"):
        soak(tiny_bundle, -3)


def test_run_device_profile_is_used_or_refused(tiny_bundle, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(IMAGE).save(image)
    base = ["run", str(tiny_bundle), "--image", str(image), "--prompt", "hi", "--max-new-tokens", "1", "-q"]
    assert main([*base, "--device-profile", str(tmp_path / "missing.yaml")]) == 1
    assert "device profile file" in capsys.readouterr().err
    assert main([*base, "--device-profile", "cpu-generic"]) == 0     # its providers: cpu
