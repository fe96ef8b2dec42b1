"""Where the image goes in the prompt: text before it, K image tokens, text after it.

A chat template is reduced to two strings so the runtime needs only `tokenizers`:
`prefix` (everything before the image) and `suffix` (after it, with `{prompt}` for the user text).
Both are tokenised separately without added special tokens, identically in torch and runtime.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from edgeprune.errors import ModelError

__all__ = ["ChatTemplate", "encode_prompt"]


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
