"""Benchmarks: `python bench/latency.py` (end to end; installed: `nearl-bench`), `python -m nearl_rt.bench.kernels`
(fused ops) and the others listed in docs/benchmarks.md."""
