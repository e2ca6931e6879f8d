"""Training speed: the tutorial's way against this project's default path, in one run.

Both train the same network with the same batch size, optimizer and augmentation (random
crop with padding 4 and horizontal flip), on whatever device is present:

  tutorial  torchvision ImageFolder + DataLoader (2 workers) decoding JPEG files and
            transforming one image at a time; float32, NCHW; the tutorial's loop, which
            calls torch.cuda.empty_cache() and reads loss and accuracy with .item() every batch.
  project   utils.get_loaders' in-memory loader (decoded once, augmented a batch at a time on
            the device) and utils.train_one_epoch: float16 autocast with a gradient scaler on
            CUDA, no per-batch synchronisation, in both memory layouts (NCHW and
            channels_last); train() picks the faster one (runtime.channels_last_is_faster),
            marked "default".
  allocator on the CPU, the default path twice more, each in a fresh process from the same
            seed: with freed memory kept in the process (runtime.keep_freed_memory, on wherever
            the project's modules are imported, so in the rows above too) and with glibc's
            default malloc (MOBILENETV2_KEEP_FREED_MEMORY=0), each with its peak resident
            memory. The line "allocator fix: N.NNx" is the first over the second.
  --amp-dtype float16 bfloat16 none times the project's path in each precision (default: the
            device's default, float16 on CUDA and float32 on the CPU).
  --compile adds the default path through torch.compile (train(compile=True)), compiled
            during the warm-up batches; --compile-mode MODE [MODE ...] adds one such row per
            torch.compile mode ("reduce-overhead" adds CUDA graphs), in the first precision.
  --json OUT writes the rows as JSON, rewritten after each row, so that a run stopped part
            way keeps the rows it finished.

    python benchmarks/train_speed.py --data data/cifar10-jpeg            # CIFAR option
    python benchmarks/train_speed.py --data data/cifar10-jpeg --paper-strides
    python benchmarks/train_speed.py --data data/cifar10-jpeg --amp-dtype float16 bfloat16 none \
        --compile-mode default max-autotune-no-cudagraphs reduce-overhead --json runs/speed.json
The last line is "speedup: N.NNx": the project's default path (in the first precision) over
the tutorial's, in images/s.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoints  # noqa: E402
import runtime  # noqa: E402
import utils  # noqa: E402
from images import make_synthetic  # noqa: E402
from model import MobileNetV2  # noqa: E402


class FirstBatches:
    """The first ``count`` batches of a loader, with len(): enough to time a few steps."""

    def __init__(self, loader, count):
        self.loader, self.count = loader, count

    def __len__(self):
        return self.count

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.count:
                return
            yield batch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tutorial_steps(net, loader, optimizer, criterion, device, steps, warmup):
    """The tutorial's training loop, timed after ``warmup`` batches."""
    net.train()
    batches = iter(loader)
    start, images_seen = None, 0
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        im, label = next(batches)
        im, label = im.to(device), label.to(device)
        optimizer.zero_grad()
        if hasattr(torch.cuda, "empty_cache"):
            torch.cuda.empty_cache()
        outputs = net(im)
        loss = criterion(outputs, label)
        loss.backward()
        optimizer.step()
        train_loss = loss.item()  # noqa: F841  (the tutorial sums these per batch)
        train_acc = (outputs.argmax(1) == label).sum().item() / label.size(0)  # noqa: F841
        images_seen += len(label) if step >= warmup else 0
    synchronize(device)
    return images_seen / (time.perf_counter() - start)


def project_steps(net, loader, optimizer, criterion, device, steps, warmup, channels_last, amp_dtype,
                  compile_mode=None):  # fmt: skip
    """utils.train_one_epoch over ``warmup`` batches, then timed over ``steps`` batches.

    compile_mode: a torch.compile mode, or None for eager. torch.compile is called here
    rather than through runtime.compiled, which would hide a failed compile."""
    net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if compile_mode is not None:
        torch.compiler.reset()  # each mode compiles from scratch, not on top of the previous one
        net = torch.compile(net, mode=compile_mode)
    kwargs = {"amp_dtype": amp_dtype, "scaler": runtime.grad_scaler(device, amp_dtype), "progress": False}
    utils.train_one_epoch(net, FirstBatches(loader, warmup), optimizer, criterion, **kwargs)
    synchronize(device)
    start = time.perf_counter()
    result = utils.train_one_epoch(net, FirstBatches(loader, steps), optimizer, criterion, **kwargs)
    synchronize(device)
    return result["count"] / (time.perf_counter() - start)


