"""Checkout shortcut: `python -m export.onnx ...` runs `python -m nearl_rt.export.onnx ...` (installed: `nearl-export` or `nearl-rt export`).

`export/` is a folder of such shortcuts, not a package: no __init__.py, so it never shadows an installed
distribution named `export` (docs/architecture.md)."""
if __name__ == "__main__":
    import runpy
    runpy.run_module("nearl_rt.export.onnx", run_name="__main__", alter_sys=True)
