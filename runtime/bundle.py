"""Read and verify a bundle (the format is in runtime/format.py). numpy-free, torch-free.

`load_bundle(path)` checks, in order, and raises `BundleError` naming the file or key:
1. the folder and manifest.json exist and parse; format.read accepts it (format marker, schema range,
   older schemas migrated, required keys, every key's value of its Kind);
2. the facts agree with each other (position mode and RoPE kind, K <= N, N = H * W for one view, ...);
3. files: every path the manifest names is a relative path that stays inside the bundle (no '..', no
   absolute path, no symlink leading out); every file the runtime opens (`runtime_files`: the graphs
   and their external data, tokenizer, preprocessing, the TensorRT engine) is listed under
   `files.sha256`; every listed file exists and its sha256 matches (hashing skipped with verify=False).
   Files in the folder that the manifest does not list are reported in `Bundle.unlisted` (the
   runtime opens none of them; `run` warns and `inspect` lists them).
`check_vision_graph` and `check_llm_graphs` compare the manifest with the graphs' own inputs and outputs
as ONNX Runtime (or TensorRT) reports them; the pipeline runs them on load, so `run` and `inspect` refuse
the same bundles.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.fileio import FileLock
from edgeprune.runtime import format as fmt
from edgeprune.runtime.format import (DECODER_DEEPSTACK, DECODER_EMBEDS, DECODER_LOGITS, DECODER_POSITIONS,
                                      EMBED_OUTPUT, VISION_DEEPSTACK, VISION_INPUT, VISION_POSITIONS, VISION_TOKENS,
                                      Bucket, EmbedTable, Engine, Files, Graph, Keys, ScorerRecord,
                                      external_data, past_names)
from edgeprune.runtime.positions import check_rope_mode
from edgeprune.runtime.preprocess import PreprocessConfig
from edgeprune.runtime.prompt import ChatTemplate

__all__ = ["Bundle", "load_bundle", "read_manifest", "sha256_file", "hash_files", "runtime_files", "unlisted_files",
           "bundle_lock", "method_label", "pruner_label",
           "check_vision_outputs", "check_vision_graph", "check_llm_graphs"]

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: str | Path, rels: list[str] | None = None) -> dict[str, str]:
    """sha256 of every file under `root` (or of the files `rels`) except the manifest and ONNX Runtime's
    run-time TensorRT cache, keyed by POSIX relative path, sorted."""
    root = Path(root)
    if rels is None:
        rels = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    skip = (Files.MANIFEST, Files.ORT_TRT_CACHE + "/")
    return {rel: sha256_file(root / rel) for rel in sorted(rels) if rel != skip[0] and not rel.startswith(skip[1])}


def bundle_lock(out: Path) -> FileLock:
    """The write lock of bundle folder `out` (`.<name>.lock` beside it), taken at once or a BundleError: what
    writes a bundle (export, build-engine) holds it, so two writers never race."""
    try:
        return FileLock(out.parent / f".{out.name}.lock").acquire(
            busy=f"{out}: another edgeprune process (export or build-engine) is writing this bundle right now; wait "
                 "for it to finish")
    except OSError as err:
        raise BundleError(f"{out}: cannot write there ({err})") from err


def method_label(method: str, scorer: dict | None = None) -> str:
    """The name every report shows for a method: "<method> (untrained)" when its scorer record (the
    manifest's pruner.scorer, or `scorer_record()` of the pruner) says the scorer is untrained."""
    return f"{method} (untrained)" if scorer and not scorer[ScorerRecord.TRAINED] else method


def pruner_label(manifest: dict) -> str:
    """`method_label` of a bundle's pruner (`manifest` as read_manifest returns it)."""
    return method_label(manifest[Keys.PRUNER_METHOD], manifest[Keys.PRUNER_SCORER])


def read_manifest(path: str | Path) -> dict:
    """Parse `<bundle>/manifest.json` and check it with format.read (no hashing); returns the manifest in
    the current schema's layout (older schemas migrated, optional keys' defaults filled)."""
    if not isinstance(path, (str, os.PathLike)):
        raise BundleError(f"bundle={path!r:.60}: expected the path of a bundle folder")
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle folder (it does not exist or is a file)")
    manifest_path = root / Files.MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; is {root} a bundle written by `edgeprune export`?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{manifest_path}: not valid JSON ({err})") from err
    return fmt.read(manifest, where=str(manifest_path))


def _inside(root: Path, rel: str, where: str) -> Path:
    """root/rel, after checking that `rel` (a path the manifest names) is a plain relative POSIX path that
    stays inside the bundle: no absolute path, no '..', nothing a symlink leads out of the folder."""
    pure = PurePosixPath(rel) if isinstance(rel, str) else None
    if (pure is None or not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or "\x00" in rel
            or pure.as_posix() != rel):                        # a NUL byte: os.path would raise ValueError
        raise BundleError(f"{where}: {rel!r} is not a relative path inside the bundle; re-export the bundle")
    path = root / rel
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise BundleError(f"{path}: leads outside the bundle (to {real}); refusing to load it")
    return path


def runtime_files(manifest: dict, root: Path) -> list[str]:
    """Every file the runtime opens (manifest.json aside), as the manifest names them: the vision graph(s),
    the LLM graphs and their external data (format.external_data, where present), the embedding table,
    tokenizer, preprocessing and the TensorRT engine when one is recorded."""
    graphs = [manifest[Keys.VISION_GRAPH][Graph.FILE], Files.VISION, manifest[Keys.LLM_DECODER_GRAPH][Graph.FILE]]
    if manifest[Keys.LLM_EMBED_GRAPH] is not None:                 # bundles written before llm.embed_table
        graphs.append(manifest[Keys.LLM_EMBED_GRAPH][Graph.FILE])
    if manifest[Keys.LLM_PREFILL_GRAPH] is not None:               # an in-LLM stage's prefill graph
        graphs.append(manifest[Keys.LLM_PREFILL_GRAPH][Graph.FILE])
    graphs += [bucket[Bucket.FILE] for bucket in manifest[Keys.VISION_BUCKETS] or []]
    files = [Files.TOKENIZER, Files.PREPROCESS]
    for graph in dict.fromkeys(graphs):
        files.append(graph)
        data = external_data(graph)
        if data in manifest[Keys.FILES_SHA256] or os.path.lexists(root / data):
            files.append(data)
    if manifest[Keys.LLM_EMBED_TABLE] is not None:                 # a tied table lies in decoder.onnx.data
        files.append(manifest[Keys.LLM_EMBED_TABLE][EmbedTable.FILE])
    if manifest[Keys.ENGINE_VISION]:
        files.append(manifest[Keys.ENGINE_VISION][Engine.FILE])
    return list(dict.fromkeys(files))


def unlisted_files(root: Path, manifest: dict) -> list[str]:
    """Files in the bundle folder that files.sha256 does not list (manifest.json and ONNX Runtime's run-time
    TensorRT cache aside), as sorted relative paths."""
    listed, skip = manifest[Keys.FILES_SHA256], Files.ORT_TRT_CACHE + "/"
    ours = (Files.MANIFEST, f".{Files.MANIFEST}.tmp")          # the manifest and write_manifest's temp file
    found = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(rel for rel in found if rel not in ours and rel not in listed and not rel.startswith(skip))


def _verify_files(root: Path, manifest: dict, hash_them: bool) -> None:
    where = str(root / Files.MANIFEST)
    listed = manifest[Keys.FILES_SHA256]
    for rel in runtime_files(manifest, root):
        path = _inside(root, rel, where)
        if rel not in listed:
            raise BundleError(f"{path}: the runtime loads it but {Keys.FILES_SHA256} does not list it, so it cannot "
                              "be verified; re-export the bundle")
    for rel, expected in listed.items():
        path = _inside(root, rel, f"{where}: {Keys.FILES_SHA256}")
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {Files.MANIFEST}); re-export the bundle")
        if not hash_them:
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                              "the file was modified or corrupted — re-export the bundle")


