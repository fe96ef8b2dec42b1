"""Fuzzing the two readers of untrusted input (issue 14): the manifest reader (any JSON at any key, nested
fields included: a BundleError or a bundle every reader can use, never another exception) and the image
loader (every Pillow mode, sizes from 1x1 to extreme aspect ratios: an 8-bit RGB image or a ModelError)."""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeprune.cli.export import parity_lines
from edgeprune.cli.inspect import summary
from edgeprune.errors import BundleError, ModelError
from edgeprune.runtime import format as fmt
from edgeprune.runtime.bundle import load_bundle
from edgeprune.runtime.format import Files
from edgeprune.runtime.preprocess import MAX_ASPECT_RATIO, PreprocessConfig, load_image, preprocess

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
KEYS = sorted(str(k) for k in fmt.required_keys() + fmt.optional_keys())


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / Files.MANIFEST).read_text())
    (out / Files.ENGINES).mkdir()
    (out / Files.VISION_ENGINE).write_bytes(b"plan")    # listed, so a fuzzed engine record is read (not hashed)
    manifest[fmt.Keys.FILES_SHA256][Files.VISION_ENGINE] = "0" * 64
    return out, manifest


def _read_everything(root) -> None:
    """What the runtime and the CLI read of a loaded bundle."""
    bundle = load_bundle(root, verify=False)
    m = bundle.manifest
    _ = (bundle.keep, bundle.num_image_tokens, bundle.positions_mode, bundle.rope, bundle.buckets, bundle.grid,
         bundle.eos_token_ids, bundle.extra_outputs)
    summary(m, root)
    parity_lines(m)


def _check(root, manifest) -> None:
    (root / Files.MANIFEST).write_text(json.dumps(manifest))
    try:
        _read_everything(root)
    except BundleError:
        pass


@pytest.mark.parametrize("key", KEYS)
@FUZZ
@given(value=JSON)
def test_any_json_at_any_key_is_a_bundle_error_or_readable(fuzz_bundle, key, value):
    root, manifest = fuzz_bundle
    _check(root, {**manifest, key: value})


SCALAR = (fmt.TEXT, fmt.TEXT_OR_NULL, fmt.COUNT, fmt.COUNT_OR_NULL, fmt.DTYPE)
RECORDS = sorted(str(k) for k in fmt.required_keys() + fmt.optional_keys() if k.kind not in SCALAR)
EXAMPLES = {   # records the tiny bundle has none of (null): fuzz inside a well-formed one
    fmt.Keys.VISION_BUCKETS: [{"size": [336, 336], "grid": [24, 24], "num_image_tokens": 576, "file": "vision.onnx",
                               "validation": {"passed": True, "images": 2, "tolerance": 1e-4}}],
    fmt.Keys.VALIDATION_VISION: {"passed": True, "images": 2, "positions_equal": True, "max_abs_diff": 1e-6,
                                 "tolerance": 1e-4, "extras_max_abs_diff": {"gate": 0.0}},
    fmt.Keys.VALIDATION_LLM: {"passed": True, "prefill": 1e-6, "tolerance": 1e-4},
    fmt.Keys.ENGINE_VISION: {"file": "engines/vision.plan", "timing_cache": "engines/timing.cache",
                             "tensorrt_version": "10.3", "gpu_name": "Orin", "compute_capability": "8.7",
                             "precision": "fp16", "batch": {"min": 1, "opt": 1, "max": 4}, "built": "now"},
}


@pytest.mark.parametrize("key", RECORDS)
@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_any_json_inside_any_record_is_a_bundle_error_or_readable(fuzz_bundle, key, data):
    """One field somewhere inside a key's value (a graph's inputs, a bucket, the file list) replaced or removed."""
    root, manifest = fuzz_bundle
    value = json.loads(json.dumps(EXAMPLES.get(key, manifest[key])))
    path, node = [], value
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        step = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(step)
        node = node[step]
    if not path:
        value = data.draw(JSON)
    else:
        parent = value
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[path[-1]]                          # a field missing
        else:
            parent[path[-1]] = data.draw(JSON)            # a field of another type
    _check(root, {**manifest, key: value})


