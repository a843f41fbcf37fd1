"""The GPU suite behind `bash bench/gpu_suite.sh OUTDIR`: every figure the project claims, in one run.

    bash bench/gpu_suite.sh OUTDIR [--budget 470] [--wheels DIR] [--compile] [--ort] [--dry-run]
    bash bench/gpu_suite.sh --prepare-wheels DIR [--python-version 3.12]    # on a connected machine

Steps, in order, under one deadline (--budget seconds from the start): each step's timeout is its own
maximum, cut to the time left after keeping a minimum for every later step, so it can never run past
the deadline; a step that no longer fits is recorded as skipped. Files in OUTDIR (at most 8):
summary.json (every step's status, written after each step), suite.log (every step's output), env.json,
resources.json, kernels.json, latency.json, launches.json, and summary.md: the tables of all of them in
Markdown (also printed at the end), to paste into bench/RESULTS.md.

--dry-run runs every step on the CPU with tiny shapes (Triton interpreter), so the suite itself is known
to work before GPU time is spent on it.

The suite prints the versions it runs with against those the project checked (TABLE_TRITON, CHECKED_TORCH),
and its first step after the environment compiles the kernels with the machine's own Triton and ptxas
(`python -m nearl_rt.kernels.resources --check`): a spill or a compile failure is known before any timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROG = "bench/gpu_suite.sh"
SCHEMA = "nearl-rt-gpu-suite/1"
# what the GPU image lacks (it has torch, triton, numpy, onnx, regex, tqdm, timm, safetensors, pillow, pytest)
WHEELS = ("open_clip_torch", "ftfy", "wcwidth")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
CUDA_TEST_FILES = ("tests/test_kernels_oca.py", "tests/test_kernels_use.py", "tests/test_backend_model.py",
                   "tests/test_cuda_graph.py")
# torch releases (major.minor) the CPU checks ran on: 2.11, the GPU image's, and CI's 2.14 (docs/gpu-suite.md)
CHECKED_TORCH = ("2.11", "2.14")
# what the resources step compiles: the geometry and dtype the later steps time, every batch, site and pass
# (30 distinct compiles for sm_90); the dry run one subset of it
RESOURCES_SUBSET = ("--geometry", "vit_b16", "--dtype", "fp16")
RESOURCES_DRY = ("--geometry", "vit_b16", "--dtype", "fp16", "--batch", "64", "--pass", "fwd")


@dataclass
class Step:
    name: str
    argv: list            # the command (run from the repository root)
    max_s: float          # its own timeout
    min_s: float          # below this much time it is not started
    output: str = ""      # its file in OUTDIR, if any
    absent: str = ""      # a module path that must exist, else the step is recorded as absent


def steps(out: Path, dry: bool, compile_: bool, ort: bool) -> list[Step]:
    py = sys.executable
    kernels = [py, "-m", "nearl_rt.bench.kernels", "--out", str(out / "kernels.json")]
    kernels += ["--smoke", "--ops", "oca_image", "use_attention_shared_text"] if dry else \
        [] if compile_ else ["--no-compile"]
    backends = ["frozen_clip", "eager", "triton", "frozen_clip_graphs", "cuda_graphs"]
    backends += ["torch_compile"] if compile_ else []
    backends += ["frozen_clip_ort_cuda", "ort_cuda_fp16"] if ort else []
    latency = [py, "-m", "nearl_rt.bench.latency", "--mode", "both", "--backends", ",".join(backends),
               "--out", str(out / "latency.json")]
    latency += ["--quick", "--device", "cpu", "--batch-sizes", "1,2", "--iters", "2", "--warmup", "0"] if dry else \
        ["--device", "cuda", "--batch-sizes", "1,8,64", "--iters", "30", "--warmup", "5"]
    tests = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TEST_FILES]
    tests += ["-k", "cuda"] if dry else []  # on a CPU the CUDA-only tests are collected and skip
    resources = [py, "-m", "nearl_rt.kernels.resources", "--arch", "sm_90", "--check",
                 "--json", str(out / "resources.json"), *(RESOURCES_DRY if dry else RESOURCES_SUBSET)]
    return [
        Step("environment", [py, "bench/suite.py", "env", str(out / "env.json")], 30, 5, "env.json"),
        Step("resources", resources, 45, 10, "resources.json", absent="nearl_rt/kernels/resources.py"),
        Step("cuda_tests", tests, 120, 30),
        Step("kernels", kernels + ["--time-budget", "{left}"], 120, 30, "kernels.json"),
        Step("latency", latency, 150, 40, "latency.json"),
        Step("launches", [py, "-m", "nearl_rt.bench.launches", "--out", str(out / "launches.json"), *(["--quick"] if dry else [])],
             90, 15, "launches.json"),
    ]


def run_suite(args, plan=None) -> int:
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    plan = steps(out, args.dry_run, args.compile, args.ort) if plan is None else plan
    summary = {"schema": SCHEMA, "dry_run": args.dry_run, "budget_s": args.budget, "started_unix": time.time(),
               "python": sys.executable, "wheels": args.wheels, "complete": False, "steps": []}
    log_path = out / "suite.log"
    with open(log_path, "a", buffering=1) as log:
        log.write(f"==== {PROG} {'--dry-run ' if args.dry_run else ''}budget {args.budget:g} s, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        for i, step in enumerate(plan):
            left = deadline - time.monotonic()
            reserve = sum(s.min_s for s in plan[i + 1:])
            timeout = min(step.max_s, left - reserve, left)
            record = {"step": step.name, "file": step.output or None, "timeout_s": round(max(timeout, 0), 1)}
            if step.absent and not (ROOT / step.absent).exists():
                record.update(status="absent", reason=f"{step.absent} is not in this checkout")
            elif timeout < step.min_s:
                record.update(status="skipped", reason=f"{left:.0f} s left, {step.min_s:g} s needed "
                                                       f"(+{reserve:g} s kept for later steps)")
            else:
                argv = [a.replace("{left}", f"{max(timeout - 15, 5):.0f}") for a in step.argv]
                record.update(command=shlex.join(argv), **_run(argv, timeout, log, step.name))
            summary["steps"].append(record)
            print(f"{PROG}: {step.name:12s} {record['status']:8s} {record.get('seconds', 0):6.1f} s"
                  f"{'  ' + record['reason'] if record.get('reason') else ''}", flush=True)
            if step.name == "environment" and (env := _load(out / "env.json")):
                print(f"{PROG}: {versions_line(env)}", flush=True)
            _write_json(out / "summary.json", summary)
    summary.update(complete=True, wall_s=round(time.monotonic() - start, 1))
    _write_json(out / "summary.json", summary)
    report = markdown_report(out, summary)
    (out / "summary.md").write_text(report + "\n")
    print(report, flush=True)
    print(f"{PROG}: {sum(s['status'] == 'ok' for s in summary['steps'])}/{len(plan)} steps ok in "
          f"{summary['wall_s']:.0f} s; {out / 'summary.json'}", flush=True)
    return 0 if all(s["status"] in ("ok", "absent") for s in summary["steps"]) else 1


def markdown_report(out: Path, summary: dict) -> str:
    """The steps, and the tables of the steps' JSON files that exist, in Markdown."""
    lines = [f"Suite{' (dry run)' if summary['dry_run'] else ''}: {summary.get('wall_s', 0):.0f} s of a "
             f"{summary['budget_s']:g} s budget", "", "| step | status | s | timeout s | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s.get('seconds', '-')} | {s['timeout_s']} | {s.get('reason', '')} |"
              for s in summary["steps"]]
    env = _load(out / "env.json")
    if env:
        gpu = env.get("gpu") or {}
        lines += ["", f"Machine: {gpu.get('name', 'no GPU')}" + (f", {gpu['sms']} SMs, L2 {gpu['l2_mib']:.0f} MiB, "
                  f"driver {gpu.get('nvidia_smi', {}).get('driver_version', '?')}" if gpu else "") +
                  f"; {versions_line(env)}"]
    resources = _load(out / "resources.json")
    if resources:
        problems = resources["problems"]
        verdict = f"{len(problems)} do not fit: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "") \
            if problems else "every row fits (no spill, shared memory within the limit)"
        lines += ["", f"Resources (triton {resources['triton']}, {len(resources['rows'])} rows compiled): {verdict}"]
    kernels = _load(out / "kernels.json")
    if kernels and kernels.get("table"):
        lines += ["", f"Kernels ({kernels['device']}, {kernels['dtype']}, copy {kernels['copy_GBps']} GB/s): "
                      f"`{kernels['command']}`", "", kernels["table"]]
    latency = _load(out / "latency.json")
    if latency:
        lines += ["", f"Latency: `{' '.join(latency['command'])}`", "",
                  "| mode | backend | B | median ms | p90/median | xCLIP | vs |", "|---|---|---|---|---|---|---|"]
        others = {}
        for r in latency["results"]:
            if r["status"] == "ok":
                flag = " (noisy)" if r["noisy"] else ""
                xclip = "-" if r["xclip"] is None else f"{r['xclip']:.2f}"
                lines.append(f"| {r['mode']} | {r['backend']} | {r['batch_size']} | {r['median_ms']:.3f} | "
                             f"{r['spread']:.2f}{flag} | {xclip} | {r['baseline']} |")
            else:
                others.setdefault((r["backend"], r["status"], r["reason"]), []).append(f"{r['mode']} B={r['batch_size']}")
        lines += [f"\n{status}: {name} ({', '.join(where)}): {reason}" for (name, status, reason), where in others.items()]
    launches = _load(out / "launches.json")
    if launches:
        lines += ["", f"Launches ({launches['counted']}, {launches['preset']})", "",
                  "| mode | B | forward | per forward | added per layer |", "|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['B']} | {r['forward']} | {r['per_forward']:.1f} | {r['added_per_layer']:+.1f} |"
                  for r in launches["rows"]]
    return "\n".join(lines)


