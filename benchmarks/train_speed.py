"""Training speed: the tutorial's way against this project's default path, in one run.

Both train the same network with the same batch size, optimizer and augmentation (random
crop with padding 4 and horizontal flip), on whatever device is present:

  tutorial  torchvision ImageFolder + DataLoader (2 workers) decoding JPEG files and
            transforming one image at a time; float32, NCHW; the tutorial's loop, which
            calls torch.cuda.empty_cache() and reads loss and accuracy with .item() every batch.
  project   utils.get_loaders' in-memory loader (decoded once, augmented a batch at a time on
            the device) and utils.train_one_epoch: float16 autocast with a gradient scaler on
            CUDA, no per-batch synchronisation, in both memory layouts (NCHW and
            channels_last); train() picks the faster one (utils.channels_last_is_faster),
            marked "default".
  --compile adds the default path through torch.compile (train(compile=True)), compiled
            during the warm-up batches.

    python benchmarks/train_speed.py --data data/cifar10-jpeg            # CIFAR option
    python benchmarks/train_speed.py --data data/cifar10-jpeg --paper-strides
The last line is "speedup: N.NNx": the project's default path over the tutorial's, in images/s.
"""

import argparse
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


def project_steps(net, loader, optimizer, criterion, device, steps, warmup, channels_last, compile=False):
    """utils.train_one_epoch over ``warmup`` batches, then timed over ``steps`` batches."""
    net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if compile:
        net = utils.compiled(net)
    amp_dtype = utils.autocast_dtype(device, None)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="image folder with train/ and test/ (default: a synthetic one)")
    parser.add_argument("--steps", type=int, help="timed batches per path (default: 3 on the CPU, 100 on a GPU)")
    parser.add_argument("--warmup", type=int, help="untimed batches first (default: 1 on the CPU, 20 on a GPU)")
    parser.add_argument("--batch-size", type=int, default=utils.RECIPES["default"]["batch_size"])
    parser.add_argument("--paper-strides", action="store_true", help="the paper's network instead of the CIFAR option")
    parser.add_argument("--device")
    parser.add_argument("--compile", action="store_true", help="also time the default path through torch.compile")
    args = parser.parse_args()

    device = utils.get_device(args.device)
    on_cpu = device.type == "cpu"
    steps = args.steps or (3 if on_cpu else 100)
    warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 20)
    small_input = not args.paper_strides
    tmp = tempfile.TemporaryDirectory()
    data = args.data or synthetic_folder(Path(tmp.name) / "synthetic")
    cache_root = Path(tmp.name) if args.data is None else utils.DATA_DIR

    import torchvision
    from torchvision import transforms

    train_images, train_labels, _ = utils.load_split(data, "train", root=cache_root)
    mean, std = utils.channel_stats(train_images)
    per_image = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip
    folder = torchvision.datasets.ImageFolder(data / "train", transform=per_image)
    tutorial_loader = torch.utils.data.DataLoader(folder, args.batch_size, shuffle=True, num_workers=2)
    project_loader = utils.InMemoryLoader(train_images, train_labels, args.batch_size, mean, std,
                                          shuffle=True, augment=True, drop_last=True, device=device)  # fmt: skip
    needed = warmup + steps
    if min(len(tutorial_loader), len(project_loader)) < needed:
        raise SystemExit(f"{data} has too few images for {needed} batches of {args.batch_size}.")

    def fresh():
        utils.set_seed(0)
        net = MobileNetV2(len(folder.classes), small_input=small_input).to(device)
        return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True), nn.CrossEntropyLoss()

    print(f"MobileNetV2 ({'CIFAR option' if small_input else 'paper strides'}), batch {args.batch_size}, "
          f"{steps} timed steps after {warmup} warm-up, {data}")  # fmt: skip
    net, optimizer, criterion = fresh()
    rows = [("tutorial: DataLoader, per-image transforms, fp32, NCHW",
             tutorial_steps(net, tutorial_loader, optimizer, criterion, device, steps, warmup))]  # fmt: skip
    default_layout = utils.channels_last_is_faster(net, device)  # what train() would pick
    amp_dtype = utils.autocast_dtype(device, None)
    amp = f"{str(amp_dtype).removeprefix('torch.')} autocast" if amp_dtype else "fp32"
    for channels_last in (False, True):
        net, optimizer, criterion = fresh()
        speed = project_steps(net, project_loader, optimizer, criterion, device, steps, warmup, channels_last)
        layout = "channels_last" if channels_last else "NCHW"
        default = " (default)" if channels_last == default_layout else ""
        rows.append((f"project: in-memory batches, {amp}, {layout}{default}", speed))
    speedup = rows[1 + default_layout][1] / rows[0][1]
    if args.compile:
        net, optimizer, criterion = fresh()
        speed = project_steps(net, project_loader, optimizer, criterion, device, steps, warmup, default_layout, True)
        rows.append(("project: the default path, torch.compile", speed))

    baseline = rows[0][1]
    print(f"\n{'path':<62}{'images/s':>10}{'vs tutorial':>13}")
    for name, speed in rows:
        print(f"{name:<62}{speed:>10.1f}{speed / baseline:>12.2f}x")
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads)")  # fmt: skip
    print(f"speedup: {speedup:.2f}x")


if __name__ == "__main__":
    main()
