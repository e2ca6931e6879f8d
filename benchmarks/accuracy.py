"""Accuracy figures of the README, one command each.

    python benchmarks/accuracy.py tutorial-paper-10 --data data/cifar10-jpeg
    python benchmarks/accuracy.py default-paper-10  --data data/cifar10-jpeg
    python benchmarks/accuracy.py default-cifar-10  --data data/cifar10-jpeg
    python benchmarks/accuracy.py default-cifar-long --data data/cifar10-jpeg [--epochs N]

Each trains with train.py's code (validation split of 5,000, seed 0), evaluates the final
epoch's weights once on the test set (flip TTA reported separately) and writes
runs/accuracy/<experiment>.json with the per-epoch metrics and times. Any train.py option
after the experiment's name overrides it (e.g. --lr 0.1).

--emulate bfloat16 (or float16) trains in float32 rounded as autocast would round
(precision.emulate_autocast): what bf16 costs in accuracy, measured on a CPU.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import precision  # noqa: E402
import train  # noqa: E402

PAPER_10 = ["--no-small-input", "--epochs", "10"]
CIFAR_10 = ["--small-input", "--epochs", "10"]
# The accuracy ingredients, added one at a time to the default recipe: "<name>-paper-10" on
# the paper's network (short enough for a CPU), "<name>-cifar-10" on the CIFAR option. Each
# run also reports the recipe without the average: it is validated beside the weights.
INGREDIENTS = {
    "ema": ["--ema", "0.98"],
    "strong": ["--ema", "0.98", "--trivial-augment", "--cutout", "12"],
}
EXPERIMENTS = {
    # The tutorial: its recipe on its network (the paper's strides), 10 epochs.
    "tutorial-paper-10": ["--recipe", "tutorial", *PAPER_10],
    # This project's recipe on the same network, and on the CIFAR option.
    "default-paper-10": ["--recipe", "default", *PAPER_10],
    "default-cifar-10": ["--recipe", "default", *CIFAR_10],
    "default-cifar-long": ["--recipe", "default", "--small-input", "--epochs", "60"],
    **{
        f"{name}-{network}-10": ["--recipe", "default", *layout, *options]
        for name, options in INGREDIENTS.items()
        for network, layout in (("paper", PAPER_10), ("cifar", CIFAR_10))
    },
    # The long recipe on the CIFAR option; "-all" trains on all 50,000 images (no validation).
    "long-cifar-100": ["--recipe", "long", "--small-input", "--epochs", "100"],
    "long-cifar-100-all": ["--recipe", "long", "--small-input", "--epochs", "100", "--val-size", "0"],
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in EXPERIMENTS:
        raise SystemExit(f"usage: accuracy.py EXPERIMENT [train.py options]; EXPERIMENT is one of {list(EXPERIMENTS)}")
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--emulate", choices=["bfloat16", "float16"])
    args, overrides = parser.parse_known_args(argv[1:])
    name = argv[0] + (f"-emulated-{args.emulate}" if args.emulate else "")
    out = Path(__file__).resolve().parents[1] / "runs" / "accuracy" / f"{name}.json"
    # argparse keeps the last value of an option, so the overrides win.
    train_argv = [*EXPERIMENTS[argv[0]], "--run-name", name, "--metrics-out", str(out), *overrides]
    if not args.emulate:
        return train.main(train_argv)
    dtype = getattr(torch, args.emulate)
    return train.main(
        train_argv,
        adapt_network=lambda net: precision.emulate_autocast(net, dtype),
        extra={"emulated_autocast": args.emulate},
    )


if __name__ == "__main__":
    main()
