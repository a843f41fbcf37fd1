"""nearl-rt: NEARL-CLIP (frozen CLIP + USEformer + OCA adapters), fast and deployable.

The package face is lazy: `import nearl_rt` imports nothing else, and a name is imported from its module
when it is first used. So `from nearl_rt import NearlSession` (serving: NumPy, Pillow, onnxruntime) never
loads PyTorch, while `nearl_rt.build_model` loads the model. Layers (docs/architecture.md), each importing
only from those before it: nearl_rt.core (no PyTorch) <- nearl_rt.kernels <- the model modules <-
nearl_rt.export <- nearl_rt.serving <- the command-line tools and nearl_rt.bench.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "build_model": "nearl_rt.model", "NearlCLIP": "nearl_rt.model",
    "build_backbone": "nearl_rt.backbone",
    "load_checkpoint": "nearl_rt.checkpoint", "save_checkpoint": "nearl_rt.checkpoint",
    "from_pretrained": "nearl_rt.pretrained",
    "PRESETS": "nearl_rt.config", "NearlConfig": "nearl_rt.config", "preset_config": "nearl_rt.config",
    "tokenize": "nearl_rt.tokenizer",
    "BackboneError": "nearl_rt.core.errors", "CheckpointError": "nearl_rt.core.errors",
    "NearlError": "nearl_rt.core.errors", "RandomBackboneWarning": "nearl_rt.core.errors",
    "NearlSession": "nearl_rt.core.session",
    "explain": "nearl_rt.saliency", "Explanation": "nearl_rt.saliency",
}
__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nearl_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return __all__
