"""Launch budget of backend="triton" (counted on the CPU, kernels stubbed: nearl_rt/bench/launch_budget.py, which also
measures host time). Counted as in the GPU review: aten ops that would each be a CUDA kernel plus the Triton
launches, tiny preset in bf16, after a warm-up call, per layer over frozen CLIP computing the same logits.
"""
import pytest
import torch

from nearl_rt.bench.launch_budget import CLASSES, launches_per_layer
from nearl_rt.kernels.derived import derived
from nearl_rt.kernels.launches import recorded_launches
from tests.helpers import perturb_adapters, tiny, tiny_inputs

BUDGET = {"text_cacheable": 16, "bidirectional": 24}  # added kernels per layer (issue 9)


@pytest.mark.parametrize("interaction", BUDGET)
def test_triton_backend_launch_budget(interaction, monkeypatch):
    monkeypatch.delenv("NEARL_RT_BACKEND", raising=False)
    model = perturb_adapters(tiny(interaction, backend="triton")).to(torch.bfloat16)
    model.set_classes(CLASSES)
    per_layer, extra_ops, names, _ = launches_per_layer(model, tiny_inputs(batch=3)[0].to(torch.bfloat16))
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
