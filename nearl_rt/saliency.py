"""Saliency maps: which region of an image drove the adapted model's score for a class (docs/explain.md).

Three methods, all on the whole adapted model (frozen towers, USEformer, every OCA; either interaction mode;
every preset, open_clip and timm ViTs):

- `integrated_gradients` (the default): integrated gradients (Sundararajan et al. 2017) through captum, from
  the mean-colour image (0 after normalisation) to the image in INTEGRATION_STEPS steps, of the class's
  calibrated probability; the gradient flows through every block, every USEformer step and every OCA. Summed
  over colour channels, the class's evidence kept (ReLU) and averaged per patch (the ViT's unit).
- `gradcam`: Grad-CAM (Selvaraju et al. 2017) through pytorch-grad-cam on the patch tokens the last vision
  block reads (its first LayerNorm's output, pytorch-grad-cam's recipe for ViTs: the tokens after every
  earlier layer's OCA), reshaped to the patch grid with the CLS / register tokens dropped
  (`reshape_transform`). Channel weights are mean gradients, which assumes non-negative features as in CNNs;
  on ViT tokens they are signed, and on the synthetic test (docs/explain.md) its peak misses the object:
  offered because users ask for it, not the default.
- `occlusion`: occlusion sensitivity (Zeiler & Fergus 2014) through captum: each patch in turn set to the mean
  colour (0 after normalisation); the map is the drop of the class's calibrated probability. Model-agnostic,
  one forward pass per patch.

All keep the evidence for the class only (ReLU) and scale each map to [0, 1] (all 0 when nothing supports
the class). Maps come out in the model's input geometry (size x size, after nearl_rt.core.preprocess's resize
and centre crop); `to_image_geometry` maps one back onto the decoded image (the crop undone; 0 where the crop
cut the image away).

Explaining leaves the model as it was: for the duration it is in eval() with no parameter requiring a gradient
(the gradient reaches the tokens through the input), and afterwards every module's mode, every requires_grad
flag and every .grad are restored; the libraries' hooks are removed.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from nearl_rt.core.atomic import atomic_output
from nearl_rt.classifier import Classifier, OnnxClassifier, load_classifier
from nearl_rt.core.errors import NearlError
from nearl_rt.core.imaging import DEFAULT_POLICY, ImageLike, IntensityPolicy, resolve_policy
from nearl_rt.core.preprocess import resize_crop_geometry
from nearl_rt.data import Preprocess, Split, load_images
from nearl_rt.model import NearlCLIP

METHODS = ("integrated_gradients", "gradcam", "occlusion")
DEFAULT_METHOD = METHODS[0]
INTEGRATION_STEPS = 16  # integrated gradients: interpolation steps (Riemann sum) between baseline and image
PASS_BATCH = 32  # images per forward pass of the occlusion scan or the integration (copies x images)
NEEDS_CHECKPOINT = ("saliency maps need the model's checkpoint (.pt or run directory): an exported .onnx file "
                    "runs without gradients or hooks; pass the checkpoint it was exported from")

Probabilities = Callable[[torch.Tensor], torch.Tensor]  # logits [B, C] -> per-class probabilities [B, C]


@dataclass
class Explanation:
    """One image's saliency map for one class."""
    saliency: np.ndarray        # float32 [H, W] in [0, 1]: the decoded image's geometry
    image: Image.Image          # the RGB image as the model saw it (after the intensity policy), before resize/crop
    class_name: str
    probability: float          # the class's calibrated probability
    method: str
    model_saliency: np.ndarray  # float32 [size, size] in [0, 1]: the model's input geometry


