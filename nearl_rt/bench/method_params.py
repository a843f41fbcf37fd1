"""Trainable parameters of every registered few-shot method (nearl_rt.methods) on a backbone: each method's
trainable module is built on the preset (random backbone weights: only shapes matter) and its parameters are
counted, next to the registry's formula.

    python -m nearl_rt.bench.method_params                                # vit_b16 and biomedclip, C = 2, K = 16
    python -m nearl_rt.bench.method_params --presets tiny --classes 3 --shots 4

BiomedCoOp's description targets and KgCoOp's hand-crafted prompt features are buffers, not parameters; Tip-Adapter's
cache is fitted, not trained (0); Tip-Adapter-F trains its K x C cache keys.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path


def method_parameters(preset: str, classes: int, shots: int, context: int = 4) -> dict:
    """{method: {"counted": built module's trainable parameters, "formula": the registry's}} on `preset`."""
    import torch
    import torch.nn.functional as F

    import nearl_rt
    from nearl_rt.core.errors import RandomBackboneWarning
    from nearl_rt.feature_fit import text_head_args
    from nearl_rt.feature_heads import ClipAdapterHead, LPPlusPlusHead, TipAdapterHead
    from nearl_rt.adapters import count_parameters
    from nearl_rt.methods import METHODS, REGISTRY, trainable_count
    from nearl_rt.prompt_learners import build_context

    names = [f"class {i}" for i in range(classes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        model = nearl_rt.build_model(preset, interaction="text_cacheable").eval()
    model.set_classes(names, "a photo of a {}.")
    E, D = model.embed_dim, model.text_tower.width
    text, scale, bias = text_head_args(model)
    keys = F.normalize(torch.randn(shots * classes, E), dim=-1)
    values = F.one_hot(torch.arange(shots * classes) % classes, classes).float()
    heads = {"clip_adapter": ClipAdapterHead(text, scale, bias, ratio=0.5),
             "tip_adapter": TipAdapterHead(text, scale, bias, keys, values, 1.0, 1.0),
             "tip_adapter_f": TipAdapterHead(text, scale, bias, keys, values, 1.0, 1.0, train_keys=True),
             "lpplusplus": LPPlusPlusHead(text, scale, bias, torch.zeros(classes, E), torch.zeros(classes),
                                          torch.ones(classes))}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        descriptions = Path(tmp) / "descriptions.json"
        descriptions.write_text(json.dumps({c: [f"an image of {c}"] for c in names}))
        for method in METHODS:
            kind = REGISTRY[method].kind
            if kind == "adapters":
                counted = model.num_trainable_parameters()
            elif kind == "none":
                counted = 0
            elif kind == "probe":
                counted = classes * (E + 1)  # scikit-learn's coefficients and intercepts, as a softmax head
            elif kind == "features":
                counted = count_parameters(heads[method])
            else:
                context_module = build_context(method, model, names, context, 0, str(descriptions))
                counted = count_parameters(context_module)
            out[method] = {"counted": counted, "formula": trainable_count(
                method, embed_dim=E, text_width=D, classes=classes, shots=shots, context=context,
                adapters=model.num_trainable_parameters())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.bench.method_params", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="vit_b16,biomedclip", help="comma-separated presets")
    p.add_argument("--classes", type=int, default=2, help="C, the number of classes")
    p.add_argument("--shots", type=int, default=16, help="K, shots per class (Tip-Adapter-F's cache size)")
    args = p.parse_args(argv)
    presets = args.presets.split(",")
    table = {preset: method_parameters(preset, args.classes, args.shots) for preset in presets}
    print("| method | " + " | ".join(presets) + " |\n|---|" + "---|" * len(presets))
    for method in next(iter(table.values())):
        cells = []
        for preset in presets:
            c = table[preset][method]
            cells.append(f"{c['counted']:,}" + ("" if c["counted"] == c["formula"] else f" (formula {c['formula']:,})"))
        print(f"| {method} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
