"""The vision engine (engines/vision.plan, `edgeprune build-engine`): checked against this device, then run
with TensorRT's own Python API. numpy + tensorrt + polygraphy's CUDA wrapper; no torch, no onnxruntime.

Why TensorRT directly rather than ONNX Runtime's TensorRT provider: JetPack ships TensorRT and its Python
bindings, while onnxruntime-gpu for Jetson is a separate build tied to each JetPack release, so a Jetson
user often has `tensorrt` and a CPU-only onnxruntime. The engine built on the device by `build-engine`
then runs here whatever onnxruntime is installed; the LLM stays on ONNX Runtime (its fused attention is an
ORT contrib op). README ("The device path") has the whole reasoning.

TensorRT API used (the named-tensor API of TensorRT >= 8.5: JetPack 5.1 ships 8.5, JetPack 6 ships 8.6 and
10.x; TensorRT 10 removed the older binding-index API):
  trt.Runtime(logger).deserialize_cuda_engine(bytes) -> ICudaEngine, None when it cannot
  engine.num_io_tensors, get_tensor_name(i), get_tensor_mode(name) (TensorIOMode.INPUT / OUTPUT),
  get_tensor_dtype(name) (trt.nptype -> numpy), get_tensor_shape(name) (-1 for a dynamic axis),
  get_tensor_profile_shape(name, 0) -> (min, opt, max) of optimisation profile 0
  context = engine.create_execution_context(); set_input_shape(name, shape); get_tensor_shape(name)
  (outputs, once the input shape is set); set_tensor_address(name, ptr); execute_async_v3(stream) -> bool
Device memory and the stream come from polygraphy.cuda (DeviceArray: resize / copy_from / copy_to, Stream),
ctypes over libcudart: pure Python, in edgeprune[trt], installs with pip on JetPack, which ships neither
cuda-python nor pycuda. The GPU's name and compute capability are read through the same libcudart
(cudaGetDeviceProperties, cudaDeviceGetAttribute).
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune.errors import BundleError, EdgepruneError, MissingDependencyError, ModelError
from edgeprune.runtime.format import VISION_INPUT, Engine, Graph, Keys

__all__ = ["DeviceFacts", "device_facts", "check_engine", "rebuild_hint", "TrtVision"]

log = logging.getLogger(__name__)

_COMPUTE_MAJOR, _COMPUTE_MINOR = 75, 76   # cudaDevAttrComputeCapabilityMajor / Minor (driver_types.h)
_PROPS_BYTES = 8192                       # > sizeof(cudaDeviceProp) of every CUDA; `char name[256]` comes first


@dataclass(frozen=True)
class DeviceFacts:
    """What an engine is tied to: it runs only with the TensorRT and on the GPU it was built with."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str   # "8.7"


def import_tensorrt():
    try:
        import tensorrt
        from polygraphy import cuda  # noqa: F401  (device memory for the runner)
    except ImportError as err:
        raise MissingDependencyError(f"TensorRT's Python package or polygraphy does not import here ({err}); on the "
                                     "device: JetPack ships tensorrt; pip install polygraphy (edgeprune[trt])") from err
    return tensorrt


def device_facts(device: int = 0) -> DeviceFacts:
    """TensorRT version, GPU name and compute capability of CUDA device `device` (needs a GPU)."""
    trt = import_tensorrt()
    from polygraphy import cuda

    lib = cuda.wrapper().handle
    props = ctypes.create_string_buffer(_PROPS_BYTES)
    major, minor = ctypes.c_int(), ctypes.c_int()
    for status in (lib.cudaGetDeviceProperties(props, device),
                   lib.cudaDeviceGetAttribute(ctypes.byref(major), _COMPUTE_MAJOR, device),
                   lib.cudaDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_MINOR, device)):
        if status != 0:
            raise EdgepruneError(f"CUDA device {device}: cannot read its properties (cudaError {status})")
    return DeviceFacts(tensorrt_version=trt.__version__, gpu_name=props.value.decode(errors="replace"),
                       compute_capability=f"{major.value}.{minor.value}")


def rebuild_hint(bundle_dir: Path) -> str:
    return f"rebuild it on this device: edgeprune build-engine {bundle_dir} --force"


