"""How exact are mixed-precision gradients for this network? One training batch, one gradient
per precision, each compared with the same gradient computed in float64.

For a freshly initialised network (and, with --checkpoint, a trained one) it prints the loss
and the cosine similarity between each gradient and the float64 one: over all parameters, for
the first convolution alone and for the classifier alone (1.0000 = the same direction).
Float32 is the control. Autocast runs on the device chosen, so on a GPU this measures cuDNN's
bf16/fp16 kernels; on a CPU without bf16 instructions it is slow (tens of seconds a batch).

    python benchmarks/precision.py --data data/cifar10-jpeg --paper-strides
    python benchmarks/precision.py --data data/cifar10-jpeg --checkpoint model/mobilenetv2_last.pth
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from model import MobileNetV2  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "float16")


def gradient(net, images, labels, precision, device, label_smoothing):
    """Per-parameter gradients of one batch's loss, as float64 vectors; and the loss."""
    net = net.to(device).train()
    images, labels = images.to(device), labels.to(device)
    if precision == "float64":
        net, images = net.double(), images.double()
    autocast = precision in ("bfloat16", "float16")
    dtype = getattr(torch, precision) if autocast else None
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        loss = F.cross_entropy(net(images), labels, label_smoothing=label_smoothing)
    loss.backward()
    return {name: p.grad.detach().double().flatten().cpu() for name, p in net.named_parameters()}, loss.item()


def compare(config, state, images, labels, device, label_smoothing):
    """Rows of (precision, loss, cosine all, cosine first conv, cosine classifier)."""

    def fresh():
        net = MobileNetV2(**{**config, "dropout": 0.0})  # dropout off: the same function in every precision
        net.load_state_dict(state)
        return net

    def cosine(grads, names):
        a = torch.cat([grads[n] for n in names])
        b = torch.cat([exact[n] for n in names])
        return F.cosine_similarity(a, b, dim=0).item()

    exact, _ = gradient(fresh(), images, labels, "float64", device, label_smoothing)
    first, last = next(iter(exact)), "classifier.1.weight"
    rows = []
    for precision in PRECISIONS:
        grads, loss = gradient(fresh(), images, labels, precision, device, label_smoothing)
        rows.append((precision, loss, cosine(grads, list(exact)), cosine(grads, [first]), cosine(grads, [last])))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic", help='"cifar10", "synthetic" or an image folder')
    parser.add_argument("--checkpoint", type=Path, help="also compare at these trained weights")
    parser.add_argument("--paper-strides", action="store_true", help="the paper's network instead of the CIFAR option")
    parser.add_argument("--batch-size", type=int, default=utils.RECIPES["default"]["batch_size"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device")
    args = parser.parse_args()

    device = utils.get_device(args.device)
    images, labels, classes = utils.load_split(args.data, "train")
    mean, std = utils.channel_stats(images)
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[: args.batch_size]
    batch, batch_labels = utils.normalize(images[pick], mean, std), labels[pick]
    label_smoothing = utils.RECIPES["default"]["label_smoothing"]

    torch.manual_seed(args.seed)
    initial = MobileNetV2(len(classes), small_input=not args.paper_strides)
    states = [("initialised", initial.config, initial.state_dict())]
    if args.checkpoint:
        trained, checkpoint = utils.load_model(args.checkpoint, device="cpu")
        states.append((f"{args.checkpoint.name}, epoch {checkpoint['epoch']}", trained.config, trained.state_dict()))

    print(f"one batch of {len(batch_labels)} from {args.data}; gradients against float64 on {device}; "
          "cosine similarity (1 = same direction)")  # fmt: skip
    print(f"{'weights':<34}{'network':<15}{'precision':<11}{'loss':>8}{'all':>9}{'first conv':>12}{'classifier':>12}")
    for name, config, state in states:
        network = "CIFAR option" if config["small_input"] else "paper strides"
        for precision, loss, total, first, last in compare(config, state, batch, batch_labels, device, label_smoothing):
            print(f"{name:<34}{network:<15}{precision:<11}{loss:>8.4f}{total:>9.4f}{first:>12.4f}{last:>12.4f}")


if __name__ == "__main__":
    main()
