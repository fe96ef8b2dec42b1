"""The serving protocol: the Triton model's tensors and the checks on one request, shared by the PyTriton
server (serve/server.py), the stock-Triton model (serve/repo.py's model.py) and the clients (bench, OpenAI route).

A request asks one prompt about one or more images (one answer per image, as `edgeprune run` does). Every tensor
has Triton's batch dimension first (one per request), then the dims below. numpy + stdlib only.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from edgeprune.errors import EdgepruneError

__all__ = ["MODEL_NAME", "INPUTS", "OUTPUTS", "STAGES_MS", "Limits", "Request", "RequestError", "parse_request",
           "error_outputs"]

MODEL_NAME = "edgeprune"

# (name, numpy dtype, dims after the batch dim, optional). bytes = Triton's BYTES.
INPUTS = (
    ("image", bytes, (-1,), False),              # PNG/JPEG/... file bytes, one or more
    ("prompt", bytes, (1,), False),              # UTF-8
    ("max_new_tokens", np.int32, (1,), True),    # default Limits.default_new_tokens
    ("temperature", np.float32, (1,), True),     # absent or 0: greedy; > 0: top-p sampling
    ("top_p", np.float32, (1,), True),           # default 1.0
    ("seed", np.int64, (1,), True),              # sampling seed, default 0
)
STAGES_MS = ("preprocess", "vision", "embed", "prefill", "decode")
OUTPUTS = (
    ("text", bytes, (-1,)),                      # one answer per image
    ("finish_reason", bytes, (-1,)),             # "stop" (EOS) or "length" (max_new_tokens reached)
    ("positions", np.int64, (-1, -1)),           # [images, K] kept image-token positions
    ("prompt_tokens", np.int32, (-1,)),          # prefill length per image
    ("completion_tokens", np.int32, (-1,)),      # new tokens per image (EOS included)
    ("timings_ms", np.float32, (len(STAGES_MS),)),  # per stage, of the batch this request ran in
    ("batch_size", np.int32, (1,)),              # requests the dynamic batcher delivered together with this one
    ("error", bytes, (1,)),                      # empty on success; else why this request failed (no answer)
)


class RequestError(EdgepruneError):
    """What is wrong with one request: that request gets this message as its error; the batch goes on."""


@dataclass(frozen=True)
class Limits:
    max_images: int = 16               # images in one request
    max_prompt_tokens: int = 256       # the user's prompt, tokenised
    max_new_tokens: int = 512
    default_new_tokens: int = 64
    max_image_bytes: int = 32 * 2**20
    max_image_pixels: int = 40_000_000  # larger images are refused before decoding (decompression bombs)


@dataclass(frozen=True)
class Request:
    images: list                        # RGB PIL images
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def sampling(self) -> tuple:
        """Requests with equal `sampling` may share one generate call (greedy ones always can)."""
        return ("greedy",) if self.greedy else (self.temperature, self.top_p, self.seed, id(self))


def _scalar(tensors: dict, name: str, default, kind):
    value = tensors.get(name)
    if value is None:
        return default
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name}: {flat.size} values; expected one")
    return kind(flat[0])


def parse_request(tensors: dict, limits: Limits, count_tokens) -> Request:
    """One request's tensors (name -> array, batch dim included) -> Request, or RequestError naming the problem.
    `count_tokens(prompt)` -> the prompt's token count (the server's tokenizer)."""
    from PIL import Image

    raw = tensors.get("prompt")
    if raw is None or np.asarray(raw).size != 1:
        raise RequestError("prompt: expected one UTF-8 string")
    raw = np.asarray(raw).reshape(-1)[0]
    try:
        prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as err:
        raise RequestError(f"prompt: not UTF-8 ({err})") from None
    n_tokens = count_tokens(prompt)
    if n_tokens > limits.max_prompt_tokens:
        raise RequestError(f"prompt of {n_tokens} tokens; this server takes at most {limits.max_prompt_tokens}")
    max_new = _scalar(tensors, "max_new_tokens", limits.default_new_tokens, int)
    if not 1 <= max_new <= limits.max_new_tokens:
        raise RequestError(f"max_new_tokens={max_new}; expected 1..{limits.max_new_tokens}")
    temperature = _scalar(tensors, "temperature", 0.0, float)
    top_p = _scalar(tensors, "top_p", 1.0, float)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise RequestError(f"temperature={temperature}; expected >= 0 (0 = greedy)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise RequestError(f"top_p={top_p}; expected 0 < top_p <= 1")
    seed = _scalar(tensors, "seed", 0, int)
    if seed < 0:
        raise RequestError(f"seed={seed}; expected >= 0")

    blobs = np.asarray(tensors.get("image", [])).reshape(-1)
    if not 1 <= blobs.size <= limits.max_images:
        raise RequestError(f"{blobs.size} images; expected 1..{limits.max_images}")
    images = []
    for i, blob in enumerate(blobs):
        if not isinstance(blob, bytes) or not blob:
            raise RequestError(f"image {i}: empty or not bytes")
        if len(blob) > limits.max_image_bytes:
            raise RequestError(f"image {i}: {len(blob)} bytes; at most {limits.max_image_bytes}")
        try:
            with Image.open(io.BytesIO(blob)) as pil:
                if pil.width * pil.height > limits.max_image_pixels:
                    raise RequestError(f"image {i}: {pil.width}x{pil.height}; at most {limits.max_image_pixels} pixels")
                images.append(pil.convert("RGB"))
        except RequestError:
            raise
        except Exception as err:  # Pillow raises many kinds (OSError, SyntaxError, ValueError...) on corrupt files
            raise RequestError(f"image {i}: cannot decode ({type(err).__name__}: {err})") from None
    return Request(images, prompt, max_new, temperature, top_p, seed)


def error_outputs(message: str, keep: int) -> dict:
    """The outputs of a failed request: `error` set, one placeholder row (PyTriton cannot send empty tensors):
    text "", finish_reason "error", positions -1, token counts 0."""
    return {"text": np.array([[b""]], dtype=object), "finish_reason": np.array([[b"error"]], dtype=object),
            "positions": np.full((1, 1, keep), -1, dtype=np.int64), "prompt_tokens": np.zeros((1, 1), np.int32),
            "completion_tokens": np.zeros((1, 1), np.int32),
            "timings_ms": np.zeros((1, len(STAGES_MS)), dtype=np.float32), "batch_size": np.ones((1, 1), np.int32),
            "error": np.array([[message.encode("utf-8")]], dtype=object)}
