"""Helpers for the notebooks: device, data, recipes, training, evaluation, checkpoints, plots.

The tutorial's two calls work as written:

    Acc, Loss, Lr = train(net, trainloader, testloader, epoch, optimizer, criterion,
                          scheduler, save_path, tbwriter, verbose=True)
    plot_history(epoch, Acc, Loss, Lr)

The second loader given to ``train`` is the *validation* loader: it picks the best
checkpoint and drives ReduceLROnPlateau. The test set is left for the testing notebook.
"""

import contextlib
import ctypes
import hashlib
import inspect
import itertools
import math
import os
import pickle
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.optim import lr_scheduler
from tqdm.std import tqdm as std_tqdm

from model import MobileNetV2

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
MODEL_DIR = ROOT / "model"
LOG_DIR = ROOT / "logs"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Every image reaches the network at this size, CIFAR-10's own: the pictures of a data folder
# and those to classify are resized to it.
IMAGE_SIZE = 32
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
# Larger images are refused: a small file can claim dimensions that take gigabytes to decode
# (a "decompression bomb"). 100 megapixels admits the photos of any current camera.
MAX_PIXELS = 100_000_000
CHECKPOINT_FORMAT = "mobilenetv2-cifar10-checkpoint/1"
# What train() records per epoch; the first four are the metrics a checkpoint and TensorBoard show.
HISTORY = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
METRICS = HISTORY[:4]
EMA_EVERY = 5  # batches between two updates of the weight average (train's ``ema``)
BATCHNORM_BATCHES = 20  # training batches that give the average its BatchNorm statistics


# ----------------------------------------------------------------------------------------
# Device, distributed environment and reproducibility


def keep_freed_memory():
    """Keep freed memory in the process instead of handing it back to the OS (glibc only).

    glibc gives every block over 32 MB its own mmap and unmaps it when freed, so on the CPU each
    training step faults in and zero-fills its activations anew (one activation of the 32x32
    stage at batch 256 is 151 MB): half the time went to the kernel. With these two settings
    the CIFAR option trains about 2x faster on a 2-core CPU, for a higher peak memory
    (benchmarks/README.md, "The allocator"). Called when this module is imported, so every
    notebook and script has it; MOBILENETV2_KEEP_FREED_MEMORY=0 keeps glibc's defaults.
    Returns whether the settings took effect (False on macOS, Windows, musl, or when turned off).
    """
    if os.environ.get("MOBILENETV2_KEEP_FREED_MEMORY") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    # No block gets its own mmap, and freed memory at the top of the heap is never trimmed.
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


KEEPS_FREED_MEMORY = keep_freed_memory()


def distributed_env():
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def is_main_process():
    return distributed_env()[0] == 0


def get_device(device=None, verbose=True):
    """The device to train on: CUDA when present, else Apple MPS, else the CPU.

    ``device`` overrides the choice ("cpu", "cuda", "cuda:1", "mps"). Under torchrun each
    process takes the GPU of its local rank.
    """
    if device is None or device == "auto":
        _, world_size, local_rank = distributed_env()
        if torch.cuda.is_available():
            device = f"cuda:{local_rank}" if world_size > 1 else "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"Device {device} was asked for, but PyTorch sees no CUDA GPU here.")
    if verbose and is_main_process():
        if device.type == "cuda":
            count = torch.cuda.device_count()
            name = torch.cuda.get_device_name(device)
            print(f"Using device: {device} ({name}; {count} GPU{'s' if count > 1 else ''} visible)")
        else:
            print(f"Using device: {device}")
    return device


def set_seed(seed=0, deterministic=False):
    """Seed Python-side and PyTorch random numbers so that a run can be repeated.

    On the CPU the same seed gives the same losses. On a GPU some kernels are not
    deterministic unless ``deterministic=True`` (which is slower).
    """
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global generator that user code calls)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def unwrap_model(net):
    """The plain MobileNetV2 inside DataParallel / DistributedDataParallel / torch.compile."""
    while True:
        if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


def channels_last_is_faster(net, device):
    """Whether training ``net`` on ``device`` is faster in channels_last memory format, as
    measured with benchmarks/train_speed.py: yes on CUDA, and on the CPU for small_input;
    on the CPU the paper's network, whose late maps are 2x2 and 1x1, is faster in NCHW."""
    return device.type == "cuda" or bool(getattr(net, "config", {}).get("small_input", False))


def prepare_model(net, device=None, *, channels_last=None, sync_batchnorm=False, compile=False):
    """Make ``net`` ready to train, always in this order: device, memory format, SyncBatchNorm,
    DistributedDataParallel (under torchrun) or DataParallel (several GPUs in one process, as
    the tutorial does), torch.compile. DDP must come after the memory format, or it keeps
    gradient buckets of the wrong strides and copies every gradient.

    channels_last: None picks the faster layout (channels_last_is_faster). Under torchrun the
    process group must exist already (train.py starts it). A model that is already wrapped
    keeps its wrapping, so calling this twice is harmless.
    """
    device = get_device(device, verbose=False)
    wrapped = isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or hasattr(net, "_orig_mod")
    if not wrapped:
        if channels_last is None:
            channels_last = channels_last_is_faster(net, device)
        net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if distributed_env()[1] > 1:
            if not dist.is_initialized():
                raise RuntimeError("Under torchrun, start the process group before preparing the model (see train.py).")
            if sync_batchnorm:
                if device.type != "cuda":
                    raise ValueError(
                        "sync_batchnorm needs CUDA; on the CPU each process normalises over its own batch."
                    )
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        elif device.type == "cuda" and torch.cuda.device_count() > 1:
            net = nn.DataParallel(net)
    if compile and not hasattr(net, "_orig_mod"):
        net = compiled(net, mode=None if compile is True else compile)
    return net


