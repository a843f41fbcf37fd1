"""Fitting the feature-level heads (nearl_rt.feature_heads) on the K shots' frozen image features, with the
settings of BiomedCoOp's benchmark code (HealthX-Lab/BiomedCoOp, configs/trainers/{CLIP_Adapter,TiP_Adapter,
LP2}/few_shot.yaml and trainers/{ClipAdapter,TipAdapter,LP2}/*_biomedclip.py; docs/protocols.md). The features
are computed once (no augmentation: the shots are preprocessed as for evaluation), so every fit takes well under a
second on the CPU. Every fit is deterministic for a seed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nearl_rt.feature_heads import ClipAdapterHead, LPPlusPlusHead, TipAdapterHead
from nearl_rt.linear_probe import image_features
from nearl_rt.prompts import pool_prompts

# CLIP-Adapter: configs/trainers/CLIP_Adapter/few_shot.yaml (alpha_ca = the residual ratio)
CLIP_ADAPTER = {"ratio": 0.5, "lr": 0.01, "epochs": 20, "batch_size": 32, "warmup_lr": 1e-5}
# Tip-Adapter(-F): configs/trainers/TiP_Adapter/few_shot.yaml
TIP_ADAPTER = {"alpha": 1.0, "beta": 1.0, "lr": 1e-3, "epochs": 20, "batch_size": 256, "eps": 1e-4,
               "search_scale": (50.0, 50.0), "search_steps": (200, 200)}
# LP++: configs/trainers/LP2/few_shot.yaml (full-batch gradient descent; alpha updated every 10 epochs)
LP_PLUS_PLUS = {"epochs": 300, "alpha_every": 10, "alpha_init_scale": 250.0, "momentum": 0.9}


def class_text_features(model) -> torch.Tensor:
    """The model's normalised class text features [C, E] (prompt ensembles averaged) as zero-shot CLIP scores
    them: the text stream with NEARL's adapters at their zero update is the frozen text tower."""
    with torch.no_grad():
        return pool_prompts(model.encode_text_stream(model.class_tokens).features, model.prompt_pool).float()


def text_head_args(model) -> tuple:
    """(class text features, logit scale, logit bias) of the frozen model."""
    bias = model.backbone.logit_bias
    return class_text_features(model), float(model.backbone.logit_scale.exp()), None if bias is None else float(bias)


