"""An OpenAI-compatible front for the Triton model: POST /v1/chat/completions, GET /v1/models, GET /health.

The interface vLLM, llama.cpp's server and Ollama speak, so existing clients work unchanged. Each HTTP request
becomes one Triton request (through Triton's own HTTP API, so Triton's dynamic batcher batches concurrent chats).
Supported: one user message whose content holds text parts and exactly one `image_url` part with a data URI
(data:image/png;base64,...); `max_tokens` / `max_completion_tokens`, `temperature` (absent or 0: greedy),
`top_p`, `seed`; `stream: true` answers in server-sent events (the whole answer in one chunk: the model is
batched, not streamed). System messages are ignored (the bundle's chat template has its own). Beside OpenAI's
fields, a reply carries "edgeprune": kept image-token positions, per-stage timings (ms) and the batch size formed.
Errors come back as HTTP 400 (the request) or 502/503 (the server), with OpenAI's {"error": {...}} body.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from edgeprune.serve.protocol import MODEL_NAME, STAGES_MS, RequestError

__all__ = ["start_openai_server", "chat_to_tensors", "TritonHttp"]

log = logging.getLogger(__name__)

MAX_BODY = 48 * 2**20


def chat_to_tensors(body: dict) -> dict:
    """An OpenAI chat request -> the Triton model's input tensors (protocol.INPUTS), or RequestError."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list")
    turns = [m for m in messages if isinstance(m, dict) and m.get("role") != "system"]
    if len(turns) != 1 or turns[0].get("role") != "user":
        raise RequestError("messages: expected exactly one user message (multi-turn chat is not supported)")
    content = turns[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise RequestError("content: expected a string or a list of parts")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(_data_uri_bytes(url))
        else:
            raise RequestError(f"content part of type {kind!r}: expected 'text' or 'image_url'")
    if len(images) != 1:
        raise RequestError(f"{len(images)} image_url parts; expected exactly one per chat request")
    if body.get("n", 1) != 1:
        raise RequestError(f"n={body.get('n')}: only n=1 is supported")
    tensors = {"image": np.array([images], dtype=object),
               "prompt": np.array([[" ".join(t for t in texts if t).encode("utf-8")]], dtype=object)}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    for name, value, dtype in (("max_new_tokens", max_tokens, np.int32), ("temperature", body.get("temperature"),
                               np.float32), ("top_p", body.get("top_p"), np.float32), ("seed", body.get("seed"),
                               np.int64)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{name}={value!r}: expected a number")
        if dtype is not np.float32 and value != int(value):
            raise RequestError(f"{name}={value!r}: expected an integer")
        if dtype is np.int32 and not -2**31 <= value < 2**31 or dtype is np.int64 and not -2**63 <= value < 2**63:
            raise RequestError(f"{name}={value!r}: out of range")
        tensors[name] = np.array([[value]], dtype=dtype)
    return tensors


def _data_uri_bytes(url) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url[:100]:
        raise RequestError("image_url: expected a data URI (data:image/png;base64,...); remote URLs are not fetched")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"image_url: bad base64 ({err})") from None


class TritonHttp:
    """Triton's HTTP API through tritonclient, one client per thread (tritonclient's clients are not thread-safe)."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        self.url, self.timeout_s = url.removeprefix("http://"), timeout_s
        self._local = threading.local()

    def infer(self, tensors: dict) -> dict:
        import tritonclient.http as http
        from tritonclient.utils import np_to_triton_dtype

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = http.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
        inputs = []
        for name, value in tensors.items():
            item = http.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            item.set_data_from_numpy(value, binary_data=True)
            inputs.append(item)
        result = client.infer(MODEL_NAME, inputs)
        return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def start_openai_server(host: str, port: int, triton_url: str) -> ThreadingHTTPServer:
    """Start the front on (host, port) in a daemon thread, forwarding to Triton's HTTP API at `triton_url`."""
    triton = TritonHttp(triton_url)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            log.debug("openai %s " + fmt, self.address_string(), *args)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._json(HTTPStatus.OK, {"status": "ok"})
            elif self.path.rstrip("/") == "/v1/models":
                self._json(HTTPStatus.OK, {"object": "list", "data": [
                    {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "edgeprune"}]})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= MAX_BODY:
                    raise RequestError(f"request body of {length} bytes; expected 1..{MAX_BODY}")
                try:
                    body = json.loads(self.rfile.read(length))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise RequestError(f"body is not JSON ({err})") from None
                if not isinstance(body, dict):
                    raise RequestError("body: expected a JSON object")
                tensors = chat_to_tensors(body)
            except (RequestError, ValueError) as err:
                return self._error(HTTPStatus.BAD_REQUEST, str(err))
            try:
                out = triton.infer(tensors)
            except Exception as err:  # connection refused, timeout, Triton error: the server side failed
                log.warning("triton request failed: %s", err)
                return self._error(HTTPStatus.BAD_GATEWAY, f"inference failed: {err}")
            error = out["error"].reshape(-1)[0].decode("utf-8")
            if error:
                return self._error(HTTPStatus.BAD_REQUEST, error)
            self._answer(body, out)

        def _answer(self, body: dict, out: dict) -> None:
            text = out["text"].reshape(-1)[0].decode("utf-8")
            reason = out["finish_reason"].reshape(-1)[0].decode()
            prompt_tokens, completion = int(out["prompt_tokens"].reshape(-1)[0]), int(
                out["completion_tokens"].reshape(-1)[0])
            head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": MODEL_NAME}
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion}
            if not body.get("stream"):
                # "edgeprune": what OpenAI's format has no field for (kept image-token positions, stage timings)
                extra = {"positions": out["positions"].reshape(-1).tolist(),
                         "timings_ms": dict(zip(STAGES_MS, map(float, out["timings_ms"].reshape(-1)))),
                         "batch_size": int(out["batch_size"].reshape(-1)[0])}
                return self._json(HTTPStatus.OK, {**head, "object": "chat.completion", "usage": usage, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                    "edgeprune": extra})
            chunks = [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None},
                      {"index": 0, "delta": {}, "finish_reason": reason}]
            events = b"".join(b"data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [c]})
                              .encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
            self._send(HTTPStatus.OK, events, "text/event-stream")

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, status: HTTPStatus, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def _send(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="openai-route", daemon=True).start()
    return server
