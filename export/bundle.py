"""Write a bundle (format: runtime/format.py): vision graph, LLM graphs, tokenizer, preprocessing and
a manifest with every file's sha256 and the validation results.

Atomic: everything is built in a temp folder beside the target and renamed into place at the end,
so a crash leaves either the old bundle or the new one, never half of one. One writer at a time: a
lock file beside the target (`.<name>.lock`, FileLock) makes a second export to the same folder fail at
once, and the target is checked again under the lock. What --force may replace (`check_target`): a
folder whose manifest.json carries edgeprune's format marker and that holds nothing but the files its
manifest lists (and run-time caches). A folder that is not a bundle, or a bundle holding files of yours,
is never replaced; neither is the folder you are in.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeprune import __version__
from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.export.onnx_io import graph_io
from edgeprune.export.validate import ParityError, check_graph, validate_vision
from edgeprune.export.vision import export_vision, vision_in_float32
from edgeprune.models.base import Adapter
from edgeprune.pruners import available
from edgeprune.pruners.ops import check_keep
from edgeprune.runtime.bundle import bundle_lock, hash_files, load_bundle, unlisted_files
from edgeprune.runtime.format import (PASSED, PRECISIONS, SCHEMA_VERSION, Bucket, Files, Graph, Keys, bucket_file,
                                      known, llm_keys, optional_keys, recognise, write_manifest)
from edgeprune.runtime.format import llm_precision as recorded_precision
from edgeprune.runtime.llm import llm_files
from edgeprune.runtime.prompt import encode_prompt
from edgeprune.runtime.positions import POSITION_MODES, check_rope_mode

__all__ = ["export_bundle", "check_target", "EXPORT_STEPS", "effective_config"]

log = logging.getLogger(__name__)

# Step names reported to `on_step`, in order (the CLI's progress bar counts them).
EXPORT_STEPS = ("build pruner", "export vision graph", "check vision graph", "validate vision graph",
                "export LLM graphs", "write tokenizer and preprocessing", "hash files and write manifest")


def effective_config(method: str, adapter: Adapter, cfg: dict) -> dict:
    """The options the pruner is built with: its defaults, the model facts it accepts
    (build_for_model's rule), then the user's `cfg`."""
    defaults = {k: v for k, v in available()[method].defaults.items() if v is not inspect.Parameter.empty}
    merged = {**defaults, **{k: v for k, v in adapter.pruner_options().items() if k in defaults}}
    merged.update(cfg)
    return merged


def _jsonable(value):
    """Tuples -> lists recursively; raises TypeError for anything JSON cannot hold."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(type(value).__name__)


def _store_config(config: dict, folder: Path, sub: str = Files.PRUNER_ARRAYS) -> tuple[dict, dict]:
    """JSON part of `config`, with tensors/arrays saved as `<sub>/<key>.npy` (referenced by path);
    anything else that JSON cannot hold is omitted with a note."""
    stored, omitted = {}, {}
    for key, value in sorted(config.items()):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            rel = f"{sub}/{key}.npy"
            (folder / sub).mkdir(exist_ok=True)
            np.save(folder / rel, value)
            stored[key] = {"file": rel, "shape": list(value.shape), "dtype": value.dtype.name}
            continue
        try:
            stored[key] = _jsonable(value)
        except TypeError as err:
            omitted[key] = f"{err} is not JSON-serialisable; baked into the vision graph"
    return stored, omitted


def check_target(out: str | Path, force: bool) -> None:
    """Raise BundleError unless `out` may be written: absent, an empty folder, or with force=True an edgeprune
    bundle (recognised by its format marker) holding only the files its manifest lists."""
    out = Path(os.path.abspath(out))
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise BundleError(f"{out}: {above} is a file, not a folder; choose another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    manifest, problem = _existing_manifest(out)
    if problem:
        raise BundleError(f"{out}: a non-empty folder that is not an edgeprune bundle ({problem}); refusing to replace "
                          "it, even with --force")
    if not force:
        raise BundleError(f"{out}: a bundle already exists there; pass --force (force=True) to replace it")
    cwd = Path.cwd()
    if cwd == out or out in cwd.parents:
        raise BundleError(f"{out}: the current folder is (inside) the bundle to replace; run from outside it or "
                          "choose another --out")
    files = manifest[Keys.FILES_SHA256] if Keys.FILES_SHA256 in manifest else None   # raw JSON: not read() yet
    if not isinstance(files, dict):
        raise BundleError(f"{out}: its manifest does not list its files ({Keys.FILES_SHA256}), so --force cannot tell "
                          "them from yours; remove the folder yourself")
    theirs = unlisted_files(out, {Keys.FILES_SHA256: files})
    if theirs:
        raise BundleError(f"{out}: the bundle holds {len(theirs)} file(s) its manifest does not list ("
                          f"{', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}); --force replaces only what "
                          "edgeprune wrote: move them out first")


def _existing_manifest(out: Path) -> tuple[dict | None, str | None]:
    """(the parsed manifest, None) when `out` holds an edgeprune manifest by its marker, else (None, why not)."""
    path = out / Files.MANIFEST
    if not path.is_file():
        return None, f"no {Files.MANIFEST}"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"{Files.MANIFEST} is not readable JSON: {err}"
    problem = recognise(manifest)
    return (None, f"{Files.MANIFEST}: {problem}") if problem else (manifest, None)


def _begin_write(out: Path, force: bool):
    """The lock of `out` and the temp folder to build the bundle in: under the lock, the target is checked again
    (another writer may have finished since the first check) and what a killed writer left is cleaned up."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BundleError(f"{out}: cannot write there ({err})") from err
    lock = bundle_lock(out)
    try:
        check_target(out, force)
        _clean_leftovers(out)
        return lock, Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as err:
        lock.release()
        raise BundleError(f"{out}: cannot write there ({err})") from err
    except BaseException:
        lock.release()
        raise


def _clean_leftovers(out: Path) -> None:
    """Temp folders of a writer killed before it finished (nobody else writes `out` while we hold its lock):
    .tmp-* are half-built bundles; .old-* hold a replaced bundle, put back if the new one never arrived."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out.parent.glob(f".{out.name}.old-*"):
        if not out.exists() and (old / "bundle").is_dir():
            os.replace(old / "bundle", out)
        shutil.rmtree(old, ignore_errors=True)


def _normalise_permissions(folder: Path) -> None:
    """mkdtemp creates 0700 folders and some writers 0600 files; a bundle is read by other users
    (a service account on the device), so give it the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "bundle")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_bundle(adapter: Adapter, out: str | Path, *, method: str, keep: int | None = None,
                  cfg: dict | None = None, positions: str | None = None, llm_precision: str = "fp32",
                  batch: int | None = None, attention: str = "fused", force: bool = False, source: str = "",
                  validate: bool = True, on_step: Callable[[str], None] | None = None,
                  reuse_llm_from: str | Path | None = None, buckets: list[tuple[int, int]] | None = None,
                  llm_method: str | None = None, llm_keep=None, llm_layer=None, llm_average: float | None = None,
                  llm_cfg: dict | None = None, kv_policy: str = "uniform") -> dict:
    """Export `adapter` pruned by `method` to K=`keep` (None: N, no pruning) into the bundle `out`.

    positions: "original" | "compact" (default: the method's own convention, else the adapter's);
    llm_precision: "fp32" | "fp16" | "int8" | "int4" (the LLM's weights, export/llm.py; the vision graph stays
    float32 in ONNX, build-engine --fp16 makes its engine fp16);
    batch: fixed vision batch, None for dynamic. reuse_llm_from: a bundle of the same model, LLM precision
    and attention whose LLM graphs are hard-linked (or copied) instead of exported again, e.g. by a
    sweep over methods and K, where only the vision graph differs. Returns the manifest. Raises ParityError when
    validation fails (nothing is written then).

    buckets: input sizes (h, w) for resolution buckets (adapters with `with_image_size`, e.g. Qwen2-VL): one
    vision graph per size, each with its own static N and the same K (`keep` is required when the Ns
    differ). The first size is the bundle's default: vision.onnx, model.grid and preprocess.json describe it;
    the others are vision_<h>x<w>.onnx; all are listed under vision.buckets. The runtime picks a bucket per
    image (runtime/buckets.py). Needs a dynamic batch (each graph runs on the images that chose it).

    llm_method: an in-LLM stage (edgeprune.inllm, METHODS_INLLM.md) inside the prefill, reducing the K image
    tokens to `llm_keep` (an int or one per stage) from layer `llm_layer` on (default: the method's layers),
    or to counts whose layer average is `llm_average`; `llm_cfg` its options; kv_policy "uniform" (every
    layer's cache gathered) or "faithful" (layers before L keep the whole sequence). Writes prefill.onnx.
    """
    out = Path(os.path.abspath(out))
    cfg = dict(cfg or {})
    if method in available():
        positions = positions or available()[method].default_positions
    positions = positions or adapter.default_positions
    if positions not in POSITION_MODES:
        raise EdgepruneError(f"positions={positions!r}; expected one of {', '.join(POSITION_MODES)}")
    check_rope_mode(getattr(adapter, "rope", "1d"), positions)
    if llm_precision not in PRECISIONS:
        raise EdgepruneError(f"llm_precision={llm_precision!r}; expected one of {', '.join(PRECISIONS)}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise EdgepruneError(f"batch={batch!r}; expected an integer >= 1 or None (dynamic)")
    check_target(out, force)
    step = on_step or (lambda name: log.info("export: %s", name))
    bucket_adapters = _bucket_adapters(adapter, buckets, batch, keep)
    if bucket_adapters:
        adapter = bucket_adapters[0]
    n = adapter.num_image_tokens
    if keep is not None:
        for sub in bucket_adapters or [adapter]:
            check_keep(method, keep, sub.num_image_tokens)  # before any work: the pruner checks only when it runs

    runner = None
    if llm_method is not None:
        runner = _stage_runner(adapter, llm_method, keep if keep is not None else n, llm_keep, llm_layer,
                               llm_average, dict(llm_cfg or {}), kv_policy)
        if reuse_llm_from is not None:
            raise EdgepruneError("reuse_llm_from: the LLM graphs of an in-LLM stage depend on its budget; "
                                 "export them (omit reuse_llm_from)")
        if bucket_adapters and "positions" in runner.method.requires:
            raise EdgepruneError(f"{llm_method} with resolution buckets: it reads the slots' grid positions, and "
                                 f"the grid differs per bucket; export one size")

    lock, tmp = _begin_write(out, force)      # held until the bundle is in place (module docstring)
    try:
        step(EXPORT_STEPS[0])
        pruner = adapter.build_pruner(method, keep if keep is not None else n, **cfg)
        config, omitted = _store_config(effective_config(method, adapter, cfg), tmp)

        with vision_in_float32(adapter):   # the vision graph is float32 even when the adapter was loaded in float16
            step(EXPORT_STEPS[1])
            export_vision(adapter, pruner, tmp / Files.VISION, batch=batch)
            step(EXPORT_STEPS[2])
            check_graph(tmp / Files.VISION)
            step(EXPORT_STEPS[3])
            vision_check = validate_vision(adapter, pruner, tmp / Files.VISION, batch=batch) if validate else None
            if validate and not vision_check[PASSED]:
                raise ParityError(f"vision graph ORT vs torch: {_summary(vision_check)}")
            bucket_entries = []
            for i, sub in enumerate(bucket_adapters):
                file = Files.VISION if i == 0 else bucket_file(sub.preprocess_config.size)
                if i > 0:
                    export_vision(sub, pruner, tmp / file, batch=batch)
                    check_graph(tmp / file)
                if not validate:
                    check = None
                elif i == 0:
                    check = vision_check   # vision.onnx was validated above
                else:
                    check = validate_vision(sub, pruner, tmp / file, batch=batch)
                if check is not None and not check[PASSED]:
                    raise ParityError(f"vision graph {file} ORT vs torch: {_summary(check)}")
                bucket_entries.append({Bucket.SIZE: list(sub.preprocess_config.size), Bucket.GRID: list(sub.grid),
                                       Bucket.NUM_IMAGE_TOKENS: sub.num_image_tokens, Bucket.FILE: file,
                                       **({Bucket.VALIDATION: check} if check is not None else {})})

        step(EXPORT_STEPS[4])
        if reuse_llm_from is not None:
            llm_entries = _reuse_llm(Path(reuse_llm_from), tmp, adapter, source, llm_precision, attention)
        else:
            from edgeprune.export.llm import export_llm

            prompts = validation_prompts(adapter, pruner) if validate and runner is None else None  # staged: none
            llm_entries = export_llm(adapter.llm, tmp, precision=llm_precision, attention=attention,
                                     validate=validate, prompts=prompts, rope=adapter.rope, stages=runner)
        llm_check = llm_entries.pop(Keys.VALIDATION_LLM, None) if validate else None  # (a reused bundle's report
        if llm_check is not None and not llm_check[PASSED]:                            # is not a check asked for)
            raise ParityError(f"LLM graphs ORT vs torch: {llm_check}")

        step(EXPORT_STEPS[5])
        (tmp / Files.TOKENIZER).write_text(adapter.tokenizer_json(), encoding="utf-8")
        (tmp / Files.PREPROCESS).write_text(json.dumps(_jsonable(adapter.preprocess_config.to_dict()), indent=2),
                                            encoding="utf-8")

        step(EXPORT_STEPS[6])
        vision = adapter.vision_facts()
        manifest = {
            **{key: key.default for key in optional_keys()},   # every key present; null = none (bucket, engine)
            Keys.SCHEMA_VERSION: SCHEMA_VERSION,
            Keys.EDGEPRUNE_VERSION: __version__,
            Keys.CREATED: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            Keys.MODEL_FAMILY: adapter.family,
            Keys.MODEL_SOURCE: source or getattr(adapter, "name", ""),
            Keys.MODEL_GRID: list(adapter.grid),
            Keys.MODEL_NUM_IMAGE_TOKENS: n,
            Keys.MODEL_EOS_TOKEN_IDS: [int(i) for i in adapter.eos_token_ids],
            Keys.MODEL_CHAT_TEMPLATE: adapter.chat_template.to_dict(),
            Keys.MODEL_DOMAIN: adapter.domain,
            Keys.PRUNER_METHOD: method,
            Keys.PRUNER_KEEP: pruner.keep,
            Keys.PRUNER_CONFIG: config,
            Keys.PRUNER_CONFIG_OMITTED: omitted,
            Keys.PRUNER_SPACE: pruner.space,
            Keys.PRUNER_EXTRA_OUTPUTS: list(pruner.extra_outputs),
            # a learned-scorer method's record (file, sha256, recipe, trained); null for the others
            Keys.PRUNER_SCORER: _jsonable(pruner.scorer_record()) if hasattr(pruner, "scorer_record") else None,
            Keys.POSITIONS_MODE: positions,
            Keys.POSITIONS_ROPE: adapter.rope,
            Keys.VISION_GRAPH: {Graph.FILE: Files.VISION, **graph_io(tmp / Files.VISION)},
            Keys.VISION_DTYPE: "float32",
            Keys.VISION_BATCH: batch,
            Keys.VISION_BUCKETS: _jsonable(bucket_entries) if bucket_entries else None,
            Keys.VISION_NUM_LAYERS: vision["num_layers"],
            Keys.VISION_HIDDEN_SIZE: vision["hidden_size"],
            Keys.VISION_TOKENS_PER_VIEW: vision["tokens_per_view"],
            Keys.VISION_VIEWS: vision["views"],
            **_jsonable(llm_entries),
            **(_stage_manifest(runner, tmp) if runner is not None else {}),
            Keys.FILES_SHA256: hash_files(tmp),
            Keys.VALIDATION_VISION: _jsonable(vision_check),
            Keys.VALIDATION_LLM: _jsonable(llm_check),
        }
        manifest = write_manifest(tmp, manifest)
        _normalise_permissions(tmp)
        _swap_into_place(tmp, out)
    except OSError as err:      # a full or read-only disk: nothing was put in place
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"{out}: cannot write the bundle ({err})") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    return manifest


def _stage_runner(adapter: Adapter, method: str, num_image: int, keep, layer, average, cfg: dict, kv_policy: str):
    """The in-LLM stage for this model and prompt layout; every budget error before any work."""
    from edgeprune.inllm import build_for_budget
    from edgeprune.inllm.boundary import StageRunner
    from edgeprune.runtime.prompt import encode_prompt

    num_layers = adapter.llm.config.num_hidden_layers
    stage = build_for_budget(method, num_image=num_image, num_layers=num_layers, keep=keep, layer=layer,
                             average=average, **cfg)
    image_start = len(encode_prompt(adapter.tokenizer, adapter.chat_template, "")[0])
    return StageRunner(stage, num_image=num_image, num_layers=num_layers, image_start=image_start,
                       kv_policy=kv_policy, grid=tuple(adapter.grid))


def _stage_manifest(runner, folder: Path) -> dict:
    from edgeprune.inllm import available as stage_methods

    method = runner.method
    defaults = {k: v for k, v in stage_methods()[method.name].defaults.items() if v is not inspect.Parameter.empty}
    config = {k: getattr(method, k) for k in defaults if hasattr(method, k)}
    if "bias" in defaults:   # the prior as a file, not a path on the exporting machine
        config["bias"] = None if method.bias is None else method.bias.numpy()
    stored, _ = _store_config(config, folder, sub=Files.STAGE_ARRAYS)
    return {**runner.plan().to_manifest(), Keys.LLM_STAGE_CONFIG: stored}


def _bucket_adapters(adapter: Adapter, buckets, batch, keep) -> list[Adapter]:
    """One adapter per bucket size (shared weights), after checking the sizes; [] without buckets."""
    if buckets is None:
        return []
    sizes = [tuple(int(v) for v in size) for size in buckets]
    if not sizes or any(len(s) != 2 for s in sizes) or len(set(sizes)) != len(sizes):
        raise EdgepruneError(f"buckets={buckets!r}; expected a non-empty list of distinct (height, width) sizes")
    if batch is not None:
        raise EdgepruneError(f"buckets with batch={batch}: resolution buckets need a dynamic batch (batch=None), "
                             "each graph runs on the images that chose it")
    subs = [adapter.with_image_size(size) for size in sizes]
    if keep is None and len({s.num_image_tokens for s in subs}) > 1:
        raise EdgepruneError(f"buckets {sizes} have N = {[s.num_image_tokens for s in subs]}; pass keep= "
                             "(one static K for every bucket)")
    return subs


def validation_prompts(adapter: Adapter, pruner=None) -> list:
    """The LLM validation's real prompts (export/llm.py): VALIDATION_PROMPTS as token ids in the model's chat
    template, text only, then VALIDATION_IMAGE_PROMPTS about VALIDATION_IMAGE as the pipeline lays them out
    (vision, `pruner`, projector: EmbedsPrompt with the image tokens the bundle's LLM will see). A DeepStack
    model's image prompts also need its DeepStack features in the decoder: text prompts only there."""
    from edgeprune.export.llm import VALIDATION_IMAGE, VALIDATION_IMAGE_PROMPTS, VALIDATION_PROMPTS, EmbedsPrompt
    from edgeprune.reference import prefill_inputs

    prompts = [sum(encode_prompt(adapter.tokenizer, adapter.chat_template, text), []) for text in VALIDATION_PROMPTS]
    with torch.no_grad():
        for text in VALIDATION_IMAGE_PROMPTS:
            inputs = prefill_inputs(adapter, pruner, [str(VALIDATION_IMAGE)], text)
            if inputs.deepstack is not None:
                break
            prompts.append(EmbedsPrompt(inputs.embeds.float().numpy(), np.asarray(inputs.position_ids)))
    return prompts


def _reuse_llm(src: Path, tmp: Path, adapter: Adapter, source: str, precision: str, attention: str) -> dict:
    """Link the LLM graphs of bundle `src` into `tmp` after checking they are the ones this export
    would write; returns their manifest entries (with the validation recorded when they were exported)."""
    manifest = load_bundle(src).manifest  # verifies src's hashes: a tampered source is refused
    if manifest[Keys.LLM_PREFILL_GRAPH] is not None:
        raise EdgepruneError(f"reuse_llm_from={src}: its LLM graphs include an in-LLM stage; reuse needs plain ones")
    theirs = (manifest[Keys.MODEL_FAMILY], manifest[Keys.MODEL_SOURCE], recorded_precision(manifest),
              manifest[Keys.LLM_ATTENTION])
    ours = (adapter.family, source or getattr(adapter, "name", ""), precision, attention)
    if theirs != ours:
        raise EdgepruneError(f"reuse_llm_from={src}: its LLM graphs are (family, source, precision, attention) = {theirs}, "
                             f"this export needs {ours}")
    # a schema-1 source lacks required facts (known() says to re-export it); optional ones may be null
    entries = {key: manifest[key] if key.optional else known(manifest, key) for key in llm_keys()}
    entries[Keys.VALIDATION_LLM] = manifest[Keys.VALIDATION_LLM]
    for name in llm_files(entries):
        if (src / name).exists():
            try:
                os.link(src / name, tmp / name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(src / name, tmp / name)
    return entries


def _summary(v: dict) -> str:
    if not v["positions_equal"]:
        return f"positions differ in row(s) {v['positions_mismatch_rows']} of {v['images']} seeded images"
    return f"image tokens max abs diff {v['max_abs_diff']:.3g} > tolerance {v['tolerance']:.3g}"
