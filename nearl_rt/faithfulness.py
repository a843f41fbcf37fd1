"""The deletion test: is a saliency map about the model, or decoration? (docs/explain.md)

Per image and its explained class (the predicted one), the k = round(p * patches) patches the map rates most
salient (patch score: the map's mean over the patch; ties broken at random) are deleted, i.e. set to the
mean colour (0 after normalisation, what occlusion uses too), and so, separately, are k patches drawn at random
(the mean over `random_draws` draws). A faithful map makes the class's calibrated probability drop more for its
salient patches than for random ones. Reported per fraction p: the mean drop for each and the share of images
whose salient drop is the larger.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from nearl_rt.saliency import (DEFAULT_METHOD, Probabilities, as_classifier, calibrated_softmax, model_untouched,
                                saliency_maps)

FRACTIONS = (0.1, 0.2, 0.5)


@dataclass
class DeletionResult:
    """Per fraction p (keys of the dicts): per-image probability drops [N] for salient and random patches."""
    method: str
    fractions: tuple
    patches: int                    # patches per image
    salient: dict                   # p -> float64 [N]
    random: dict                    # p -> float64 [N], mean over the random draws

    def summary(self) -> dict:
        """p -> {patches deleted, mean drop salient, mean drop random, share of images salient > random}."""
        return {p: {"deleted": deleted(p, self.patches), "salient": float(self.salient[p].mean()),
                    "random": float(self.random[p].mean()),
                    "salient_larger": float((self.salient[p] > self.random[p]).mean())} for p in self.fractions}


def deleted(fraction: float, patches: int) -> int:
    """Patches deleted at `fraction`: round(fraction * patches), at least 1."""
    return max(1, int(round(fraction * patches)))


def patch_scores(maps: np.ndarray, patch: tuple) -> np.ndarray:
    """[B, H, W] maps -> [B, (H/ph) * (W/pw)] mean per patch, row-major like the ViT's tokens."""
    (ph, pw), (b, h, w) = patch, maps.shape
    return maps.reshape(b, h // ph, ph, w // pw, pw).mean(axis=(2, 4)).reshape(b, -1)


def delete_patches(images: torch.Tensor, chosen: Sequence[np.ndarray], patch: tuple) -> torch.Tensor:
    """A copy of images [B, 3, H, W] with image b's patches chosen[b] (row-major indices) set to 0."""
    (ph, pw), out = patch, images.clone()
    columns = images.shape[-1] // pw
    for b, idx in enumerate(chosen):
        for i in np.asarray(idx).tolist():
            r, c = divmod(i, columns)
            out[b, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 0
    return out


def deletion_test(classifier, images: torch.Tensor, method: str = DEFAULT_METHOD, *, fractions=FRACTIONS,
                  random_draws: int = 5, seed: int = 0, batch_size: int = 8,
                  probabilities: Probabilities = None) -> DeletionResult:
    """The deletion test on preprocessed images [N, 3, size, size] (see the module's docstring)."""
    classifier = as_classifier(classifier)
    probabilities = probabilities or calibrated_softmax(classifier)
    patch = tuple(classifier.model.vision_tower.patch_size)
    rng = np.random.default_rng(seed)
    salient = {p: [] for p in fractions}
    random = {p: [] for p in fractions}
    patches = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(classifier.device)
        with model_untouched(classifier.model), torch.no_grad():
            probs = probabilities(classifier.logits(x))
        targets = probs.argmax(1)
        scores = patch_scores(saliency_maps(classifier, x, targets.tolist(), method, probabilities), patch)
        patches = scores.shape[1]
        order = [np.lexsort((rng.random(patches), -s)) for s in scores]  # most salient first, ties at random
        for p in fractions:
            k = deleted(p, patches)
            drawn = [[rng.permutation(patches)[:k] for _ in range(random_draws)] for _ in range(len(x))]
            variants = [delete_patches(x, [o[:k] for o in order], patch)]
            variants += [delete_patches(x, [d[r] for d in drawn], patch) for r in range(random_draws)]
            with model_untouched(classifier.model), torch.no_grad():
                after = torch.stack([probabilities(classifier.logits(v)) for v in variants])  # [1 + R, B, C]
            kept = after.gather(2, targets.view(1, -1, 1).expand(len(variants), -1, 1))[..., 0]
            drop = (probs.gather(1, targets[:, None])[:, 0] - kept).double().cpu().numpy()
            salient[p].append(drop[0])
            random[p].append(drop[1:].mean(axis=0))
    return DeletionResult(method, tuple(fractions), patches, {p: np.concatenate(v) for p, v in salient.items()},
                          {p: np.concatenate(v) for p, v in random.items()})
