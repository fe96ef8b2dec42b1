"""What a caller may pass to the runtime (Pipeline, OrtLLM), checked once at its edge: a wrong type or
value is a one-line EdgepruneError naming the argument and what was expected, before any work.

Context-length rule (README, Guarantees; the torch reference applies the same function): every position
id the decoder is fed must be below the model's context length (manifest llm.context_length, its
max_position_embeddings). The prompt's largest id is P (with "original" positions the image spans all N
ids however few tokens are kept; runtime/positions.py), and new token t (0-based) is fed at P + 1 + t
except the last, which is never fed back: so P + max_new_tokens <= context length. A request beyond it is
refused before any graph runs, naming how many new tokens would fit; nothing is truncated.
"""
from __future__ import annotations

import numbers

from edgeprune.errors import EdgepruneError, ModelError

__all__ = ["check_images", "check_prompt", "check_count", "check_seed", "check_context"]


def check_images(images) -> list:
    """One image (path, file object, PIL image, array) or a list/tuple of them -> a non-empty list."""
    if images is None or isinstance(images, (bool, numbers.Number)) or (
            hasattr(images, "__next__") and not hasattr(images, "read")):   # a generator or iterator: no len, one pass
        raise ModelError(f"images={_short(images)}: expected an image (file path, PIL image or uint8 array) or a "
                         "list of them")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ModelError("no image given")
    return images


def check_prompt(prompt) -> str:
    """A str that UTF-8 can encode (no lone surrogates: Python's reading of bytes that are not UTF-8)."""
    if not isinstance(prompt, str):
        raise ModelError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ModelError(f"prompt: character {err.start} ({prompt[err.start]!r}) is not valid text (a lone surrogate: "
                         "bytes that are not UTF-8, e.g. from a terminal in another encoding); pass UTF-8 text")
    return prompt


def check_count(name: str, value, low: int = 1) -> int:
    """An integer (Python or numpy, not bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise EdgepruneError(f"{name}={_short(value)}: expected an integer >= {low}")
    return int(value)


def check_seed(seed) -> int:
    return check_count("seed", seed, low=0)


def check_context(top_position: int, max_new_tokens: int, context_length: int | None) -> None:
    """Refuse a request whose prompt's largest position id `top_position` + max_new_tokens exceeds the context
    length (module rule); context_length None (a schema-1 bundle never recorded it): nothing to check."""
    if context_length is None or top_position + max_new_tokens <= context_length:
        return
    if top_position >= context_length:
        raise ModelError(f"the prompt needs position ids up to {top_position} (text and image tokens), the model's "
                         f"context length is {context_length}: shorten the prompt")
    raise ModelError(f"the prompt needs position ids up to {top_position} and max_new_tokens={max_new_tokens} up to "
                     f"{top_position + max_new_tokens - 1}, the model's context length is {context_length}: at most "
                     f"{context_length - top_position} new tokens fit")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
