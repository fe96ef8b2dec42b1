"""Image preprocessing in numpy/Pillow, shared by the torch adapters and the runtime (bit-identical).

Mirrors CLIPImageProcessor / BitImageProcessor: RGB, resize the shortest edge (bicubic), centre
crop, rescale to [0, 1], normalise with mean/std, CHW float32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from edgeprune.errors import ModelError

__all__ = ["PreprocessConfig", "preprocess", "load_image"]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class PreprocessConfig:
    size: tuple[int, int]                 # (height, width) the vision encoder takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shortest_edge: int | None = None      # resize so the short side is this, then centre-crop `size`;
                                          # None: resize straight to `size`
    resample: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   shortest_edge=d.get("shortest_edge"), resample=d.get("resample", "bicubic"))


def load_image(image) -> Image.Image:
    """A path, PIL image or HxWx3 / HxW uint8 array -> an RGB PIL image (clear error otherwise)."""
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ModelError(f"image array of shape {image.shape} and dtype {image.dtype}: "
                             "expected uint8 HxW, HxWx1, HxWx3 or HxWx4")
        pil = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image)
    else:
        try:
            pil = Image.open(image)
            pil.load()
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot read image {image!r}: {err}") from err
    return pil.convert("RGB") if pil.mode != "RGB" else pil


def preprocess(images, config: PreprocessConfig) -> np.ndarray:
    """One image or a list of images -> float32 [B, 3, H, W]."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ModelError("no image given")
    resample = _RESAMPLE[config.resample]
    h, w = config.size
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)
    for i, image in enumerate(images):
        pil = load_image(image)
        if config.shortest_edge is None:
            pil = pil.resize((w, h), resample)
        else:
            scale = config.shortest_edge / min(pil.size)
            new_w, new_h = max(w, round(pil.width * scale)), max(h, round(pil.height * scale))
            pil = pil.resize((new_w, new_h), resample)
            left, top = (new_w - w) // 2, (new_h - h) // 2
            pil = pil.crop((left, top, left + w, top + h))
        array = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out[i] = (array - mean) / std
    return out
