"""Device profiles: what a target device offers the model (YAML under profiles/devices/).

`load_device_profile("jetson-orin-nano-8gb")` or a path to a YAML file; every field is validated and
a bad profile is an error naming the file and the field. Torch-free: the profiler runs on devices.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from edgeprune.errors import EdgepruneError

__all__ = ["DeviceProfile", "DeviceProfileError", "load_device_profile", "device_profiles", "DEVICES_DIR"]

DEVICES_DIR = Path(__file__).resolve().parent / "devices"
KINDS = ("jetson", "discrete-gpu", "cpu")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
PROVIDERS = ("tensorrt", "cuda", "cpu")
PROBES = ("tegrastats", "nvml", "rss")


class DeviceProfileError(EdgepruneError):
    pass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str                       # jetson | discrete-gpu | cpu
    memory_total_gb: float
    memory_available_gb: float      # what the model (weights + activations + KV) may use
    unified_memory: bool            # CPU and GPU share memory (Jetson; and trivially a CPU box)
    precision: str                  # the precision engines are built in
    jetpack: str | None
    tensorrt_version: str | None    # the TensorRT its JetPack ships (8.5: JP 5.1, 10.3: JP 6.x, 10.16: JP 7.x)
    workspace_mb: int               # TensorRT builder workspace
    providers: tuple[str, ...]      # ONNX Runtime execution providers, in priority order
    memory_probe: str               # tegrastats | nvml | rss

    @property
    def memory_available_bytes(self) -> int:
        return int(self.memory_available_gb * 1024**3)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _check(source: str, data: dict) -> DeviceProfile:
    def fail(field: str, msg: str):
        raise DeviceProfileError(f"{source}: field '{field}': {msg}")

    if not isinstance(data, dict):
        raise DeviceProfileError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    names = [f.name for f in fields(DeviceProfile)]
    for key in data:
        if key not in names:
            fail(key, f"unknown field; expected one of {', '.join(names)}")
    for key in names:
        if key not in data:
            fail(key, "missing")

    def number(key, minimum=0.0):
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum:
            fail(key, f"{v!r}, expected a number >= {minimum}")
        return v

    def choice(key, options):
        if data[key] not in options:
            fail(key, f"{data[key]!r}, expected one of {', '.join(options)}")
        return data[key]

    def optional_str(key):
        v = data[key]
        if v is not None and not isinstance(v, (str, int, float)):
            fail(key, f"{v!r}, expected a version string or null")
        return None if v is None else str(v)

    for key in ("name", "description"):
        if not isinstance(data[key], str) or not data[key]:
            fail(key, f"{data[key]!r}, expected a non-empty string")
    if not isinstance(data["unified_memory"], bool):
        fail("unified_memory", f"{data['unified_memory']!r}, expected true or false")
    total, available = number("memory_total_gb", 0.1), number("memory_available_gb", 0.1)
    if available > total:
        fail("memory_available_gb", f"{available} exceeds memory_total_gb={total}")
    workspace = data["workspace_mb"]
    if isinstance(workspace, bool) or not isinstance(workspace, int) or workspace < 0:
        fail("workspace_mb", f"{workspace!r}, expected an integer >= 0")
    providers = data["providers"]
    if not isinstance(providers, list) or not providers or any(p not in PROVIDERS for p in providers):
        fail("providers", f"{providers!r}, expected a non-empty list of {', '.join(PROVIDERS)}")
    return DeviceProfile(name=data["name"], description=data["description"], kind=choice("kind", KINDS),
                         memory_total_gb=float(total), memory_available_gb=float(available),
                         unified_memory=data["unified_memory"], precision=choice("precision", PRECISIONS),
                         jetpack=optional_str("jetpack"), tensorrt_version=optional_str("tensorrt_version"),
                         workspace_mb=workspace, providers=tuple(providers),
                         memory_probe=choice("memory_probe", PROBES))


def device_profiles() -> list[str]:
    """Names of the profiles shipped with edgeprune."""
    return sorted(p.stem for p in DEVICES_DIR.glob("*.yaml"))


def load_device_profile(name_or_path: str | Path) -> DeviceProfile:
    path = Path(name_or_path)
    if not path.suffix:
        path = DEVICES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise DeviceProfileError(f"unknown device profile {str(name_or_path)!r}; shipped: "
                                     f"{', '.join(device_profiles())} (or pass a YAML file)")
    elif not path.is_file():
        raise DeviceProfileError(f"device profile file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DeviceProfileError(f"{path}: not valid YAML: {err}") from err
    return _check(str(path), data)
