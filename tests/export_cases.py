"""Exported tiny models shared by the export, runtime and C++ client tests (each exported once per run)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from export.onnx import export_model
from tests.helpers import CLASSES, perturb_adapters, tiny

TEMPLATE = "a chest x-ray showing {}."
_DIR = Path(tempfile.mkdtemp(prefix="nearl-export-tests-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def tiny_model(interaction: str, preset: str = "tiny"):
    """A tiny model with non-trivial adapters (an untrained one is the frozen backbone) and classes."""
    model = perturb_adapters(tiny(interaction, preset, backend="torch"), seed=3).eval()
    model.set_classes(CLASSES, TEMPLATE)
    return model


@functools.lru_cache(maxsize=None)
def exported(interaction: str, fp16: bool = False, batch_size="dynamic", optimize: bool = False,
             opset=None, preset: str = "tiny") -> Path:
    name = f"{preset}-{interaction}-{'fp16' if fp16 else 'fp32'}-b{batch_size}-o{int(optimize)}-op{opset}.onnx"
    return export_model(tiny_model(interaction, preset), _DIR / name, fp16=fp16, batch_size=batch_size,
                        optimize=optimize, opset=opset, checkpoint_sha256="ab" * 32)
