"""Benchmarks: `python bench/latency.py` (end to end) and `python bench/kernels.py` (fused ops)."""
