"""bench/gpu_suite.sh: the CPU dry run (every step, tiny shapes, wheels installed privately) writes its
summary and at most 8 files; the deadline logic never gives a step more than the time left."""
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from argparse import Namespace
from pathlib import Path

import torch
import triton

from bench import suite
from nearl_rt.kernels.resources import TABLE_TRITON

ROOT = Path(__file__).resolve().parents[1]


def fake_wheel(folder: Path) -> str:
    """A minimal valid pure-Python wheel, so the --wheels path is exercised without a network."""
    name = "nearl_suite_probe"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "__version__ = '1.0'\n")
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n")
        z.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return name


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    probe = fake_wheel(wheels)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PYTHON=sys.executable, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", str(out), "--dry-run", "--wheels", str(wheels)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["dry_run"] and summary["budget_s"] == 470
    by_step = {s["step"]: s for s in summary["steps"]}
    assert list(by_step) == ["environment", "resources", "cuda_tests", "kernels", "latency", "launches"]
    for name, s in by_step.items():
        assert s["status"] == "ok", s
        assert 0 < s["timeout_s"] <= summary["budget_s"] and s["seconds"] <= s["timeout_s"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.json", "summary.md", "suite.log", "env.json", "kernels.json",
                                "latency.json", "launches.json"} <= set(files), files
    machine = json.loads((out / "env.json").read_text())
    assert machine["nearl_rt_import"] == "ok" and machine["triton_interpret"] == "1"
    # the versions it runs with, against those checked, printed before any other step runs
    checked = machine["checked"]
    assert checked["triton"][:2] == [triton.__version__, list(TABLE_TRITON)]
    assert checked["triton"][2] == (triton.__version__ in TABLE_TRITON)
    assert checked["torch"][0] == torch.__version__ and checked["torch"][1] == list(suite.CHECKED_TORCH)
    versions = next(line for line in proc.stdout.splitlines() if "CUDA" in line and "triton" in line)
    assert proc.stdout.index(versions) < proc.stdout.index("resources "), "versions before the resources step"
    assert f"triton {triton.__version__} (" in versions and f"torch {torch.__version__} (" in versions
    # the resources step ran first after the environment, with --check, on this machine's Triton
    assert "--check" in by_step["resources"]["command"]
    resources = json.loads((out / "resources.json").read_text())
    assert resources["triton"] == triton.__version__ and resources["problems"] == [] and resources["rows"]
    site = [p for p in machine["pythonpath"].split(":") if "nearl-suite-site" in p]
    assert len(site) == 1 and (Path(site[0]) / probe / "__init__.py").is_file()
    assert importlib.util.find_spec(probe) is None, "the wheel went into the private directory only"
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["complete"] and kernels["smoke"] and all(r["status"] == "ok" for r in kernels["rows"])
    latency = json.loads((out / "latency.json").read_text())
    assert {r["mode"] for r in latency["results"]} == {"bidirectional", "text_cacheable"}
    assert {r["backend"] for r in latency["results"] if r["status"] == "ok"} == {"frozen_clip", "eager"}
    launches = json.loads((out / "launches.json").read_text())
    assert {r["forward"] for r in launches["rows"]} == {"frozen_clip", "nearl_torch"}
    report = (out / "summary.md").read_text()
    assert "| latency | ok |" in report and "| eager |" in report and "| oca_image | 1 | fwd |" in report
    assert f"Resources (triton {triton.__version__}, {len(resources['rows'])} rows compiled): every row fits" in report
    assert report.strip() in proc.stdout