class CompiledModel(nn.Module):
    """``torch.compile(module)`` that runs ``module`` eagerly, after one warning, if compiling
    fails. Its state_dict is the module's own, under ``_orig_mod.`` as torch.compile's is."""

    def __init__(self, module, mode=None):
        super().__init__()
        self._orig_mod = module
        # Kept out of the module tree, so that parameters and state_dict are not listed twice.
        self.__dict__["_compiled"] = torch.compile(module, mode=mode)

    def forward(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as error:  # dynamo and inductor raise many kinds; the eager run re-raises real bugs
                warnings.warn(f"torch.compile failed, running without it from now on: {error}", stacklevel=2)
                self.__dict__["_compiled"] = None
        return self._orig_mod(*args, **kwargs)


def compiled(model, mode=None):
    """``model`` through torch.compile (CompiledModel) in ``mode`` (None, "reduce-overhead"
    for CUDA graphs, "max-autotune-no-cudagraphs", ...), or ``model`` itself with a warning
    where compiling is not supported."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("torch.compile is not supported here; training without it.", stacklevel=2)
        return model
    return CompiledModel(model, mode)


def _all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


# ----------------------------------------------------------------------------------------
# Progress bars: widgets in a notebook front end, plain text in terminals and logs

# Where the text of a bar is kept instead of redrawn (papermill's --log-output, CI logs,
# files), each update is one more line, so it updates this often.
TEXT_PROGRESS_INTERVAL = 15  # seconds


def progress_bar(iterable, desc=None, total=None, disable=False, leave=True):
    """A tqdm bar over ``iterable`` (``set_postfix`` works): a widget in a notebook that a
    front end shows (JupyterLab, Jupyter Notebook, VS Code), plain text everywhere else.

    Plain text is what papermill (``make run``), a terminal and a log can show. In a terminal
    it redraws itself as usual; elsewhere it writes one update, with the rate and the time
    left, every TEXT_PROGRESS_INTERVAL seconds.
    """
    if _notebook_front_end():
        from tqdm.notebook import tqdm as widget_bar

        return widget_bar(iterable, desc=desc, total=total, disable=disable, leave=leave)
    options = {"desc": desc, "total": total, "disable": disable, "leave": leave, "file": sys.stderr}
    if not sys.stderr.isatty():
        # maxinterval too: tqdm's monitor thread would otherwise redraw a slow bar every 10 s.
        options.update(mininterval=TEXT_PROGRESS_INTERVAL, maxinterval=TEXT_PROGRESS_INTERVAL)
    return _TextBar(iterable, **options)


class _TextBar(std_tqdm):
    """tqdm's text bar, with a postfix that waits for the next update instead of writing one
    at once: where each update is a line of a log, a loop that sets one often adds many."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def _notebook_front_end():
    """Whether this runs in a Jupyter kernel whose notebook is open in a front end.

    papermill and nbclient run kernels without one: widgets then reach no screen, and the
    terminal of ``make run`` shows a bar's first frame only. jupyter_server, behind JupyterLab
    and Jupyter Notebook, starts its kernels with JPY_SESSION_NAME set, and VS Code defines
    ``__vsc_ipynb_file__`` in the notebook's namespace; papermill and nbclient do neither.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or "IPKernelApp" not in shell.config:
        return False  # plain Python, or IPython in a terminal
    return "JPY_SESSION_NAME" in os.environ or "__vsc_ipynb_file__" in shell.user_ns


# ----------------------------------------------------------------------------------------
# Data: reading images, decoding a folder once, splitting, normalising, augmenting batches


class ImageError(ValueError):
    """An input that cannot be read as an image; the message names the input."""


def image_files(folder):
    """Every image file in ``folder`` and its sub-folders (by suffix, in any case), sorted.

    Hidden files and folders, whose names start with a dot, are left out: among them the
    "._name.jpg" copies that macOS leaves next to each picture on some drives.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder at {folder}.")
    files = []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]  # not walked into
        files += [
            Path(parent, name)
            for name in names
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(files)


def decode_image(file, name=None):
    """Read an image file, a path or a binary file object, as an RGB PIL image (to_rgb).

    This is how both training (an image folder) and prediction read a picture. Images of
    more than MAX_PIXELS pixels are refused before their pixels are decoded. Raises
    ImageError, naming the file (or ``name``), for anything that is not a readable image.
    """
    name = str(file) if name is None else name
    if isinstance(file, (str, os.PathLike)) and os.path.getsize(file) == 0:
        raise ImageError(f"{name} is an empty file, not an image.")
    try:
        # Pillow warns from 89 megapixels and refuses from 179; MAX_PIXELS is checked instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
            image.load()
            return to_rgb(image, name)
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"{name} is refused as a possible decompression bomb: {error}, over the limit of "
            f"{MAX_PIXELS:,} (utils.MAX_PIXELS; raise it for a file you trust)."
        ) from error
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError(f"{name} is not an image, or not in a format Pillow reads.") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name} is not a readable image (truncated or damaged): {error}") from error


def to_rgb(image, name="image"):
    """A PIL image of any mode as RGB, the same way for every picture: turned upright by its
    EXIF orientation, the first frame of an animation, 16-bit values scaled to 8 bits, and
    transparent pixels laid over a white background."""
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name} has no pixels ({image.width}x{image.height}).")
    image = ImageOps.exif_transpose(image)  # a copy, upright as the camera was held
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own conversion clips 16-bit values at 255, which turns most pixels white.
        # "I" is how Pillow reads other 16-bit files, so it is scaled the same way.
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels have no colour of their own: show them as on a white page.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def image_pixels(image, size=IMAGE_SIZE):
    """A PIL image as the uint8 array (size, size, 3) that the network is given: resized with
    Pillow's antialiased bilinear filter, aspect ratio not kept. An image that is not RGB
    yet is converted with to_rgb first."""
    if image.mode != "RGB":
        image = to_rgb(image)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def load_split(source, split, root=DATA_DIR, skip_unreadable=False):
    """One split of a data set, decoded into memory.

    source: "cifar10" (torchvision's copy, downloaded into ``root`` on first use),
            "synthetic" (a small generated set for smoke runs and tests), or the path of a
            folder holding ``train/`` and ``test/``, each with one sub-folder per class (a
            relative path not found from the current folder is read from the project root).
    split:  "train" or "test".
    skip_unreadable: for a folder, leave out the images that cannot be decoded, with a
            warning that counts them, instead of stopping with an error that names them.
    Returns (images, labels, classes): images a uint8 tensor (N, 3, H, W), labels int64 (N,).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if source == "synthetic":
        return make_synthetic(split)
    if source == "cifar10":
        return _load_cifar10(split, Path(root))
    folder = Path(source)
    if not folder.is_absolute() and not folder.exists():
        folder = ROOT / folder  # notebooks run in notebooks/; data/... means the project's data/
    return _load_image_folder(folder, split, Path(root) / "cache", skip_unreadable)


def data_source_problem(source, root=DATA_DIR):
    """None when both splits of ``source`` load, else what stops them, as a message.

    ``make run`` asks this before the notebooks start, so that a missing network or a wrongly
    laid out folder is the first thing it reports rather than the end of a traceback. A
    folder's decoded images are cached on the way, so the notebooks do not decode them again.
    """
    try:
        for split in ("train", "test"):
            load_split(source, split, root)
    except (OSError, RuntimeError, ValueError) as error:
        return f"error: {error}"
    return None


def _load_cifar10(split, root):
    import torchvision

    try:
        dataset = torchvision.datasets.CIFAR10(root=root, train=split == "train", download=True)
    except Exception as error:  # no network, proxy, partial download...
        raise RuntimeError(
            f"Could not download CIFAR-10 into {root} ({error}). Without a network, use a copy laid "
            'out as image folders (README.md, "Data folders"): make run DATA=data/cifar10-jpeg, '
            'or DATA = "data/cifar10-jpeg" in the notebooks.'
        ) from error
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes)


def make_synthetic(split, num_classes=10, train_size=1000, test_size=200, seed=0):
    """A small learnable data set: each class is a coloured pattern, each image a noisy,
    shifted copy of its class's pattern, learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, 4, 4, generator=g) * 255
    patterns = F.interpolate(patterns, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    count = train_size if split == "train" else test_size
    g.manual_seed(seed + (1 if split == "train" else 2))
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=g)]
    noise = torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 25
    shifts = torch.randint(-3, 4, (count, 2), generator=g)
    images = patterns[labels] + noise
    images = torch.stack([img.roll(tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts, strict=True)])
    images = images.clamp(0, 255).to(torch.uint8)
    return images, labels, [f"class_{i}" for i in range(num_classes)]