def check_engine(entry: dict, here: DeviceFacts, bundle_dir: Path) -> None:
    """BundleError unless the engine record `entry` (format.Engine) was built for `here`, naming both sides
    and the command that rebuilds it. Pure Python: the record against the facts, nothing loaded."""
    where = Path(bundle_dir) / entry[Engine.FILE]
    facts = (Engine.TENSORRT_VERSION, Engine.GPU_NAME, Engine.COMPUTE_CAPABILITY, Engine.PRECISION, Engine.BATCH)
    missing = [field for field in facts if field not in entry]
    if missing:
        raise BundleError(f"{where}: its manifest record lacks {', '.join(missing)} (built by an older edgeprune), "
                          f"so it cannot be checked against this device; {rebuild_hint(bundle_dir)}")
    built = DeviceFacts(str(entry[Engine.TENSORRT_VERSION]), str(entry[Engine.GPU_NAME]),
                        str(entry[Engine.COMPUTE_CAPABILITY]))
    if built != here:
        raise BundleError(f"{where}: built with TensorRT {built.tensorrt_version} for {built.gpu_name} (compute "
                          f"{built.compute_capability}), this device has TensorRT {here.tensorrt_version} and "
                          f"{here.gpu_name} (compute {here.compute_capability}); an engine runs only where it was "
                          f"built: {rebuild_hint(bundle_dir)}")
    if entry[Engine.PRECISION] not in Engine.PRECISIONS:
        raise BundleError(f"{where}: precision {entry[Engine.PRECISION]!r}, expected one of "
                          f"{', '.join(Engine.PRECISIONS)}; {rebuild_hint(bundle_dir)}")


class TrtVision:
    """engines/vision.plan of a verified bundle, checked against this device (check_engine) and run on it.

    Same surface as the ONNX Runtime runner (runtime/vision.py): output_names, output_shapes, batch,
    pixel_dtype, device and run(pixels) -> {name: array}."""

    def __init__(self, bundle):
        trt = import_tensorrt()
        from polygraphy import cuda

        entry = bundle.manifest[Keys.ENGINE_VISION]
        path = bundle.file(entry[Engine.FILE])
        if entry[Engine.FILE] not in bundle.manifest[Keys.FILES_SHA256]:
            raise BundleError(f"{path}: not listed under {Keys.FILES_SHA256}, so it cannot be verified; "
                              f"{rebuild_hint(bundle.path)}")
        check_engine(entry, device_facts(), bundle.path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BundleError(f"{path}: cannot read it ({err}); {rebuild_hint(bundle.path)}") from err
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if self.engine is None:
            raise BundleError(f"{path}: TensorRT {trt.__version__} cannot deserialize it; {rebuild_hint(bundle.path)}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in inputs]
        expected = list(bundle.manifest[Keys.VISION_GRAPH][Graph.OUTPUTS])
        if inputs != [VISION_INPUT] or sorted(self.output_names) != sorted(expected):
            raise BundleError(f"{path}: tensors {inputs} -> {self.output_names}, the vision graph has "
                              f"[{VISION_INPUT!r}] -> {expected}; {rebuild_hint(bundle.path)}")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.pixel_dtype = self.dtypes[VISION_INPUT]
        shape = tuple(self.engine.get_tensor_shape(VISION_INPUT))
        low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(VISION_INPUT, 0)) if shape[0] == -1 \
            else (shape, shape, shape)
        self.batch_range = (low[0], high[0])
        self.batch = shape[0] if shape[0] != -1 else None
        self.input_shape = ["batch" if d == -1 else int(d) for d in shape]
        self.output_shapes = {n: ["batch" if d == -1 else int(d) for d in self.engine.get_tensor_shape(n)]
                              for n in self.output_names}
        self.device = f"TensorRT {trt.__version__} engine ({entry[Engine.PRECISION]})"
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.buffers = {n: cuda.DeviceArray(shape=(0,), dtype=self.dtypes[n]) for n in names}
        self.path = path

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """pixels [B, 3, H, W] -> {output name: array}, B within the engine's batch profile."""
        b = pixels.shape[0]
        low, high = self.batch_range
        if not low <= b <= high:
            raise ModelError(f"{b} image(s) given; {self.path} takes a batch of {low}..{high} (rebuild with "
                             f"`edgeprune build-engine ... --force --max-batch {b}` for more)")
        pixels = np.ascontiguousarray(pixels, dtype=self.pixel_dtype)
        if not self.context.set_input_shape(VISION_INPUT, pixels.shape):
            raise ModelError(f"pixels of shape {pixels.shape}: {self.path} does not accept it")
        self.buffers[VISION_INPUT].resize(pixels.shape).copy_from(pixels, self.stream)
        outputs = {}
        for name in self.output_names:
            outputs[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])
            self.buffers[name].resize(outputs[name].shape)
        for name, buffer in self.buffers.items():
            self.context.set_tensor_address(name, buffer.ptr)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise EdgepruneError(f"{self.path}: TensorRT execution failed (see TensorRT's log above)")
        for name in self.output_names:
            self.buffers[name].copy_to(outputs[name], self.stream)
        self.stream.synchronize()
        return outputs
