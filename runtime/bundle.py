"""Read and verify a bundle (the format is in runtime/format.py). numpy-free, torch-free.

`load_bundle(path)` checks, in order, and raises `BundleError` naming the file or key:
the folder and manifest.json exist and parse; format.read accepts it (format marker, schema range,
older schemas migrated, required keys); every file listed under `files.sha256` exists and its sha256
matches.
`check_vision_outputs` compares K (and the extras) in the manifest with the vision graph itself.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import BundleError
from edgeprune.runtime import format as fmt
from edgeprune.runtime.format import VISION_POSITIONS, VISION_TOKENS, Bucket, Files, Keys
from edgeprune.runtime.preprocess import PreprocessConfig
from edgeprune.runtime.prompt import ChatTemplate

__all__ = ["Bundle", "load_bundle", "read_manifest", "sha256_file", "hash_files", "check_vision_outputs"]

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


def read_manifest(path: str | Path) -> dict:
    """Parse `<bundle>/manifest.json` and check it with format.read (no hashing); returns the manifest in
    the current schema's layout (older schemas migrated, optional keys' defaults filled)."""
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


def _verify_files(root: Path, manifest: dict) -> None:
    listed = manifest[Keys.FILES_SHA256]
    if not isinstance(listed, dict) or not listed:
        raise BundleError(f"{root / Files.MANIFEST}: {Keys.FILES_SHA256} must be a non-empty object")
    for required in (Files.VISION, Files.TOKENIZER, Files.PREPROCESS):
        if required not in listed:
            raise BundleError(f"{root / Files.MANIFEST}: {Keys.FILES_SHA256} does not list {required}")
    for rel, expected in listed.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {Files.MANIFEST}); re-export the bundle")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                              "the file was modified or corrupted — re-export the bundle")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, manifest and the small configs parsed."""

    path: Path
    manifest: dict
    preprocess: PreprocessConfig
    chat_template: ChatTemplate

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


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and verify the bundle at `path` (verify=False skips hashing, e.g. for `inspect`)."""
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        _verify_files(root, manifest)
    try:
        pre = PreprocessConfig.from_dict(json.loads((root / Files.PREPROCESS).read_text(encoding="utf-8")))
    except FileNotFoundError as err:
        raise BundleError(f"{root / Files.PREPROCESS}: missing") from err
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{root / Files.PREPROCESS}: malformed ({err})") from err
    try:
        template = ChatTemplate.from_dict(manifest[Keys.MODEL_CHAT_TEMPLATE])
    except (KeyError, TypeError) as err:
        raise BundleError(f"{root / Files.MANIFEST}: {Keys.MODEL_CHAT_TEMPLATE} malformed ({err})") from err
    return Bundle(path=root, manifest=manifest, preprocess=pre, chat_template=template)


def check_vision_outputs(bundle: Bundle, outputs: dict[str, list]) -> None:
    """`outputs`: the vision graph's output name -> shape (ints or symbolic names), as ORT reports them.
    K and the extra outputs in the manifest must be what the graph produces."""
    where = f"{bundle.path / Files.VISION}"
    expected = [VISION_TOKENS, VISION_POSITIONS, *bundle.extra_outputs]
    if sorted(outputs) != sorted(expected):
        raise BundleError(f"{where}: outputs {sorted(outputs)}, the manifest expects {sorted(expected)}")
    for name in (VISION_TOKENS, VISION_POSITIONS):
        k = outputs[name][1] if len(outputs[name]) > 1 else None
        if k != bundle.keep:
            raise BundleError(f"{where}: output '{name}' has K={k}, the manifest says "
                              f"{Keys.PRUNER_KEEP}={bundle.keep}")