def _class_folders(split_dir):
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_image_folder(folder):
    """Validate the layout and return (classes, {split: [(path, label), ...]})."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Data folder {folder} does not exist.")
    missing = [s for s in ("train", "test") if not (folder / s).is_dir()]
    if missing:
        raise ValueError(
            f"Data folder {folder} has no {' or '.join(m + '/' for m in missing)} sub-folder. "
            "Expected <folder>/train/<class>/<images> and <folder>/test/<class>/<images>."
        )
    classes = _class_folders(folder / "train")
    test_classes = _class_folders(folder / "test")
    if not classes:
        raise ValueError(f"{folder / 'train'} has no class sub-folders.")
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise ValueError(
            f"Class folders differ between {folder / 'train'} and {folder / 'test'}: "
            f"only in train: {only_train}, only in test: {only_test}."
        )
    files = {}
    for split in ("train", "test"):
        files[split] = []
        for label, name in enumerate(classes):
            class_dir = folder / split / name
            paths = image_files(class_dir)
            if not paths:
                raise ValueError(f"Class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            files[split] += [(p, label) for p in paths]
    return classes, files


def _decoding_fingerprint():
    """What decoded pixels depend on besides the files: the code of the decoding functions,
    Pillow's version and the image size. Part of the cache's key, so that a change to any
    of them decodes the folder again."""
    code = "".join(inspect.getsource(function) for function in (decode_image, to_rgb, image_pixels))
    return f"{IMAGE_SIZE}:{PIL.__version__}:{code}"


def _load_image_folder(folder, split, cache_dir, skip_unreadable=False):
    """Decode every image of a split once, as prediction decodes a picture; later runs read
    the decoded tensors from a cache file, whose name changes whenever a file in the folder
    or the decoding changes."""
    classes, files = _check_image_folder(folder)
    fingerprint = hashlib.sha1(_decoding_fingerprint().encode())
    for path, label in files[split]:
        stat = path.stat()
        fingerprint.update(f"{path.relative_to(folder)}:{label}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache_file = cache_dir / f"{folder.name}-{split}-{fingerprint.hexdigest()[:12]}.pt"
    if cache_file.is_file():
        decoded = torch.load(cache_file, weights_only=True)
    else:
        decoded = _decode_files(files[split], f"{folder.name}/{split}")
        decoded["classes"] = classes
        atomic_save(decoded, cache_file)

    unreadable = decoded["unreadable"]
    if unreadable:
        total = len(files[split])
        listed = "\n".join(f"  {message}" for message in unreadable[:5])
        more = f"\n  ... and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        summary = (
            f"{len(unreadable)} of the {total} images in {folder / split} cannot be read "
            f"(the other {total - len(unreadable)} are fine):\n{listed}{more}"
        )
        if not skip_unreadable:
            raise ImageError(f"{summary}\nFix or remove them, or load with skip_unreadable=True to leave them out.")
        if len(unreadable) == total:
            raise ImageError(summary)
        warnings.warn(f"{summary}\nThey are left out.", stacklevel=3)
    return decoded["images"], decoded["labels"], decoded["classes"]


def _decode_files(files, desc):
    """{"images", "labels"} of the readable files of [(path, label), ...], and "unreadable":
    the error message of each of the others."""

    def decode(path):
        try:
            return image_pixels(decode_image(path))
        except ImageError as error:
            return error  # kept, so that one bad file does not hide how many others there are

    paths = [path for path, _ in files]
    # PIL releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        decoded = pool.map(decode, paths, chunksize=256)
        results = list(progress_bar(decoded, desc=f"Decoding {desc}", total=len(paths)))
    readable = [i for i, result in enumerate(results) if not isinstance(result, ImageError)]
    images = np.array([results[i] for i in readable], dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)
    return {
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "labels": torch.tensor([files[i][1] for i in readable], dtype=torch.int64),
        "unreadable": [str(result) for result in results if isinstance(result, ImageError)],
    }


def stratified_split(labels, val_size, seed=0, classes=None):
    """Indices (train, val) with ``val_size`` training images held out for validation: a
    fraction (0.1 = 10 %) or a count. Each class gives its share, rounded, but at least one
    image, and keeps at least one to train on; the same seed gives the same split.

    classes: the class names, to name a class that has too few images (fewer than two).
    """
    n = len(labels)
    fraction = 0 < val_size < 1
    count = round(val_size * n) if fraction else int(val_size)
    if not 0 <= count < n:
        raise ValueError(f"val_size={val_size} must be at least 0 and below the {n} training images.")
    counts = torch.bincount(labels, minlength=len(classes) if classes is not None else 0)
    take = torch.zeros_like(counts)
    if val_size > 0:
        names = list(classes) if classes is not None else [str(c) for c in range(len(counts))]
        too_few = [f"{names[c]!r} ({k})" for c, k in enumerate(counts.tolist()) if k < 2]
        if too_few:
            raise ValueError(
                f"Classes with fewer than 2 training images cannot give one to validation and keep one "
                f"for training: {', '.join(too_few)}. Add images to them, or set val_size=0 (no validation)."
            )
        num_classes = len(counts)
        if fraction:
            count = max(count, num_classes)
        if not num_classes <= count <= n - num_classes:
            raise ValueError(
                f"val_size={val_size} must leave each of the {num_classes} classes at least one validation "
                f"image and one training image: between {num_classes} and {n - num_classes} images."
            )
        take = _validation_counts(counts, count)
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c, k in enumerate(take.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _validation_counts(counts, total):
    """How many images each class gives to a validation set of ``total``: in proportion to
    its size, between 1 and its size - 1."""
    quota = counts.double() * total / counts.sum()
    take = quota.floor().long().clamp(min=torch.ones_like(counts), max=counts - 1)
    # Hand out (or take back) the rounding difference one image at a time, to the class whose
    # share is furthest from its quota.
    while (missing := total - int(take.sum())) != 0:
        if missing > 0:
            c = torch.where(take < counts - 1, quota - take, -math.inf).argmax()
            take[c] += 1
        else:
            c = torch.where(take > 1, take - quota, -math.inf).argmax()
            take[c] -= 1
    return take


def channel_stats(images, chunk=4096):
    """Per-channel mean and std of uint8 images (N, 3, H, W), as fractions of 255."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].double() / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean**2).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def normalize(images, mean, std):
    """uint8 images (N, 3, H, W) to the float inputs the network sees: (x / 255 - mean) / std
    per channel. Training batches and prediction inputs both go through here."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean) / std


def random_crop_flip(images, padding=4, flip=True, generator=None):
    """Random crop with zero padding and random horizontal flip, for a whole batch at once.

    images: (N, C, H, W), any dtype, on any device. One gather does both: each image gets
    its own offsets, and a flip is the same gather with the columns read backwards.
    """
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    rows = dy + torch.arange(h, device=device)
    cols = torch.arange(w, device=device).expand(n, w)
    if flip:
        flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    cols = dx + cols
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def cutout(images, size, fill, generator=None):
    """Cutout (DeVries and Taylor, 2017) for a whole batch: in each image, one size x size
    square at a random centre, clipped by the border, set to ``fill`` (a value per channel).
    With the mean pixel as fill the square is zero after normalisation, as in the paper."""
    n, _, h, w = images.shape
    device = images.device
    top = torch.randint(0, h, (n, 1, 1), device=device, generator=generator) - size // 2
    left = torch.randint(0, w, (n, 1, 1), device=device, generator=generator) - size // 2
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    square = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return torch.where(square[:, None], fill.view(1, -1, 1, 1).to(images.dtype), images)


def trivial_augment(images, generator, group=8):
    """TrivialAugment Wide (Muller and Hutter, 2021) on uint8 images (N, 3, H, W): one op of
    torchvision's TrivialAugmentWide, at a random magnitude, per group of ``group`` images.

    torchvision draws one op for all the images of a call, so the (shuffled) batch is split
    into groups, each its own call: a batch of 256 sees 32 draws. ``generator``, a CPU
    generator, seeds each group's draws, so that a resumed epoch is augmented the same way.
    """
    from torchvision.transforms import v2

    policy = v2.TrivialAugmentWide()
    seeds = torch.randint(2**62, (math.ceil(len(images) / group),), generator=generator).tolist()
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator
        groups = []
        for chunk, seed in zip(images.split(group), seeds, strict=True):
            torch.manual_seed(seed)
            groups.append(policy(chunk))
    return torch.cat(groups)


class InMemoryLoader:
    """Batches of (images, labels) from a data set held whole, as uint8, on the device.

    Augmentation and normalisation are applied to a batch at once with tensor ops, so there
    are no worker processes and no per-image Python: ``augment`` random crop and flip,
    ``trivial_augment`` TrivialAugment Wide, ``cutout`` a square of that many pixels. It has
    ``len()`` and yields what a DataLoader yields, so it is a drop-in for one. Under torchrun
    each process reads its own share of every shuffled epoch.
    """

    def __init__(self, images, labels, batch_size, mean, std, shuffle=False, augment=False, drop_last=False, seed=0,
                 device="cpu", rank=0, world_size=1, classes=None, trivial_augment=False, cutout=0):  # fmt: skip
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.trivial_augment, self.cutout = trivial_augment, cutout
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        # What a checkpoint records of the data (data_info).
        self.classes, self.mean, self.std = classes, tuple(mean), tuple(std)
        # On the device once, so that normalising a batch copies nothing from the host.
        self._mean = torch.tensor(mean, device=self.device)
        self._std = torch.tensor(std, device=self.device)
        self._mean_pixel = (self._mean * 255).round().to(torch.uint8)  # cutout's fill

    def set_epoch(self, epoch):
        """Make the shuffle and augmentation of the next pass a function of ``epoch``."""
        self.epoch = epoch

    def _shard_size(self):
        n = len(self.labels)
        # Training shards must be equal, or DDP waits forever on the rank with more batches.
        return n // self.world_size if self.shuffle else len(range(self.rank, n, self.world_size))

    def __len__(self):
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        g = torch.Generator(device=self.device)
        n = len(self.labels)
        if self.shuffle:
            g.manual_seed(self.seed * 100_003 + epoch)  # the same order on every rank
            order = torch.randperm(n, device=self.device, generator=g)
            order = order[self.rank : self.world_size * self._shard_size() : self.world_size]
        else:
            order = torch.arange(self.rank, n, self.world_size, device=self.device)
        g.manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank + 1)
        policy_g = torch.Generator().manual_seed(g.initial_seed())  # on the CPU: no GPU sync per batch
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[idx]
            if self.augment:
                images = random_crop_flip(images, generator=g)
            if self.trivial_augment:
                images = trivial_augment(images, policy_g)
            if self.cutout:
                images = cutout(images, self.cutout, self._mean_pixel, generator=g)
            yield normalize(images, self._mean, self._std), self.labels[idx]


class TensorImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) and labels with per-image torchvision transforms."""

    def __init__(self, images, labels, transform, classes):
        self.images, self.labels, self.transform, self.classes = images, labels, transform, classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def image_transform(mean, std, augment, trivial_augment=False, cutout=0):
    """The per-image torchvision pipeline equivalent to InMemoryLoader's batch ops. Its
    cutout is RandomErasing of a square, which, unlike Cutout, stays inside the image."""
    from torchvision.transforms import v2

    steps = [v2.RandomCrop(IMAGE_SIZE, padding=4), v2.RandomHorizontalFlip()] if augment else []
    steps += [v2.TrivialAugmentWide()] if trivial_augment else []
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    area = cutout**2 / IMAGE_SIZE**2
    steps += [v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0)] if cutout else []
    return v2.Compose(steps)