def explain(model, image: ImageLike, *, class_name: Optional[str] = None, method: str = DEFAULT_METHOD,
            intensity: Union[IntensityPolicy, str, None] = None) -> Explanation:
    """The saliency map of `image` (a path, Frame, PIL image or array) for `class_name` (default: the predicted
    class). `model`: a NearlCLIP with its classes set, a nearl_rt.classifier.Classifier, or a checkpoint path
    (its calibration and intensity policy apply). `intensity`: how >8-bit images map to 0..255 (default: the
    checkpoint's, else minmax)."""
    policy = IntensityPolicy.parse(intensity) if isinstance(intensity, str) else intensity
    if isinstance(model, (str, os.PathLike)):
        if Path(model).suffix == ".onnx":
            raise NearlError(f"{model}: {NEEDS_CHECKPOINT}")
        classifier, extra = load_classifier(model)
        policy = resolve_policy(extra.get("intensity"), policy, str(model))
    else:
        classifier = as_classifier(model)
    preprocess = Preprocess(classifier.preprocess_cfg, intensity=policy or DEFAULT_POLICY)
    return next(explain_sources(classifier, [image], preprocess, class_name=class_name, method=method))


def as_classifier(model) -> Classifier:
    """A Classifier for a NearlCLIP (its classes set) or a Classifier; one clear line for anything else."""
    if isinstance(model, OnnxClassifier):
        raise NearlError(NEEDS_CHECKPOINT)
    if isinstance(model, NearlCLIP):
        model = Classifier(model, "coop" if model.prompt_context is not None else "nearl")
    if not isinstance(model, Classifier):
        raise TypeError(f"cannot explain a {type(model).__name__}: pass a NearlCLIP, a nearl_rt.classifier.Classifier "
                        f"or a checkpoint path")
    if not model.class_names:
        raise NearlError("the model has no classes set: call model.set_classes([...]) before explaining")
    return model


def class_index(classifier, class_name: Optional[str]) -> Optional[int]:
    """The index of `class_name` among the classifier's classes (None for None); a NearlError naming them if absent."""
    if class_name is None:
        return None
    names = list(classifier.class_names)
    if class_name not in names:
        raise NearlError(f"class {class_name!r} is not one of the model's classes {names}; name one of them "
                         f"(or none for the predicted class)")
    return names.index(class_name)


def calibrated_softmax(classifier) -> Probabilities:
    """The classifier's calibrated probabilities: softmax(logits / T), or per finding sigmoid(logits / T) for a
    multi-label model (nearl_rt.multilabel)."""
    temperature = classifier.calibration.temperature
    if getattr(classifier, "multi_label", False):
        return lambda logits: torch.sigmoid(logits.float() / temperature)
    return lambda logits: torch.softmax(logits.float() / temperature, dim=-1)


def explain_sources(classifier: Classifier, sources: Sequence, preprocess: Preprocess, *,
                    class_name: Optional[str] = None, method: str = DEFAULT_METHOD,
                    batch_size: int = 8) -> Iterator[Explanation]:
    """One Explanation per image source (decoded with preprocess.intensity), `batch_size` images per pass."""
    classifier = as_classifier(classifier)
    check_method(method)
    target = class_index(classifier, class_name)
    probabilities = calibrated_softmax(classifier)
    for start in range(0, len(sources), batch_size):
        chunk = list(sources[start:start + batch_size])
        images, _, _ = load_images(Split(chunk, np.zeros(len(chunk), np.int64)), intensity=preprocess.intensity)
        x = preprocess.eval(images).to(classifier.device)
        with model_untouched(classifier.model), torch.no_grad():
            probs = probabilities(classifier.logits(x)).cpu().numpy()
        targets = probs.argmax(1) if target is None else np.full(len(images), target)
        maps = saliency_maps(classifier, x, targets, method, probabilities)
        for im, p, t, m in zip(images, probs, targets, maps):
            yield Explanation(to_image_geometry(m, im.size), im, classifier.class_names[t], float(p[t]), method, m)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise NearlError(f"saliency method {method!r} is unknown; use one of {METHODS}")