def _features(model, images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(image_features(model, images)).float()


def _epochs_of_batches(n: int, batch_size: int, epochs: int, seed: int):
    """(epoch, index batch) for `epochs` shuffled passes over n items."""
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            yield epoch, order[start:start + batch_size]


def fit_clip_adapter(model, train_x, train_y, val_x, val_y, seed: int) -> tuple:
    """SGD (no momentum) at 0.01, one epoch at 1e-5 then cosine over 20 epochs, batch 32, ratio 0.5."""
    s = CLIP_ADAPTER
    torch.manual_seed(seed)
    head = ClipAdapterHead(*text_head_args(model), ratio=s["ratio"])
    f, y = _features(model, train_x), torch.from_numpy(np.asarray(train_y)).long()
    opt = torch.optim.SGD(head.adapter.parameters(), lr=s["lr"])
    losses = []
    for epoch, idx in _epochs_of_batches(len(y), s["batch_size"], s["epochs"], seed):
        lr = s["warmup_lr"] if epoch == 0 else 0.5 * s["lr"] * (1 + math.cos(math.pi * (epoch - 1) / (s["epochs"] - 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(head(f[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return head, {"train_loss_first": losses[0], "train_loss_last": losses[-1], **s}


def search_alpha_beta(head: TipAdapterHead, val_f: torch.Tensor, val_y: torch.Tensor) -> tuple:
    """Tip-Adapter's grid search on the validation shots: beta and alpha each over 200 values in [0.1, 50), the
    first best accuracy kept (its search_hp)."""
    s = TIP_ADAPTER
    betas = [i * (s["search_scale"][0] - 0.1) / s["search_steps"][0] + 0.1 for i in range(s["search_steps"][0])]
    alphas = torch.tensor([i * (s["search_scale"][1] - 0.1) / s["search_steps"][1] + 0.1
                           for i in range(s["search_steps"][1])])
    with torch.no_grad():
        zs = head.zero_shot(val_f)
        best = (-1.0, head.beta, head.alpha)
        for beta in betas:
            cache = head.cache_logits(val_f, beta)
            acc = ((zs[None] + alphas[:, None, None] * cache[None]).argmax(-1) == val_y).float().mean(-1)
            i = int(acc.argmax())
            if acc[i] > best[0]:
                best = (float(acc[i]), beta, float(alphas[i]))
    return best


def _tip_head(model, train_x, train_y, train_keys: bool) -> tuple:
    f = _features(model, train_x)
    y = torch.from_numpy(np.asarray(train_y)).long()
    text, scale, bias = text_head_args(model)
    values = F.one_hot(y, text.shape[0]).float()
    return TipAdapterHead(text, scale, bias, f, values, TIP_ADAPTER["alpha"], TIP_ADAPTER["beta"], train_keys), f, y


def fit_tip_adapter(model, train_x, train_y, val_x, val_y, seed: int) -> tuple:
    """Training-free: the cache, then alpha and beta searched on the validation shots."""
    head, _, _ = _tip_head(model, train_x, train_y, train_keys=False)
    acc, head.beta, head.alpha = search_alpha_beta(head, _features(model, val_x), torch.from_numpy(np.asarray(val_y)))
    return head, {"val_accuracy_search": acc, "alpha": head.alpha, "beta": head.beta}


def fit_tip_adapter_f(model, train_x, train_y, val_x, val_y, seed: int) -> tuple:
    """The cache keys trained by AdamW (lr 1e-3, eps 1e-4, cosine over 20 epochs of batch 256) at alpha = beta =
    1, then alpha and beta searched on the validation shots."""
    s = TIP_ADAPTER
    head, f, y = _tip_head(model, train_x, train_y, train_keys=True)
    opt = torch.optim.AdamW([head.keys], lr=s["lr"], eps=s["eps"])
    total = s["epochs"] * math.ceil(len(y) / s["batch_size"])
    losses = []
    for step, (_, idx) in enumerate(_epochs_of_batches(len(y), s["batch_size"], s["epochs"], seed)):
        for group in opt.param_groups:
            group["lr"] = 0.5 * s["lr"] * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(head(f[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    acc, head.beta, head.alpha = search_alpha_beta(head, _features(model, val_x), torch.from_numpy(np.asarray(val_y)))
    return head, {"train_loss_first": losses[0], "train_loss_last": losses[-1], "val_accuracy_search": acc,
                  "alpha": head.alpha, "beta": head.beta}


def fit_lp_plus_plus(model, train_x, train_y, val_x, val_y, seed: int) -> tuple:
    """LP++'s block-coordinate descent, full batch: prototypes V (from the per-class sums of the shots'
    features) and biases by SGD (momentum 0.9) at lr 4N / lambda_max(F^T F); the blending alpha (from 250 x the
    mean text logit of the shots) every 10 epochs by a step of N / (4 max_c sum_i (f_i . w_c)^2) along its
    gradient summed over those epochs; 300 epochs (the repository's linear_probe_p2)."""
    s = LP_PLUS_PLUS
    f, y = _features(model, train_x).double(), torch.from_numpy(np.asarray(train_y)).long()
    text, scale, bias = text_head_args(model)
    n, classes = len(y), text.shape[0]
    onehot = F.one_hot(y, classes).double()
    text_logits = f @ text.double().t()  # [N, C]
    alpha0 = s["alpha_init_scale"] * float(((onehot.t() @ text_logits) / onehot.sum(0)[:, None]).mean())
    lr_w = 4 * n / float(torch.linalg.eigvalsh(f.t() @ f).max())
    lr_alpha = n / (4 * float((text_logits ** 2).sum(0).max()))
    head = LPPlusPlusHead(text, scale, bias, onehot.t() @ f, torch.zeros(classes), torch.full((classes,), alpha0))
    head.double()
    f, opt = f.double(), torch.optim.SGD([head.prototypes, head.class_bias], lr=lr_w, momentum=s["momentum"])
    losses = []
    for epoch in range(s["epochs"]):
        loss = F.cross_entropy(head(f), y)
        opt.zero_grad()  # alpha's gradient is not zeroed here: it sums over the epochs between its updates
        loss.backward()
        opt.step()
        if (epoch + 1) % s["alpha_every"] == 0:
            with torch.no_grad():
                head.alpha -= lr_alpha * head.alpha.grad
            head.alpha.grad = None
        losses.append(loss.item())
    head.float()
    return head, {"train_loss_first": losses[0], "train_loss_last": losses[-1], "lr_w": lr_w, "lr_alpha": lr_alpha,
                  "alpha_init": alpha0}


FITS = {"clip_adapter": fit_clip_adapter, "tip_adapter": fit_tip_adapter, "tip_adapter_f": fit_tip_adapter_f,
        "lpplusplus": fit_lp_plus_plus}


def fit_feature_head(method: str, model, train_x, train_y, val_x, val_y, seed: int) -> tuple:
    """(head, what the fit found) for a feature-level method."""
    return FITS[method](model, train_x, train_y, val_x, val_y, seed)

