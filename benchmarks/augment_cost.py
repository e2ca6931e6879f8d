"""What the in-memory loader's augmentations cost per epoch, side by side in one run.

Each row iterates the same loader over the same images (45,000 by default, as a CIFAR-10
epoch) with one more augmentation switched on, and reports the seconds per epoch; no network
is trained, so the figure is the augmentation's own cost, to compare with an epoch's training
time (about 110 s for the paper's network on a 2-core CPU, 3-4 s for the CIFAR option on an
H200).

    python benchmarks/augment_cost.py                       # synthetic images
    python benchmarks/augment_cost.py --data data/cifar10-jpeg --device cuda
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from images import make_synthetic  # noqa: E402

SETTINGS = {
    "crop + flip": {"augment": True},
    "crop + flip + Cutout 12": {"augment": True, "cutout": 12},
    "crop + flip + TrivialAugment": {"augment": True, "trivial_augment": True},
    "crop + flip + TrivialAugment + Cutout 12": {"augment": True, "trivial_augment": True, "cutout": 12},
}


def seconds_per_epoch(images, labels, device, batch_size, **augmentation):
    loader = utils.InMemoryLoader(images, labels, batch_size, (0.5,) * 3, (0.25,) * 3, shuffle=True,
                                  drop_last=True, device=device, **augmentation)  # fmt: skip
    next(iter(loader))  # warm-up: the first batch imports torchvision and allocates
    start = time.perf_counter()
    for _ in loader:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * len(images) / (len(loader) * batch_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic", help='"synthetic", "cifar10" or an image folder')
    parser.add_argument("--images", type=int, default=45_000, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device")
    args = parser.parse_args()

    device = utils.get_device(args.device)
    if args.data == "synthetic":
        images, labels, _ = make_synthetic("train", train_size=args.images)
    else:
        images, labels, _ = utils.load_split(args.data, "train")
    images, labels = images[: args.images], labels[: args.images]
    rows = [(name, seconds_per_epoch(images, labels, device, args.batch_size, **s)) for name, s in SETTINGS.items()]
    print(f"\n{'augmentation':<44}{'s/epoch':>9}{'vs crop + flip':>16}")
    for name, seconds in rows:
        print(f"{name:<44}{seconds:>9.3f}{seconds / rows[0][1]:>15.2f}x")
    print(f"{len(images)} images per epoch, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