def synthetic_folder(root, per_class=300):
    """An image folder of synthetic JPEGs, for machines without the CIFAR-10 copy."""
    from PIL import Image

    for split in ("train", "test"):
        images, labels, classes = make_synthetic(split, train_size=per_class * 10, test_size=100)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg", quality=75)
    return root


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "none": None}
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]


def precision_name(precision):
    """How a row names one of AMP_DTYPES' keys."""
    return "fp32" if precision == "none" else f"{precision} autocast"


def layout_name(channels_last):
    return "channels_last" if channels_last else "NCHW"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="image folder with train/ and test/ (default: a synthetic one)")
    parser.add_argument("--steps", type=int, help="timed batches per path (default: 3 on the CPU, 100 on a GPU)")
    parser.add_argument("--warmup", type=int, help="untimed batches first (default: 1 on the CPU, 20 on a GPU)")
    parser.add_argument("--batch-size", type=int, default=utils.RECIPES["default"]["batch_size"])
    parser.add_argument("--paper-strides", action="store_true", help="the paper's network instead of the CIFAR option")
    parser.add_argument("--device")
    parser.add_argument("--amp-dtype", nargs="+", choices=list(AMP_DTYPES),
                        help="precisions of the project's path, the first one the default's (default: the device's)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also time the default path through torch.compile")
    parser.add_argument("--compile-mode", nargs="+", choices=COMPILE_MODES,
                        help="one compiled row per torch.compile mode (implies --compile)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file as they are measured")
    parser.add_argument("--row", type=json.loads, help=argparse.SUPPRESS)  # the default path, in a process of its own
    return parser.parse_args(argv)


def allocator_row(row, keep_freed_memory):
    """The default path timed in a fresh process, with or without runtime.keep_freed_memory:
    its images/s and peak resident memory."""
    env = {**os.environ, "MOBILENETV2_KEEP_FREED_MEMORY": "1" if keep_freed_memory else "0"}
    command = [sys.executable, __file__, *sys.argv[1:], "--row", json.dumps(row)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the allocator row failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("ROW ") :])


