"""bench/latency.py: the --quick CI run writes the JSON schema, every requested backend has figures or an
explicit skip reason, the harness times what it says, and bad options fail with one clear line.
No test asserts a speed."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from itertools import product
from pathlib import Path

import pytest
import torch

from nearl_rt.bench import backends, harness, latency
from nearl_rt.bench.backends import BACKENDS, BenchContext
from nearl_rt.core.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "spread", "images_per_s", "setup_s", "first_call_s")
MODES = ("bidirectional", "text_cacheable")


def run_script(*args):
    """As a user runs it: `python bench/latency.py` from the repository root, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "bench/latency.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def check_document(doc, backends, modes, batch_sizes):
    """The JSON schema, and that every requested (backend, mode, batch size) has figures or a reason."""
    assert doc["schema"] == latency.SCHEMA
    machine = doc["machine"]
    assert machine["cpu"] and machine["cpu_count"] >= 1 and machine["versions"]["torch"] == torch.__version__
    assert {"triton", "onnxruntime", "open_clip"} <= set(machine["versions"])
    settings = doc["settings"]
    assert settings["backends"] == list(backends) and settings["modes"] == list(modes)
    assert settings["batch_sizes"] == list(batch_sizes) and settings["iters"] >= 1
    assert set(doc["backends"]) == set(backends) and all(d["description"] for d in doc["backends"].values())
    results = doc["results"]
    keys = [(r["backend"], r["mode"], r["batch_size"]) for r in results]
    assert sorted(keys) == sorted(product(backends, modes, batch_sizes)), "one record per requested measurement"
    by_key = dict(zip(keys, results))
    for (name, mode, b), r in by_key.items():
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert isinstance(r["reason"], str) and r["reason"].strip(), r
            continue
        assert all(isinstance(r[f], float) and math.isfinite(r[f]) and r[f] >= 0 for f in FIGURES), r
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] == pytest.approx(b * 1000 / r["median_ms"])
        assert r["iters"] == settings["iters"] and r["warmup"] == settings["warmup"]
        assert r["peak_mem_mib"] is None or r["peak_mem_mib"] >= 0
        assert r["spread"] == pytest.approx(r["p90_ms"] / r["median_ms"]) and r["noisy"] == (r["spread"] > 1.5)
        assert r["baseline"] == (BACKENDS[name].baseline or name) and r["baseline"].startswith("frozen_clip")
        floor, eager = by_key.get((r["baseline"], mode, b)), by_key.get(("eager", mode, b))
        if floor and floor["status"] == "ok":
            assert r["xclip"] == pytest.approx(r["median_ms"] / floor["median_ms"])
        if eager and eager["status"] == "ok":
            assert r["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / r["median_ms"])
        if BACKENDS[name].compares_to_eager:
            assert r["max_abs_diff_vs_fp32_eager"] >= 0
    return by_key


def export_available() -> bool:
    try:
        return importlib.util.find_spec("nearl_rt.export.onnx") is not None
    except ModuleNotFoundError:
        return False


def test_quick_run_as_a_script_writes_the_schema(tmp_path):
    out = tmp_path / "results.json"
    proc = run_script("--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--quick is a smoke test" in proc.stdout + proc.stderr  # it says its times are no measurement
    assert "min each" not in proc.stdout + proc.stderr  # tiny exports take seconds, not minutes
    doc = json.loads(out.read_text())
    by_key = check_document(doc, tuple(BACKENDS), MODES, (1, 3))
    assert doc["settings"]["preset"] == "tiny" and doc["settings"]["classes"] == 2
    for mode, b in product(MODES, (1, 3)):
        eager, floor = by_key[("eager", mode, b)], by_key[("frozen_clip", mode, b)]
        assert eager["status"] == floor["status"] == "ok"
        assert eager["speedup_vs_eager"] == 1.0 and floor["xclip"] == 1.0 and eager["baseline"] == "frozen_clip"
        assert eager["max_abs_diff_vs_fp32_eager"] <= 1e-4  # a float32 copy of the reference itself
        assert "--quick" in by_key[("torch_compile", mode, b)]["reason"]
        if not torch.cuda.is_available():
            for name in ("triton", "cuda_graphs", "frozen_clip_graphs", "ort_cuda_fp32", "ort_cuda_fp16",
                         "ort_tensorrt", "frozen_clip_ort_cuda", "frozen_clip_ort_cuda_fp32"):
                assert by_key[(name, mode, b)]["reason"].startswith("needs CUDA")
        ort, frozen_ort = by_key[("ort_cpu", mode, b)], by_key[("frozen_clip_ort_cpu", mode, b)]
        if export_available():
            assert ort["status"] == frozen_ort["status"] == "ok" and ort["max_abs_diff_vs_fp32_eager"] <= 1e-3, ort
            assert ort["baseline"] == "frozen_clip_ort_cpu"
            assert ort["xclip"] == pytest.approx(ort["median_ms"] / frozen_ort["median_ms"])
            int8, frozen_int8 = by_key[("ort_cpu_int8", mode, b)], by_key[("frozen_clip_ort_cpu_int8", mode, b)]
            assert int8["status"] == frozen_int8["status"] == "ok" and int8["baseline"] == "frozen_clip_ort_cpu_int8"
            assert int8["xclip"] == pytest.approx(int8["median_ms"] / frozen_int8["median_ms"])
            # int8 moves the tiny model's logits (scale 100 on cosines) far more than fp32 ORT's 1e-3, but
            # not by a whole logit: test_quantize bounds its probabilities and class agreement
            assert 1e-4 < int8["max_abs_diff_vs_fp32_eager"] < 1.0, int8
            fused, fused_int8 = by_key[("ort_cpu_fused", mode, b)], by_key[("ort_cpu_fused_int8", mode, b)]
            assert fused["status"] == fused_int8["status"] == "ok" and fused["baseline"] == "frozen_clip_ort_cpu_fused"
            assert fused["max_abs_diff_vs_fp32_eager"] <= 1e-3 and fused_int8["max_abs_diff_vs_fp32_eager"] < 1.0
            assert by_key[("frozen_clip_ort_cpu_fused", mode, b)]["status"] == "ok"
            if importlib.util.find_spec("openvino") is not None:
                ov, bf16 = by_key[("openvino", mode, b)], by_key[("openvino_bf16", mode, b)]
                assert ov["status"] == bf16["status"] == "ok" and ov["baseline"] == "frozen_clip_openvino"
                assert ov["max_abs_diff_vs_fp32_eager"] <= 1e-3, ov  # f32 inference: the same model
                assert bf16["max_abs_diff_vs_fp32_eager"] < 1.0 and bf16["baseline"] == "frozen_clip_openvino_bf16"
                assert ov["xclip"] == pytest.approx(ov["median_ms"] / by_key[("frozen_clip_openvino", mode, b)]["median_ms"])
        else:
            assert ort["reason"] == "export.onnx not available"
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 12, \
        "NEARL per mode + one frozen CLIP, fp32, int8, fused fp32 and fused int8 (OpenVINO reads the fp32 files)"
    assert "estimated time" in proc.stderr and "interleaved" in proc.stderr
    assert "runs frozen_clip, eager" in proc.stderr and "left out here, each with its reason" in proc.stderr
    for name in BACKENDS:
        assert name in proc.stdout, f"{name} missing from the table"
    assert "mode: bidirectional" in proc.stdout and "mode: text_cacheable" in proc.stdout


def test_subset_one_mode_more_classes_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.json", tmp_path / "latency.png"
    argv = ["--quick", "--mode", "text_cacheable", "--backends", "eager,frozen_clip", "--batch-sizes", "2,1",
            "--classes", "5", "--iters", "2", "--warmup", "0", "--out", str(out), "--plot", str(png)]
    assert run_cli(latency.main, argv, prog=latency.PROG) == 0
    doc = json.loads(out.read_text())
    by_key = check_document(doc, ("eager", "frozen_clip"), ("text_cacheable",), (2, 1))
    assert doc["settings"]["classes"] == 5 and doc["settings"]["warmup"] == 0
    assert all(r["status"] == "ok" and r["iters"] == 2 for r in by_key.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.png", "r.json"], "no temp files left"
    assert "C=5" in capsys.readouterr().out


def test_a_derived_onnx_precision_is_written_once_from_its_source_and_cached(tmp_path, monkeypatch):
    """How a new ONNX runtime (say int8 from the fp32 file) plugs in: one ONNX_PRECISIONS entry."""
    writes = []

    def fp32(ctx, kind, path):
        writes.append((kind, "fp32"))
        path.write_bytes(f"{kind} {ctx.mode}".encode())

    def reversed_(ctx, kind, path):  # derived from the fp32 file, as a quantiser would be
        source = ctx.onnx_file(kind, "fp32")
        writes.append((kind, "rev"))
        path.write_bytes(source.read_bytes()[::-1])
    monkeypatch.setitem(backends.ONNX_PRECISIONS, "fp32", fp32)
    monkeypatch.setitem(backends.ONNX_PRECISIONS, "rev", reversed_)
    master = latency.build_master(Namespace(seed=0, ckpt=None, preset="tiny", classes=None), "bidirectional")

    def context():
        return BenchContext(master=master, device=torch.device("cpu"), dtype=torch.float32, workdir=tmp_path,
                            cache_dir=tmp_path / "cache")
    ctx = context()
    assert not ctx.onnx_cached("nearl", "rev")
    path = ctx.onnx_file("nearl", "rev")
    assert path.read_bytes() == b"lanoitceridib lraen" and "-rev-" in path.name
    assert ctx.onnx_file("nearl", "rev") == path
    assert ctx.onnx_cached("nearl", "rev") and ctx.onnx_cached("nearl", "fp32")
    later = context()  # a later run with the same weights finds the files: nothing is written again
    assert later.onnx_file("nearl", "rev") == path
    frozen = later.onnx_file("frozen_clip", "rev")
    assert frozen != path and frozen.read_bytes() == b"lanoitceridib pilc_nezorf"
    assert writes == [("nearl", "fp32"), ("nearl", "rev"), ("frozen_clip", "fp32"), ("frozen_clip", "rev")]
    master.set_classes(["a", "b", "c"])  # other classes: other files
    assert not context().onnx_cached("nearl", "rev")


def test_rounds_interleave_rotate_exclude_warmup_and_survive_a_failure():
    calls = []
    inputs = [torch.full((1,), float(i)) for i in range(3)]

    def fn(name):
        def call(x):
            calls.append((name, int(x)))
            if name == "c" and len(calls) > 5:
                raise MemoryError("out of memory")
        return call
    times, errors = harness.time_rounds({n: fn(n) for n in "abc"}, inputs, warmup=1, iters=4,
                                        device=torch.device("cpu"))
    assert list(times) == ["a", "b"] and all(len(t) == 4 for t in times.values())
    assert isinstance(errors["c"], MemoryError)
    # round r: every fn once on input r % 3, the order rotated by r; c raised in round 2 and sat out after
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2),
                     ("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    stats = harness.summarize([4.0, 1.0, 3.0, 2.0, 5.0], batch_size=8)
    assert (stats["median_ms"], stats["min_ms"], stats["mean_ms"]) == (3.0, 1.0, 3.0)
    assert stats["p90_ms"] == pytest.approx(4.6) and stats["p99_ms"] == pytest.approx(4.96)
    assert stats["spread"] == pytest.approx(4.6 / 3)
    assert stats["images_per_s"] == pytest.approx(8 / 3e-3)


def test_cpu_peak_memory_sees_activations_that_reuse_freed_blocks():
    memory = harness.PeakMemory(torch.device("cpu"))
    if memory.kind is None:
        pytest.skip("no /proc/self/clear_refs: peak RSS cannot be reset here")

    def call():  # 100 blocks of 600 KB, like ViT-B/16 activations at B = 1: glibc keeps them after free
        blocks = [torch.ones(150_000) for _ in range(100)]
        return sum(float(b[0]) for b in blocks)
    call()  # the warm-up frees its blocks; the timed call reuses them
    memory.start()
    call()
    assert memory.stop() >= 40  # ~57 MiB


@pytest.mark.parametrize("argv, expect", [
    (["--batch-sizes", "0"], "batch sizes must be integers >= 1"),
    (["--batch-sizes", "1,x"], "comma-separated list of integers"),
    (["--backends", "eager,warp_drive"], "unknown backend(s) ['warp_drive']"),
    (["--iters", "0"], "must be >= 1"),
    (["--classes", "0"], "must be >= 1"),
    (["--mode", "sideways"], "invalid choice"),
    (["--device", "meta"], "only cpu and cuda"),
    (["--device", "banana"], "is not a device"),
    (["--ckpt", "/nonexistent/ckpt.pt"], "file not found"),
    (["--out", "/nonexistent/dir/r.json"], "does not exist"),
])
def test_bad_options_fail_with_one_line(argv, expect, capsys):
    assert run_cli(latency.main, ["--quick", *argv], prog=latency.PROG) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench/latency.py: error: ") and expect in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    assert run_cli(latency.main, ["--device", "cuda"], prog=latency.PROG) == 2
    assert "CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert run_cli(latency.main, ["--quick", "--plot", "x.png"], prog=latency.PROG) == 2
    assert "pip install 'nearl-rt[bench]'" in capsys.readouterr().err


def test_backend_override_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("NEARL_RT_BACKEND", "torch")
    assert run_cli(latency.main, ["--quick"], prog=latency.PROG) == 2
    assert "unset it" in capsys.readouterr().err


def test_script_error_has_no_traceback():
    proc = run_script("--quick", "--backends", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"bench/latency.py: error: argument --backends: unknown backend(s) ['nope']; choose from all, "
        f"{', '.join(BACKENDS)} (see bench/latency.py --help)"]


def test_export_sources_exist():
    """The files whose content keys the export cache: a moved one would leave stale exports undetected."""
    from nearl_rt.bench.backends import EXPORT_SOURCES, ROOT
    missing = [rel for rel in EXPORT_SOURCES if not (ROOT / rel).is_file()]
    assert not missing, missing
