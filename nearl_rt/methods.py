"""The registry of few-shot methods: one place that says what each method trains, how many parameters, whether it
scores classes it was not trained on, and whether `export.onnx` writes it. Training (nearl_rt.train), the classifier
(nearl_rt.classifier: evaluate, predict, calibration), the sweep and the export read it; docs/protocols.md
describes every method with its published settings and source.

kinds:
- adapters: NEARL's USEformer + OCA adapters, trained by train's step loop.
- none: zero-shot CLIP.
- probe: the logistic-regression linear probe (nearl_rt.linear_probe).
- features: a head on the frozen image features, fitted in one go (nearl_rt.feature_heads / feature_fit).
- prompt: learned prompt context on the frozen backbone, trained by train's step loop (nearl_rt.coop,
  nearl_rt.prompt_learners).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nearl_rt.core.errors import NearlError


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    summary: str
    generalises: bool = False        # scores classes it was not trained on: base-to-novel applies
    not_exported: Optional[str] = None  # why export.onnx refuses it (None: it exports)
    needs_descriptions: bool = False  # trains against class descriptions (--class-descriptions FILE)

    @property
    def steps(self) -> bool:
        """Trained by train's optimizer-step loop (--steps / --epochs, resumable per epoch)."""
        return self.kind in ("adapters", "prompt")

    @property
    def prompt_learner(self) -> bool:
        return self.kind == "prompt"


REGISTRY: dict = {m.name: m for m in (
    Method("nearl", "adapters", "USEformer + OCA adapters in both towers", generalises=True),
    Method("zeroshot", "none", "frozen CLIP with the prompts", generalises=True),
    Method("linear_probe", "probe", "logistic regression on frozen image features",
           not_exported="its linear head on frozen CLIP features is not part of the NEARL graph"),
    Method("coop", "prompt", "learned prompt context (CoOp)", generalises=True),
    Method("kgcoop", "prompt", "CoOp + distance to the hand-crafted prompt's text features (KgCoOp)",
           generalises=True),
    Method("cocoop", "prompt", "CoOp context + an image-conditioned meta-net shift (CoCoOp)", generalises=True,
           not_exported="its prompts depend on each image (the text tower runs per image on meta-net-shifted "
                        "embeddings, which the export's graphs do not build)"),
    Method("biomedcoop", "prompt", "CoOp + LLM-description consistency and selective distillation (BiomedCoOp)",
           generalises=True, needs_descriptions=True),
    Method("clip_adapter", "features", "residual MLP on the frozen image features (CLIP-Adapter)"),
    Method("tip_adapter", "features", "training-free key-value cache of the shots' features (Tip-Adapter)"),
    Method("tip_adapter_f", "features", "Tip-Adapter with the cache keys trained (Tip-Adapter-F)"),
    Method("lpplusplus", "features", "linear probe blended with the text classifier (LP++)"),
)}
METHODS = tuple(REGISTRY)


def get_method(name: str) -> Method:
    """The registered method `name`, or one clear line naming the choices."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise NearlError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


def expand_methods(text: str) -> list:
    """--methods: comma-separated names, or `all` (every registered method, registry order)."""
    if text.strip() == "all":
        return list(METHODS)
    return [m.strip() for m in text.split(",")]


def cocoop_hidden(embed_dim: int) -> int:
    """CoCoOp's meta-net bottleneck: vis_dim // 16."""
    return max(1, embed_dim // 16)


def trainable_count(name: str, *, embed_dim: int, text_width: int, classes: int, shots: int, context: int,
                    adapters: int = 0) -> int:
    """The paper's trainable-parameter formula for `name` on a backbone (E = embed_dim, D = text_width, C classes,
    K shots, n context vectors; `adapters`: NEARL's adapter count, from the model)."""
    E, D, C, n = embed_dim, text_width, classes, context
    h = cocoop_hidden(E)
    return {"nearl": adapters, "zeroshot": 0, "linear_probe": C * (E + 1),
            "coop": n * D, "kgcoop": n * D, "biomedcoop": n * D,
            "cocoop": n * D + (E * h + h) + (h * D + D),
            "clip_adapter": 2 * E * (E // 4), "tip_adapter": 0, "tip_adapter_f": shots * C * E,
            "lpplusplus": C * E + 2 * C}[get_method(name).name]
