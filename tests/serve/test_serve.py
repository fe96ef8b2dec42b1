"""`edgeprune serve` for real: Triton (PyTriton) on loopback with its dynamic batcher, driven through the
OpenAI-compatible route. Concurrent chats are batched and answer exactly what the bundle answers alone; bad
requests fail alone while the rest of their batch is answered; bench-serve reports 0 lost or mismatched."""
from __future__ import annotations

import base64
import json
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from edgeprune.serve.bench import ServerProcess, workload

NEW = 8
LONG = "word " * 100         # > --max-prompt-tokens 200 below (tiny-llava tokenises by characters)


@pytest.fixture(scope="module")
def server(serve_python, tiny_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # a long queue delay so that requests sent together reliably land in one batch
    args = ("--max-batch", "8", "--max-queue-delay-us", "400000", "--max-prompt-tokens", "200", "--threads", "1")
    with ServerProcess(tiny_bundle, args, openai=True, log_path=log, python=str(serve_python)) as proc:
        proc.wait_ready(timeout_s=300)
        yield proc
        assert proc.proc.poll() is None, f"the server died (log: {log})"


def chat(image: bytes | None, prompt: str, **params) -> dict:
    content = [{"type": "text", "text": prompt}]
    if image is not None:
        content.append({"type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}})
    return {"model": "edgeprune", "messages": [{"role": "user", "content": content}], "max_tokens": NEW, **params}


def post(server, body, raw: bytes | None = None) -> tuple[int, dict | bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.openai_url + "/chat/completions", data,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            payload = reply.read()
            kind = reply.headers.get("Content-Type", "")
            return reply.status, json.loads(payload) if kind.startswith("application/json") else payload
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def all_at_once(server, bodies: list) -> list:
    results = [None] * len(bodies)

    def send(i):
        body, raw = bodies[i] if isinstance(bodies[i], tuple) else (bodies[i], None)
        results[i] = post(server, body, raw)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


def test_concurrent_chats_are_batched_and_equal_single_answers(server, single):
    work = workload(6)                       # prompts of three lengths: batches mix prompt lengths
    replies = all_at_once(server, [chat(image, prompt) for image, prompt in work])
    for (image, prompt), (status, reply) in zip(work, replies):
        assert status == 200, reply
        alone = single(image, prompt, NEW)
        assert reply["choices"][0]["message"]["content"] == alone.texts[0]
        assert reply["edgeprune"]["positions"] == alone.positions[0].tolist()
        assert reply["usage"] == {"prompt_tokens": alone.prompt_lengths[0], "completion_tokens": len(alone.ids[0]),
                                  "total_tokens": alone.prompt_lengths[0] + len(alone.ids[0])}
        assert reply["choices"][0]["finish_reason"] == "length"       # tiny-llava never emits EOS
    sizes = [reply["edgeprune"]["batch_size"] for _, reply in replies]
    assert max(sizes) > 1, f"no batch formed: {sizes}"


def test_bad_requests_fail_alone_and_the_server_stays_up(server, single):
    (image, prompt), (other, other_prompt) = workload(2)
    good = chat(image, prompt)
    bodies = [
        good,
        chat(image[: len(image) // 2], prompt),                   # truncated PNG
        chat(b"not an image at all", prompt),
        chat(image, LONG),                                        # over-long prompt
        chat(image, prompt, max_tokens=0),
        chat(image, prompt, temperature=-1),
        chat(image, prompt, top_p=2),
        chat(image, prompt, seed="x"),
        chat(None, prompt),                                       # no image
        ({}, b"{not json"),
        chat(other, other_prompt),
    ]
    replies = all_at_once(server, bodies)
    expected = {1: "cannot decode", 2: "cannot decode", 3: "prompt of", 4: "max_new_tokens=0", 5: "temperature=-1",
                6: "top_p=2", 7: "seed='x'", 8: "0 image_url parts", 9: "not JSON"}
    for i, needle in expected.items():
        status, reply = replies[i]
        assert status == 400 and needle in reply["error"]["message"], (i, status, reply)
    for i, (img, text) in ((0, (image, prompt)), (10, (other, other_prompt))):
        status, reply = replies[i]
        assert status == 200 and reply["choices"][0]["message"]["content"] == single(img, text, NEW).texts[0]
    status, reply = post(server, good)                            # still up, same answer
    assert status == 200 and reply["choices"][0]["message"]["content"] == single(image, prompt, NEW).texts[0]


def test_streaming_models_and_unknown_routes(server, single):
    image, prompt = workload(1)[0]
    status, events = post(server, chat(image, prompt, stream=True))
    assert status == 200
    chunks = [json.loads(line[6:]) for line in events.decode().split("\n\n") if line.startswith("data: {")]
    assert events.decode().rstrip().endswith("data: [DONE]")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == single(image, prompt, NEW).texts[0] and chunks[-1]["choices"][0]["finish_reason"] == "length"
    with urllib.request.urlopen(server.openai_url + "/models", timeout=30) as reply:
        assert json.loads(reply.read())["data"][0]["id"] == "edgeprune"
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(server.openai_url + "/nothing", timeout=30)


def test_bench_serve_reports_no_lost_or_mismatched(serve_python, tiny_bundle):
    """The load generator end to end on its own server: two levels, every 4th request broken on purpose."""
    result = subprocess.run([str(serve_python), "-m", "edgeprune.cli", "bench-serve", str(tiny_bundle), "--clients",
                             "1,4", "--requests", "8", "--distinct", "4", "--max-new-tokens", "6", "--bad-every", "4",
                             "--threads", "1", "--time-limit", "300"],
                            capture_output=True, text=True, timeout=900)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert lines[-1] == "16 requests, 0 lost or mismatched"
    assert any("4 refused with an error" in line for line in lines), result.stdout
    assert any(line.startswith("throughput at 4 clients / at 1:") for line in lines), result.stdout
