"""serve/protocol.py and the OpenAI request mapping (serve/openai.py) on hand-made requests; no server needed.
Each bad value gets a RequestError naming it; `edgeprune serve` without PyTriton says what to install."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeprune.serve.openai import chat_to_tensors
from edgeprune.serve.protocol import Limits, RequestError, parse_request

LIMITS = Limits(max_images=2, max_prompt_tokens=5, max_new_tokens=10, default_new_tokens=4, max_image_pixels=4096)


def png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def tensors(images=None, prompt=b"what is it", **scalars) -> dict:
    out = {"image": np.array([images if images is not None else [png()]], dtype=object),
           "prompt": np.array([[prompt]], dtype=object)}
    kinds = {"max_new_tokens": np.int32, "temperature": np.float32, "top_p": np.float32, "seed": np.int64}
    out.update({k: np.array([[v]], dtype=kinds[k]) for k, v in scalars.items()})
    return out


def words(prompt: str) -> int:
    return len(prompt.split())


def test_a_good_request_and_its_defaults():
    request = parse_request(tensors(images=[png(), png((5, 9))]), LIMITS, words)
    assert [im.size for im in request.images] == [(8, 8), (5, 9)] and request.prompt == "what is it"
    assert (request.max_new_tokens, request.temperature, request.top_p, request.seed) == (4, 0.0, 1.0, 0)
    assert request.greedy and request.sampling == ("greedy",)
    sampled = parse_request(tensors(temperature=0.7, top_p=0.9, seed=3, max_new_tokens=10), LIMITS, words)
    assert not sampled.greedy and sampled.sampling[:3] == (pytest.approx(0.7), pytest.approx(0.9), 3)


@pytest.mark.parametrize("request_tensors, message", [
    (tensors(images=[png()[:40]]), "image 0: cannot decode"),
    (tensors(images=[b"GIF89a nonsense"]), "image 0: cannot decode"),
    (tensors(images=[png(), b""]), "image 1: empty"),
    (tensors(images=[png((100, 100))]), "image 0: 100x100; at most 4096 pixels"),
    (tensors(images=[png()] * 3), "3 images; expected 1..2"),
    (tensors(images=[]), "0 images"),
    (tensors(prompt="one two three four five six".encode()), "prompt of 6 tokens; this server takes at most 5"),
    (tensors(prompt=b"\xff\xfe"), "prompt: not UTF-8"),
    (tensors(max_new_tokens=0), "max_new_tokens=0; expected 1..10"),
    (tensors(max_new_tokens=11), "max_new_tokens=11"),
    (tensors(temperature=-0.5), "temperature=-0.5"),
    (tensors(temperature=float("nan")), "temperature=nan"),
    (tensors(top_p=0.0), "top_p=0.0"),
    (tensors(top_p=1.5), "top_p=1.5"),
    (tensors(seed=-1), "seed=-1"),
])
def test_bad_requests_are_named(request_tensors, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_request(request_tensors, LIMITS, words)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_an_image_fail_cleanly(blob):
    """Whatever bytes arrive, the request is parsed or refused with a RequestError, never another exception."""
    try:
        parse_request(tensors(images=[blob]), LIMITS, words)
    except RequestError:
        pass


def data_uri(blob: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(blob).decode()


def test_chat_request_mapping():
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "what"},
                                                      {"type": "image_url", "image_url": {"url": data_uri(b"abc")}},
                                                      {"type": "text", "text": "is it?"}]}],
            "max_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 9}
    got = chat_to_tensors(body)
    assert got["image"].tolist() == [[b"abc"]] and got["prompt"].tolist() == [[b"what is it?"]]
    assert got["max_new_tokens"].tolist() == [[7]] and got["max_new_tokens"].dtype == np.int32
    assert got["temperature"].tolist() == [[0.0]] and got["seed"].dtype == np.int64
    assert chat_to_tensors(dict(body, max_completion_tokens=3))["max_new_tokens"].tolist() == [[3]]
    assert "temperature" not in chat_to_tensors({"messages": body["messages"]})


@pytest.mark.parametrize("change, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "exactly one user"),
    ({"messages": [{"role": "user", "content": "no image"}]}, "0 image_url parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "expected a data URI"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     "bad base64"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "type 'audio'"),
    ({"n": 2}, "only n=1"),
    ({"max_tokens": "5"}, "max_new_tokens='5': expected a number"),
    ({"max_tokens": 2.5}, "expected an integer"),
    ({"seed": 2**70}, "out of range"),
    ({"temperature": True}, "expected a number"),
])
def test_bad_chat_requests_are_named(change, message):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": data_uri(b"x")}}]}]}
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        chat_to_tensors({**body, **change})


def test_serve_without_pytriton_says_what_to_install(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    try:
        import pytriton  # noqa: F401
        pytest.skip("PyTriton is installed in this environment")
    except ImportError:
        pass
    from edgeprune.cli import main

    assert main(["serve", str(tmp_path)]) == 1
    assert "pip install 'edgeprune[serve]'" in capsys.readouterr().err
