"""Export a trained network for fast inference, away from the training code.

    python export.py model/mobilenetv2.pth --onnx model/mobilenetv2.onnx --pt2 model/mobilenetv2.pt2
    python export.py model/mobilenetv2.pth --onnx model/mobilenetv2.onnx --int8 model/mobilenetv2-int8.onnx
    python export.py model/mobilenetv2_last.pth --release model/pretrained/mobilenetv2-cifar10.pth

fold_batchnorm  the network with every BatchNorm folded into the convolution before it
export_onnx     an ONNX file with a dynamic batch size, for onnxruntime and other runtimes
export_program  a torch.export program (.pt2); torch.export.load(path).module() runs it
quantize_onnx   an int8 ONNX file, by static post-training quantisation on training images

Every export takes 32x32 RGB inputs normalised as predict.preprocess does (utils.normalize), any batch size,
and gives the logits the PyTorch network gives (int8: close to them).
"""

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

import checkpoints
import images
import utils


@torch.no_grad()
def fold_batchnorm(net):
    """A copy of ``net``, in eval mode, with every BatchNorm2d that follows a Conv2d in an
    nn.Sequential folded into that convolution and replaced by nn.Identity.

    In eval mode BatchNorm is a fixed affine map per channel,
        y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,
    so the convolution before it can apply it through its own weights and bias: the outputs
    stay the same and a third of the layers (and their memory traffic) go away.
    """
    net = copy.deepcopy(net).eval()
    for module in list(net.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for conv_name, bn_name in zip(names, names[1:], strict=False):
            conv, bn = module._modules[conv_name], module._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                _fold_into(conv, bn)
                setattr(module, bn_name, nn.Identity())
    return net


def _fold_into(conv, bn):
    # In float64 so that folding adds no rounding error of its own.
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter((bias * scale + shift).to(dtype))


def _cpu_copy_and_example(net):
    """A CPU copy in eval mode, an example batch and its dynamic batch dimension."""
    net = copy.deepcopy(net).cpu().eval()
    # Two images, not one: an example of size 1 would fix the batch size at 1.
    example = torch.zeros(2, 3, images.IMAGE_SIZE, images.IMAGE_SIZE)
    return net, example, ({0: torch.export.Dim("batch")},)


def export_onnx(net, path, opset=None):
    """Write ``net`` as ONNX (input "images" (N, 3, 32, 32), output "logits" (N, classes), any N),
    check the file with onnx.checker and return its path. ``opset`` None: the exporter's default."""
    net, example, dynamic_shapes = _cpu_copy_and_example(net)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net, (example,), path, input_names=["images"], output_names=["logits"], opset_version=opset,
        dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
    )  # fmt: skip
    onnx.checker.check_model(path, full_check=True)
    return path


def export_program(net, path):
    """Write ``net`` as a torch.export program (.pt2) with a dynamic batch size; return its path.
    It needs PyTorch but not this project: torch.export.load(path).module()(images)."""
    net, example, dynamic_shapes = _cpu_copy_and_example(net)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=dynamic_shapes), path)
    return path


def quantize_onnx(onnx_path, int8_path, calibration_images, batch_size=32, reduce_range=True):
    """Quantise an ONNX file from export_onnx to int8 and return the new file's path.

    calibration_images: normalised float images (N, 3, 32, 32), a few hundred training images;
    the range of every activation is measured on them. Weights are int8 per output channel
    (depthwise filters differ too much for one scale per layer), activations uint8.
    reduce_range=True keeps weights to 7 bits, which avoids overflowing the 16-bit sums of
    x86 CPUs without VNNI instructions; on CPUs with VNNI, False is slightly more accurate.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quant_pre_process, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = (
                {"images": calibration_images[i : i + batch_size].numpy()}
                for i in range(0, len(calibration_images), batch_size)
            )

        def get_next(self):
            return next(self.batches, None)

    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The recommended first step: shape inference, and BatchNorm folded into convolutions.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(onnx_path, prepared)
        quantize_static(
            prepared, int8_path, Batches(), per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    return int8_path


def calibration_batch(source, checkpoint, count=512, seed=0):
    """``count`` training images of a data source (see images.load_split), drawn at random and
    normalised with the checkpoint's mean and std, for quantize_onnx."""
    pictures, _, _ = images.load_split(source, "train")
    chosen = torch.randperm(len(pictures), generator=torch.Generator().manual_seed(seed))[:count]
    return utils.normalize(pictures[chosen], checkpoint["mean"], checkpoint["std"])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a checkpoint written by utils.train() for inference.")
    parser.add_argument("checkpoint", help="a .pth file written by train(), e.g. model/mobilenetv2.pth")
    parser.add_argument("--release", help="write the weights alone in float16, with their metadata, here")
    parser.add_argument("--onnx", help="write an ONNX file here")
    parser.add_argument("--pt2", help="write a torch.export program here")
    parser.add_argument("--int8", help="also write an int8 ONNX file here (needs --onnx)")
    parser.add_argument("--calibration-data", default="cifar10", help="training images for --int8 (images.load_split)")
    parser.add_argument("--calibration-size", type=int, default=512, help="images to calibrate --int8 on")
    parser.add_argument("--keep-batchnorm", action="store_true", help="export BatchNorm layers unfolded")
    args = parser.parse_args(argv)
    if not (args.release or args.onnx or args.pt2):
        parser.error("nothing to do: give --release, --onnx and/or --pt2")
    if args.int8 and not args.onnx:
        parser.error("--int8 quantises the ONNX file: give --onnx too")

    try:
        net, checkpoint = checkpoints.load_model(args.checkpoint, device="cpu")
    except (FileNotFoundError, checkpoints.CheckpointError) as error:
        sys.exit(f"error: {error}")
    written = []
    if args.release:
        # What model/pretrained/ ships: loadable by load_model, predict.py and hubconf.py.
        checkpoints.atomic_save(checkpoints.release_checkpoint(checkpoint), args.release)
        written.append(Path(args.release))
    if not args.keep_batchnorm:
        net = fold_batchnorm(net)
    if args.onnx:
        written.append(export_onnx(net, args.onnx))
    if args.pt2:
        written.append(export_program(net, args.pt2))
    if args.int8:
        images = calibration_batch(args.calibration_data, checkpoint, args.calibration_size)
        written.append(quantize_onnx(args.onnx, args.int8, images))
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