def saliency_maps(classifier: Classifier, images: torch.Tensor, targets: Sequence[int], method: str = DEFAULT_METHOD,
                  probabilities: Optional[Probabilities] = None) -> np.ndarray:
    """float32 [B, size, size] in [0, 1]: per preprocessed image [B, 3, size, size] the map for class targets[b].
    `probabilities` (integrated gradients and occlusion) turns logits into the scores explained (default: the
    classifier's calibrated softmax; a multi-label model passes its per-finding sigmoid)."""
    check_method(method)
    ph, pw = classifier.model.vision_tower.patch_size
    if images.dim() != 4 or images.shape[-2] % ph or images.shape[-1] % pw:
        raise ValueError(f"images must be preprocessed [B, 3, H, W] with H, W multiples of the patch size "
                         f"{ph}x{pw}, got {tuple(images.shape)}")
    if len(targets) != len(images):
        raise ValueError(f"{len(targets)} target classes for {len(images)} images")
    x = images.detach().to(classifier.device)
    with model_untouched(classifier.model):
        if method == "gradcam":
            maps = _gradcam(classifier, x, targets)
        elif method == "occlusion":
            maps = _occlusion(classifier, x, targets, probabilities or calibrated_softmax(classifier))
        else:
            maps = _integrated_gradients(classifier, x, targets, probabilities or calibrated_softmax(classifier))
    return np.clip(np.nan_to_num(maps, nan=0.0), 0.0, 1.0).astype(np.float32)


def to_image_geometry(saliency: np.ndarray, image_size: tuple) -> np.ndarray:
    """A map in the model's input geometry [size, size] -> float32 [H, W] on the decoded image (W, H =
    image_size): placed where preprocessing cropped it from the resized image, the resize undone (bilinear);
    0 outside the crop."""
    size = saliency.shape[0]
    (rw, rh), (left, top) = resize_crop_geometry(*image_size, size)
    canvas = np.zeros((rh, rw), np.float32)
    canvas[top:top + size, left:left + size] = saliency
    if (rw, rh) != tuple(image_size):
        canvas = np.asarray(Image.fromarray(canvas).resize(tuple(image_size), Image.BILINEAR))
    return np.clip(canvas, 0.0, 1.0).astype(np.float32)


@contextmanager
def model_untouched(model: nn.Module):
    """The model in eval() with no parameter requiring a gradient for the duration; afterwards every module's
    mode, every requires_grad flag and every .grad as they were."""
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for p, _, _ in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag, grad in params:
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


def _library(name: str):
    try:
        if name == "gradcam":
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
            return GradCAM, ClassifierOutputTarget
        import captum.attr
        return captum.attr.Occlusion if name == "occlusion" else captum.attr.IntegratedGradients
    except ImportError as e:
        raise NearlError(f"saliency maps need pytorch-grad-cam and captum ({e}): "
                         f"pip install 'nearl-rt[explain]'") from None


