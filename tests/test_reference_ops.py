"""The PyTorch reference ops against the spec's math written out independently in float64."""
import math

import pytest
import torch

from nearl_rt.kernels import OpInputError, oca_reference, use_attention_reference


def oca_inputs(R=3, N=5, D=24, G=2, M=3, r=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(x=rnd(R, N, D), group=torch.randint(0, G, (R,), generator=g), k=rnd(G, M, r), v=rnd(G, M, r),
                w_q=rnd(D, r), w_o=rnd(r, D), scale=torch.tensor(0.7, dtype=dtype))


def oca_spec(x, group, k, v, w_q, w_o, scale, eps=1e-6):
    """The spec's formula, token by token, in float64."""
    x, k, v, w_q, w_o = (t.double() for t in (x, k, v, w_q, w_o))
    out = torch.empty_like(x)
    r = w_q.shape[1]
    for i in range(x.shape[0]):
        for n in range(x.shape[1]):
            f = x[i, n]
            ln = (f - f.mean()) / torch.sqrt(f.var(unbiased=False) + 1e-5)
            a = torch.softmax((ln @ w_q) @ k[group[i]].t() / math.sqrt(r), dim=-1)
            h = (a @ v[group[i]]) @ w_o
            perp = h - (h @ f) / (f @ f + eps) * f
            out[i, n] = f + scale.double() * perp
    return out


def test_oca_reference_matches_spec_formula():
    inp = oca_inputs()
    torch.testing.assert_close(oca_reference(**inp).double(), oca_spec(**inp), rtol=1e-5, atol=1e-5)


def test_oca_modes():
    inp = {k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in oca_inputs().items()}
    plain = oca_reference(**inp, orthogonal=False)
    stop = oca_reference(**inp, keep_parallel="stopgrad")
    drop = oca_reference(**inp)
    torch.testing.assert_close(stop, plain)  # value: D_perp + D_par = H
    g = torch.randn_like(drop)
    params = [inp[n] for n in ("x", "k", "v", "w_q", "w_o", "scale")]
    g_stop = torch.autograd.grad(stop, params, g)
    g_drop = torch.autograd.grad(drop, params, g)
    for name, a, b in zip(("x", "k", "v", "w_q", "w_o"), g_stop[:5], g_drop[:5]):
        torch.testing.assert_close(a, b, msg=f"stopgrad must backpropagate like D_perp alone ({name})")
    g_plain = torch.autograd.grad(plain, params, g)
    torch.testing.assert_close(g_stop[5], g_plain[5], msg="s scales the whole value D_perp + sg(D_par) = H")


def test_oca_half_precision_close_to_fp64():
    inp = oca_inputs(D=64, r=8)
    ref = oca_reference(**{k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()})
    half = oca_reference(**{k: (v.half() if v.is_floating_point() else v) for k, v in inp.items()})
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), ref, rtol=0, atol=0.05)


def use_spec(q, x, t, t_valid, lxw, lxb, wdx, ltw, ltb, wdt, wk, bk, wv, bv, heads):
    """Explicit loop over groups and heads in float64."""
    d = lambda a: None if a is None else a.double()  # noqa: E731
    q, x, t, lxw, lxb, wdx, ltw, ltb, wdt, wk, bk, wv, bv = map(d, (q, x, t, lxw, lxb, wdx, ltw, ltb, wdt, wk, bk, wv, bv))
    ln = lambda a, w, b: (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1e-5) * w + b  # noqa: E731
    G, M, ds = q.shape
    dh = ds // heads
    out = torch.zeros(G, M, ds, dtype=torch.float64)
    for gi in range(G):
        tg = gi if t.shape[0] == G else 0
        keys = ln(t[tg], ltw, ltb)[t_valid[tg]] @ wdt.t()
        if x is not None:
            keys = torch.cat([ln(x[gi], lxw, lxb) @ wdx.t(), keys])
        k, v = keys @ wk.t() + bk, keys @ wv.t() + bv
        for h in range(heads):
            s = slice(h * dh, (h + 1) * dh)
            a = torch.softmax(q[gi, :, s] @ k[:, s].t() / math.sqrt(dh), dim=-1)
            out[gi, :, s] = a @ v[:, s]
    return out


def use_inputs(G=3, M=5, ds=12, heads=3, Nx=7, Dx=20, Nt=11, Dt=16, shared_text=False, with_image=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    Gt = 1 if shared_text else G
    valid = torch.rand(Gt, Nt, generator=g) > 0.4
    valid[:, 0] = True
    valid[-1, 1:] = False  # all-but-one text key masked
    img = (rnd(G, Nx, Dx), 1 + 0.1 * rnd(Dx), 0.1 * rnd(Dx), rnd(ds, Dx)) if with_image else (None,) * 4
    return (rnd(G, M, ds), img[0], rnd(Gt, Nt, Dt), valid, *img[1:], 1 + 0.1 * rnd(Dt), 0.1 * rnd(Dt), rnd(ds, Dt),
            rnd(ds, ds), rnd(ds), rnd(ds, ds), rnd(ds), heads)


@pytest.mark.parametrize("shared_text, with_image", [(False, True), (True, True), (True, False)])
def test_use_attention_reference_matches_spec(shared_text, with_image):
    args = use_inputs(shared_text=shared_text, with_image=with_image)
    out = use_attention_reference(*args[:-1], heads=args[-1])
    torch.testing.assert_close(out.double(), use_spec(*args), rtol=1e-5, atol=1e-5)


def test_ops_reject_bad_inputs_with_clear_errors():
    inp = oca_inputs()
    with pytest.raises(OpInputError, match="w_o is"):
        oca_reference(**{**inp, "w_o": inp["w_o"][:, :-1]})
    with pytest.raises(OpInputError, match="group has"):
        oca_reference(**{**inp, "group": inp["group"][:-1]})
    with pytest.raises(OpInputError, match="dtype"):
        oca_reference(**{**inp, "x": inp["x"].long()})
    with pytest.raises(OpInputError, match="keep_parallel"):
        oca_reference(**inp, keep_parallel="keep")
    args = list(use_inputs())
    with pytest.raises(OpInputError, match="not divisible"):
        use_attention_reference(*args[:-1], heads=5)
    args[3] = args[3][:, :-1]
    with pytest.raises(OpInputError, match="t_valid is"):
        use_attention_reference(*args[:-1], heads=3)
