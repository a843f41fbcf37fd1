"""Checkout shortcut: `python -m export.serve ...` runs `python -m nearl_rt.serving.server ...` (installed: `nearl-rt serve`).

`export/` is a folder of such shortcuts, not a package: no __init__.py, so it never shadows an installed
distribution named `export` (docs/architecture.md)."""
if __name__ == "__main__":
    import runpy
    runpy.run_module("nearl_rt.serving.server", run_name="__main__", alter_sys=True)
