"""nearl_rt/bench/int8.py: exported files side by side (size, interleaved latency, closeness to the first file)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from nearl_rt.bench import int8 as bench_int8
from nearl_rt.core.session import NearlSession
from nearl_rt.core.cli import run_cli
from tests.export_cases import exported, exported_int8


def test_rows_compare_each_file_with_the_first(tmp_path, capsys):
    fp32, q = exported("text_cacheable"), exported_int8("text_cacheable")
    out = tmp_path / "int8.json"
    code = run_cli(bench_int8.main, [str(fp32), str(q), "--batch-sizes", "1", "3", "--iters", "2", "--warmup", "0",
                                     "--threads", "1", "--out", str(out)], prog=bench_int8.PROG)
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["threads"] == 1 and "cpu" in doc["machine"]
    rows = {(r["file"], r["batch_size"]): r for r in doc["rows"]}
    assert sorted(rows) == sorted((str(f), b) for f in (fp32, q) for b in (1, 3))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)  # compare()'s first input
    expected = np.abs(NearlSession(q).run(x)[1] - NearlSession(fp32).run(x)[1]).max()
    for b in (1, 3):
        ref, got = rows[(str(fp32), b)], rows[(str(q), b)]
        assert ref["speedup"] == 1.0 and ref["max_abs_prob_diff"] == 0.0 and ref["top1_agreement"] == 1.0
        assert ref["precision"] == "fp32" and got["precision"] == "int8" and got["method"] == "dynamic"
        assert got["speedup"] == pytest.approx(ref["median_ms"] / got["median_ms"])
        assert got["size_mib"] == pytest.approx(q.stat().st_size / 2**20)
        assert 0 < got["max_abs_prob_diff"] < 0.05  # tiny-model int8 moves probabilities by 0.005-0.03 here
    assert rows[(str(q), 1)]["max_abs_prob_diff"] >= expected - 1e-7  # max over 4 inputs includes the first
    assert "max|dprob|" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path, capsys):
    fp32 = exported("text_cacheable")
    for argv, match in (([str(tmp_path / "missing.onnx")], "not found: "),
                        ([str(fp32), "--iters", "0"], "must be >= 1"),
                        ([str(fp32), "--out", str(tmp_path / "no" / "r.json")], "does not exist")):
        assert run_cli(bench_int8.main, argv, prog=bench_int8.PROG) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{bench_int8.PROG}: error: ") and match in err and len(err.strip().splitlines()) == 1


def test_runs_as_a_script(tmp_path):
    proc = subprocess.run([sys.executable, "nearl_rt/bench/int8.py", str(tmp_path / "missing.onnx")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"{bench_int8.PROG}: error: not found: "), proc.stderr