def _check_facts(root: Path, m: dict) -> None:
    """The manifest's facts against each other (their JSON types were checked by format.read)."""
    where = root / Files.MANIFEST
    try:
        check_rope_mode(m[Keys.POSITIONS_ROPE], m[Keys.POSITIONS_MODE])
    except EdgepruneError as err:
        raise BundleError(f"{where}: {Keys.POSITIONS_ROPE}/{Keys.POSITIONS_MODE}: {err}") from None
    choices = {Keys.PRUNER_SPACE: ("tokens", "feats"), Keys.LLM_ATTENTION: ("fused", "plain")}
    for key, allowed in choices.items():
        if m[key] not in allowed:
            raise BundleError(f"{where}: {key}={m[key]!r}, expected one of {', '.join(allowed)}")
    if m[Keys.LLM_KV_CACHE] == "shared" and m[Keys.LLM_ATTENTION] != "fused":
        raise BundleError(f"{where}: {Keys.LLM_KV_CACHE}='shared' needs {Keys.LLM_ATTENTION}='fused' (the shared "
                          f"buffer is GroupQueryAttention's), not {m[Keys.LLM_ATTENTION]!r}")
    nums = [m[Keys.MODEL_NUM_IMAGE_TOKENS]] + [b[Bucket.NUM_IMAGE_TOKENS] for b in m[Keys.VISION_BUCKETS] or []]
    if m[Keys.PRUNER_KEEP] > min(nums):
        raise BundleError(f"{where}: {Keys.PRUNER_KEEP}={m[Keys.PRUNER_KEEP]} exceeds {Keys.MODEL_NUM_IMAGE_TOKENS}="
                          f"{min(nums)}; expected 1 <= K <= N")
    h, w = m[Keys.MODEL_GRID]
    if m[Keys.VISION_VIEWS] == 1 and m[Keys.MODEL_NUM_IMAGE_TOKENS] != h * w:   # LLaVA-NeXT packs several views
        raise BundleError(f"{where}: {Keys.MODEL_NUM_IMAGE_TOKENS}={m[Keys.MODEL_NUM_IMAGE_TOKENS]} but "
                          f"{Keys.MODEL_GRID}={[h, w]} has {h * w} cells (one view)")
    clash = {VISION_TOKENS, VISION_POSITIONS} & set(m[Keys.PRUNER_EXTRA_OUTPUTS])
    if clash:
        raise BundleError(f"{where}: {Keys.PRUNER_EXTRA_OUTPUTS} repeats {sorted(clash)}")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, manifest and the small configs parsed."""

    path: Path
    manifest: dict
    preprocess: PreprocessConfig
    chat_template: ChatTemplate
    unlisted: tuple[str, ...] = ()        # files in the folder that files.sha256 does not list (never opened)

    def file(self, rel: str) -> Path:
        return self.path / rel

    @property
    def keep(self) -> int:
        return int(self.manifest[Keys.PRUNER_KEEP])

    @property
    def num_image_tokens(self) -> int:
        return int(self.manifest[Keys.MODEL_NUM_IMAGE_TOKENS])

    @property
    def positions_mode(self) -> str:
        return self.manifest[Keys.POSITIONS_MODE]

    @property
    def rope(self) -> str:
        """"1d" or "mrope" (runtime/positions.py)."""
        return self.manifest[Keys.POSITIONS_ROPE]

    @property
    def buckets(self) -> list[dict]:
        """Resolution buckets (format.Bucket records); one entry, the bundle's own size, when the bundle has
        none (Keys.VISION_BUCKETS)."""
        listed = self.manifest[Keys.VISION_BUCKETS]
        if listed:
            return [dict(b) for b in listed]
        return [{Bucket.SIZE: list(self.preprocess.size), Bucket.GRID: list(self.grid),
                 Bucket.NUM_IMAGE_TOKENS: self.num_image_tokens, Bucket.FILE: Files.VISION}]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.manifest[Keys.MODEL_GRID])

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(i) for i in self.manifest[Keys.MODEL_EOS_TOKEN_IDS]]

    @property
    def extra_outputs(self) -> list[str]:
        return list(self.manifest[Keys.PRUNER_EXTRA_OUTPUTS])

    def known(self, key: fmt.Key):
        """manifest[key], or a BundleError naming the manifest and the key when an older bundle never recorded it."""
        try:
            return fmt.known(self.manifest, key)
        except BundleError as err:
            raise BundleError(f"{self.path / Files.MANIFEST}: {err}") from None

    @property
    def domain(self) -> str | None:
        """What the model was trained to recognise, when its adapter says (Adapter.domain); else None."""
        return self.manifest[Keys.MODEL_DOMAIN]

    @property
    def deepstack_layers(self) -> int:
        """L > 0 when the vision graph outputs DeepStack features and the decoder takes them (Qwen3-VL)."""
        return int(self.manifest[Keys.LLM_DEEPSTACK_LAYERS])


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check the bundle at `path` (module docstring); verify=False skips only the hashing."""
    manifest = read_manifest(path)
    root = Path(path)
    _check_facts(root, manifest)
    from edgeprune.runtime.stages import StagePlan

    StagePlan.from_manifest(manifest)   # the in-LLM stage keys agree with each other and the prefill graph
    _verify_files(root, manifest, hash_them=verify)
    try:
        pre = PreprocessConfig.from_dict(json.loads((root / Files.PREPROCESS).read_text(encoding="utf-8")))
    except FileNotFoundError as err:
        raise BundleError(f"{root / Files.PREPROCESS}: missing") from err
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"{root / Files.PREPROCESS}: malformed ({err})") from err
    try:
        template = ChatTemplate.from_dict(manifest[Keys.MODEL_CHAT_TEMPLATE])
    except EdgepruneError as err:
        raise BundleError(f"{root / Files.MANIFEST}: {Keys.MODEL_CHAT_TEMPLATE}: {err}") from None
    return Bundle(path=root, manifest=manifest, preprocess=pre, chat_template=template,
                  unlisted=tuple(unlisted_files(root, manifest)))


