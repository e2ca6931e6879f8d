"""Training speed: the tutorial's way against this project's default path, in one run.

Both train the same network with the same batch size, optimizer and augmentation (random
crop with padding 4 and horizontal flip), on whatever device is present. Every row runs in a
process of its own, from the same seed, so that no row inherits another's memory, and reports
that process's peak resident memory:

  tutorial  torchvision ImageFolder + DataLoader (2 workers) decoding JPEG files and
            transforming one image at a time; float32, NCHW; the tutorial's loop, which
            calls torch.cuda.empty_cache() and reads loss and accuracy with .item() every batch;
            glibc's default allocator, as the tutorial's reader has it.
  project   utils.get_loaders' in-memory loader (decoded once, augmented a batch at a time on
            the device) and utils.train_one_epoch: float16 autocast with a gradient scaler on
            CUDA, no per-batch synchronisation, in both memory layouts (NCHW and
            channels_last); train() picks the faster one (utils.channels_last_is_faster),
            marked "default". Freed memory is kept in the process (utils.keep_freed_memory).
  allocator the default path again with glibc's default allocator
            (MOBILENETV2_KEEP_FREED_MEMORY=0); the line "allocator fix: N.NNx" is the default
            row over this one.
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
import utils  # noqa: E402
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
    rather than through utils.compiled, which takes no mode and hides a failed compile."""
    net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if compile_mode is not None:
        torch.compiler.reset()  # each mode compiles from scratch, not on top of the previous one
        net = torch.compile(net, mode=compile_mode)
    kwargs = {"amp_dtype": amp_dtype, "scaler": utils.grad_scaler(device, amp_dtype), "channels_last": channels_last,
              "progress": False}  # fmt: skip
    utils.train_one_epoch(net, FirstBatches(loader, warmup), optimizer, criterion, device, **kwargs)
    synchronize(device)
    start = time.perf_counter()
    result = utils.train_one_epoch(net, FirstBatches(loader, steps), optimizer, criterion, device, **kwargs)
    synchronize(device)
    return result["count"] / (time.perf_counter() - start)


def synthetic_folder(root, per_class=300):
    """An image folder of synthetic JPEGs, for machines without the CIFAR-10 copy."""
    from PIL import Image

    for split in ("train", "test"):
        images, labels, classes = utils.make_synthetic(split, train_size=per_class * 10, test_size=100)
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
    parser.add_argument("--row", type=json.loads, help=argparse.SUPPRESS)  # one row, in the process main() starts
    return parser.parse_args(argv)


def time_row(args, row):
    """Time one row in this process: images/s after the warm-up batches."""
    device = utils.get_device(args.device, verbose=False)
    on_cpu = device.type == "cpu"
    steps = args.steps or (3 if on_cpu else 100)
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 20)
    data = Path(row["data"])
    train_images, train_labels, classes = utils.load_split(data, "train", root=Path(row["cache_root"]))
    mean, std = utils.channel_stats(train_images)
    if row["loop"] == "tutorial":
        import torchvision
        from torchvision import transforms

        per_image = transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])  # fmt: skip
        folder = torchvision.datasets.ImageFolder(data / "train", transform=per_image)
        loader = torch.utils.data.DataLoader(folder, args.batch_size, shuffle=True, num_workers=2)
    else:
        loader = utils.InMemoryLoader(train_images, train_labels, args.batch_size, mean, std,
                                      shuffle=True, augment=True, drop_last=True, device=device)  # fmt: skip
    if len(loader) < warmup + steps:
        raise SystemExit(f"{data} has too few images for {warmup + steps} batches of {args.batch_size}.")

    utils.set_seed(0)
    net = MobileNetV2(len(classes), small_input=not args.paper_strides).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    criterion = nn.CrossEntropyLoss()
    if row["loop"] == "tutorial":
        return tutorial_steps(net, loader, optimizer, criterion, device, steps, warmup)
    return project_steps(net, loader, optimizer, criterion, device, steps, warmup, row["layout"] == "channels_last",
                         AMP_DTYPES[row["amp_dtype"]], row.get("compile_mode"))  # fmt: skip