def test_deadline_cuts_timeouts_to_the_time_left(tmp_path):
    py = sys.executable
    sleep = [py, "-c", "import time; time.sleep(30)"]
    plan = [suite.Step("slow", sleep, max_s=100, min_s=1), suite.Step("quick", [py, "-c", "pass"], max_s=100, min_s=1),
            suite.Step("too_big", [py, "-c", "pass"], max_s=100, min_s=50),
            suite.Step("probe", [py, "-m", "nonexistent_module_xyz"], max_s=100, min_s=0.5, absent="no/such/file.py")]
    args = Namespace(outdir=str(tmp_path), budget=6.0, dry_run=True, wheels=None)
    assert suite.run_suite(args, plan) == 1
    steps = {s["step"]: s for s in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    # slow: 6 s budget minus 1 + 50 + 0.5 kept for later steps leaves nothing: it may use what is left, not more
    assert steps["slow"]["timeout_s"] <= 6.0
    assert steps["slow"]["status"] in ("skipped", "timeout")
    assert steps["too_big"]["status"] == "skipped" and "needed" in steps["too_big"]["reason"]
    assert steps["probe"]["status"] == "absent"
    assert sum(s.get("seconds", 0) for s in steps.values()) <= 7.5


def test_budget_is_enforced_on_the_first_step(tmp_path):
    py = sys.executable
    plan = [suite.Step("slow", [py, "-c", "import time; time.sleep(30)"], max_s=100, min_s=1),
            suite.Step("after", [py, "-c", "pass"], max_s=100, min_s=1)]
    assert suite.run_suite(Namespace(outdir=str(tmp_path), budget=4.0, dry_run=True, wheels=None), plan) == 1
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps[0]["status"] == "timeout" and steps[0]["timeout_s"] <= 3.0 and steps[0]["seconds"] < 4.0
    assert steps[1]["status"] in ("ok", "skipped")


def test_wheels_folder_without_wheels_is_one_clear_line(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", str(tmp_path / "o"), "--wheels", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"bench/gpu_suite.sh: error: no .whl files in {tmp_path} (make them with: bash bench/gpu_suite.sh "
        f"--prepare-wheels {tmp_path})"]


def test_pyproject_bounds_state_the_checked_releases():
    """triton's bound spans the releases the resource table and interpreter tests are checked on; torch's floor
    is the oldest torch checked (docs/gpu-suite.md#versions)."""
    text = (ROOT / "pyproject.toml").read_text()
    minors = sorted(tuple(int(x) for x in v.split(".")[:2]) for v in TABLE_TRITON)
    (lo_major, lo_minor), (hi_major, hi_minor) = minors[0], minors[-1]
    bound = f'"triton>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1};'
    assert text.count('"triton>=') == text.count(bound) == 2, bound  # the gpu and dev extras
    oldest_torch = min(suite.CHECKED_TORCH, key=lambda v: tuple(int(x) for x in v.split(".")))
    assert f'"torch>={oldest_torch},' in text


def test_report_names_unchecked_versions_and_rows_that_do_not_fit(tmp_path):
    """What a GPU run on another toolchain shows before any timing: the release it was not checked on, and the
    first rows of the resource table that spill."""
    env = {"python": "3.12.3", "cuda": "13.0", "gpu": None,
           "checked": suite.toolchain_checks("2.10.1+cu128", "3.5.1")}
    (tmp_path / "env.json").write_text(json.dumps(env))
    problems = [f"sm_90 _use_fwd vit_b16 use_image+own_text fp16 fwd B={b}: 48 B of register spill > 0 B"
                for b in range(1, 8)]
    (tmp_path / "resources.json").write_text(json.dumps({"triton": "3.5.1", "problems": problems, "rows": [{}] * 78}))
    line = suite.versions_line(env)
    assert line == ("Python 3.12.3, CUDA 13.0; torch 2.10.1+cu128 (not among the checked "
                    f"{', '.join(suite.CHECKED_TORCH)}), triton 3.5.1 (not among the checked {', '.join(TABLE_TRITON)})")
    report = suite.markdown_report(tmp_path, {"dry_run": False, "budget_s": 470, "steps": []})
    assert line in report
    assert f"Resources (triton 3.5.1, 78 rows compiled): 7 do not fit: {problems[0]}" in report
    assert problems[4] in report and problems[5] not in report and report.rstrip().endswith("...")
    checked = suite.toolchain_checks("2.11.0+cu130", TABLE_TRITON[0])
    assert checked["torch"][2] and checked["triton"][2]