def get_loaders(
    source="cifar10",
    root=DATA_DIR,
    batch_size=128,
    val_size=0.1,
    augment=True,
    fast=True,
    device=None,
    seed=0,
    eval_batch_size=512,
    num_workers=2,
    skip_unreadable=False,
    trivial_augment=False,
    cutout=0,
):
    """Train, validation and test loaders and the class names.

    source:     "cifar10", "synthetic", or an image folder with train/ and test/ (load_split).
    val_size:   training images held out for validation (stratified, seeded): a fraction
                (0.1, 5,000 images of CIFAR-10) or a count; at least one of each class.
                0 gives no validation loader (None).
    augment:    random crop (padding 4) and horizontal flip for the training loader;
                trivial_augment and cutout (a square of that many pixels) add to it.
    batch_size: training batch; under torchrun, the global batch summed over processes.
    fast:       True gives InMemoryLoader (data on the device, batch ops); False gives
                torch.utils.data.DataLoader with per-image transforms.
    skip_unreadable: leave out the images of a folder that cannot be decoded (load_split).
    Checkpoints record the classes, mean and std (data_info reads them from these loaders),
    so that a saved model predicts with the same preprocessing it was trained with.
    """
    train_images, train_labels, classes = load_split(source, "train", root, skip_unreadable)
    test_images, test_labels, _ = load_split(source, "test", root, skip_unreadable)
    train_idx, val_idx = stratified_split(train_labels, val_size, seed, classes)
    if len(train_idx) < batch_size:  # the last incomplete batch is dropped: nothing would be left
        raise ValueError(
            f"The training split has {len(train_idx)} images, fewer than one batch of {batch_size}: "
            "choose a smaller batch size."
        )
    mean, std = channel_stats(train_images[train_idx])
    rank, world_size, _ = distributed_env()
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must divide evenly between the {world_size} processes.")
    splits = {
        "train": (train_images[train_idx], train_labels[train_idx]),
        "val": (train_images[val_idx], train_labels[val_idx]),
        "test": (test_images, test_labels),
    }
    loaders = {}
    for name, (images, labels) in splits.items():
        if len(labels) == 0:
            loaders[name] = None
            continue
        training = name == "train"
        # batch_size is the global batch: under torchrun each process takes its share.
        size = batch_size // world_size if training else eval_batch_size
        if fast:
            device = get_device(device, verbose=False)
            loader = InMemoryLoader(
                images, labels, size, mean, std, shuffle=training, augment=training and augment,
                drop_last=training, seed=seed, device=device, rank=rank, world_size=world_size, classes=list(classes),
                trivial_augment=training and trivial_augment, cutout=cutout if training else 0,
            )  # fmt: skip
        else:
            transform = image_transform(mean, std, training and augment, training and trivial_augment,
                                        cutout if training else 0)  # fmt: skip
            dataset = TensorImageDataset(images, labels, transform, list(classes))
            if world_size > 1:
                sampler = (
                    torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
                    if training
                    else range(rank, len(dataset), world_size)
                )
            else:
                sampler = torch.utils.data.RandomSampler(dataset) if training else None
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=size, sampler=sampler, drop_last=training,
                num_workers=num_workers, persistent_workers=num_workers > 0,
            )  # fmt: skip
        loaders[name] = loader
    return loaders["train"], loaders["val"], loaders["test"], list(classes)


# ----------------------------------------------------------------------------------------
# Recipes: optimizer, loss and learning-rate schedule by name

RECIPES = {
    # The tutorial's recipe, kept to compare against: constant 0.1 until the validation
    # loss stalls, no augmentation, batch 256.
    "tutorial": {
        "batch_size": 256,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5e-4,
        "decay_norm_and_bias": True,
        "label_smoothing": 0.0,
        "schedule": "plateau",
        "warmup": 0.0,
        "augment": False,
        "trivial_augment": False,
        "cutout": 0,
        "decay_depthwise": True,
        "ema": 0.0,
    },
    # This project's default. Each choice was measured against the tutorial's (benchmarks/README.md).
    "default": {
        "batch_size": 256,
        "lr": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "decay_norm_and_bias": False,  # weight decay on BatchNorm and biases only hurts
        "label_smoothing": 0.1,
        "schedule": "onecycle",  # linear warm-up, then cosine decay to ~0, stepped per batch
        "warmup": 0.15,  # fraction of the steps spent warming up
        "augment": True,  # random crop and flip
        "trivial_augment": False,  # TrivialAugment Wide on top
        "cutout": 0,  # side of the Cutout square in pixels; 0 = none
        "decay_depthwise": True,  # False: no weight decay on the depthwise filters either
        "ema": 0.0,  # decay of an average of the weights, updated every 5 batches; 0 = none
    },
}
# For runs of up to 100 epochs, where the default overfits (99 % training accuracy after 65
# epochs): stronger augmentation and an average of the weights, from published runs; their
# validation-split runs need a GPU (benchmarks/gpu_campaign.py). Sparing the depthwise filters
# from weight decay lost 3.2 points of validation accuracy in 10 epochs (benchmarks/README.md).
RECIPES["long"] = {**RECIPES["default"], "trivial_augment": True, "cutout": 12, "ema": 0.99}


