"""Accuracy figures of the README, one command each.

    python benchmarks/accuracy.py tutorial-paper-10 --data data/cifar10-jpeg
    python benchmarks/accuracy.py default-paper-10  --data data/cifar10-jpeg
    python benchmarks/accuracy.py default-cifar-10  --data data/cifar10-jpeg
    python benchmarks/accuracy.py default-cifar-long --data data/cifar10-jpeg [--epochs N]

Each trains with train.py's code (validation split of 5,000, seed 0), evaluates the final
epoch's weights once on the test set (flip TTA reported separately) and writes
runs/accuracy/<experiment>.json with the per-epoch metrics and times. Any train.py option
after the experiment's name overrides it (e.g. --lr 0.1).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

EXPERIMENTS = {
    # The tutorial: its recipe on its network (the paper's strides), 10 epochs.
    "tutorial-paper-10": ["--recipe", "tutorial", "--no-small-input", "--epochs", "10"],
    # This project's recipe on the same network.
    "default-paper-10": ["--recipe", "default", "--no-small-input", "--epochs", "10"],
    # This project's recipe on the CIFAR option.
    "default-cifar-10": ["--recipe", "default", "--small-input", "--epochs", "10"],
    "default-cifar-long": ["--recipe", "default", "--small-input", "--epochs", "60"],
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in EXPERIMENTS:
        raise SystemExit(f"usage: accuracy.py EXPERIMENT [train.py options]; EXPERIMENT is one of {list(EXPERIMENTS)}")
    name, overrides = argv[0], argv[1:]
    out = Path(__file__).resolve().parents[1] / "runs" / "accuracy" / f"{name}.json"
    # argparse keeps the last value of an option, so the overrides win.
    return train.main([*EXPERIMENTS[name], "--run-name", name, "--metrics-out", str(out), *overrides])


if __name__ == "__main__":
    main()
