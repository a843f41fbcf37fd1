"""Timing, statistics, memory and machine info for the benchmarks.

Latency is wall-clock per call with the device synchronised before and after (cudaDeviceSynchronize
covers every stream, so onnxruntime's own CUDA stream is included). Warm-up calls are never timed, each
round feeds the next of several distinct input batches so caches cannot flatter the result, and the
backends take turns within every round (`time_rounds`) so that outside load hits them alike.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

SPREAD_FLAG = 1.5  # p90 / median above this: the machine was too noisy for the row
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory over a code region, in MiB (None where it cannot be measured).

    CUDA: torch.cuda.max_memory_allocated during the region (weights + activations held by torch's
    allocator; memory that onnxruntime allocates itself is invisible to it). CPU: growth of the peak
    resident set over the region (activations and workspaces; weights already resident are excluded),
    read from /proc after resetting the peak with /proc/self/clear_refs (Linux only). Free heap memory
    that glibc keeps for reuse is handed back first (malloc_trim), else a region that reuses the
    warm-up's freed blocks would show no growth at all.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = self.describe(device)
        self._base_rss = None

    @staticmethod
    def describe(device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            return "cuda_max_memory_allocated"
        if _STATUS.exists() and os.access(_CLEAR_REFS, os.W_OK):
            return "cpu_peak_rss_growth"
        return None

    def start(self) -> None:
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss_growth":
            gc.collect()
            _malloc_trim()
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            self._base_rss = _status_kib("VmRSS")

    def stop(self) -> Optional[float]:
        if self.kind == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cpu_peak_rss_growth":
            return max(_status_kib("VmHWM") - self._base_rss, 0) / 1024
        return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: the growth is then a lower bound
        pass


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {_STATUS}")


def time_rounds(fns: dict[str, Callable], inputs: Sequence, *, warmup: int, iters: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, BaseException]]:
    """Interleaved timing: `warmup` untimed then `iters` timed rounds, each calling every fn once on the
    round's input (the next of `inputs`), the order rotated by one place every round, so that load from
    other processes and clock changes hit all fns alike. Returns the ms of each fn's timed calls, and the
    exception of each fn that raised (it sits out the later rounds)."""
    if iters < 1 or warmup < 0 or not inputs:
        raise ValueError(f"need iters >= 1, warmup >= 0 and inputs; got iters={iters}, warmup={warmup}")
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, BaseException] = {}
    for r in range(warmup + iters):
        x = inputs[r % len(inputs)]
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in errors:
                continue
            try:
                synchronize(device)
                t0 = time.perf_counter_ns()
                fns[name](x)
                synchronize(device)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the others go on
                errors[name] = e
                continue
            if r >= warmup:
                times[name].append((time.perf_counter_ns() - t0) / 1e6)
    return {n: t for n, t in times.items() if n not in errors}, errors


def peak_memory(fn: Callable, x, device: torch.device, memory: PeakMemory) -> Optional[float]:
    """Peak memory (MiB, see PeakMemory) of one untimed call fn(x)."""
    synchronize(device)
    memory.start()
    fn(x)
    synchronize(device)
    return memory.stop()


def summarize(times_ms: Sequence[float], batch_size: int) -> dict:
    """median / p90 / p99 / mean / min in ms, spread (p90 / median) and images/s (from the median)."""
    t = np.asarray(times_ms, dtype=np.float64)
    median = float(np.median(t))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "min_ms": float(t.min()),
        "spread": float(np.percentile(t, 90)) / median,  # p90 / median: > SPREAD_FLAG marks a noisy row
        "images_per_s": batch_size * 1000.0 / median,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: report as not installed
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device) -> dict:
    """CPU/GPU names and the versions of everything that decides the speed."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "cuda": torch.version.cuda,
        "versions": {m: _version(m) for m in ("torch", "triton", "onnxruntime", "open_clip", "onnx", "numpy",
                                              "nearl_rt")},
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "driver": _nvidia_driver()}
    return info


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"\S+", out.stdout)
    return match.group(0) if out.returncode == 0 and match else None
