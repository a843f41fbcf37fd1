"""Checkout shortcut: `python bench/latency.py ...` runs `python -m nearl_rt.bench.latency ...` (installed: `nearl-bench`).

`bench/` holds this shortcut, the GPU suite (gpu_suite.sh, suite.py) and RESULTS.md; the benchmarks themselves are
nearl_rt.bench (docs/benchmarks.md)."""
if __name__ == "__main__":
    import runpy
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's nearl_rt, installed or not
    runpy.run_module("nearl_rt.bench.latency", run_name="__main__", alter_sys=True)
