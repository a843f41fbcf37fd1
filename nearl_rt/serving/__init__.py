"""Serving exported models with NVIDIA Triton Inference Server: model repositories for the NGC container
(triton_repository, `python -m export.triton`) and Triton on one machine without a container (server,
`python -m export.serve`)."""
