"""AutoSelect: top-K by a learned per-token scorer on `feats` (METHODS.md, AutoSelect).

Inference only: s = Linear(TransformerEncoder_L(Down(feats))), keep the K highest scores at their
original positions (`--positions original`). Training (soft top-K, noise gate, denoiser) lives in
edgeprune.train and trains the `Scorer` defined here; `save_scorer` / `load_scorer` are the checkpoint
format (safetensors, config and recipe id in its metadata).

Which scorer (issue 12: a random scorer is never silent):
- `scorer=PATH` (CLI `--scorer`): a checkpoint of `save_scorer` (`edgeprune train`, or the file an
  adapter ships: edgeprune-mini's `pruner_options()` names it, so `build_for_model` / `adapter.build_pruner`
  / `export` use it when no scorer is given);
- `scorer=module`: any nn.Module mapping feats [B, N, C] to scores [B, N];
- `scorer="random"`: the seeded, untrained scorer, only on request; the untrained baseline, labelled
  "autoselect (untrained)" in every report;
- nothing (`build("autoselect", keep=K)` alone): a PrunerConfigError that names `--scorer`,
  `edgeprune train` and `scorer="random"`.
`scorer_record()` says which one was used (file name, sha256, recipe id): export writes it to the
manifest (`pruner.scorer`).

Choices where METHODS.md is silent: the blocks are pre-norm (LayerNorm -> attention -> residual,
LayerNorm -> 4x GELU MLP -> residual) with no final norm, as nn.TransformerEncoder(norm=None) with
norm_first=True; the attention is F.scaled_dot_product_attention on our own q/k/v projections (no
nn.MultiheadAttention, whose eval-mode fast path traces differently); no dropout. Default heads: the
largest of (8, 6, 4, 3, 2, 1) dividing the width.
Departure from METHODS.md (issue 12, "a scorer cheap enough for the edge"): the default scorer is
narrow, a Linear down-projection from the encoder width C to `width` (DEFAULT_WIDTH) before its
DEFAULT_DEPTH block(s); METHODS.md's "L = 2 blocks at the encoder width" is `width=None, depth=2`.
Their cost next to the encoder: `python -m edgeprune.profiles.bench_pruners` (autoselect vs
autoselect-wide).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import gather_rows, sort_by_position, topk_indices
from edgeprune.runtime.format import ScorerRecord

__all__ = ["AutoSelect", "Scorer", "save_scorer", "load_scorer", "default_heads", "RANDOM", "DEFAULT_WIDTH",
           "DEFAULT_DEPTH", "NO_SCORER", "quality_notice"]

_META = "edgeprune.scorer."  # safetensors metadata prefix: dim, depth, heads, width, format, recipe
_FORMAT = "2"                # 2: + width (a format-1 file has none: its blocks run at dim)
RANDOM = "random"            # scorer="random": the untrained baseline, only on request
DEFAULT_WIDTH = 128          # narrow scorer (module docstring); None = the encoder width
DEFAULT_DEPTH = 1
NO_SCORER = ("autoselect needs a trained scorer and this model ships none: pass scorer=PATH (CLI: --scorer CKPT) "
             "with a checkpoint written by `edgeprune train`, or scorer='random' (CLI: --cfg scorer=random) "
             "for the untrained baseline")


def default_heads(dim: int) -> int:
    """The largest of (8, 6, 4, 3, 2, 1) that divides dim (8 heads of 128 at CLIP-L's 1024)."""
    return next(h for h in (8, 6, 4, 3, 2, 1) if dim % h == 0)


class _Block(nn.Module):
    """Pre-norm Transformer encoder block; its own q/k/v/out projections around sdpa (no fast-path module)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:                             # [B, N, C]
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # sdpa: a fused kernel in eager mode (no [B, H, N, N] tensor at N=2880); the legacy exporter
        # writes it out as MatMul/Softmax/MatMul. No mask, no dropout, default scale 1/sqrt(C/H).
        att = F.scaled_dot_product_attention(q, k, v)                  # [B, H, N, C/H]
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, c))        # [B, N, C]
        return x + self.mlp(self.norm2(x))


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PrunerConfigError(f"autoselect: {name}={value!r}, expected an integer >= {low}")


class Scorer(nn.Module):
    """Per-token score s = Linear(TransformerEncoder_depth(Down(feats))): [B, N, dim] -> [B, N].

    `width`: the blocks' width; Down is a Linear(dim, width) when width != dim, else absent (None: dim)."""

    def __init__(self, dim: int, depth: int = 2, heads: int | None = None, width: int | None = None):
        super().__init__()
        width = dim if width is None else width
        _check_int("dim", dim, 1)
        _check_int("width", width, 1)
        heads = default_heads(width) if heads is None else heads
        _check_int("depth", depth, 0)
        _check_int("heads", heads, 1)
        if width % heads:
            raise PrunerConfigError(f"autoselect: heads={heads} does not divide "
                                    f"{'dim' if width == dim else 'width'}={width}")
        self.dim, self.depth, self.heads, self.width = dim, depth, heads, width
        if width != dim:
            self.down = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, feats: Tensor) -> Tensor:                        # [B, N, dim]
        x = self.down(feats) if self.width != self.dim else feats     # [B, N, width]
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)                                # [B, N]

    def config(self) -> dict[str, int]:
        return {"dim": self.dim, "depth": self.depth, "heads": self.heads, "width": self.width}


