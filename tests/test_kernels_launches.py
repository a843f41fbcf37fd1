"""Launch and host budget of backend="triton" (counted on the CPU, kernels stubbed: kernels/launches.py).

Counted as in the GPU review: aten ops that would each be a CUDA kernel plus the Triton launches, tiny
preset in bf16, after a warm-up call, per layer over frozen CLIP computing the same logits (its class text
cached in text_cacheable; its text tower run per call in bidirectional, C = 2 classes).
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.derived import derived
from kernels.launches import counted_kernels, recorded_launches
from tests.helpers import perturb_adapters, tiny, tiny_inputs

BUDGET = {"text_cacheable": 16, "bidirectional": 24}  # added kernels per layer (issue 9)
CLASSES = ["normal lungs", "pneumonia with consolidation in the left lower lobe"]


def launches_per_layer(interaction):
    model = perturb_adapters(tiny(interaction, backend="triton")).to(torch.bfloat16)
    model.set_classes(CLASSES)
    images = tiny_inputs(batch=3)[0].to(torch.bfloat16)
    bb = model.backbone

    def frozen():
        txt = F.normalize(bb.encode_text(model.class_tokens), dim=-1) if interaction == "bidirectional" else cached
        return bb.logit_scale.exp() * F.normalize(bb.encode_image(images), dim=-1) @ txt.t()

    with torch.no_grad(), recorded_launches(run=False) as launches:
        cached = F.normalize(bb.encode_text(model.class_tokens), dim=-1)
        model.classify(images)  # warm-up: class prompts, class text stream, folded weights
        start = len(launches)
        with counted_kernels() as nearl:
            model.classify(images)
        triton_launches = launches[start:]
        with counted_kernels() as plain:
            frozen()
    added = sum(nearl.values()) + len(triton_launches) - sum(plain.values())
    return added / len(model.vision_blocks), nearl - plain, [launch.name for launch in triton_launches]


@pytest.mark.parametrize("interaction", BUDGET)
def test_triton_backend_launch_budget(interaction, monkeypatch):
    monkeypatch.delenv("NEARL_RT_BACKEND", raising=False)
    per_layer, extra_ops, names = launches_per_layer(interaction)
    assert per_layer <= BUDGET[interaction], f"{per_layer} kernels per layer over frozen CLIP: {extra_ops}, {names}"
    assert not extra_ops["_to_copy"], "weights are re-cast every call"
    assert not {"mv", "mul", "amax", "exp", "log"} & set(extra_ops), f"per-call folds or combine: {extra_ops}"
    layers = 2
    if interaction == "text_cacheable":  # class-text keys cached: only image keys are down-projected
        assert names.count("_ln_down_fwd") == layers and names.count("_use_fwd") == layers
    else:  # per-image prompts: image and text keys at every layer
        assert names.count("_ln_down_fwd") == 2 * layers and names.count("_use_fwd") == layers


def test_derived_cache_follows_weight_versions():
    w = torch.randn(4, 3)
    calls = []
    fn = lambda t: calls.append(1) or t * 2  # noqa: E731
    a = derived("t2", fn, w)
    assert derived("t2", fn, w) is a and len(calls) == 1
    with torch.no_grad():
        w.add_(1.0)  # in-place update (an optimizer step): new version
    b = derived("t2", fn, w)
    assert len(calls) == 2 and torch.equal(b, w * 2)
    assert derived("t2", fn, w.clone()) is not b  # another tensor with the same values is another source
    p = torch.nn.Parameter(torch.randn(3))
    g1 = derived("t2", fn, p)
    g2 = derived("t2", fn, p)
    assert g1 is not g2 and g1.requires_grad, "recorded autograd graphs must not be shared between calls"
    with torch.no_grad():
        assert derived("t2", fn, p) is derived("t2", fn, p)


def test_cached_class_text_keys_follow_adapter_updates(monkeypatch):
    """text_cacheable classify reuses the class-text keys until a weight changes; results stay exact."""
    monkeypatch.delenv("NEARL_RT_BACKEND", raising=False)
    model = perturb_adapters(tiny("text_cacheable", backend="triton"))
    model.set_classes(CLASSES)
    images = tiny_inputs(batch=2)[0]
    ref = perturb_adapters(tiny("text_cacheable", backend="torch"))
    ref.set_classes(CLASSES)
    with torch.no_grad():
        ref.load_adapter_state_dict(model.adapter_state_dict())
        torch.testing.assert_close(model.classify(images), ref.classify(images), rtol=1e-4, atol=1e-5)
        model.classify(images)
        with recorded_launches(run=True) as launches:
            model.classify(images)
        assert [n for n in (x.name for x in launches) if n == "_ln_down_fwd"] == ["_ln_down_fwd"] * 2
        for m in (model, ref):
            m.use.ln_t.weight.mul_(1.5)
            m.use.down_x.weight.add_(0.05)
        torch.testing.assert_close(model.classify(images), ref.classify(images), rtol=1e-4, atol=1e-5)
