"""Build cpp/ (library, nearl_client, ctest suite) once per test run for the C++ tests, in build/cpp-tests
(reused and rebuilt incrementally); skip with the reason only where a compiler or headers are missing
(`bash .ci/setup-system.sh` installs them; CI runs it)."""
from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "cpp"
BUILD = ROOT / "build" / "cpp-tests"
SETUP = "bash .ci/setup-system.sh"
_HEADERS = {"nlohmann/json.hpp": "nlohmann-json3-dev", "png.h": "libpng-dev", "jpeglib.h": "libjpeg62-turbo-dev"}
_INCLUDE_DIRS = [Path("/usr/include"), Path("/usr/local/include")]


def _run(argv, timeout):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@functools.lru_cache(maxsize=None)
def _build() -> tuple[str, str]:
    """("ok", build dir) | ("skip", reason) | ("fail", output)."""
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    missing += [pkg for header, pkg in _HEADERS.items() if not any((d / header).is_file() for d in _INCLUDE_DIRS)]
    if missing:
        return "skip", f"C++ library not built: {', '.join(missing)} not installed (run `{SETUP}`)"
    code, out, err = _run(["bash", str(CPP / "fetch_ort_headers.sh")], 300)
    if code != 0:
        return "skip", f"C++ library not built: onnxruntime headers unavailable ({err.strip().splitlines()[-1:]})"
    include = out.strip().splitlines()[-1]
    code, out, err = _run(["cmake", "-S", str(CPP), "-B", str(BUILD), f"-DPython3_EXECUTABLE={sys.executable}",
                           f"-DORT_INCLUDE_DIR={include}"], 300)
    if code == 0:
        code, out, err = _run(["cmake", "--build", str(BUILD), "-j", "2"], 900)
    return ("ok", str(BUILD)) if code == 0 else ("fail", (out + err)[-5000:])


def cpp_build() -> Path:
    """The build folder (skips the calling test when the toolchain is missing, fails it when the build does)."""
    status, detail = _build()
    if status == "skip":
        pytest.skip(detail)
    assert status == "ok", detail
    return Path(detail)
