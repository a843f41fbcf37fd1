"""nearl_rt/bench/kernels.py: every case gets figures or its error, the JSON survives a crash mid-run, inputs are
the model's dtypes rotated past the L2, and no GPU means one clear line. No test asserts a speed."""
import json
from functools import partial

import pytest
import torch

from nearl_rt.bench import kernels as kb
from nearl_rt.core.cli import run_cli

OPS = kb.OPS


def test_smoke_gives_every_case_its_figures_or_its_error(tmp_path, monkeypatch, capsys):
    real = kb.implementations

    def broken(op_name, compile_ref):  # one op fails (as _use_bwd would with OutOfResources): the run goes on
        impls = real(op_name, compile_ref)
        if op_name == "oca_text":
            impls["fused"] = lambda *args: (_ for _ in ()).throw(RuntimeError("out of resources: shared memory"))
        return impls
    monkeypatch.setattr(kb, "implementations", broken)
    out = tmp_path / "kernels.json"
    assert kb.main(["--smoke", "--out", str(out)]) == 1
    assert "2 measurement(s) failed" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["schema"] == kb.SCHEMA and doc["complete"] and doc["copy_GBps"] > 0
    rows = doc["rows"]
    assert {(r["op"], r["mode"], r["impl"]) for r in rows} == {
        (op, mode, impl) for op in OPS for mode in kb.PASSES for impl in ("fused", "eager")}
    failed = [r for r in rows if r["status"] != "ok"]
    assert {(r["op"], r["mode"], r["impl"], r["status"]) for r in failed} == {
        ("oca_text", m, "fused", "failed") for m in kb.PASSES}
    assert all("out of resources" in r["reason"] for r in failed)
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["ms"] > 0 and r["bytes"] > 0 and r["GBps"] > 0 and r["TFLOPs"] > 0 and r["sets"] == 2
        assert r["pct_copy"] == pytest.approx(100 * r["GBps"] / doc["copy_GBps"], rel=0.02)
        if r["impl"] == "fused":
            eager = next(e for e in rows if (e["op"], e["mode"], e["impl"]) == (r["op"], r["mode"], "eager"))
            assert r["x_eager"] == pytest.approx(eager["ms"] / r["ms"], rel=1e-2)
    assert "| oca_image | 1 | fwd |" in doc["table"] and "| use_attention_shared_text | 1 | fwd+bwd |" in doc["table"]
    assert "| oca_text | 1 | fwd | failed |" in doc["table"]


def test_json_keeps_the_cases_finished_before_a_crash(tmp_path, monkeypatch):
    def crash(dtype, device, seed):
        raise KeyboardInterrupt
    first = kb.cases([1], smoke=True)[0]
    monkeypatch.setattr(kb, "cases", lambda batches, smoke: [first, ("use_attention", 1, crash)])
    out = tmp_path / "k.json"
    with pytest.raises(KeyboardInterrupt):
        kb.main(["--smoke", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert not doc["complete"] and {r["op"] for r in doc["rows"]} == {"oca_image"} and len(doc["rows"]) == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inputs_are_model_dtypes_and_rotate_past_the_l2(dtype):
    builder = partial(kb.use_case, 2, 9, 24, 6, 16, shared_text=True)
    one = builder(dtype, torch.device("cpu"), seed=0)
    per_set = sum(a.numel() * a.element_size() for a in one["args"].values())
    sets = kb.input_sets(builder, dtype, torch.device("cpu"), l2_bytes=10 * per_set, smoke=False)
    assert len(sets) * per_set > 10 * per_set and len(sets) >= 3
    assert not torch.equal(sets[0]["args"]["x"], sets[1]["args"]["x"]), "distinct inputs, not one buffer"
    for s in sets[:2]:
        floats = {n: a.dtype for n, a in s["args"].items() if a.is_floating_point()}
        assert set(floats.values()) == {dtype}, floats  # weights too: the model caches them in its dtype
        assert s["args"]["t"].shape[0] == 1 and s["args"]["t_valid"].dtype == torch.bool
    oca = kb.oca_case(2, 5, 24, dtype, torch.device("cpu"), text=True, seed=0)
    assert {a.dtype for a in oca["args"].values() if a.is_floating_point()} == {dtype}
    assert oca["args"]["group"].tolist() == [0, 0, 1, 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_is_one_clear_line(tmp_path, capsys):
    assert run_cli(kb.main, ["--out", str(tmp_path / "k.json")], prog="nearl_rt/bench/kernels.py") == 2
    err = capsys.readouterr().err
    assert err.startswith("nearl_rt/bench/kernels.py: error: ") and "--smoke" in err and err.count("\n") == 1
    assert not (tmp_path / "k.json").exists()