def main():
    args = parse_args()
    device = runtime.get_device(args.device, verbose=args.row is None)
    on_cpu = device.type == "cpu"
    steps = args.steps or (3 if on_cpu else 100)
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 20)
    small_input = not args.paper_strides
    if args.row is not None:  # a child process of allocator_row: the parent's data and cache
        data, cache_root = Path(args.row["data"]), Path(args.row["cache_root"])
    else:
        tmp = tempfile.TemporaryDirectory()  # kept until main() returns
        data = args.data or synthetic_folder(Path(tmp.name) / "synthetic")
        cache_root = Path(tmp.name) if args.data is None else utils.DATA_DIR

    train_images, train_labels, classes = utils.load_split(data, "train", root=cache_root)
    mean, std = utils.channel_stats(train_images)
    project_loader = utils.InMemoryLoader(train_images, train_labels, args.batch_size, mean, std,
                                          shuffle=True, augment=True, drop_last=True, device=device)  # fmt: skip
    if len(project_loader) < warmup + steps:
        raise SystemExit(f"{data} has too few images for {warmup + steps} batches of {args.batch_size}.")

    def fresh():
        utils.set_seed(0)
        net = MobileNetV2(len(classes), small_input=small_input).to(device)
        return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True), nn.CrossEntropyLoss()

    def project(channels_last, precision, compile_mode=None):
        net, optimizer, criterion = fresh()
        return project_steps(net, project_loader, optimizer, criterion, device, steps, warmup, channels_last,
                             AMP_DTYPES[precision], compile_mode)  # fmt: skip

    if args.row is not None:
        speed = project(args.row["layout"] == "channels_last", args.row["amp_dtype"])
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes
        print("ROW " + json.dumps({"images_per_s": speed, "peak_rss_mb": round(peak_mb),
                                   "keeps_freed_memory": runtime.KEEPS_FREED_MEMORY}))  # fmt: skip
        return

    import torchvision
    from torchvision import transforms

    per_image = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip
    folder = torchvision.datasets.ImageFolder(data / "train", transform=per_image)
    tutorial_loader = torch.utils.data.DataLoader(folder, args.batch_size, shuffle=True, num_workers=2)
    if len(tutorial_loader) < warmup + steps:
        raise SystemExit(f"{data} has too few images for {warmup + steps} batches of {args.batch_size}.")

    device_default = next(name for name, dtype in AMP_DTYPES.items() if dtype == runtime.autocast_dtype(device, None))
    precisions = args.amp_dtype or [device_default]
    compile_modes = args.compile_mode or (["default"] if args.compile else [])
    network = "CIFAR option" if small_input else "paper strides"
    print(f"MobileNetV2 ({network}), batch {args.batch_size}, {steps} timed steps after {warmup} warm-up, {data}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    record = {"device": device_name, "threads": torch.get_num_threads(), "network": network,
              "batch_size": args.batch_size, "steps": steps, "warmup": warmup, "rows": []}  # fmt: skip

    def add_row(path, speed, **details):
        baseline = record["rows"][0]["images_per_s"] if record["rows"] else speed
        vs_tutorial = speed / baseline if speed is not None else None
        record["rows"].append({"path": path, "images_per_s": speed, "vs_tutorial": vs_tutorial, **details})
        save()

    def save():
        if args.json:
            checkpoints.atomic_write(args.json, json.dumps(record, indent=2))  # never half a file

    net, optimizer, criterion = fresh()
    add_row("tutorial: DataLoader, per-image transforms, fp32, NCHW",
            tutorial_steps(net, tutorial_loader, optimizer, criterion, device, steps, warmup))  # fmt: skip
    default_layout = runtime.channels_last_is_faster(net, device)  # what train() would pick
    for precision in precisions:
        for channels_last in (False, True):
            speed = project(channels_last, precision)
            layout = layout_name(channels_last)
            default = channels_last == default_layout and precision == precisions[0]
            add_row(f"project: in-memory batches, {precision_name(precision)}, {layout}{' (default)' if default else ''}",
                    speed, amp_dtype=precision, layout=layout, default=default)  # fmt: skip
    speedup = record["rows"][1 + default_layout]["vs_tutorial"]
    record["speedup"] = speedup
    save()

    # The allocator, where training activations live in host memory: the default path again,
    # each time in a fresh process, with and without keeping freed memory.
    if on_cpu:
        row = {"amp_dtype": precisions[0], "layout": layout_name(default_layout), "data": str(data),
               "cache_root": str(cache_root)}  # fmt: skip
        for keep, name in ((True, "freed memory kept (the default)"), (False, "glibc's default malloc")):
            result = allocator_row(row, keep)
            add_row(f"allocator: the default path in a fresh process, {name}", result["images_per_s"],
                    peak_rss_mb=result["peak_rss_mb"], keeps_freed_memory=result["keeps_freed_memory"])  # fmt: skip
        record["allocator_speedup"] = record["rows"][-2]["images_per_s"] / record["rows"][-1]["images_per_s"]
        save()

    for mode in compile_modes:
        path = f"project: the default path, torch.compile {mode}, {precision_name(precisions[0])}"
        try:
            speed = project(default_layout, precisions[0], mode)
        except Exception as error:  # a mode this machine cannot compile is a result too; the other rows stand
            print(f"{path}: failed: {error!r}")
            add_row(path, None, amp_dtype=precisions[0], layout=layout_name(default_layout), compile_mode=mode,
                    error=repr(error))  # fmt: skip
        else:
            add_row(path, speed, amp_dtype=precisions[0], layout=layout_name(default_layout), compile_mode=mode)

    width = max(62, *(len(row["path"]) + 2 for row in record["rows"]))
    print(f"\n{'path':<{width}}{'images/s':>10}{'vs tutorial':>13}{'peak MB':>9}")
    for row in record["rows"]:
        peak = row.get("peak_rss_mb", "")
        if row["images_per_s"] is None:
            print(f"{row['path']:<{width}}{'failed':>10}")
        else:
            print(f"{row['path']:<{width}}{row['images_per_s']:>10.1f}{row['vs_tutorial']:>12.2f}x{peak:>9}")
    print(f"device: {device} ({device_name}, {torch.get_num_threads()} threads)")
    if on_cpu:
        print(f"allocator fix: {record['allocator_speedup']:.2f}x")
    print(f"speedup: {speedup:.2f}x")


if __name__ == "__main__":
    main()
