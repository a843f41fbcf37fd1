"""The fused kernels fit the GPU: compiled offline for sm_90 (no GPU needed), shared memory and spills checked.

CI compiles a representative subset (ViT-B/16, bf16 and fp32, B = 64, inference and training passes of the
image-row sites: every kernel but the split combine at its largest per-program footprint, 18 compiles, ~20 s);
`python -m nearl_rt.kernels.resources` builds the full table (every geometry, dtype, batch and site, sm_90/sm_80).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nearl_rt.kernels.resources import ARCHS, SPILL_BOUND, blocks_per_sm, violations

ROOT = Path(__file__).resolve().parents[1]


def _ptxas():
    try:
        from triton import knobs
        path = knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001 - any failure to locate it means "absent"
        return None, f"triton's NVIDIA backend is not importable ({e})"
    return (path, "") if path and os.path.isfile(path) else (None, "ptxas is absent")


def test_violations_report_shared_memory_and_spills():
    arch = ARCHS["sm_90"]
    row = dict(kernel="_use_bwd", geometry="vit_b16", site="use_image+own_text", dtype="bf16", B=64,
               smem=311_296, spill_stores=0, regs=255, warps=8, **{"pass": "fwd+bwd"})
    assert blocks_per_sm(row, arch) == 0
    (msg,) = violations([row], arch)
    assert "311296 B of shared memory > 232448" in msg and "_use_bwd" in msg
    assert violations([dict(row, smem=arch.smem_per_block)], arch) == []
    (msg,) = violations([dict(row, smem=1024, spill_stores=SPILL_BOUND + 4)], arch)
    assert "register spill" in msg
    assert blocks_per_sm(dict(row, smem=57_344, regs=124), arch) == 2  # 8 warps x 124 regs: register-bound
    assert violations([dict(row, smem=170_000)], ARCHS["sm_80"])  # 163 KB per block on sm_80


def test_kernels_fit_sm90_offline(tmp_path):
    path, why = _ptxas()
    if path is None:
        pytest.skip(why)
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "nearl_rt.kernels.resources", "--arch", "sm_90", "--geometry", "vit_b16",
                           "--dtype", "bf16,fp32", "--batch", "64", "--site", "oca_image,use_image+own_text",
                           "--pass", "fwd,fwd+bwd", "--jobs", "2", "--json", str(out), "--check"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels >= {"_oca_fwd", "_oca_bwd_rows", "_oca_bwd_weights", "_ln_down_fwd", "_use_fwd", "_use_bwd"}
    for r in rows:
        assert 0 < r["smem"] <= ARCHS["sm_90"].smem_per_block and r["spill_stores"] <= SPILL_BOUND, r
        assert r["blocks_per_sm"] >= 1 and 0 < r["regs"] <= 255, r
    oca = next(r for r in rows if r["kernel"] == "_oca_fwd" and r["dtype"] == "bf16")
    assert oca["blocks_per_sm"] * ARCHS["sm_90"].sms >= oca["grid"][0] * oca["grid"][1], "B=64 OCA in one wave"
    assert "| sm_90 | vit_b16 |" in proc.stdout
