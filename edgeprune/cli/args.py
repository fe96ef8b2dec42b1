"""Argument groups shared by subcommands: each adds its options and turns them into a small value."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import EdgepruneError

__all__ = ["add_logging_args", "setup_logging", "add_pruner_args", "pruner_options", "PrunerOptions",
           "add_bundle_args", "add_device_args", "device_profile", "add_model_arg", "add_threads_arg",
           "add_positions_arg", "parse_key_values", "DEFAULT_MODEL", "count", "count0", "positive_float",
           "add_llm_stage_args", "llm_stage_options", "LLMStageOptions", "int_list"]

DEFAULT_MODEL = "edgeprune-mini"


# argparse `type=` checks: a nonsense value is a usage error naming the option, before anything loads.
def count(text: str) -> int:
    """An integer >= 1 (--threads, --batch, --runs, --soak, ...)."""
    return _integer(text, 1)


def count0(text: str) -> int:
    """An integer >= 0 (--warmup, --seed)."""
    return _integer(text, 0)


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {low}")
    return value


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    return _port(text, 1)


def port0(text: str) -> int:
    """A TCP port, or 0 for off (--openai-port)."""
    return _port(text, 0)


def _port(text: str, low: int) -> int:
    value = _integer(text, low)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value}: expected a port number in {low}..65535")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (--ttft-ms)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number > 0")
    return value


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="INFO log lines (default: warnings only); -vv for debug")
    group.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars")
    group.add_argument("--log-file", type=Path, help="also write the log to this file")


def setup_logging(args: argparse.Namespace) -> None:
    """Warnings by default, INFO with -v, DEBUG with -vv, errors only with -q. The console handler
    writes through tqdm when it is installed (`cli.main` redirects it), so log lines never land on a
    progress bar's line."""
    verbose = getattr(args, "verbose", 0)
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if getattr(args, "log_file", None):
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    logging.captureWarnings(True)   # Python warnings (e.g. from torch.onnx) follow the same level


def parse_key_values(items: list[str] | None) -> dict:
    """`--cfg alpha=0.5 --cfg selection=dart` -> {"alpha": 0.5, "selection": "dart"} (YAML scalars);
    a value naming a .npy file is loaded as the array (e.g. `--cfg bias=prior.npy`), so a bundle
    stores the values it was built with rather than a path on the exporting machine."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgepruneError(f"--cfg {item!r}: expected KEY=VALUE")
        if value.endswith(".npy"):
            import numpy as np

            try:
                out[key] = np.load(value)
            except (OSError, ValueError) as err:
                raise EdgepruneError(f"--cfg {item!r}: cannot read the array ({err})") from None
            continue
        out[key] = yaml.safe_load(value)
    return out


@dataclass(frozen=True)
class PrunerOptions:
    method: str
    keep: int | None
    config: dict


def add_pruner_args(parser: argparse.ArgumentParser, keep_required: bool = False) -> None:
    from edgeprune.cli.method_names import METHOD_NAMES   # static: no torch, no pruner imports at parse time

    group = parser.add_argument_group("pruner")
    group.add_argument("--method", default="divprune", choices=METHOD_NAMES, help="pruning method")
    group.add_argument("--keep", type=count, required=keep_required,
                       help="token budget K (default: N, i.e. no pruning)")
    group.add_argument("--cfg", action="append", metavar="KEY=VALUE",
                       help="method option, repeatable (see `edgeprune methods`)")


def pruner_options(args: argparse.Namespace) -> PrunerOptions:
    if args.keep is not None and args.keep < 1:
        raise EdgepruneError(f"--keep {args.keep}: expected an integer >= 1")
    return PrunerOptions(method=args.method, keep=args.keep, config=parse_key_values(args.cfg))


def int_list(text: str, option: str) -> tuple[int, ...]:
    """'91,64,45' -> (91, 64, 45); a clear error naming the option otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise EdgepruneError(f"{option} {text!r}: expected comma-separated integers, e.g. 91,64,45")
    return values


@dataclass(frozen=True)
class LLMStageOptions:
    method: str | None
    keep: tuple[int, ...] | None
    layer: tuple[int, ...] | None
    average: float | None
    kv_policy: str
    config: dict

    def export_kwargs(self) -> dict:
        """Keyword arguments of export_bundle."""
        return {"llm_method": self.method, "llm_keep": self.keep, "llm_layer": self.layer,
                "llm_average": self.average, "llm_cfg": self.config, "kv_policy": self.kv_policy}


