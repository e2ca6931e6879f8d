"""Pictures: reading one (prediction), reading a folder of them once (training), the data
sets that load_split knows by name, and a validation split of their training images.
"""

import hashlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from checkpoints import atomic_save
from runtime import DATA_DIR, ROOT, progress_bar

# Every image reaches the network at this size, CIFAR-10's own: the pictures of a data folder
# and those to classify are resized to it.
IMAGE_SIZE = 32

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}

# Larger images are refused: a small file can claim dimensions that take gigabytes to decode
# (a "decompression bomb"). 100 megapixels admits the photos of any current camera.
MAX_PIXELS = 100_000_000

# Part of the image cache's key: raise it when a change to decode_image, to_rgb or
# image_pixels changes the pixels they give, so that folders are decoded again.
DECODING_VERSION = 1


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


def load_split(source, split, root=DATA_DIR):
    """One split of a data set, decoded into memory.

    source: "cifar10" (torchvision's copy, downloaded into ``root`` on first use),
            "synthetic" (a small generated set for smoke runs and tests), or the path of a
            folder holding ``train/`` and ``test/``, each with one sub-folder per class (a
            relative path not found from the current folder is read from the project root).
    split:  "train" or "test".
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
    return _load_image_folder(folder, split, Path(root) / "cache")


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


def _load_image_folder(folder, split, cache_dir):
    """Decode every image of a split once, as prediction decodes a picture; later runs read
    the decoded tensors from a cache file, whose name changes whenever a file in the folder
    or the decoding changes."""
    classes, files = _check_image_folder(folder)
    fingerprint = hashlib.sha1(f"{DECODING_VERSION}:{IMAGE_SIZE}:{PIL.__version__}".encode())
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
        raise ImageError(
            f"{len(unreadable)} of the {total} images in {folder / split} cannot be read "
            f"(the other {total - len(unreadable)} are fine):\n{listed}{more}\nFix or remove them."
        )
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
