"""Shared test utilities."""
import torch
import torch.nn.functional as F

import nearl_rt

CLASSES = ["normal lungs", "pneumonia with consolidation in the left lower lobe", "a nodule"]


def perturb_adapters(model, seed: int = 0, scale: float = 0.5):
    """Give every adapter parameter a non-trivial random value (an untrained model is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            if name.endswith("scale"):
                p.fill_(scale)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def frozen_clip_logits(backbone, images, tokens):
    img = F.normalize(backbone.encode_image(images), dim=-1)
    txt = F.normalize(backbone.encode_text(tokens), dim=-1)
    return backbone.logit_scale.exp() * img @ txt.t()


def tiny(interaction="bidirectional", **kw):
    return nearl_rt.build_model("tiny", interaction=interaction, **kw)


def tiny_inputs(batch=3, classes=CLASSES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), nearl_rt.tokenize(classes, "nearl-tiny")