def versions_line(env: dict) -> str:
    """Python, torch, CUDA and Triton of the run, each against the releases the project checked."""
    checked = env.get("checked", {})
    notes = [f"{name} {version} " + ("(checked)" if ok else f"(not among the checked {', '.join(among)})")
             for name, (version, among, ok) in checked.items()]
    return f"Python {env['python']}, CUDA {env.get('cuda')}; " + ", ".join(notes)


def toolchain_checks(torch_version: str, triton_version: str) -> dict:
    """name -> (running version, the checked releases, whether it is one of them)."""
    from nearl_rt.kernels.resources import TABLE_TRITON
    torch_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    return {"torch": (torch_version, list(CHECKED_TORCH), torch_minor in CHECKED_TORCH),
            "triton": (triton_version, list(TABLE_TRITON), triton_version in TABLE_TRITON)}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run(argv, timeout: float, log, name: str) -> dict:
    """Run one step in its own process group (killed whole at the timeout), output appended to the log."""
    log.write(f"\n==== step {name}: {shlex.join(argv)} (timeout {timeout:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"status": "timeout", "rc": None, "seconds": round(time.monotonic() - t0, 1),
                "reason": f"killed at its {timeout:.0f} s timeout"}
    seconds = round(time.monotonic() - t0, 1)
    log.write(f"==== step {name}: exit {rc} after {seconds} s\n")
    return {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": seconds,
            **({} if rc == 0 else {"reason": f"exit status {rc}; see suite.log"})}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def environment(path: Path) -> int:
    """GPU, SMs, L2, clocks, driver, and the versions that decide the speed; fails if nearl_rt cannot import."""
    import torch
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton_interpret": os.environ.get("TRITON_INTERPRET"),
           "pythonpath": os.environ.get("PYTHONPATH"), "gpu": None, "versions": {}}
    for module in ("triton", "numpy", "onnx", "onnxruntime", "open_clip", "ftfy", "wcwidth"):
        try:
            env["versions"][module] = __import__(module).__version__
        except Exception as e:  # noqa: BLE001 - recorded: absent or broken
            env["versions"][module] = f"unavailable ({type(e).__name__})"
    env["checked"] = toolchain_checks(torch.__version__, env["versions"]["triton"])
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_gib": round(p.total_memory / 2**30, 1), "l2_mib": getattr(p, "L2_cache_size", 0) / 2**20,
                      "nvidia_smi": _nvidia_smi()}
    error = None
    try:
        import nearl_rt  # noqa: F401 - the import every later step needs
    except ImportError as e:
        error = (f"nearl_rt cannot be imported ({e}); bring the missing packages as wheels: "
                 f"{PROG} OUTDIR --wheels DIR, with DIR from {PROG} --prepare-wheels DIR")
    env["nearl_rt_import"] = error or "ok"
    _write_json(path, env)
    print(json.dumps(env, indent=2))
    if error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _nvidia_smi() -> dict:
    fields = ("driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit",
              "temperature.gpu", "utilization.gpu")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": type(e).__name__}
    values = out.stdout.strip().splitlines()[0].split(", ") if out.returncode == 0 and out.stdout.strip() else []
    return dict(zip(fields, values)) if values else {"error": out.stderr.strip()[:200]}


