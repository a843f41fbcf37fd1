"""Print the top-level import names a wheel installs; exit 1 if one of them is a standard-library module or the
name of a distribution on PyPI (installing the wheel would shadow it, as a top-level `kernels` did
transformers' Hugging Face `kernels`). Usage: python .ci/wheel_names.py WHEEL"""
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import PurePosixPath


def top_level_names(wheel: str) -> set:
    with zipfile.ZipFile(wheel) as z:
        parts = {PurePosixPath(n).parts[0] for n in z.namelist()}
    return {p.removesuffix(".py") for p in parts if not p.endswith((".dist-info", ".data"))}


def on_pypi(name: str) -> bool:
    """Whether PyPI has a distribution of this name (PEP 503 normalises _ and - alike)."""
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/{name.replace('_', '-')}/json", timeout=30):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


def main(wheel: str) -> int:
    names = sorted(top_level_names(wheel))
    print(f"{wheel}: top-level names {names}")
    clashes = [n for n in names if n in sys.stdlib_module_names or on_pypi(n)]
    for n in clashes:
        print(f"error: the wheel installs a top-level `{n}`, which is "
              f"{'a standard-library module' if n in sys.stdlib_module_names else 'a distribution on PyPI'}: "
              f"move it under nearl_rt/", file=sys.stderr)
    return 1 if clashes else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
