#!/usr/bin/env bash
# CI, second half: nearl-rt as a user installs it (a wheel, a fresh venv with transformers), run from a
# directory outside the checkout. The wheel must install `nearl_rt` alone at the top level (no PyPI
# distribution's name, no stdlib name), and Hugging Face's `kernels` (which transformers needs) stays intact.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/nearl-installed.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
python3 -m pip wheel --quiet --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/nearl_rt-*.whl)
python3 .ci/wheel_names.py "$wheel"
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$wheel[cpu,hf,triton]"
echo "installed: wheel + cpu,hf,triton extras in $(( $(date +%s) - start )) s, venv $(du -sh "$work/venv" | cut -f1)"
mkdir "$work/outside" && cd "$work/outside"
python - <<'PY'
import nearl_rt, transformers
from kernels import get_kernel  # Hugging Face's kernels, not ours
assert "site-packages" in nearl_rt.__file__, nearl_rt.__file__
print(f"nearl_rt {nearl_rt.__version__} from {nearl_rt.__file__}; transformers {transformers.__version__}; "
      f"kernels.get_kernel {get_kernel.__module__}")
PY
nearl-rt demo --out demo --no-progress >demo.log 2>&1 || { cat demo.log; exit 1; }
tail -n 3 demo.log
nearl-export demo/run/best.pt -o exported.onnx
data=$(python -c "import nearl_rt.demo as d; print(d.DEMO_DATA)")
nearl-rt info demo/run/best.pt >/dev/null
nearl-rt evaluate demo/run --data "$data" --split test | tail -n 2
nearl-rt predict demo/run/best.pt "$data/test/normal" --topk 1 | tail -n 2
nearl-rt triton exported.onnx --repo repo --cpu | tail -n 1
python - <<'PY'
import glob, os, sys
import numpy as np
from nearl_rt import NearlSession
import nearl_rt
images = sorted(glob.glob(os.path.join(os.path.dirname(nearl_rt.__file__), "demo_data", "test", "*", "*.png")))
top = NearlSession("exported.onnx").predict(images, top_k=1)
assert len(top) == len(images) == 16 and all(0.0 <= p <= 1.0 for (_, p), in top), top
assert "torch" not in sys.modules, "NearlSession imported torch"
print(f"NearlSession.predict on {len(images)} installed demo images: {top[0]}")
PY
python - <<'PY'
import warnings
import torch
import nearl_rt
warnings.simplefilter("ignore", nearl_rt.RandomBackboneWarning)
model = nearl_rt.build_model("tiny_bert", backend="torch").eval()
model.set_classes(["normal lungs", "pneumonia"])
with torch.no_grad():
    probs = model.classify(torch.randn(2, 3, *model.preprocess_cfg["size"])).softmax(-1)
assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))
print(f"tiny_bert (timm ViT + Hugging Face BERT) built and ran: probs {probs[0].tolist()}")
PY
python -m nearl_rt.bench.latency --help >/dev/null
nearl-bench --help >/dev/null && nearl-rt triton --help >/dev/null && nearl-rt serve --help >/dev/null
echo "installed-package checks passed in $(( $(date +%s) - start )) s"
