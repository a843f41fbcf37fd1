"""A 20-step training on a few real chest X-rays lowers the loss (tiny preset, random backbone)."""
import numpy as np
import pytest
import torch

import nearl_rt
from nearl_rt.core.preprocess import preprocess_batch


@pytest.mark.parametrize("mode", ["bidirectional", "text_cacheable"])
def test_twenty_steps_on_real_images_lower_the_loss(pneumonia_npz, mode):
    data = np.load(pneumonia_npz)
    labels = data["train_labels"][:, 0].astype(np.int64)
    idx = np.concatenate([np.flatnonzero(labels == c)[:8] for c in (0, 1)])
    model = nearl_rt.build_model("tiny", interaction=mode)
    cfg = model.preprocess_cfg
    images = torch.from_numpy(preprocess_batch(data["train_images"][idx], cfg["size"][0], cfg["mean"], cfg["std"]))
    target = torch.from_numpy(labels[idx])
    model.set_classes(["normal", "pneumonia"], template="a chest X-ray showing {} lungs.")
    model.train()
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model.classify(images), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
