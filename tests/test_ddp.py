"""torchrun with 2 CPU processes (gloo, DistributedDataParallel) trains the same adapters as 1 process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from nearl_rt import train
from nearl_rt.core.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(pneumonia_npz, tmp_path):
    # batch 3 over 8 images: global batches of 3, 3, 2 split 2+1, 2+1, 1+1 across the processes,
    # so the test also covers uneven shares (each process's loss is weighted by its share of the batch).
    # SGD: Adam's g / sqrt(v) amplifies the summation-order differences of near-zero gradients.
    args = ["--data", str(pneumonia_npz), "--preset", "tiny", "--shots", "4", "--epochs", "2", "--batch-size", "3",
            "--optimizer", "sgd", "--lr", "0.05", "--no-progress", "--device", "cpu"]
    assert run_cli(train.main, [*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "nearl_rt.train", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 2/2") == 1  # only rank 0 reports and writes
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["adapter"]
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["adapter"]
    assert one.keys() == two.keys()
    assert all(one[k].abs().max() > 0 for k in one if k.endswith("w_o"))  # it trained (W_o starts at 0)
    for k in one:  # float32 gradients summed in another order: ~1e-7 relative after a few steps
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    log = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
           for r in ("one", "two")]
    for a, b in zip(*log):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and a["train_accuracy"] == b["train_accuracy"]
    assert (tmp_path / "one" / "shots.json").read_text() == (tmp_path / "two" / "shots.json").read_text()
