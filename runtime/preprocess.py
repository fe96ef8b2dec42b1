"""Image preprocessing in numpy/Pillow, shared by the torch adapters and the runtime (bit-identical).

Mirrors CLIPImageProcessor / BitImageProcessor: RGB, resize the shortest edge (bicubic), centre
crop, rescale to [0, 1], normalise with mean/std, CHW float32.

Input rule (`load_image`): every image becomes 8-bit RGB as its 8-bit version would be, or is refused
with a ModelError naming what was wrong:
- RGB as it is; 1, L, P, RGBX, CMYK, YCbCr, LAB, HSV through Pillow's own conversion to RGB;
- 16-bit grey (I;16, I;16B, ...) scaled to 8 bits, v -> round(v / 257) (an 8-bit image saved as 16-bit
  stores v * 257, so it comes back exactly); Pillow's own conversion would clip it to white;
- with an alpha channel (RGBA, LA, PA, RGBa, La, P with a transparent colour): composited over white,
  so an opaque image gives exactly its RGB version and transparent parts look as on a white page;
- refused: I (32-bit integers) and F (floats), whose value range an image does not say; any other mode.
Size rule: at most MAX_PIXELS pixels (Pillow's own decompression-bomb limit, checked from the header
before decoding) and an aspect ratio of at most MAX_ASPECT_RATIO (Qwen2-VL's image processor refuses
beyond 200 too). The shortest-edge resize makes an intermediate image of shortest_edge^2 * aspect
pixels, so the aspect limit is what bounds its memory by the output size (peak RSS + 90 MB at 200:1 and
336 pixels, measured; 7 MB for a square image).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from edgeprune.errors import ModelError

__all__ = ["PreprocessConfig", "preprocess", "load_image", "MAX_PIXELS", "MAX_ASPECT_RATIO"]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}

MAX_PIXELS = 89_478_485          # PIL.Image.MAX_IMAGE_PIXELS' default: above it Pillow warns of a decompression bomb
MAX_ASPECT_RATIO = 200
_CONVERTED = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")   # Pillow converts these to RGB faithfully
_WITH_ALPHA = {"RGBA": "RGBA", "LA": "RGBA", "PA": "RGBA", "RGBa": "RGBA", "La": "LA"}  # mode -> first conversion
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_BACKGROUND = (255, 255, 255, 255)   # what transparent pixels are composited over


@dataclass(frozen=True)
class PreprocessConfig:
    size: tuple[int, int]                 # (height, width) the vision encoder takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shortest_edge: int | None = None      # resize so the short side is this, then centre-crop `size`;
                                          # None: resize straight to `size`
    resample: str = "bicubic"

    def __post_init__(self):
        """ValueError for a config no image can be preprocessed with (a hand-edited preprocess.json)."""
        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        def numbers(v, positive: bool) -> bool:
            return (len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                        and (x > 0 or not positive) for x in v))

        if len(self.size) != 2 or not all(map(count, self.size)):
            raise ValueError(f"size={list(self.size)!r}, expected [height, width] integers >= 1")
        if not numbers(self.mean, False) or not numbers(self.std, True):
            raise ValueError(f"mean={list(self.mean)!r}, std={list(self.std)!r}: expected three finite numbers each, "
                             "std > 0")
        if self.shortest_edge is not None and not count(self.shortest_edge):
            raise ValueError(f"shortest_edge={self.shortest_edge!r}, expected an integer >= 1 or null")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample={self.resample!r}, expected one of {', '.join(_RESAMPLE)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   shortest_edge=d.get("shortest_edge"), resample=d.get("resample", "bicubic"))


def _describe(image) -> str:
    """A path in full; anything else (a file object, an image) as a short repr."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    text = repr(image)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_size(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1:
        raise ModelError(f"{what}: {width}x{height} pixels; expected at least 1x1")
    if width * height > MAX_PIXELS:
        raise ModelError(f"{what}: {width}x{height} = {width * height / 1e6:.0f} megapixels; expected at most "
                         f"{MAX_PIXELS / 1e6:.0f} (a decompression bomb, or downscale it first)")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT_RATIO:
        raise ModelError(f"{what}: {width}x{height} has an aspect ratio of {aspect:.0f}:1; expected at most "
                         f"{MAX_ASPECT_RATIO}:1 (crop it to the part that matters)")


def _open(image) -> Image.Image:
    """A path or binary file object -> a PIL image checked for size before its pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)   # refused by _check_size below
            pil = Image.open(image)
            _check_size(pil.width, pil.height, f"image {_describe(image)}")
            pil.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ModelError(f"image {_describe(image)}: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:   # SyntaxError: Pillow's parsers for some broken headers
        raise ModelError(f"cannot read image {_describe(image)}: {err}") from err
    return pil


def _from_array(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ModelError(f"image array of shape {image.shape} and dtype {image.dtype}: "
                         "expected uint8 HxW, HxWx1, HxWx3 or HxWx4")
    _check_size(image.shape[1], image.shape[0], f"image array of shape {image.shape}")
    return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image)


def to_rgb(pil: Image.Image) -> Image.Image:
    """A PIL image of any mode -> 8-bit RGB by the module's input rule, or a ModelError."""
    mode = pil.mode
    if mode == "RGB":
        return pil
    if mode == "P" and pil.has_transparency_data:
        mode, pil = "RGBA", pil.convert("RGBA")
    if mode in _WITH_ALPHA:
        rgba = pil.convert(_WITH_ALPHA[mode]).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", pil.size, _BACKGROUND), rgba).convert("RGB")
    if mode in _CONVERTED:
        return pil.convert("RGB")
    if mode in _SIXTEEN_BIT:
        grey = np.round(np.asarray(pil).astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("I", "F"):
        raise ModelError(f"image mode {mode!r} ({'32-bit integer' if mode == 'I' else 'floating-point'} pixels) has "
                         "no fixed value range; save it as an 8- or 16-bit image, or pass a uint8 array")
    raise ModelError(f"image mode {mode!r} is not supported; expected an RGB, grey, palette, CMYK or YCbCr image")


def load_image(image) -> Image.Image:
    """A path, binary file object, PIL image or uint8 array (HxW, HxWx1, HxWx3, HxWx4) -> an RGB PIL image,
    converted and size-checked by the module's rules (a ModelError otherwise)."""
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, f"image {_describe(image)}")
        pil = image
    elif isinstance(image, np.ndarray):
        pil = _from_array(image)
    elif isinstance(image, (str, os.PathLike)) or hasattr(image, "read"):
        pil = _open(image)
    else:
        raise ModelError(f"image of type {type(image).__name__}: expected a file path, a PIL image or a uint8 "
                         "array (HxW, HxWx3 or HxWx4)")
    return to_rgb(pil)


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