def get_recipe(name="default", **overrides):
    """A copy of ``RECIPES[name]`` with ``overrides`` applied (None values are ignored)."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    recipe = dict(RECIPES[name])
    unknown = set(overrides) - set(recipe)
    if unknown:
        raise ValueError(f"Unknown recipe settings {sorted(unknown)}; known: {sorted(recipe)}.")
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    return recipe


def make_optimizer(net, recipe):
    """SGD with momentum, weight decay in one group and the exempt parameters in another.

    Without ``decay_norm_and_bias``, BatchNorm weights and all biases (the 1-D parameters)
    are exempt: decay only shrinks their scale. Without ``decay_depthwise``, so are the
    depthwise convolutions' filters, nine weights per channel, on which the MobileNet paper
    advises "very little or no weight decay".
    """
    depthwise = {id(m.weight) for m in net.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels}

    def decayed(p):
        if p.ndim <= 1:
            return recipe["decay_norm_and_bias"]
        return recipe["decay_depthwise"] or id(p) not in depthwise

    params = [p for p in net.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if decayed(p)], "weight_decay": recipe["weight_decay"]},
        {"params": [p for p in params if not decayed(p)], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    # On CUDA the fused kernel updates every weight in one launch, and lets a GradScaler
    # skip its per-step read of the overflow flag from the GPU.
    fused = all(p.is_cuda for p in params)
    return torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=recipe["nesterov"],
                           fused=fused or None)  # fmt: skip


def make_scheduler(optimizer, recipe, epochs, steps_per_epoch):
    """The recipe's learning-rate schedule. train() steps it per batch or per epoch."""
    if recipe["schedule"] == "plateau":
        # The tutorial's settings: x0.94 after one epoch without improvement.
        return lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=0.94, patience=1, min_lr=1e-6)
    if recipe["schedule"] == "onecycle":
        return lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe["lr"],
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=recipe["warmup"],
            div_factor=10,  # start at lr/10
            final_div_factor=1000,  # end at lr/10,000
            cycle_momentum=False,
        )
    if recipe["schedule"] == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    raise ValueError(f"Unknown schedule {recipe['schedule']!r}; choose 'plateau', 'onecycle' or 'cosine'.")


def make_criterion(recipe):
    return nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])


# ----------------------------------------------------------------------------------------
# Checkpoints: one format, built, saved, resumed and loaded here. State_dicts and plain
# metadata only, written atomically, loaded with weights_only=True.


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint of this project."""


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename it over ``path``: a
    crash or Ctrl-C mid-write leaves the previous file whole."""
    with _replacing(path) as f:
        torch.save(obj, f)


