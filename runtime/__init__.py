"""On-device runtime: numpy + onnxruntime + tokenizers (+ Pillow). No torch, no transformers.

The pieces the exporter and the torch reference share with the runtime (preprocessing, prompt
layout, position rule, bundle format) live here once, so both sides run the same code.
"""
