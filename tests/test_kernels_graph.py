"""backend "graph" (nearl_rt.kernels.graph_ops): the ops reformulated for the fused export equal the references.

The OCA's reference computes its residual update in float32 whatever the input dtype (`.float()`), and so does
the graph form, with its products in another order: they agree to float32 rounding (a few ulps of the update,
~1e-6 relative), also on float64 inputs. The USEformer attention has no such cast: in float64 both sides agree to
~1e-12, which would catch any algebra slip (a dropped bias, a wrong head split) that float32 noise could hide.
"""
import pytest
import torch

import nearl_rt
from nearl_rt import kernels
from nearl_rt.kernels.graph_ops import oca_graph, use_attention_graph
from tests.helpers import perturb_adapters, tiny_inputs

# |graph - reference| of the OCA output, relative to max |x| (update accumulated in float32 on both sides)
OCA_RTOL = 2e-6


def _oca_inputs(dtype, seed=0, R=5, N=7, D=20, G=3, M=3, r=6, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    group = torch.tensor([0, 2, 1, 2, 0][:R])
    return (3 * rand(R, N, D) + 1, group, rand(G, M, r), rand(G, M, r), rand(D, r) / D ** 0.5, rand(r, D) / r ** 0.5,
            torch.tensor(scale, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("orthogonal", [True, False])
def test_oca_graph_equals_reference(dtype, orthogonal):
    args = _oca_inputs(dtype)
    ref = kernels.oca_reference(*args, orthogonal=orthogonal)
    got = oca_graph(*args, orthogonal=orthogonal)
    assert got.dtype == dtype and got.shape == ref.shape
    assert (got - ref).abs().max() <= OCA_RTOL * args[0].abs().max()
    assert (ref - args[0]).abs().max() > 0.1  # the update is non-trivial


def test_oca_graph_update_is_orthogonal_and_zero_scale_is_identity():
    x, group, k, v, w_q, w_o, _ = _oca_inputs(torch.float64, seed=1)
    update = oca_graph(x, group, k, v, w_q, w_o, torch.tensor(0.9, dtype=torch.float64)) - x
    cos = (update * x).sum(-1) / (update.norm(dim=-1) * x.norm(dim=-1))
    assert cos.abs().max() < 1e-5 and update.norm(dim=-1).min() > 1e-2
    x, group, k, v, w_q, w_o, _ = _oca_inputs(torch.float32, seed=1)  # s = 0: the frozen token, bit for bit
    assert torch.equal(oca_graph(x, group, k, v, w_q, w_o, torch.tensor(0.0)), x)


def test_oca_graph_stopgrad_is_the_reference_and_gradients_match():
    args = _oca_inputs(torch.float64, seed=2)
    assert torch.equal(oca_graph(*args, keep_parallel="stopgrad"), kernels.oca_reference(*args, keep_parallel="stopgrad"))
    grads = []
    for op in (kernels.oca_reference, oca_graph):
        leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        (op(*leaves) * torch.linspace(-1, 1, args[0].shape[-1], dtype=torch.float64)).sum().backward()
        grads.append([leaf.grad for leaf in leaves if leaf.requires_grad])
    for ref, got in zip(*grads):
        assert (got - ref).abs().max() <= 1e-5 * (ref.abs().max() + 1)


def _use_inputs(dtype, *, image: bool, shared_text: bool, seed=0, G=3, M=4, ds=12, heads=3, Nx=6, Nt=5, Dx=16, Dt=10):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    Gt = 1 if shared_text else G
    valid = torch.ones(Gt, Nt, dtype=torch.bool)
    valid[:, 3:] = False  # padded prompt positions
    if not shared_text:
        valid[1, 2:] = False
    return (rand(G, M, ds), rand(G, Nx, Dx) if image else None, rand(Gt, Nt, Dt), valid,
            1 + 0.3 * rand(Dx), 0.3 * rand(Dx), rand(ds, Dx) / Dx ** 0.5, 1 + 0.3 * rand(Dt), 0.3 * rand(Dt),
            rand(ds, Dt) / Dt ** 0.5, rand(ds, ds) / ds ** 0.5, rand(ds), rand(ds, ds) / ds ** 0.5, rand(ds)), heads


@pytest.mark.parametrize("image", [True, False])
@pytest.mark.parametrize("shared_text", [True, False])
def test_use_attention_graph_equals_reference(image, shared_text):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        args, heads = _use_inputs(dtype, image=image, shared_text=shared_text)
        ref = kernels.use_attention_reference(*args, heads=heads)
        got = use_attention_graph(*args, heads=heads)
        assert got.dtype == dtype and got.shape == ref.shape
        assert (got - ref).abs().max() <= tol * ref.abs().max(), dtype


def test_use_attention_graph_masks_padding_and_gradients_match():
    args, heads = _use_inputs(torch.float64, image=True, shared_text=True, seed=3)
    t = args[2].clone()
    t[:, 3:] += 100.0  # padded positions: whatever they hold must not matter
    moved = use_attention_graph(*args[:2], t, *args[3:], heads=heads)
    assert (moved - use_attention_graph(*args, heads=heads)).abs().max() < 1e-12
    grads = []
    for op in (kernels.use_attention_reference, use_attention_graph):
        leaves = [a.clone().requires_grad_(a.is_floating_point()) if a is not None else None for a in args]
        op(*leaves, heads=heads).square().sum().backward()
        # b_k (index 11) cancels in the softmax: its gradient is ~0 on both sides
        grads.append([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                      for i, leaf in enumerate(leaves) if leaf is not None and leaf.is_floating_point() and i != 11])
    for ref, got in zip(*grads):
        assert (got - ref).abs().max() <= 1e-9 * (ref.abs().max() + 1)


@pytest.mark.parametrize("preset", ["tiny", "tiny_bert"])
@pytest.mark.parametrize("mode", ["bidirectional", "text_cacheable"])
def test_model_on_graph_backend_equals_reference(preset, mode):
    """The whole model (both towers' OCAs, every USEformer step, prompt masks) in float64."""
    model = perturb_adapters(nearl_rt.build_model(preset, interaction=mode, backend="torch"), seed=4).double().eval()
    images, tokens = tiny_inputs(batch=3, preset=preset)
    with torch.no_grad():
        ref = model(images.double(), tokens)
        model.backend = "graph"
        got = model(images.double(), tokens)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert ref.std() > 1e-3