def run_row(row, keep_freed_memory=True):
    """Run one row in a fresh process; its images/s and peak resident memory, or its error."""
    env = {**os.environ, "MOBILENETV2_KEEP_FREED_MEMORY": "1" if keep_freed_memory else "0"}
    command = [sys.executable, __file__, *sys.argv[1:], "--row", json.dumps(row)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not lines:
        return {"images_per_s": None, "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return json.loads(lines[-1][len("ROW ") :])


def main():
    args = parse_args()
    if args.row is not None:  # a child process: one row, one line of JSON
        speed = time_row(args, args.row)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes
        print("ROW " + json.dumps({"images_per_s": speed, "peak_rss_mb": round(peak_mb),
                                   "keeps_freed_memory": utils.KEEPS_FREED_MEMORY}))  # fmt: skip
        return

    device = utils.get_device(args.device)
    on_cpu = device.type == "cpu"
    steps = args.steps or (3 if on_cpu else 100)
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 20)
    small_input = not args.paper_strides
    tmp = tempfile.TemporaryDirectory()
    data = args.data or synthetic_folder(Path(tmp.name) / "synthetic")
    cache_root = Path(tmp.name) if args.data is None else utils.DATA_DIR
    utils.load_split(data, "train", root=cache_root)  # decoded here once; each row reads the cache
    source = {"data": str(data), "cache_root": str(cache_root)}

    device_default = next(name for name, dtype in AMP_DTYPES.items() if dtype == utils.autocast_dtype(device, None))
    precisions = args.amp_dtype or [device_default]
    compile_modes = args.compile_mode or (["default"] if args.compile else [])
    default_layout = utils.channels_last_is_faster(MobileNetV2(small_input=small_input), device)  # train()'s pick
    network = "CIFAR option" if small_input else "paper strides"
    print(f"MobileNetV2 ({network}), batch {args.batch_size}, {steps} timed steps after {warmup} warm-up, {data}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    record = {"device": device_name, "threads": torch.get_num_threads(), "network": network,
              "batch_size": args.batch_size, "steps": steps, "warmup": warmup, "rows": []}  # fmt: skip

    def add_row(name, row, keep_freed_memory=True, **details):
        result = run_row({**row, **source}, keep_freed_memory)
        speed = result["images_per_s"]
        baseline = record["rows"][0]["images_per_s"] if record["rows"] else speed
        if speed is None and not row.get("compile_mode"):  # only a compiled row may fail and leave the others
            raise SystemExit(f"{name}: failed: {result['error']}")
        if speed is None:
            print(f"{name}: failed: {result['error']}")
        vs_tutorial = speed / baseline if speed is not None else None
        record["rows"].append({**row, "path": name, **details, **result, "vs_tutorial": vs_tutorial})
        save()
        return speed

    def save():
        if args.json:
            utils.atomic_write(args.json, json.dumps(record, indent=2))  # never half a file

    add_row("tutorial: DataLoader, per-image transforms, fp32, NCHW, glibc malloc", {"loop": "tutorial"},
            keep_freed_memory=False)  # fmt: skip
    for precision in precisions:
        for channels_last in (False, True):
            layout = layout_name(channels_last)
            default = channels_last == default_layout and precision == precisions[0]
            speed = add_row(f"project: in-memory batches, {precision_name(precision)}, {layout}{' (default)' if default else ''}",
                            {"loop": "project", "amp_dtype": precision, "layout": layout}, default=default)  # fmt: skip
            if default:
                default_speed, default_row = speed, {"loop": "project", "amp_dtype": precision, "layout": layout}
    record["speedup"] = default_speed / record["rows"][0]["images_per_s"]
    glibc_speed = add_row("allocator: the default path with glibc malloc", default_row, keep_freed_memory=False)
    record["allocator_speedup"] = default_speed / glibc_speed
    save()
    for mode in compile_modes:
        add_row(f"project: the default path, torch.compile {mode}, {precision_name(precisions[0])}",
                {**default_row, "compile_mode": mode})  # fmt: skip

    width = max(62, *(len(row["path"]) + 2 for row in record["rows"]))
    print(f"\n{'path':<{width}}{'images/s':>10}{'vs tutorial':>13}{'peak MB':>9}")
    for row in record["rows"]:
        if row["images_per_s"] is None:
            print(f"{row['path']:<{width}}{'failed':>10}")
        else:
            print(
                f"{row['path']:<{width}}{row['images_per_s']:>10.1f}{row['vs_tutorial']:>12.2f}x{row['peak_rss_mb']:>9}"
            )
    print(f"device: {device} ({device_name}, {torch.get_num_threads()} threads)")
    print(f"allocator fix: {record['allocator_speedup']:.2f}x")
    print(f"speedup: {record['speedup']:.2f}x")


if __name__ == "__main__":
    main()
