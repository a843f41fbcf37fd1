"""The tiny model with backend="triton" (interpreter on CPU) equals backend="torch": logits, every adapter gradient.

Also: the NEARL_RT_BACKEND override.
"""
import pytest
import torch

from nearl_rt.kernels import oca_triton, use_attention_triton
from tests.helpers import TINY_PRESETS, perturb_adapters, tiny, tiny_inputs
from tests.test_kernels_oca import DEVICE


def logits_and_grads(interaction, backend, preset):
    torch.manual_seed(0)
    model = perturb_adapters(tiny(interaction, preset, backend=backend)).to(DEVICE)
    images, tokens = (t.to(DEVICE) for t in tiny_inputs(preset=preset))
    logits = model(images, tokens)
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def spy(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("interaction", ["bidirectional", "text_cacheable"])
def test_triton_backend_equals_torch_backend(interaction, preset, monkeypatch):
    """tiny_bert: BERT's key-padding mask reaches the USE kernel as the text `valid` mask."""
    monkeypatch.delenv("NEARL_RT_BACKEND", raising=False)
    ref_logits, ref_grads = logits_and_grads(interaction, "torch", preset)
    oca_calls = spy(monkeypatch, oca_triton, "oca_triton")
    use_calls = spy(monkeypatch, use_attention_triton, "use_attention_triton")
    logits, grads = logits_and_grads(interaction, "triton", preset)
    assert oca_calls and use_calls, "backend='triton' did not run the fused ops"
    # both fp32: only the summation order differs, through two layers of both towers
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert grads[name] is not None, f"{name} got no gradient through the fused ops"
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


def test_env_overrides_model_backend(monkeypatch):
    monkeypatch.setenv("NEARL_RT_BACKEND", "torch")
    calls = spy(monkeypatch, oca_triton, "oca_triton")
    model = tiny(backend="triton")
    model(*tiny_inputs(batch=1))
    assert not calls, "NEARL_RT_BACKEND=torch must override backend='triton'"