@FUZZ
@given(value=JSON)
def test_the_whole_manifest_any_json(fuzz_bundle, value):
    root, _ = fuzz_bundle
    _check(root, value)
    (root / Files.MANIFEST).write_bytes(b"\xff\xfe not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(root, verify=False)


# -- the image loader ---------------------------------------------------------------------------------------
MODES = ["1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA", "I", "F",
         "I;16", "I;16L", "I;16B", "I;16N"]
REFUSED = {"I", "F"}
CONFIG = PreprocessConfig(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), shortest_edge=16)
SIZES = st.tuples(st.integers(1, 64), st.integers(1, 64)) | st.tuples(st.just(1), st.integers(150, 400)) \
    | st.tuples(st.integers(150, 400), st.just(1))


@settings(max_examples=150, deadline=None)
@given(mode=st.sampled_from(MODES), size=SIZES, seed=st.integers(0, 2**16), as_file=st.booleans())
def test_every_mode_and_size_is_rgb_or_a_clear_error(mode, size, seed, as_file):
    rng = np.random.default_rng(seed)
    image = Image.frombytes(mode, size, bytes(rng.integers(0, 256, size=len(Image.new(mode, size).tobytes()),
                                                            dtype=np.uint8)))
    if as_file:
        buffer = io.BytesIO()
        try:
            image.save(buffer, "TIFF" if mode not in ("1", "L", "P", "RGB", "RGBA", "LA") else "PNG")
        except (OSError, ValueError, KeyError):
            return                                   # Pillow cannot write this mode: nothing to read back
        buffer.seek(0)
        image = buffer
    w, h = size
    try:
        rgb = load_image(image)
    except ModelError as err:
        assert mode in REFUSED or max(w, h) / min(w, h) > MAX_ASPECT_RATIO, err
        return
    assert mode not in REFUSED and rgb.mode == "RGB" and rgb.size == size
    assert np.isfinite(preprocess(rgb, CONFIG)).all()


GREY = (np.arange(24 * 20).reshape(20, 24) * 7 % 256).astype(np.uint8)
COLOUR = np.stack([GREY, 255 - GREY, GREY // 2], axis=-1)


@pytest.mark.parametrize("image, eight_bit, tolerance", [
    (Image.fromarray(GREY.astype(np.uint16) * 257), GREY, 0),                     # 16-bit grey, the issue's PNG
    (Image.frombytes("I;16B", GREY.shape[::-1], (GREY.astype(">u2") * 257).tobytes()), GREY, 0),
    (Image.fromarray(COLOUR).convert("RGBA"), COLOUR, 0),                         # opaque alpha
    (Image.fromarray(GREY).convert("LA"), GREY, 0),
    (Image.fromarray(COLOUR).convert("RGBa"), COLOUR, 0),
    (Image.fromarray(COLOUR).convert("CMYK"), COLOUR, 0),
    (Image.fromarray(COLOUR).convert("YCbCr"), COLOUR, 3),                       # Pillow's integer YCbCr rounding
    (Image.fromarray(GREY).convert("P"), GREY, 0),
    (Image.fromarray(COLOUR).convert("RGBX"), COLOUR, 0),
])
def test_modes_preprocess_as_their_8_bit_version(image, eight_bit, tolerance):
    got, want = preprocess(image, CONFIG), preprocess(eight_bit, CONFIG)
    assert np.abs(got - want).max() <= tolerance / 255 / 0.25 + 1e-6


def test_transparency_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)                    # transparent black
    assert (np.asarray(load_image(rgba)) == 255).all()
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert (np.asarray(load_image(palette)) == 255).all()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height, message", [
    (20000, 10000, r"bomb.png: Image size \(200000000 pixels\) exceeds limit"),   # Pillow's own error threshold
    (10000, 9000, r"bomb.png: Image size \(90000000 pixels\) exceeds limit"),     # its warning, refused too
    (12000, 1, r"aspect ratio of 12000:1; expected at most 200:1"),
])
def test_size_limits_are_checked_before_decoding(tmp_path, width, height, message):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(width, height))
    with pytest.raises(ModelError, match=message):
        load_image(path)


def test_size_limits_hold_for_arrays_too():
    huge = np.broadcast_to(np.zeros(1, np.uint8), (9500, 9500))      # 90 megapixels that take no memory
    with pytest.raises(ModelError, match=r"9500x9500 = 90 megapixels; expected at most 89"):
        load_image(huge)