def add_llm_stage_args(parser: argparse.ArgumentParser) -> None:
    """In-LLM pruning (METHODS_INLLM.md): a second, static budget inside the LLM's prefill."""
    from edgeprune.cli.method_names import STAGE_METHOD_NAMES   # static: no torch at parse time

    group = parser.add_argument_group("in-LLM stage", "prune the image tokens again inside the LLM (see "
                                      "`edgeprune methods`)")
    group.add_argument("--llm-method", choices=STAGE_METHOD_NAMES, help="in-LLM method (default: none)")
    group.add_argument("--llm-keep", metavar="K2[,K2...]",
                       help="image tokens left after each stage, e.g. 64 or 91,64,45 (default: the method's)")
    group.add_argument("--llm-layer", metavar="L[,L...]",
                       help="first reduced layer of each stage, 0-based, e.g. 2 or 3,7,16 (default: the method's)")
    group.add_argument("--llm-average", type=float, metavar="B",
                       help="instead of --llm-keep: counts whose layer-average visual token count is B")
    group.add_argument("--kv-policy", choices=("uniform", "faithful"), default="uniform",
                       help="KV cache of the layers before a stage: uniform (gathered like the later layers; one "
                            "decode mask) or faithful (kept whole, as the official code) (default: uniform)")
    group.add_argument("--llm-cfg", action="append", metavar="KEY=VALUE",
                       help="in-LLM method option, repeatable (e.g. bias=prior.npy for d2pruner)")


def llm_stage_options(args: argparse.Namespace) -> LLMStageOptions:
    keep = int_list(args.llm_keep, "--llm-keep") if args.llm_keep else None
    layer = int_list(args.llm_layer, "--llm-layer") if args.llm_layer else None
    if args.llm_method is None and (keep or layer or args.llm_average is not None or args.llm_cfg):
        raise EdgepruneError("--llm-keep/--llm-layer/--llm-average/--llm-cfg need --llm-method")
    if keep is not None and args.llm_average is not None:
        raise EdgepruneError("--llm-keep and --llm-average: give one of them")
    return LLMStageOptions(method=args.llm_method, keep=keep, layer=layer, average=args.llm_average,
                           kv_policy=args.kv_policy, config=parse_key_values(args.llm_cfg))


def add_bundle_args(parser: argparse.ArgumentParser, output: bool = False) -> None:
    group = parser.add_argument_group("bundle")
    if output:
        group.add_argument("--out", type=Path, required=True, help="bundle folder to write")
        group.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    else:
        group.add_argument("bundle", type=Path, help="bundle folder written by `edgeprune export`")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device")
    group.add_argument("--provider", action="append", metavar="NAME",
                       help="execution provider, repeatable, in priority order (cpu, cuda, tensorrt; default: "
                            "the device profile's, else cpu); tensorrt runs the vision engine of `build-engine` "
                            "with TensorRT itself")
    group.add_argument("--device-profile", metavar="NAME|FILE",
                       help="device profile (profiles/devices/*.yaml or your own file): its providers are used "
                            "unless --provider is given")


def device_profile(args: argparse.Namespace):
    """(the loaded --device-profile or None, the providers to use: --provider, else the profile's, else None)."""
    device = None
    if args.device_profile:
        from edgeprune.profiles.device import load_device_profile

        device = load_device_profile(args.device_profile)
    return device, args.provider or (list(device.providers) if device else None)


def add_model_arg(parser, *, required: bool = False, default: str | None = DEFAULT_MODEL,
                  torch_note: bool = False) -> None:
    """--model: a preset (edgeprune.models.presets()) or a local Hugging Face directory. `parser` may be a
    group (e.g. plan's --bundle | --model)."""
    default = None if required else default
    text = "preset (edgeprune-mini, tiny-llava, ...) or local model directory"
    text += f" (default: {default})" if default else ""
    text += "; loads the model with torch" if torch_note else ""
    parser.add_argument("--model", required=required, default=default, help=text)


def add_threads_arg(parser, engine: str = "ONNX Runtime intra-op", per: str = "") -> None:
    """--threads N for `engine` (`per`: e.g. " per instance"); `parser` may be a group."""
    parser.add_argument("--threads", type=count, metavar="N", help=f"{engine} threads{per} (default: its own choice)")


def add_positions_arg(parser: argparse.ArgumentParser, default_note: str = "the method's convention, else the "
                      "model's") -> None:
    from edgeprune.runtime.positions import POSITION_MODES

    parser.add_argument("--positions", choices=POSITION_MODES,
                        help=f"position ids of the kept image tokens (default: {default_note})")
