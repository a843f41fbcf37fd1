"""The package layout of docs/architecture.md holds: every import points down the layers, the bottom layer
(nearl_rt.core) needs no PyTorch, nobody imports another module's private names, one module owns the nearl.*
ONNX metadata, and the wheel installs one top-level name."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nearl_rt"
# Lowest first; a module may import from its own layer and the ones below it.
LAYERS = {
    "core": ["nearl_rt.core"],
    "kernels": ["nearl_rt.kernels"],
    "model": ["nearl_rt.config", "nearl_rt.adapters", "nearl_rt.backbone", "nearl_rt.timm_models", "nearl_rt.towers",
              "nearl_rt.tokenizer", "nearl_rt.prompts", "nearl_rt.model", "nearl_rt.cuda_graph", "nearl_rt.checkpoint",
              "nearl_rt.data", "nearl_rt.sampling", "nearl_rt.dassl_splits", "nearl_rt.classsets", "nearl_rt.calibration",
              "nearl_rt.metrics", "nearl_rt.coop", "nearl_rt.multilabel", "nearl_rt.methods", "nearl_rt.feature_heads",
              "nearl_rt.classifier", "nearl_rt.linear_probe", "nearl_rt.feature_fit", "nearl_rt.prompt_learners",
              "nearl_rt.pretrained",
              "nearl_rt.saliency", "nearl_rt.faithfulness"],
    "export": ["nearl_rt.export"],
    "serving": ["nearl_rt.serving"],
    "tools": ["nearl_rt.train", "nearl_rt.evaluate", "nearl_rt.calibrate", "nearl_rt.plots", "nearl_rt.predict",
              "nearl_rt.sweep", "nearl_rt.demo", "nearl_rt.config_file", "nearl_rt.tracking",
              "nearl_rt.__main__", "nearl_rt.bench"],
}
RANK = {prefix: i for i, prefixes in enumerate(LAYERS.values()) for prefix in prefixes}
# Third-party packages nearl_rt.core may import: what a serving image without PyTorch has.
CORE_THIRD_PARTY = {"numpy", "PIL", "onnxruntime", "onnx", "pydicom", "gdcm", "openvino"}


def modules() -> dict:
    """Dotted name -> source path of every module of the package."""
    out = {}
    for py in sorted(PACKAGE.rglob("*.py")):
        parts = list(py.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = py
    return out


def imports(path: Path):
    """(line, imported module, imported names) of every import in the file, function-level ones included."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, tuple(a.name for a in node.names)


def layer(module: str):
    """The layer rank of a nearl_rt module (None for the package face `nearl_rt`)."""
    best = None
    for prefix, rank in RANK.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != "nearl_rt" and layer(m) is None]
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py and docs/architecture.md: {unplaced}"


def upward_imports(mods: dict) -> list:
    problems = []
    for name, path in mods.items():
        own = layer(name)
        for line, module, names in imports(path):
            targets = [module] if module != "nearl_rt" else [f"nearl_rt.{n}" for n in names]
            for target in targets:  # `import nearl_rt` and nearl_rt.__version__: the lazy face, no layer
                rank = layer(target)
                if rank is not None and rank > own:
                    problems.append(f"{path}:{line} ({name}) imports {target} from a higher layer")
    return problems


def test_imports_point_down_the_layers():
    assert not upward_imports(modules()), "\n".join(upward_imports(modules()))


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "nearl_rt" / "core" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from nearl_rt.model import NearlCLIP\n")
    assert upward_imports({"nearl_rt.core.bad": bad})[0].endswith("imports nearl_rt.model from a higher layer")


def test_core_imports_no_torch_and_nothing_above_it():
    stdlib = set(sys.stdlib_module_names)
    for name, path in modules().items():
        if layer(name) != 0:
            continue
        for line, module, _ in imports(path):
            top = module.split(".")[0]
            ok = top in stdlib or top in CORE_THIRD_PARTY or module.startswith("nearl_rt.core") or top == "__future__"
            assert ok, f"{path.relative_to(ROOT)}:{line} imports {module}: nearl_rt.core must stay free of PyTorch"


def test_no_module_imports_another_modules_private_names():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]
    problems = [f"{p.relative_to(ROOT)}:{line} imports {n} from {module}" for p in files
                for line, module, names in imports(p) for n in names
                if n.startswith("_") and not n.startswith("__")]
    assert not problems, "\n".join(problems)


def test_one_module_owns_the_onnx_metadata_prefix():
    """The nearl.* key prefix is spelled in nearl_rt/core/metadata.py alone (readers and writers go through it)."""
    owners = [p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
              if '"nearl."' in p.read_text(encoding="utf-8") or "'nearl.'" in p.read_text(encoding="utf-8")]
    assert owners == ["nearl_rt/core/metadata.py"]


def test_serving_without_torch(tmp_path):
    """Import the package face and nearl_rt.core, serve an exported model: PyTorch is never imported."""
    from tests.export_cases import exported
    model = exported("text_cacheable")
    image = tmp_path / "x.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(image)
    code = ("import sys, nearl_rt\n"
            "from nearl_rt import NearlSession\n"
            "from nearl_rt.core import atomic, cli, errors, hashing, imaging, metadata, preprocess\n"
            f"top = NearlSession({str(model)!r}).predict([{str(image)!r}], top_k=1)\n"
            "assert len(top) == 1 and 0 <= top[0][0][1] <= 1, top\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["NearlSession", "build_model", "load_checkpoint", "NearlError"])
def test_the_package_face_resolves_lazily(name):
    import nearl_rt
    assert name in dir(nearl_rt) and getattr(nearl_rt, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nearl_rt.nope  # noqa: B018
