import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
# Two threads at most: CI machines have two cores, and oversubscribing them slows every test.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def offline_cifar():
    """The real CIFAR-10 image folder, for the few tests that want it; skipped where absent."""
    folder = ROOT / "data" / "cifar10-jpeg"
    if not (folder / "train").is_dir():
        pytest.skip("real CIFAR-10 folder data/cifar10-jpeg not present")
    return folder