def prepare_wheels(dest: Path, python_version: str) -> int:
    """Download the wheels the GPU image lacks, at the versions installed here, for `python_version`."""
    from importlib.metadata import PackageNotFoundError, version
    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise ValueError(f"{name} is not installed here; install the project first (pip install -e .)") from None
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            python_version, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)),
            "-d", str(dest), *pins]
    print(shlex.join(argv), flush=True)
    rc = subprocess.run(argv).returncode
    if rc == 0:
        print(f"{dest}: {', '.join(sorted(p.name for p in dest.glob('*.whl')))}; carry it and run "
              f"{PROG} OUTDIR --wheels {dest}")
    return rc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["env"]:
        return environment(Path(argv[1]))
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", nargs="?", help="where the suite's files go (created)")
    p.add_argument("--budget", type=float, default=470.0, help="overall deadline in seconds (default 470)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny shapes")
    p.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling)")
    p.add_argument("--ort", action="store_true", help="also onnxruntime CUDA (needs onnxruntime-gpu; exports)")
    p.add_argument("--wheels", help="(handled by gpu_suite.sh) wheel folder installed into a private directory")
    p.add_argument("--prepare-wheels", type=Path, metavar="DIR", help="download the wheels the GPU image lacks")
    p.add_argument("--python-version", default="3.12", help="the GPU image's Python, for --prepare-wheels")
    args = p.parse_args(argv)
    if args.prepare_wheels is not None:
        return prepare_wheels(args.prepare_wheels, args.python_version)
    if not args.outdir:
        raise ValueError("give the output directory: bash bench/gpu_suite.sh OUTDIR")
    if args.budget <= 0:
        raise ValueError(f"--budget {args.budget:g}: give the overall deadline in seconds, e.g. --budget 470")
    return run_suite(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    try:  # not nearl_rt.core.cli: where open_clip is missing the suite still runs, and its environment step says so
        sys.exit(main())
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