class _Logits(nn.Module):
    """The classifier as the module pytorch-grad-cam drives: images -> logits [B, C]. The model is a submodule
    (the library reads the device from its parameters; model_untouched restores what the library changes)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.model = classifier.model
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(images)


def _gradcam(classifier: Classifier, x: torch.Tensor, targets) -> np.ndarray:
    GradCAM, ClassifierOutputTarget = _library("gradcam")
    vision = classifier.model.vision_tower
    (ph, pw), prefix = vision.patch_size, vision.prefix_tokens
    grid = (x.shape[-2] // ph, x.shape[-1] // pw)

    def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:  # [B, prefix + h*w, D] -> [B, D, h, w]
        patches = tokens[:, prefix:]
        return patches.reshape(tokens.shape[0], *grid, tokens.shape[-1]).permute(0, 3, 1, 2)

    cam = GradCAM(_Logits(classifier), [vision.input_norm(len(vision.blocks) - 1)], reshape_transform=tokens_to_grid)
    try:
        with torch.enable_grad():
            return cam(x.clone().requires_grad_(True), [ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()


def _occlusion(classifier: Classifier, x: torch.Tensor, targets, probabilities: Probabilities) -> np.ndarray:
    Occlusion = _library("occlusion")
    ph, pw = classifier.model.vision_tower.patch_size
    windows = (x.shape[-2] // ph) * (x.shape[-1] // pw)
    window = (x.shape[1], ph, pw)
    with torch.no_grad():
        attr = Occlusion(lambda images: probabilities(classifier.logits(images))).attribute(
            x, target=torch.as_tensor(np.asarray(targets), device=x.device), sliding_window_shapes=window,
            strides=window, baselines=0.0, perturbations_per_eval=max(1, min(windows, PASS_BATCH // len(x))))
    return _patch_map(attr[:, :1, ::ph, ::pw], x.shape[-2:])  # one value per patch (and channel: all equal)


def _integrated_gradients(classifier: Classifier, x: torch.Tensor, targets, probabilities: Probabilities) -> np.ndarray:
    IntegratedGradients = _library("integrated_gradients")
    ph, pw = classifier.model.vision_tower.patch_size
    with torch.enable_grad():
        attr = IntegratedGradients(lambda images: probabilities(classifier.logits(images))).attribute(
            x.clone().requires_grad_(True), baselines=0.0, n_steps=INTEGRATION_STEPS,
            target=torch.as_tensor(np.asarray(targets), device=x.device), internal_batch_size=PASS_BATCH)
    per_patch = torch.nn.functional.avg_pool2d(attr.detach().sum(1, keepdim=True).relu(), (ph, pw))
    return _patch_map(per_patch, x.shape[-2:])


def _patch_map(grid: torch.Tensor, size) -> np.ndarray:
    """[B, 1, h, w] per-patch evidence -> [B, H, W] scaled to [0, 1] per image (all-0 stays 0), smooth like
    Grad-CAM's maps (bilinear from the patch grid, half-pixel centres: the peak at a patch's centre)."""
    grid = grid.float().relu()
    grid = grid / grid.amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(grid.dtype).tiny)
    return torch.nn.functional.interpolate(grid, size=tuple(size), mode="bilinear",
                                           align_corners=False)[:, 0].cpu().numpy()


OVERLAY_ALPHA = 0.45  # heat map opacity over the image


def render_overlay(explanation: Explanation, path) -> None:
    """A PNG at `path`: the heat map over the image as the model saw it (its own geometry), a colour bar, and
    the class, its probability and the method in the title. Written whole or not at all."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.figure import Figure
    except ImportError as e:
        raise NearlError(f"overlays need matplotlib ({e}): pip install 'nearl-rt[explain]'") from None
    w, h = explanation.image.size
    fig = Figure(figsize=(6.0, 6.0 * h / w + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.asarray(explanation.image))
    heat = ax.imshow(explanation.saliency, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    ax.set_title(f"{explanation.class_name}: p = {explanation.probability:.3f} ({explanation.method})", fontsize=10)
    fig.colorbar(ScalarMappable(heat.norm, heat.cmap), ax=ax, fraction=0.046, pad=0.04, label="saliency")  # opaque
    with atomic_output(Path(path)) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def write_explanations(classifier, names: Sequence[str], sources: Sequence, preprocess: Preprocess, outdir, *,
                       class_name: Optional[str] = None, method: str = DEFAULT_METHOD) -> list:
    """For each image source: OUTDIR/NNNN_NAME.png (render_overlay; NAME: the file name without its extension)
    and .npy (the map, float32 [H, W] in the decoded image's geometry). Returns the written PNG paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    explanations = explain_sources(classifier, list(sources), preprocess, class_name=class_name, method=method)
    for i, (name, e) in enumerate(zip(names, explanations)):
        base, ext = os.path.splitext(Path(str(name)).name)
        base = base if ext[1:].isalnum() or not ext else base + ext  # drop .png / .dcm, keep FILE:frame=N whole
        stem = outdir / f"{i:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', base)}"
        with atomic_output(stem.with_name(stem.name + ".npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, e.saliency)
        render_overlay(e, stem.with_name(stem.name + ".png"))
        written.append(stem.with_name(stem.name + ".png"))
    return written
