"""Checkout shortcut: `python -m export.preprocess_graph ...` runs `python -m nearl_rt.export.preprocess_graph ...` (installed: `nearl-rt preprocess-graph`).

`export/` is a folder of such shortcuts, not a package: no __init__.py, so it never shadows an installed
distribution named `export` (docs/architecture.md)."""
if __name__ == "__main__":
    import runpy
    runpy.run_module("nearl_rt.export.preprocess_graph", run_name="__main__", alter_sys=True)
