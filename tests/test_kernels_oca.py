"""Fused Triton OCA against the PyTorch reference: forward and every gradient, fp32 and fp16 (interpreter on CPU).

Tolerance rule (issue 3): for the output and each gradient, err(fused vs fp64 reference) <=
2 * err(eager reference in the same dtype vs fp64) + atol, with atol = 8 ulps of the dtype at the
quantity's largest magnitude: the fused op may round differently (fp32 accumulation, another summation
order) but must not be less accurate than eager PyTorch by more than a factor of two. All three runs
see the same input values (rounded to the dtype first).
"""
import pytest
import torch

from nearl_rt import kernels
from nearl_rt.kernels import OpInputError, oca_reference
from nearl_rt.kernels.oca_triton import oca_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
OCA_PARAMS = ("x", "k", "v", "w_q", "w_o", "scale")
MODES = {"drop": {}, "stopgrad": {"keep_parallel": "stopgrad"}, "plain": {"orthogonal": False}}


def run_with_grads(op, args: dict, params, dtype, grad_out, **kw):
    """op(**args) with the tensors named in `params` cast to `dtype`; output and gradients by name."""
    a = {n: (t.detach().to(dtype).requires_grad_() if n in params else t) for n, t in args.items()}
    out = op(**a, **kw)
    grads = torch.autograd.grad(out, [a[n] for n in params], grad_out.to(out.dtype))
    return {"out": out, **{f"d{n}": g for n, g in zip(params, grads)}}


def assert_fused_matches(fused_op, ref_op, args: dict, params, dtype, **kw):
    """The tolerance rule above, for the output and the gradient of every name in `params`."""
    args = {n: (t.to(dtype) if n in params else t) for n, t in args.items()}  # same values for all three runs
    with torch.no_grad():
        grad_out = torch.randn(ref_op(**args, **kw).shape, dtype=torch.float64, device=DEVICE)
    ref64 = run_with_grads(ref_op, args, params, torch.float64, grad_out, **kw)
    eager = run_with_grads(ref_op, args, params, dtype, grad_out, **kw)
    fused = run_with_grads(fused_op, args, params, dtype, grad_out, **kw)
    ulp = torch.finfo(dtype).eps
    for name, ref in ref64.items():
        assert fused[name].dtype == eager[name].dtype and fused[name].shape == ref.shape, name
        assert torch.isfinite(fused[name]).all(), f"{name}: non-finite values"
        err_f = (fused[name].double() - ref).abs().max().item()
        err_e = (eager[name].double() - ref).abs().max().item()
        atol = 8 * ulp * ref.abs().max().item()
        assert err_f <= 2 * err_e + atol, f"{name}: fused error {err_f:.3e} > 2 x eager {err_e:.3e} + {atol:.1e}"


def oca_args(R, N, D, G, M, r, *, seed=0, device=DEVICE):
    """Random OCA inputs at the model's scales; in sequence 0: row 0 large-norm, row 1 tiny-norm,
    row 2 offset (mean >> std: the LayerNorm statistics must not cancel)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(R, N, D)
    x[0, 0] *= 300.0
    if N > 2:
        x[0, 1] *= 1e-3
        x[0, 2] += 40.0
    args = dict(x=x, group=torch.randint(0, G, (R,), generator=g), k=rnd(G, M, r), v=rnd(G, M, r),
                w_q=rnd(D, r) / D ** 0.5, w_o=rnd(r, D) / r ** 0.5, scale=torch.tensor(0.7))
    return {n: t.to(device) for n, t in args.items()}


SHAPES = {  # R, N, D, G, M, r
    "odd": (3, 37, 200, 2, 3, 8),  # D: three full and one partial 64-wide chunk
    "M1_one_token": (4, 1, 24, 3, 1, 4),
    "vit_width": (2, 19, 768, 2, 16, 32),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_oca_matches_reference(dtype, shape, mode):
    args = oca_args(*SHAPES[shape])
    assert_fused_matches(oca_triton, oca_reference, args, OCA_PARAMS, dtype, **MODES[mode])


def test_fused_oca_int32_groups_and_shared_group():
    """Cached-text rows: every sequence reads group 0 of a single Z; int32 group indices."""
    args = oca_args(5, 6, 33, 1, 5, 16, seed=3)
    args["group"] = args["group"].int()
    assert_fused_matches(oca_triton, oca_reference, args, OCA_PARAMS, torch.float32)


@pytest.mark.skipif(not CUDA, reason="bf16 and bitwise repeatability are checked on CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_fused_oca_bf16_cuda(mode):
    args = oca_args(8, 197, 768, 8, 16, 32)
    assert_fused_matches(oca_triton, oca_reference, args, OCA_PARAMS, torch.bfloat16, **MODES[mode])


@pytest.mark.skipif(not CUDA, reason="bf16 and bitwise repeatability are checked on CUDA")
def test_fused_oca_bitwise_repeatable_cuda():
    args = oca_args(16, 197, 768, 16, 16, 32)
    grad_out = torch.randn(args["x"].shape, device=DEVICE, dtype=torch.float16)
    runs = [run_with_grads(oca_triton, args, OCA_PARAMS, torch.float16, grad_out) for _ in range(50)]
    for run in runs[1:]:
        for name, t in run.items():
            assert torch.equal(t, runs[0][name]), f"{name} differs between identical runs"


def test_fused_oca_rejects_bad_inputs():
    args = oca_args(2, 5, 16, 2, 3, 4)
    with pytest.raises(OpInputError, match="float64"):
        oca_triton(**{n: (t.double() if t.is_floating_point() else t) for n, t in args.items()})
    with pytest.raises(OpInputError, match="contiguous"):
        oca_triton(**{**args, "x": args["x"].transpose(0, 1).contiguous().transpose(0, 1)})
    with pytest.raises(OpInputError, match="w_q is"):
        oca_triton(**{**args, "w_q": args["w_q"][:-1]})
    with pytest.raises(OpInputError, match="keep_parallel"):
        oca_triton(**args, keep_parallel="keep")


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("NEARL_RT_BACKEND", raising=False)
    assert kernels.resolve_backend("auto", cpu) == "torch"
    assert kernels.resolve_backend("auto", cuda) == "triton"
    assert kernels.resolve_backend("auto", cuda, torch.float64) == "torch"
    assert kernels.resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv("NEARL_RT_BACKEND", "torch")
    assert kernels.resolve_backend("triton", cuda) == "torch"
    monkeypatch.setenv("NEARL_RT_BACKEND", "fast")
    with pytest.raises(ValueError, match="NEARL_RT_BACKEND"):
        kernels.resolve_backend("auto", cpu)
    monkeypatch.delenv("NEARL_RT_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = oca_args(2, 3, 16, 1, 2, 4, device="cpu")
    with pytest.raises(OpInputError, match="CUDA"):
        kernels.oca(**args, backend="triton")
