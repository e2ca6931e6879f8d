"""How exact are mixed-precision gradients for this network? One training batch, one gradient
per precision, each compared with the same gradient computed in float64.

For a freshly initialised network (and, with --checkpoint, a trained one) it prints the loss
and the cosine similarity between each gradient and the float64 one: over all parameters, for
the first convolution alone and for the classifier alone (1.0000 = the same direction).
Float32 is the control. Autocast runs on the device chosen, so on a GPU this measures cuDNN's
bf16/fp16 kernels; on a CPU without bf16 instructions it is slow (tens of seconds a batch).

    python benchmarks/precision.py --data data/cifar10-jpeg --paper-strides
    python benchmarks/precision.py --data data/cifar10-jpeg --checkpoint model/mobilenetv2_last.pth

emulate_autocast() makes a float32 network compute as if under bf16/fp16 autocast, on any
CPU: benchmarks/accuracy.py --emulate uses it to measure what bf16 costs in accuracy where
there is no GPU (and no fast bf16 on the CPU).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from model import MobileNetV2  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "float16")


class _Round(torch.autograd.Function):
    """Identity that rounds its input to ``dtype`` on the way forward and its gradient on
    the way back, as a cast into and out of a low-precision kernel does."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.dtype != torch.float16:
            return grad.to(ctx.dtype).to(grad.dtype), None
        # fp16 trains with a GradScaler, which keeps gradients inside fp16's range: scale by a
        # power of two (exact) so that the largest lands just below 2**14, round, scale back.
        scale = 2.0 ** (14 - torch.log2(grad.abs().amax().clamp_min(1e-30)).ceil())
        return (grad * scale).to(ctx.dtype).to(grad.dtype) / scale, None


def emulate_autocast(net, dtype=torch.bfloat16):
    """Make ``net`` (float32) round like autocast to ``dtype``: the inputs, weights and outputs
    of every convolution and linear layer, and the outputs of BatchNorm, forward and backward.
    Accumulation stays in float32, as in cuDNN's kernels. The weights and state_dict are
    untouched; only ``forward`` of those layers changes."""

    def low(x):
        return _Round.apply(x, dtype)

    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.forward = lambda x, m=m: low(m._conv_forward(low(x), low(m.weight), m.bias))
        elif isinstance(m, nn.Linear):
            m.forward = lambda x, m=m: low(F.linear(low(x), low(m.weight), m.bias))
        elif isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda module, inputs, output: low(output))
    return net


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
    width = max(len(name) for name, _, _ in states) + 2
    print(
        f"{'weights':<{width}}{'network':<15}{'precision':<11}{'loss':>8}{'all':>9}{'first conv':>12}{'classifier':>12}"
    )
    for name, config, state in states:
        network = "CIFAR option" if config["small_input"] else "paper strides"
        for precision, loss, total, first, last in compare(config, state, batch, batch_labels, device, label_smoothing):
            print(f"{name:<{width}}{network:<15}{precision:<11}{loss:>8.4f}{total:>9.4f}{first:>12.4f}{last:>12.4f}")


if __name__ == "__main__":
    main()
