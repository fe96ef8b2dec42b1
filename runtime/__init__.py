"""On-device runtime: numpy + onnxruntime + tokenizers (+ Pillow). No torch, no transformers.

The pieces the exporter and the torch reference share with the runtime (preprocessing, prompt
layout, position rule, bundle format) live here once, so both sides run the same code.
"""

__all__ = ["Pipeline"]


def __getattr__(name: str):
    # `edgeprune.runtime.Pipeline` without importing onnxruntime for the small shared modules.
    if name == "Pipeline":
        from edgeprune.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