def save_scorer(scorer: Scorer, path: str | Path, recipe: str | None = None) -> Path:
    """Write the scorer's weights with its config (and the id of the recipe that trained it, if
    given) in the safetensors metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {_META + k: str(v) for k, v in scorer.config().items()} | {_META + "format": _FORMAT}
    if recipe:
        meta[_META + "recipe"] = recipe
    save_file({k: v.detach().contiguous().cpu() for k, v in scorer.state_dict().items()}, str(path), metadata=meta)
    return path


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise PrunerConfigError(f"autoselect: scorer checkpoint {str(path)!r} does not exist, expected a "
                                f".safetensors file written by save_scorer (edgeprune train)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise PrunerConfigError(f"autoselect: scorer checkpoint {str(path)!r} is not a readable safetensors "
                                f"file ({e})") from e


def load_scorer(path: str | Path) -> Scorer:
    """Read a checkpoint written by `save_scorer`; anything else is a PrunerConfigError naming the file.
    `scorer.recipe` is the recipe id from its metadata (None when it has none)."""
    path = Path(path)
    meta, weights = _read_checkpoint(path)
    try:
        config = {k: int(meta[_META + k]) for k in ("dim", "depth", "heads")}
        config["width"] = int(meta.get(_META + "width", config["dim"]))
    except (KeyError, ValueError):
        raise PrunerConfigError(f"autoselect: scorer checkpoint {str(path)!r} has no scorer config in its "
                                f"metadata (expected {_META}dim/depth/heads); was it written by save_scorer?") from None
    scorer = Scorer(**config)
    try:
        scorer.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise PrunerConfigError(f"autoselect: scorer checkpoint {str(path)!r} does not match its config "
                                f"{config}: {e}") from e
    scorer.recipe = meta.get(_META + "recipe")
    return scorer.eval()


def quality_notice(path: str | Path, sha256: str | None = None) -> str | None:
    """One line when the recipe JSON beside scorer `path` records a measurement ("measured": {"accuracy":
    {method: {K: value}}, "n", "see"}, scripts/train_mini_scorer.py --measured) in which autoselect scored
    below another method at some K; None otherwise, or when the JSON's sha256 is not `sha256` (another
    file). `edgeprune export` prints it for a model's shipped scorer, so a weak default misleads nobody."""
    import json

    side = Path(path).with_suffix(".json")
    try:
        recipe = json.loads(side.read_text())
        measured = recipe["measured"]
        acc = measured["accuracy"]
        own = acc["autoselect"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if sha256 is not None and recipe.get("sha256") != sha256:
        return None
    others = {m: v for m, v in acc.items() if m != "autoselect" and " " not in m}   # not "autoselect (untrained)"
    keeps = sorted((k for k in own if all(k in v for v in others.values())), key=int)
    if not others or not keeps:
        return None
    best = max(others, key=lambda m: sum(others[m][k] for k in keeps))   # the best other method over these K
    if all(own[k] >= others[best][k] for k in keeps):
        return None

    def row(values: dict) -> str:
        return " / ".join(f"{values[k]:.3f}" for k in keeps)

    return (f"notice: the {Path(path).name} scorer (recipe {recipe.get('recipe_id', '?')}) measured {row(own)} at "
            f"K = {' / '.join(keeps)} against {best}'s {row(others[best])} (VLM exact match, "
            f"n = {measured.get('n', '?')} held-out images; {measured.get('see', 'its recipe JSON')}): below the "
            f"training-free methods; --method {best} is the more accurate choice")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(file: str | None, sha256: str | None, recipe: str | None, trained: bool) -> dict:
    """The manifest's pruner.scorer record (runtime/format.py ScorerRecord)."""
    return {ScorerRecord.FILE: file, ScorerRecord.SHA256: sha256, ScorerRecord.RECIPE: recipe,
            ScorerRecord.TRAINED: trained}


@register_pruner("autoselect")
class AutoSelect(Pruner):
    """AutoSelect: top-K tokens by a learned Transformer scorer on encoder features."""

    requires = ("tokens", "feats")
    default_positions = "original"   # AutoSelect keeps the original RoPE ids (METHODS.md)

    def __init__(self, keep: int, scorer: str | Path | nn.Module | None = None, dim: int | None = None,
                 depth: int = DEFAULT_DEPTH, heads: int | None = None, width: int | None = DEFAULT_WIDTH,
                 seed: int = 0):
        super().__init__(keep)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PrunerConfigError(f"autoselect: seed={seed!r}, expected an integer")
        for name, value, low in (("depth", depth, 0), ("heads", 1 if heads is None else heads, 1),
                                 ("width", 1 if width is None else width, 1)):
            _check_int(name, value, low)     # checked now, not lazily
        self.depth, self.heads, self.width, self.seed = depth, heads, width, seed
        self._record = _record(None, None, None, trained=True)
        if scorer is None:
            raise PrunerConfigError(NO_SCORER)
        if isinstance(scorer, str) and scorer == RANDOM:
            # The untrained baseline: a seeded random scorer (deterministic). With dim=None it is
            # built on the first call from feats.shape[-1], with the same seed, so it is just as deterministic.
            self.scorer = None if dim is None else self._random_scorer(dim)
            self._record = {**_record(None, None, RANDOM, trained=False), ScorerRecord.SEED: seed}
            return
        if isinstance(scorer, (str, Path)):
            path = Path(scorer)
            scorer = load_scorer(path)
            self._record = _record(path.name, _sha256(path), scorer.recipe, trained=True)
        elif not isinstance(scorer, nn.Module):
            raise PrunerConfigError(f"autoselect: scorer={scorer!r}, expected a checkpoint path, an nn.Module "
                                    f"mapping feats [B, N, C] to scores [B, N], or {RANDOM!r}")
        # depth/heads/width describe a random scorer only; a given scorer brings its own config.
        got = getattr(scorer, "dim", None)
        if dim is not None and got is not None and got != dim:
            raise PrunerConfigError(f"autoselect: dim={dim} but the scorer's width is {got}")
        self.scorer = scorer.eval()  # no dropout, whatever the module was trained with

    @property
    def trained(self) -> bool:
        return bool(self._record[ScorerRecord.TRAINED])

    def scorer_record(self) -> dict:
        """Which scorer this pruner runs: {"file", "sha256", "recipe", "trained"} (+ "seed" for the
        random one). Export writes it to the manifest (pruner.scorer); reports label an untrained one."""
        return dict(self._record)

    def label(self) -> str:
        """The name reports show: "autoselect", or "autoselect (untrained)" for the random baseline."""
        from edgeprune.runtime.bundle import method_label

        return method_label(self.name, self._record)

    def _random_scorer(self, dim: int) -> Scorer:
        with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
            torch.manual_seed(self.seed)
            width = dim if self.width is None else min(self.width, dim)   # narrow, never wider than C
            return Scorer(dim, self.depth, self.heads, width).eval()

    def select(self, tokens: Tensor, feats: Tensor) -> Selection:      # [B, N, D], [B, N, C]
        if self.scorer is None:  # lazy: dim was not given (see __init__)
            self.scorer = self._random_scorer(feats.shape[-1]).to(device=feats.device)
        width = getattr(self.scorer, "dim", feats.shape[-1])
        if feats.shape[-1] != width:
            raise PrunerConfigError(f"autoselect: feats have C={feats.shape[-1]}, the scorer expects C={width}")
        # 1. score every token, in the scorer's own dtype (float16 feats of a half-precision model included)
        weight = next(self.scorer.parameters(), None)
        scores = self.scorer(feats if weight is None else feats.to(weight.dtype))  # [B, N]
        # 2. top-K by score (ties to the lowest index), then ascending original positions.
        chosen = topk_indices(scores, self.keep)                       # [B, K]
        # The projector acts per token, so gathering the post-projector `tokens` equals projecting
        # the kept `feats`: the output is in `tokens` space without a second projector pass.
        positions, kept = sort_by_position(chosen, gather_rows(tokens, chosen))
        return Selection(tokens=kept, positions=positions)             # [B, K, D], [B, K]

    def extra_repr(self) -> str:
        return f"keep={self.keep}, seed={self.seed}, scorer={self._record[ScorerRecord.FILE] or self._record[ScorerRecord.RECIPE]}"
