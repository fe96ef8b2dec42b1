"""torch -> ONNX -> TensorRT: graph wrappers, bundle writer, validators and the TensorRT op lint."""
