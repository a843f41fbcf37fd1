import os

# Triton must see this before any @triton.jit is defined. Without a GPU the fused kernels run in the
# interpreter on CPU (CI); with one they compile for it. Checked without importing torch (which could
# import triton first): the NVIDIA driver's control device.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.path.exists("/dev/nvidiactl") else "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Real chest X-rays shipped with the tests (tests/data/README.md: source, licence, sha256).
DATA = Path(__file__).resolve().parent / "data" / "pneumoniamnist_balanced_28.npz"


@pytest.fixture
def pneumonia_npz():
    return DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
