"""ONNX export (`python -m export.onnx ckpt.pt`) and the onnxruntime runtime."""
