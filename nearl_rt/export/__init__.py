"""ONNX export of trained models: the graph modules (graph), `python -m export.onnx` (onnx), int8
quantisation (quantize) and the preprocessing graph for clients without Pillow (preprocess_graph)."""