def check_vision_outputs(bundle: Bundle, outputs: dict[str, list], file: str = Files.VISION) -> None:
    """`outputs`: the vision graph's output name -> shape (ints or symbolic names), as ORT reports them.
    K and the extra outputs in the manifest must be what the graph produces."""
    where = f"{bundle.path / file}"
    per_token = [VISION_TOKENS, VISION_POSITIONS, *([VISION_DEEPSTACK] if bundle.deepstack_layers else [])]
    expected = [*per_token, *bundle.extra_outputs]
    if sorted(outputs) != sorted(expected):
        raise BundleError(f"{where}: outputs {sorted(outputs)}, the manifest expects {sorted(expected)}")
    for name in per_token:
        k = outputs[name][1] if len(outputs[name]) > 1 else None
        if k != bundle.keep:
            raise BundleError(f"{where}: output '{name}' has K={k}, the manifest says "
                              f"{Keys.PRUNER_KEEP}={bundle.keep}")


def check_vision_graph(bundle: Bundle, bucket: dict, pixels: list, outputs: dict[str, list]) -> None:
    """One vision graph (`bucket`, a format.Bucket record of bundle.buckets) against the manifest: its pixel
    input `pixels` [B, 3, H, W] (B an int or a symbolic name) must take the bucket's size and the recorded
    batch, and its outputs K and the extras (check_vision_outputs)."""
    where = bundle.path / bucket[Bucket.FILE]
    h, w = bucket[Bucket.SIZE]
    batch = bundle.manifest[Keys.VISION_BATCH]
    expected = [batch if batch is not None else "dynamic", 3, h, w]
    got = [d if isinstance(d, int) else "dynamic" for d in pixels]
    if got != expected:
        raise BundleError(f"{where}: input '{VISION_INPUT}' has shape {got}, the manifest says {expected} "
                          f"({Keys.VISION_BATCH}, preprocessing size)")
    check_vision_outputs(bundle, outputs, bucket[Bucket.FILE])


