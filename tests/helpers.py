"""Shared test utilities."""
import numpy as np
import torch
import torch.nn.functional as F

import nearl_rt
from nearl_rt.adapters import perturb_adapters  # noqa: F401 - shared by the tests through this module
from nearl_rt.core.cli import run_cli

CLASSES = ["normal lungs", "pneumonia with consolidation in the left lower lobe", "a nodule"]
# the two tiny backbones: open_clip ViT + CLIP text, timm ViT + Hugging Face BERT text (BiomedCLIP's kind)
TINY_PRESETS = ["tiny", "tiny_bert"]




def oca_update_stats(model, images, tokens) -> list:
    """One forward; per OCA call (every layer, both towers): (width, max |cos(F' - F, F)| over tokens,
    mean |F' - F| / |F|), computed in float64."""
    seen = []

    def hook(module, args, out):
        x = args[0].double()
        upd = out.double() - x
        cos = (upd * x).sum(-1) / (upd.norm(dim=-1) * x.norm(dim=-1))
        seen.append((x.shape[-1], cos.abs().max().item(), (upd.norm(dim=-1) / x.norm(dim=-1)).mean().item()))

    handles = [m.register_forward_hook(hook) for m in list(model.oca_v) + list(model.oca_t)]
    try:
        with torch.no_grad():
            model(images, tokens)
    finally:
        for h in handles:
            h.remove()
    return seen


def assert_orthogonal(seen) -> None:
    for width, cos, rel in seen:
        assert rel > 1e-3, "the update must be non-trivial for the check to mean anything"
        assert cos < 1e-4, f"width {width}: |cos(update, token)| = {cos}"


def frozen_clip_logits(backbone, images, tokens):
    img = F.normalize(backbone.encode_image(images), dim=-1)
    txt = F.normalize(backbone.encode_text(tokens), dim=-1)
    return backbone.logit_scale.exp() * img @ txt.t()


def tiny(interaction="bidirectional", preset="tiny", **kw):
    return nearl_rt.build_model(preset, interaction=interaction, **kw)


def tiny_inputs(batch=3, classes=CLASSES, seed=1, preset="tiny"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), nearl_rt.tokenize(classes, nearl_rt.PRESETS[preset].backbone)


def cli(module, argv, capsys):
    """Run a tool's main as its command line does: (exit code, stdout, stderr)."""
    rc = run_cli(module.main, [str(a) for a in argv], prog=module.__name__)
    out, err = capsys.readouterr()
    return rc, out, err


def labels_npz(path, labels):
    """A MedMNIST-style .npz with a train split of blank 8x8 images and these labels (for bad-input tests)."""
    n = len(labels)
    np.savez(path, train_images=np.zeros((n, 8, 8), np.uint8), train_labels=np.asarray(labels))
    return path


FINDINGS = ["effusion", "cardiomegaly", "nodule"]


def planted_multilabel(n: int, seed: int, unknown: float = 0.0, size: int = 32) -> tuple:
    """Synthetic multi-label images: finding f (of FINDINGS) present = a bright square in quadrant f of a dark,
    noisy image, each present with probability 0.4; a fraction `unknown` of the labels set to -1 (unknown).
    Returns (uint8 images [n, size, size, 3], int64 labels [n, 3])."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, len(FINDINGS))) < 0.4).astype(np.int64)
    images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    half, pad = size // 2, size // 8
    for i, row in enumerate(labels):
        for f, present in enumerate(row):
            if present:
                y, x = divmod(f, 2)
                images[i, y * half + pad:(y + 1) * half - pad, x * half + pad:(x + 1) * half - pad] = 230
    labels[rng.random(labels.shape) < unknown] = -1
    return images, labels


def write_planted_npz(path, n=(48, 40, 48), unknown: float = 0.0) -> str:
    """A MedMNIST-style multi-label .npz of planted_multilabel images (train / val / test); names: FINDINGS."""
    arrays = {}
    for seed, (split, count) in enumerate(zip(("train", "val", "test"), n)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = planted_multilabel(count, seed, unknown if split == "train" else 0.0)
    np.savez(path, **arrays)
    return str(path)
