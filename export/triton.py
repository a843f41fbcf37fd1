"""Checkout shortcut: `python -m export.triton ...` runs `python -m nearl_rt.serving.triton_repository ...` (installed: `nearl-rt triton`).

`export/` is a folder of such shortcuts, not a package: no __init__.py, so it never shadows an installed
distribution named `export` (docs/architecture.md)."""
if __name__ == "__main__":
    import runpy
    runpy.run_module("nearl_rt.serving.triton_repository", run_name="__main__", alter_sys=True)