def check_llm_graphs(manifest: dict, embed: dict[str, tuple], decoder_inputs: dict[str, tuple],
                     decoder_outputs: dict[str, tuple], where: Path) -> None:
    """The LLM facts of `manifest` against the graphs: `embed` = the embed graph's outputs, `decoder_*` the
    decoder's inputs and outputs, each name -> (shape, element dtype name such as "float32"), as ONNX Runtime
    reports them (dims: int or a symbolic name). Layers, KV heads, head size, width, vocabulary, dtype and
    the position-id layout must all be what the graphs take."""
    m = manifest
    layers, kv, hd, width = (m[Keys.LLM_NUM_LAYERS], m[Keys.LLM_NUM_KV_HEADS], m[Keys.LLM_HEAD_DIM],
                             m[Keys.LLM_HIDDEN_SIZE])
    dtype = m[Keys.LLM_DTYPE]
    past = sorted(name for name in decoder_inputs if name.startswith("past_key_values."))
    if past != sorted(past_names(layers)):
        raise BundleError(f"{where}: the decoder takes {len(past)} past key/value inputs, the manifest's "
                          f"{Keys.LLM_NUM_LAYERS}={layers} needs {2 * layers}")
    checks = [(f"past key/values [B, {Keys.LLM_NUM_KV_HEADS}, P, {Keys.LLM_HEAD_DIM}]",
               decoder_inputs[past_names(layers)[0]], {1: kv, 3: hd}),
              (f"decoder input '{DECODER_EMBEDS}' [B, L, {Keys.LLM_HIDDEN_SIZE}]", decoder_inputs.get(DECODER_EMBEDS),
               {2: width}),
              (f"embed output '{EMBED_OUTPUT}' [B, L, {Keys.LLM_HIDDEN_SIZE}]", embed.get(EMBED_OUTPUT), {2: width}),
              (f"decoder output '{DECODER_LOGITS}' [B, {Keys.LLM_VOCAB_SIZE}]", decoder_outputs.get(DECODER_LOGITS),
               {-1: m[Keys.LLM_VOCAB_SIZE]})]
    for what, io, dims in checks:
        if io is None:
            raise BundleError(f"{where}: the LLM graphs lack the {what}")
        shape, _ = io
        for axis, value in dims.items():
            got = shape[axis] if -len(shape) <= axis < len(shape) else None
            if isinstance(got, int) and got != value:
                raise BundleError(f"{where}: {what} has {got} at axis {axis}, the manifest says {value}")
    for name, io in ((DECODER_EMBEDS, decoder_inputs[DECODER_EMBEDS]), ("past key/values",
                                                                       decoder_inputs[past_names(layers)[0]])):
        if io[1] != dtype:
            raise BundleError(f"{where}: decoder input {name} is {io[1]}, the manifest's {Keys.LLM_DTYPE} is {dtype}")
    deep = m[Keys.LLM_DEEPSTACK_LAYERS]
    if (DECODER_DEEPSTACK in decoder_inputs) != bool(deep):
        raise BundleError(f"{where}: the decoder {'lacks' if deep else 'takes'} input '{DECODER_DEEPSTACK}', the "
                          f"manifest's {Keys.LLM_DEEPSTACK_LAYERS}={deep}")
    rank = 3 if m[Keys.POSITIONS_ROPE] == "mrope" else 2
    positions = decoder_inputs.get(DECODER_POSITIONS)
    if positions is None or len(positions[0]) != rank:
        raise BundleError(f"{where}: decoder input '{DECODER_POSITIONS}' has shape {positions and positions[0]}, "
                          f"{Keys.POSITIONS_ROPE}={m[Keys.POSITIONS_ROPE]!r} needs rank {rank}")