def atomic_write(path, data):
    """``data`` (bytes or text) written to ``path`` whole or not at all, as atomic_save writes."""
    with _replacing(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def _replacing(path):
    """A binary file to write, renamed over ``path`` once written; removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def last_checkpoint_path(save_path):
    """Where train() keeps the resumable checkpoint next to the best one."""
    save_path = Path(save_path)
    return save_path.with_name(f"{save_path.stem}_last{save_path.suffix}")


def data_info(loader, data=None):
    """What a checkpoint records of the data, so that prediction preprocesses as training did:
    {"classes": [...], "mean": (r, g, b), "std": (r, g, b)}.

    ``data``, a dict with those keys, is used as given. Otherwise they are read from the
    loader: get_loaders' loaders carry them, and so does a torch DataLoader whose dataset
    (inside any Subset) has ``classes``, as ImageFolder and CIFAR10 do, and a transform with a
    Normalize step. Anything missing raises a ValueError that says what to pass.
    """
    if data is None:
        dataset = getattr(loader, "dataset", None)
        while isinstance(dataset, torch.utils.data.Subset):
            dataset = dataset.dataset
        transform = getattr(dataset, "transform", None)
        steps = getattr(transform, "transforms", [transform])
        normalize_step = next((t for t in steps if type(t).__name__ == "Normalize"), None)
        data = {
            "classes": getattr(dataset, "classes", None),
            "mean": getattr(normalize_step, "mean", None),
            "std": getattr(normalize_step, "std", None),
        }
        data.update({key: getattr(loader, key) for key in data if getattr(loader, key, None) is not None})
    missing = [key for key in ("classes", "mean", "std") if data.get(key) is None]
    if missing:
        raise ValueError(
            f"A checkpoint needs the data's {', '.join(missing)}, and the training loader does not tell them. "
            "Pass them to train() or fit(): data={'classes': [...], 'mean': (r, g, b), 'std': (r, g, b)}, "
            "the values your Normalize step uses."
        )
    return {
        "classes": list(data["classes"]),
        "mean": tuple(float(v) for v in data["mean"]),
        "std": tuple(float(v) for v in data["std"]),
    }


def make_checkpoint(net, data, epochs, history, best_val_acc, optimizer=None, scheduler=None, scaler=None,
                    ema_model=None):  # fmt: skip
    """The checkpoint dict: the trained weights ("model", no wrapper prefixes) and, with
    ``ema_model``, their average ("ema_model"); "weights" says which of the two predicts
    (load_model uses it). Also what rebuilds the network (arch, model_config), what prediction
    needs (data_info's classes, mean, std) and the run so far. Given ``optimizer``, also all
    that resuming needs: optimizer, scheduler, gradient scaler, random state, EMA updates."""
    base = unwrap_model(net)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": type(base).__name__,
        "model_config": getattr(base, "config", None),
        **data,
        "model": base.state_dict(),
        "epochs": epochs,
        "epoch": len(history["val_acc"]),
        "history": history,
        "metrics": {key: values[-1] for key, values in history.items() if values},
        "best_val_acc": best_val_acc,
        "weights": "ema" if ema_model is not None else "trained",
        "ema_model": ema_model.module.state_dict() if ema_model is not None else None,
    }
    if optimizer is not None:
        device = next(base.parameters()).device
        checkpoint["optimizer"] = optimizer.state_dict()
        checkpoint["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        checkpoint["scaler"] = scaler.state_dict() if scaler is not None else None
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        checkpoint["rng"] = {"cpu": torch.get_rng_state(), "cuda": cuda_rng}
        checkpoint["ema_updates"] = int(ema_model.n_averaged) if ema_model is not None else 0
    return checkpoint


def predicting_weights(checkpoint):
    """The key of the state_dict that predicts: "ema_model" for a run with a weight average
    (its "weights" says "ema"), else "model"."""
    return "ema_model" if checkpoint.get("weights") == "ema" else "model"


def release_checkpoint(checkpoint, dtype=torch.float16):
    """A checkpoint to give away: the weights that predict (the average, with EMA) in
    ``dtype``, half the size in float16, with the metadata, without the training state."""
    kept = ("format", "arch", "model_config", "classes", "mean", "std", "epochs", "epoch", "history", "metrics",
            "best_val_acc", "weights")  # fmt: skip
    key = predicting_weights(checkpoint)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint[key].items()}
    return {"model": None, "ema_model": None, **{k: checkpoint.get(k) for k in kept}, key: weights}


def save_checkpoints(save_path, model, data, epochs, history, best_val_acc, optimizer, scheduler, scaler, ema_model):
    """After an epoch: ``save_path`` when the validation accuracy of the weights that predict
    (the average, with EMA) improved, and the resumable <stem>_last.pth every time. Returns
    the best validation accuracy so far."""
    val_acc = history["ema_val_acc" if "ema_val_acc" in history else "val_acc"][-1]
    improved = val_acc > best_val_acc
    best_val_acc = max(best_val_acc, val_acc)
    if improved:
        atomic_save(make_checkpoint(model, data, epochs, history, best_val_acc, ema_model=ema_model), save_path)
    resumable = make_checkpoint(model, data, epochs, history, best_val_acc, optimizer, scheduler, scaler, ema_model)
    atomic_save(resumable, last_checkpoint_path(save_path))
    return best_val_acc


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True``, which never runs code from the file,
    and explain what is wrong with a file that is not one of this project's checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error) or "GLOBAL" in str(error):
            raise CheckpointError(
                f"{path} holds pickled Python objects, most likely a whole model saved with "
                "torch.save(net). Loading it would run code from the file, so it is refused. "
                "If you trust the file, convert it once:\n"
                f"    net = torch.load({str(path)!r}, weights_only=False)\n"
                "    torch.save({'model': net.state_dict()}, 'converted.pth')\n"
                "and load the state_dict into MobileNetV2(...)."
            ) from error
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {error}") from error
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as error:
        # What the unpickler raises on arbitrary bytes depends on the bytes.
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another kind of file): {error}"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a checkpoint written by this project's train(). "
            "A bare state_dict loads with net.load_state_dict(torch.load(path, weights_only=True))."
        )
    return checkpoint


def resume_training(save_path, model, optimizer, scheduler, scaler, epochs, ema_model=None):
    """Restore what make_checkpoint saved in <save_path stem>_last.pth into the objects given,
    so that the run ends as if it had never stopped. Returns (history, best_val_acc)."""
    if save_path is None:
        raise ValueError("resume=True needs save_path: the checkpoint to resume is <save_path stem>_last.pth.")
    path = last_checkpoint_path(save_path)
    base = unwrap_model(model)
    device = next(base.parameters()).device
    checkpoint = load_checkpoint(path, map_location=device)
    if checkpoint["epochs"] != epochs:
        raise ValueError(
            f"{path} is from a run of {checkpoint['epochs']} epochs; resume it with epoch="
            f"{checkpoint['epochs']} (schedules such as OneCycleLR are planned for the whole run), "
            "or start a new run to train for longer."
        )
    if (ema_model is not None) != (checkpoint.get("weights") == "ema"):
        had = "with" if checkpoint.get("weights") == "ema" else "without"
        raise ValueError(f"{path} was trained {had} a weight average (ema); resume it {had} one too.")
    base.load_state_dict(checkpoint["model"])
    if ema_model is not None:
        ema_model.module.load_state_dict(checkpoint["ema_model"])
        ema_model.n_averaged.fill_(checkpoint["ema_updates"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint["scheduler"] is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint["scaler"] is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return checkpoint["history"], checkpoint["best_val_acc"]


def load_model(path, device=None, num_classes=None):
    """Rebuild the network a checkpoint was trained as, in eval mode, from its own metadata.

    Returns (net, checkpoint); the checkpoint dict holds ``classes``, ``mean``, ``std``,
    ``metrics`` and ``history``. The weights are those its "weights" names: the average of the
    weights when trained with ``ema``. ``num_classes``, if given, must match the checkpoint's.
    """
    checkpoint = load_checkpoint(path)
    config = checkpoint.get("model_config")
    if checkpoint.get("arch") != "MobileNetV2" or not isinstance(config, dict):
        raise CheckpointError(f"{path} is a checkpoint of {checkpoint.get('arch')!r}, not of MobileNetV2.")
    if num_classes is not None and config["num_classes"] != num_classes:
        raise CheckpointError(f"{path} was trained for {config['num_classes']} classes, not {num_classes}.")
    net = MobileNetV2(**config)
    try:
        net.load_state_dict(checkpoint[predicting_weights(checkpoint)])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the weights do not fit MobileNetV2({config}): {error}") from error
    net = net.to(get_device(device, verbose=False)).eval()
    return net, checkpoint


# ----------------------------------------------------------------------------------------
# Training and evaluation: fit() is the loop; the steps it is made of follow it


def autocast_dtype(device, amp):
    """The dtype to autocast to, or None. ``amp``: None = float16 on CUDA, off on the CPU;
    True = float16; False = off; "bfloat16"/"float16" = that one.

    float16 rather than bfloat16: its 3 more mantissa bits keep this network's gradients close
    to float32's early in training, where bf16's are not, and bf16 cost the paper's network
    9 points of accuracy in 10 epochs (measured: benchmarks/precision.py, benchmarks/README.md)."""
    if isinstance(amp, str):
        if amp not in ("bfloat16", "float16"):
            raise ValueError(f"amp={amp!r}: choose True, False, None, 'bfloat16' or 'float16'.")
        return getattr(torch, amp)
    if amp is None:
        amp = device.type == "cuda"
    return torch.float16 if amp else None


def grad_scaler(device, amp_dtype):
    """A GradScaler for float16 autocast, which needs one to keep small gradients from
    rounding to zero; None otherwise."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def train_one_epoch(model, loader, optimizer, criterion, device, batch_scheduler=None, scaler=None, amp_dtype=None,
                    channels_last=False, desc="Train", progress=True, refresh_every=20, ema=None,
                    ema_every=EMA_EVERY):  # fmt: skip
    """One pass over ``loader``. Returns {"loss", "acc", "count"}, per sample (acc in %).
    ``ema``, an AveragedModel of the network, is updated every ``ema_every`` batches.

    Running sums stay on the device; they are read (a GPU sync) only every
    ``refresh_every`` batches, to update the bar and to stop on a non-finite loss.
    """
    model.train()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad_batch = torch.full((), -1, device=device, dtype=torch.int64)
    count = 0
    bar = progress_bar(loader, desc=desc, disable=not progress)
    for i, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
            loss = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        if ema is not None and (i + 1) % ema_every == 0:
            ema.update_parameters(unwrap_model(model))

        loss = loss.detach()
        loss_sum += loss * len(labels)
        correct += (outputs.argmax(1) == labels).sum()
        count += len(labels)
        first_bad_batch = torch.where(~torch.isfinite(loss) & (first_bad_batch < 0), i + 1, first_bad_batch)
        if (i + 1) % refresh_every == 0 or i + 1 == len(loader):
            if first_bad_batch.item() >= 0:
                raise FloatingPointError(
                    f"{desc}: the loss became {loss_sum.item()} at batch {first_bad_batch.item()}/{len(loader)}. "
                    "Training stopped; the checkpoints on disk are from before. Try a lower learning rate."
                )
            bar.set_postfix(
                {"Train Acc": f"{correct.item() / count:.3f}", "Train Loss": f"{loss_sum.item() / count:.3g}"}
            )
    totals = _all_reduce_sum(
        torch.stack([loss_sum, correct.double(), torch.tensor(float(count), device=device, dtype=torch.float64)])
    )
    loss_total, correct_total, count_total = totals.tolist()
    return {"loss": loss_total / count_total, "acc": 100 * correct_total / count_total, "count": int(count_total)}


@torch.no_grad()
def evaluate(
    net, loader, criterion=None, device=None, tta=False, amp=None, channels_last=False, desc=None, progress=False
):
    """Evaluate ``net`` on every sample of ``loader`` once, in eval mode.

    tta: test-time augmentation, the softmax averaged over views of each image (tta_views):
    "flip" (or True) the image and its mirror image, "flip-translate" six views. The result
    says which under "tta" (None without).
    Returns a dict: loss, acc (%), per_class_acc (%), confusion (true x predicted counts),
    and per sample labels, preds, probs (on the CPU). Under torchrun the totals cover all
    ranks; the per-sample lists cover this rank's share.
    """
    device = get_device(device, verbose=False) if device is None else torch.device(device)
    tta = "flip" if tta is True else tta or None
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta={tta!r}: choose False, True, or one of {[v for v in TTA_VIEWS if v]}.")
    criterion = criterion or nn.CrossEntropyLoss()
    amp_dtype = autocast_dtype(device, amp)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    all_labels, all_probs = [], []
    for images, labels in progress_bar(loader, desc=desc or "Eval", disable=not progress):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = torch.stack([net(view) for view in tta_views(images, tta)]) if tta else net(images)
        logits = logits.float()
        if tta:
            probs = logits.softmax(-1).mean(0)
            loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        else:
            probs = logits.softmax(-1)
            loss_sum += criterion(logits, labels) * len(labels)
        all_labels.append(labels)
        all_probs.append(probs)
    net.train(was_training)

    labels = torch.cat(all_labels)
    probs = torch.cat(all_probs)
    preds = probs.argmax(1)
    num_classes = probs.shape[1]
    confusion = torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)
    count = torch.tensor(float(len(labels)), device=device, dtype=torch.float64)
    confusion, loss_sum, count = _all_reduce_sum(confusion), _all_reduce_sum(loss_sum), _all_reduce_sum(count)
    confusion = confusion.cpu()
    per_class = 100 * confusion.diag().double() / confusion.sum(1).clamp_min(1)
    return {
        "loss": loss_sum.item() / count.item(),
        "acc": 100 * confusion.diag().sum().item() / count.item(),
        "per_class_acc": per_class.tolist(),
        "confusion": confusion,
        "labels": labels.cpu(),
        "preds": preds.cpu(),
        "probs": probs.cpu(),
        "tta": tta,
    }


