"""The bottom layer, free of PyTorch: what serving needs and every other layer shares.

errors (user-facing error types), atomic (temp-file-then-rename writes), cli (one-line errors, exit 2),
hashing (sha256 of files), imaging (files and arrays -> the 8-bit RGB pixels the model sees: DICOM, 16-bit,
float; the intensity policy), preprocess (pixels -> the normalised model input, NumPy + Pillow), metadata
(the nearl.* ONNX metadata) and session (NearlSession: an exported model served by onnxruntime).
Nothing here imports torch or any other nearl_rt package (tests/test_layers.py checks both).
"""
