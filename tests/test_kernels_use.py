"""Fused Triton USEformer attention against the PyTorch reference: forward and every gradient (interpreter on CPU).

Same tolerance rule as tests/test_kernels_oca.py (fused error vs fp64 <= 2 x eager error + 8 ulps).
"""
import pytest
import torch

from nearl_rt.kernels import OpInputError, use_attention_reference
from nearl_rt.kernels.use_attention_triton import use_attention_triton
from tests.test_kernels_oca import CUDA, DEVICE, assert_fused_matches, run_with_grads

PARAMS = ("q", "x", "t", "ln_x_w", "ln_x_b", "w_dx", "ln_t_w", "ln_t_b", "w_dt", "w_k", "b_k", "w_v", "b_v")


def use_args(G, M, ds, heads, Nx, Dx, Nt, Dt, *, shared_text=False, with_image=True, seed=0, device=DEVICE):
    """Inputs at the model's scales: padded text (the last text group keeps one key), large- and tiny-norm tokens."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    Gt = 1 if shared_text else G
    valid = torch.rand(Gt, Nt, generator=g) > 0.3
    valid[:, 0] = True
    valid[-1, 1:] = False  # all but one text key masked
    t = rnd(Gt, Nt, Dt)
    t[0, 0] *= 100.0
    t[0, -1] *= 1e-3  # tiny-norm token (LayerNorm eps dominates)
    args = dict(q=rnd(G, M, ds), t=t, t_valid=valid, ln_t_w=1 + 0.1 * rnd(Dt), ln_t_b=0.1 * rnd(Dt),
                w_dt=rnd(ds, Dt) / Dt ** 0.5, w_k=rnd(ds, ds) / ds ** 0.5, b_k=0.1 * rnd(ds),
                w_v=rnd(ds, ds) / ds ** 0.5, b_v=0.1 * rnd(ds), x=None, ln_x_w=None, ln_x_b=None, w_dx=None)
    if with_image:
        x = rnd(G, Nx, Dx)
        x[-1, -1] *= 100.0
        args.update(x=x, ln_x_w=1 + 0.1 * rnd(Dx), ln_x_b=0.1 * rnd(Dx), w_dx=rnd(ds, Dx) / Dx ** 0.5)
    return {n: (a.to(device) if a is not None else None) for n, a in args.items()}


CASES = {  # G, M, ds, heads, Nx, Dx, Nt, Dt, options
    "per_image_text": ((3, 5, 12, 3, 7, 20, 11, 16), {}),
    "shared_text": ((2, 4, 16, 2, 9, 24, 13, 20), {"shared_text": True}),
    "text_only": ((1, 3, 8, 1, 0, 0, 10, 12), {"shared_text": True, "with_image": False}),
    "M1_one_group_split_keys": ((1, 1, 32, 4, 75, 24, 40, 16), {}),
    "one_text_token_two_query_blocks": ((2, 20, 32, 4, 5, 16, 1, 8), {}),  # heads x M = 80 query rows
}


def _diff(args):
    return [n for n in PARAMS if args[n] is not None]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_use_attention_matches_reference(dtype, case):
    shape, opts = CASES[case]
    args = use_args(*shape, **opts)
    assert_fused_matches(use_attention_triton, use_attention_reference, args, _diff(args), dtype, heads=shape[3])


def test_fused_use_attention_model_widths():
    """d_s = 128, 4 heads, M = 16 over ViT-B/16-wide image tokens and CLIP-wide text tokens."""
    args = use_args(2, 16, 128, 4, 21, 768, 18, 512)
    assert_fused_matches(use_attention_triton, use_attention_reference, args, _diff(args), torch.float16, heads=4)


@pytest.mark.skipif(not CUDA, reason="bf16 and bitwise repeatability are checked on CUDA")
def test_fused_use_attention_bf16_cuda():
    args = use_args(8, 16, 128, 4, 197, 768, 32, 512)
    assert_fused_matches(use_attention_triton, use_attention_reference, args, _diff(args), torch.bfloat16, heads=4)


@pytest.mark.skipif(not CUDA, reason="bf16 and bitwise repeatability are checked on CUDA")
def test_fused_use_attention_bitwise_repeatable_cuda():
    args = use_args(2, 16, 128, 4, 197, 768, 32, 512, shared_text=True)
    diff = _diff(args)
    grad_out = torch.randn(2, 16, 128, device=DEVICE)
    runs = [run_with_grads(use_attention_triton, args, diff, torch.float16, grad_out, heads=4) for _ in range(50)]
    for run in runs[1:]:
        for name, t in run.items():
            assert torch.equal(t, runs[0][name]), f"{name} differs between identical runs"


def test_fused_use_attention_rejects_bad_inputs():
    args = use_args(2, 3, 8, 2, 4, 12, 5, 10)
    with pytest.raises(OpInputError, match="float64"):
        use_attention_triton(**{n: (a.double() if a is not None and a.is_floating_point() else a)
                                for n, a in args.items()}, heads=2)
    with pytest.raises(OpInputError, match="contiguous"):
        use_attention_triton(**{**args, "t": args["t"].transpose(0, 1).contiguous().transpose(0, 1)}, heads=2)
    with pytest.raises(OpInputError, match="t_valid is"):
        use_attention_triton(**{**args, "t_valid": args["t_valid"][:, :-1].contiguous()}, heads=2)
    with pytest.raises(OpInputError, match="not divisible"):
        use_attention_triton(**args, heads=3)


def test_fused_use_attention_under_autocast():
    """Autocast (mixed-precision training) must not push the fp32 folded projections into 16-bit."""
    args = use_args(2, 4, 16, 2, 9, 24, 13, 20)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = use_attention_triton(**args, heads=2)
        ref = use_attention_reference(**args, heads=2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.float(), rtol=0.05, atol=0.05)  # the reference's matmuls ran in bf16