TTA_VIEWS = (None, "flip", "flip-translate")


def tta_views(images, tta):
    """The views of a batch that test-time augmentation averages: the images and their
    mirror images ("flip"), and for "flip-translate" each of these shifted by one pixel
    up-left and down-right as well (edges reflected): six views, as airbench uses."""
    views = [images, images.flip(3)]
    if tta == "flip-translate":
        h, w = images.shape[-2:]
        padded = [F.pad(view, (1, 1, 1, 1), mode="reflect") for view in views]
        views += [p[..., :h, :w] for p in padded] + [p[..., 2:, 2:] for p in padded]
    return views


def fit(net, train_loader, val_loader, epochs, optimizer, criterion, scheduler=None, *, save_path=None,
        tbwriter=None, verbose=True, resume=False, device=None, amp=None, channels_last=None,
        scheduler_interval=None, compile=False, data=None, hparams=None, ema=None):  # fmt: skip
    """Train ``net`` for ``epochs`` epochs and return the history: a dict of per-epoch lists
    train_loss, train_acc, val_loss, val_acc (%), lr and seconds, and with ``ema``
    ema_val_loss and ema_val_acc. train() documents the arguments; ``data`` is data_info's
    dict, read from ``train_loader`` when not given."""
    device = get_device(device, verbose=False)
    if channels_last is None:
        channels_last = channels_last_is_faster(unwrap_model(net), device)
    model = prepare_model(net, device, channels_last=channels_last, compile=compile)
    amp_dtype = autocast_dtype(device, amp)
    scaler = grad_scaler(device, amp_dtype)
    per_batch = _steps_per_batch(scheduler, scheduler_interval)
    data = data_info(train_loader, data) if save_path else None  # an error now, not after an epoch
    pick_fast_kernels(device)
    main = is_main_process()
    show = verbose and main
    history, best_val_acc = {key: [] for key in HISTORY}, -math.inf
    if resume:
        history, best_val_acc = resume_training(save_path, model, optimizer, scheduler, scaler, epochs, ema)
        if show:
            print(f"Resuming from {last_checkpoint_path(save_path)} after epoch {len(history['val_acc'])}/{epochs}.")
    elif tbwriter is not None and main:
        _add_graph(tbwriter, unwrap_model(model), train_loader, device)

    epoch = start = len(history["val_acc"])
    try:
        for epoch in range(start, epochs):
            began = time.perf_counter()
            _set_loader_epoch(train_loader, epoch)
            title = f"Epoch {epoch + 1}/{epochs}"
            train_metrics = train_one_epoch(
                model, train_loader, optimizer, criterion, device, scheduler if per_batch else None,
                scaler, amp_dtype, channels_last, desc=f"Train {title}", progress=show, ema=ema,
            )  # fmt: skip
            lr = optimizer.param_groups[0]["lr"]
            # Without validation data the training metrics stand in.
            val_metrics = train_metrics if val_loader is None else evaluate(
                model, val_loader, criterion, device, amp=amp, channels_last=channels_last,
                desc=f"Val {title}", progress=show,
            )  # fmt: skip
            if ema is not None:
                refresh_batchnorm(ema.module, train_loader, device)
            ema_metrics = None if ema is None or val_loader is None else evaluate(
                ema.module, val_loader, criterion, device, amp=amp, channels_last=channels_last,
                desc=f"EMA Val {title}", progress=show,
            )  # fmt: skip
            if scheduler is not None and not per_batch:
                _step_scheduler(scheduler, val_metrics["loss"])
            _record_epoch(history, train_metrics, val_metrics, ema_metrics, lr, time.perf_counter() - began)
            if show:
                print(_epoch_line(history, epochs))
            if main and tbwriter is not None:
                _log_epoch(tbwriter, history)
            if main and save_path:
                best_val_acc = save_checkpoints(save_path, model, data, epochs, history, best_val_acc,
                                                optimizer, scheduler, scaler, ema)  # fmt: skip
    except KeyboardInterrupt:
        if show:
            saved = save_path and epoch > start
            where = (
                f"{last_checkpoint_path(save_path)} holds epoch {epoch}" if saved else "no new checkpoint was written"
            )
            print(f"\nInterrupted during epoch {epoch + 1}/{epochs}; {where}. Continue with train(..., resume=True).")
        raise
    if main and tbwriter is not None and history["val_acc"]:
        _log_hparams(tbwriter, model, train_loader, optimizer, criterion, scheduler, epochs, history, hparams)
    return history


def pick_fast_kernels(device):
    """Let cuDNN time its kernels and keep the fastest (the input size never changes), unless
    set_seed(deterministic=True) asked for repeatable ones."""
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True


def _steps_per_batch(scheduler, interval):
    """Whether ``scheduler`` steps after every batch (else once per epoch)."""
    if interval is not None:
        if interval not in ("batch", "epoch"):
            raise ValueError(f"scheduler_interval must be 'batch', 'epoch' or None, not {interval!r}")
        return scheduler is not None and interval == "batch"
    return isinstance(scheduler, (lr_scheduler.OneCycleLR, lr_scheduler.CyclicLR))


