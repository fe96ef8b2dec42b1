"""Where the image goes in the prompt: text before it, K image tokens, text after it.

A chat template is reduced to two strings so the runtime needs only `tokenizers`:
`prefix` (everything before the image) and `suffix` (after it, with `{prompt}` for the user text).
Both are tokenised separately without added special tokens, identically in torch and runtime.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgeprune.errors import ModelError

# Token id written in the padding of shorter rows; the attention mask hides it, so any valid id does.
PAD_ID = 0

__all__ = ["ChatTemplate", "encode_prompt", "encode_prompts", "PAD_ID"]


@dataclass(frozen=True)
class ChatTemplate:
    prefix: str
    suffix: str   # must contain "{prompt}"

    def __post_init__(self):
        if "{prompt}" not in self.suffix:
            raise ModelError(f"chat template suffix {self.suffix!r} has no {{prompt}} placeholder")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ChatTemplate":
        return cls(prefix=d["prefix"], suffix=d["suffix"])


def encode_prompt(tokenizer, template: ChatTemplate, prompt: str) -> tuple[list[int], list[int]]:
    """`tokenizer` is a `tokenizers.Tokenizer`. Returns (ids before the image, ids after it)."""
    if not isinstance(prompt, str):
        raise ModelError(f"prompt must be a str, got {type(prompt).__name__}")
    prefix = tokenizer.encode(template.prefix, add_special_tokens=False).ids
    suffix = tokenizer.encode(template.suffix.replace("{prompt}", prompt), add_special_tokens=False).ids
    return prefix, suffix


def encode_prompts(tokenizer, template: ChatTemplate, prompts: list[str]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """One prompt per row -> (prefix ids shared by every row, suffix ids [B, M] int64 right-padded with
    PAD_ID, suffix mask [B, M] int64, 1 = a real token). M is the longest row's suffix."""
    prefix, suffixes = None, []
    for prompt in prompts:
        prefix, suffix = encode_prompt(tokenizer, template, prompt)
        suffixes.append(suffix)
    width = max(len(s) for s in suffixes)
    ids = np.full((len(suffixes), width), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(suffixes), width), dtype=np.int64)
    for row, suffix in enumerate(suffixes):
        ids[row, :len(suffix)], mask[row, :len(suffix)] = suffix, 1
    return prefix, ids, mask
