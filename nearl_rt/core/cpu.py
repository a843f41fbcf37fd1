"""The CPU cores a serving runtime should use: one intra-op thread per physical core.

Hyper-threads share a core's vector units, so a second thread per core adds contention, not arithmetic; the
GEMMs that dominate a ViT run at the speed of the physical cores (docs/export.md#threads). onnxruntime and
OpenVINO both default to that count themselves; NearlSession sets it explicitly (and records it), so the
figure is the same on every runtime and visible in what a benchmark reports.
"""
from __future__ import annotations

import os
from pathlib import Path

_TOPOLOGY = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (Linux: sysfs topology of its affinity mask; elsewhere,
    or when the topology cannot be read, the logical CPU count)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = _TOPOLOGY / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))