def _set_loader_epoch(loader, epoch):
    """Seed a loader's shuffle and augmentation with the epoch number, so that a resumed
    run sees the same batches as an uninterrupted one."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)


def _step_scheduler(scheduler, val_loss):
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


def weight_average(net, decay):
    """An exponential moving average of ``net``'s weights, which train_one_epoch updates
    every EMA_EVERY batches: w_avg = decay * w_avg + (1 - decay) * w. Its ``module`` is a
    MobileNetV2 to evaluate, save and predict with, once refresh_batchnorm has given it
    BatchNorm statistics of its own. Make it after prepare_model, so that it is a copy on the
    same device.

    BatchNorm statistics are not averaged (until refreshed, they are the trained network's):
    the average of the statistics of the weights averaged is not the statistics of the
    average, and in a 10-epoch run it made the average call every image the same class
    (measured on 1,024 validation images: 0 %, and 72 % once refreshed)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(unwrap_model(net), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


def refresh_batchnorm(net, loader, device, batches=BATCHNORM_BATCHES):
    """Recompute ``net``'s BatchNorm statistics over the first ``batches`` batches of
    ``loader`` (torch's update_bn), without using up random numbers or the loader's epoch, so
    that the training run goes on as it would have without."""
    from torch.optim.swa_utils import update_bn

    epoch = getattr(loader, "epoch", None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        update_bn(itertools.islice(loader, batches), net, device)
    if epoch is not None:
        loader.epoch = epoch


def _record_epoch(history, train_metrics, val_metrics, ema_metrics, lr, seconds):
    values = (train_metrics["loss"], train_metrics["acc"], val_metrics["loss"], val_metrics["acc"], lr, seconds)
    for key, value in zip(HISTORY, values, strict=True):
        history[key].append(value)
    if ema_metrics is not None:
        history.setdefault("ema_val_loss", []).append(ema_metrics["loss"])
        history.setdefault("ema_val_acc", []).append(ema_metrics["acc"])


def _epoch_line(history, epochs):
    """The tutorial's line for the epoch just recorded."""
    last = {key: values[-1] for key, values in history.items()}
    return (
        f"Epoch [{len(history['val_acc']):>3d}/{epochs:>3d}]  Train Loss:{last['train_loss']:.6f}  "
        f"Train Acc:{last['train_acc']:.2f}% Val Loss:{last['val_loss']:.6f}  Val Acc:{last['val_acc']:.2f}%  "
        f"Learning Rate:{last['lr']:.6f}  Time:{last['seconds']:.1f}s"
        + (f"  EMA Val Acc:{last['ema_val_acc']:.2f}%" if "ema_val_acc" in last else "")
    )


def _log_epoch(tbwriter, history):
    step = len(history["val_acc"])
    tbwriter.add_scalars("Loss", {"train": history["train_loss"][-1], "val": history["val_loss"][-1]}, step)
    accuracy = {"train": history["train_acc"][-1], "val": history["val_acc"][-1]}
    if "ema_val_acc" in history:
        accuracy["val (EMA)"] = history["ema_val_acc"][-1]
    tbwriter.add_scalars("Accuracy", accuracy, step)
    tbwriter.add_scalar("Learning Rate", history["lr"][-1], step)
    tbwriter.add_scalar("Seconds per epoch", history["seconds"][-1], step)


def _log_hparams(tbwriter, model, loader, optimizer, criterion, scheduler, epochs, history, extra):
    """The run's settings beside its final metrics, for TensorBoard's hparams tab."""
    group = optimizer.param_groups[0]
    values = {
        "epochs": epochs,
        "batch_size": getattr(loader, "batch_size", None),
        "optimizer": type(optimizer).__name__,
        "scheduler": type(scheduler).__name__ if scheduler is not None else "none",
        "label_smoothing": getattr(criterion, "label_smoothing", 0.0),
        **{key: group[key] for key in ("lr", "momentum", "weight_decay", "nesterov") if key in group},
        **getattr(unwrap_model(model), "config", {}),
        **(extra or {}),
    }
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
    tbwriter.add_hparams(values, {f"hparam/{key}": history[key][-1] for key in METRICS}, run_name=".")
    tbwriter.flush()


def _add_graph(tbwriter, net, loader, device):
    """Trace the model for TensorBoard's graph tab, in eval mode on zeros so that no
    BatchNorm statistics or random numbers are used up."""
    sample = next(iter(loader))[0][:2]
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # add_graph traces with torch.jit
        tbwriter.add_graph(net, torch.zeros_like(sample, device=device))
    net.train()


def train(net, trainloader, testloader, epoch, optimizer, criterion, scheduler=None, save_path=None, tbwriter=None,
          verbose=True, **options):  # fmt: skip
    """The tutorial's training call: fit() with its arguments in its order, returning the
    per-epoch histories as the tutorial's (Acc, Loss, Lr).

      trainloader  training batches;
      testloader   the *validation* batches (or None): they pick the best checkpoint and
                   drive ReduceLROnPlateau; use a held-out split, not the test set;
      epoch        total number of epochs (when resuming, the total, not the remainder);
      scheduler    any torch.optim.lr_scheduler, or None. ReduceLROnPlateau steps once per
                   epoch on the validation loss, OneCycleLR and CyclicLR after every batch,
                   the others once per epoch (``scheduler_interval`` overrides: "batch"/"epoch");
      save_path    best checkpoint by validation accuracy (e.g. model/mobilenetv2.pth); the
                   last epoch's, with optimizer/scheduler state to resume, goes next to it
                   as <name>_last.pth. None saves nothing;
      tbwriter     a torch.utils.tensorboard.SummaryWriter, or None;
      verbose      progress bars and one line per epoch.
    Keyword-only ``options`` (fit's):
      resume        continue from <save_path stem>_last.pth: weights, optimizer, scheduler,
                    random state and history, so the run ends as if never interrupted;
      device        default: get_device() (CUDA, else MPS, else CPU); prepare_model moves and
                    wraps the network;
      amp           autocast: None = float16 (with gradient scaling) on CUDA, off on the
                    CPU; True/False; or the dtype by name, "float16" or "bfloat16";
      channels_last memory format; default: whichever channels_last_is_faster() says;
      compile       run the model through torch.compile (slow to start, then faster on GPUs;
                    slower on the CPU, measured): True, or a mode such as "reduce-overhead"
                    (CUDA graphs); falls back to eager, with a warning;
      data          classes, mean and std for the checkpoints (data_info), when the loader
                    does not tell them;
      ema           a weight_average(net, decay) to update every EMA_EVERY batches and validate
                    beside the trained weights; the checkpoints then predict with the average
                    (their "weights" says so);
      hparams       extra values to record with the final metrics in TensorBoard.
    Returns Acc = {"train_acc", "val_acc"} (%), Loss = {"train_loss", "val_loss"}, Lr (lists).
    """
    history = fit(net, trainloader, testloader, epoch, optimizer, criterion, scheduler,
                  save_path=save_path, tbwriter=tbwriter, verbose=verbose, **options)  # fmt: skip
    Acc = {"train_acc": history["train_acc"], "val_acc": history["val_acc"]}
    Loss = {"train_loss": history["train_loss"], "val_loss": history["val_loss"]}
    return Acc, Loss, history["lr"]


# ----------------------------------------------------------------------------------------
# Pictures: curves, image grids, confusion matrix


def plot_history(epoch, Acc, Loss, Lr, save_dir=None):
    """The tutorial's three figures: loss, accuracy and learning rate per epoch.

    ``epoch`` is kept for the tutorial's call; the curves use as many epochs as were run.
    Returns the figures; with ``save_dir`` also writes loss.png, accuracy.png and lr.png.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figures = {}
    for name, series, ylabel in (
        ("loss", Loss, "Loss"),
        ("accuracy", Acc, "Accuracy (%)"),
        ("lr", {"lr": Lr}, "Learning rate"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, values in series.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label.replace("_", " "))
        ax.set(xlabel="Epoch", ylabel=ylabel, title=f"{ylabel} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        figures[name] = fig
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(save_dir) / f"{name}.png", dpi=100)
    return figures["loss"], figures["accuracy"], figures["lr"]


def denormalize(images, mean, std):
    """Normalised (N, 3, H, W) float images back to displayable (N, H, W, 3) values in [0, 1]."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def show_images(images, labels, classes, preds=None, ncols=8, mean=None, std=None, size=1.6):
    """A grid of images titled with their class; with ``preds``, titled "pred (true)" in
    green when right and red when wrong. ``images`` are uint8 (N, 3, H, W), or normalised
    floats together with ``mean`` and ``std``."""
    import matplotlib.pyplot as plt

    if len(images) == 0:
        raise ValueError("show_images got no images to show.")
    if images.dtype == torch.uint8:
        pictures = images.permute(0, 2, 3, 1).cpu().numpy()
    else:
        pictures = denormalize(images, mean, std)
    nrows = math.ceil(len(pictures) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * 1.15 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[: len(pictures)]):
        ax.imshow(pictures[i])
        true = classes[int(labels[i])]
        if preds is None:
            ax.set_title(true, fontsize=9)
        else:
            pred = classes[int(preds[i])]
            ax.set_title(f"{pred} ({true})", fontsize=9, color="green" if pred == true else "red")
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(per_class_acc, classes):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    bars = ax.bar(classes, per_class_acc, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set(ylabel="Accuracy (%)", ylim=(0, 105), title="Test accuracy per class")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(confusion, classes):
    """Rows are the true classes, columns the predictions; each row sums to 100%."""
    import matplotlib.pyplot as plt

    confusion = torch.as_tensor(confusion).double()
    percent = 100 * confusion / confusion.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="Predicted", ylabel="True", title="Confusion matrix (% of each true class)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            value = percent[i, j].item()
            ax.text(
                j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value > 50 else "black"
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def most_confident_mistakes(result, k=16):
    """Indices of the wrong predictions in an evaluate() result, most confident first."""
    wrong = torch.nonzero(result["preds"] != result["labels"]).flatten()
    confidence = result["probs"][wrong, result["preds"][wrong]]
    return wrong[confidence.argsort(descending=True)[:k]]
