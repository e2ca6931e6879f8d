"""Classify images with a checkpoint written by utils.train().

From the command line; each INPUT is an image file, a folder of images or an http(s) URL:

    python predict.py cat.jpg photos/ https://example.com/dog.png --topk 3
    python predict.py samples/ --checkpoint model/my-run.pth

Without --checkpoint it uses model/mobilenetv2.pth, what notebook 3 and train.py write, and
until that exists the weights that ship with the project (model/pretrained/).

From Python:

    net, checkpoint = checkpoints.load_model("model/mobilenetv2.pth")
    predict(net, "cat.jpg", checkpoint)
    # {"input": "cat.jpg", "top": [{"class": "cat", "index": 3, "prob": 0.91}, ...]}

An input is a file path, a URL, a PIL image or a NumPy array. Every kind of image becomes
RGB as the images of a training folder do (images.decode_image and images.to_rgb): EXIF
orientation applied, first frame of an animation, 16-bit scaled to 8-bit, and transparent
pixels laid over a white background. The network then sees what it was trained on: the image
resized to 32x32 (images.image_pixels) and normalised with the checkpoint's mean and std.
"""

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch
import urllib3
from PIL import Image

import checkpoints
import images
import runtime
from images import ImageError
from utils import normalize

# What notebook 3 and train.py write by default.
DEFAULT_CHECKPOINT = runtime.MODEL_DIR / "mobilenetv2.pth"
DEFAULT_NAME = DEFAULT_CHECKPOINT.relative_to(runtime.ROOT).as_posix()  # as messages show it


def describe(source):
    """A short name for an input, used in results and error messages."""
    if isinstance(source, Image.Image):
        return f"<PIL.Image {source.width}x{source.height} {source.mode}>"
    if isinstance(source, np.ndarray):
        return f"<array {'x'.join(map(str, source.shape))} {source.dtype}>"
    return str(source)


def is_url(source):
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def load_image(source, timeout=10.0, max_bytes=20_000_000):
    """Read one input as an RGB PIL image.

    source:    a file path (str or Path), an http(s) URL, a PIL image, or a NumPy array
               (H x W grayscale, or H x W x C with C = 1, 3 or 4; uint8, or floats in [0, 1]).
    timeout:   for a URL, about the most seconds the whole download may take.
    max_bytes: for a URL, the largest body accepted; a larger one is stopped mid-download.
    Every kind becomes RGB as training images do (images.decode_image, images.to_rgb): turned
    upright by its EXIF orientation, the first frame of an animation, 16-bit values scaled to
    8 bits, transparent pixels over white. Files of more than images.MAX_PIXELS pixels are
    refused before they are decoded.
    Raises FileNotFoundError for a missing file and ImageError (a ValueError) for anything
    that is not a readable image; both name the input.
    """
    name = describe(source)
    if isinstance(source, Image.Image):
        return images.to_rgb(source, name)
    if isinstance(source, np.ndarray):
        return images.to_rgb(_array_to_image(source, name), name)
    if is_url(source):
        return images.decode_image(io.BytesIO(_download(source, timeout, max_bytes)), name)
    if not Path(source).is_file():
        raise FileNotFoundError(f"No image file at {name}.")
    return images.decode_image(source, name)


def _download(url, timeout, max_bytes):
    """The body of ``url`` as bytes, or an ImageError that says why not."""
    deadline = time.monotonic() + timeout
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            # A wrong link usually leads to a web page; say so instead of failing to decode it.
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type and not content_type.startswith("image/") and content_type != "application/octet-stream":
                raise ImageError(f"{url} is not an image: the server sent Content-Type {content_type!r}.")
            too_large = ImageError(f"{url} is larger than the limit of {max_bytes:,} bytes.")
            declared_size = response.headers.get("Content-Length", "")
            if declared_size.isdigit() and int(declared_size) > max_bytes:
                raise too_large
            body = bytearray()
            # read1 returns whatever has arrived, so the deadline also holds against a server
            # that trickles bytes; requests' own timeout bounds each wait, not the whole.
            while chunk := response.raw.read1(64 * 1024, decode_content=True):
                body += chunk
                if len(body) > max_bytes:
                    raise too_large
                if time.monotonic() > deadline:
                    raise requests.Timeout()
            return bytes(body)
    except requests.HTTPError as error:
        status = error.response.status_code
        raise ImageError(f"Could not download {url}: HTTP {status} {error.response.reason}.") from error
    except (requests.Timeout, urllib3.exceptions.TimeoutError) as error:
        raise ImageError(f"Could not download {url}: no complete answer within {timeout:g} s.") from error
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        raise ImageError(f"Could not download {url}: {error}") from error


def _array_to_image(array, name):
    if array.size == 0:
        raise ImageError(f"{name} is empty.")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        hint = (
            " (channels first? use array.transpose(1, 2, 0))"
            if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] > 4
            else ""
        )
        raise ImageError(f"{name}: expected H x W or H x W x C with C = 1, 3 or 4{hint}.")
    if np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0, 1) * 255).round()
    elif array.dtype != np.uint8:
        raise ImageError(f"{name}: expected uint8 values, or floats in [0, 1].")
    return Image.fromarray(array.astype(np.uint8))


def preprocess(pictures, mean, std, size=images.IMAGE_SIZE):
    """PIL images (one or a list, as load_image returns them) to a normalised float tensor
    (N, 3, size, size): resized by images.image_pixels, as the images of a data folder are
    before training, then normalised with ``mean`` and ``std``."""
    if isinstance(pictures, Image.Image):
        pictures = [pictures]
    pixels = np.stack([images.image_pixels(picture, size) for picture in pictures])
    return normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2), mean, std)


def predict(net, inputs, checkpoint, topk=3, batch_size=256, device=None):
    """Top-k classes of one input or a list of inputs (any kind load_image reads).

    Returns plain Python: for one input a dict, for a list a list of dicts in the same order,
        {"input": "cat.jpg", "top": [{"class": "cat", "index": 3, "prob": 0.91}, ...]}
    with ``topk`` entries (at most the number of classes), most probable first.
    A single input that cannot be read raises. In a list, such an input does not stop the
    others: its entry is {"input": ..., "error": "<why>"}, so a folder with one broken file
    still gets its answers.
    """
    if topk < 1:
        raise ValueError(f"topk must be at least 1, not {topk}.")
    single = not isinstance(inputs, (list, tuple))
    entries, tensors = [], []
    for source in [inputs] if single else inputs:
        entry = {"input": describe(source)}
        try:
            # Shrunk to 32x32 at once: a folder of large photos never sits in memory whole.
            tensors.append(preprocess(load_image(source), checkpoint["mean"], checkpoint["std"]))
        except (ValueError, OSError) as error:
            if single:
                raise
            entry["error"] = str(error)
        entries.append(entry)

    classes = checkpoint["classes"]
    readable = [entry for entry in entries if "error" not in entry]
    device = runtime.model_device(net) if device is None else torch.device(device)
    net.eval()
    with torch.inference_mode():
        for start in range(0, len(tensors), batch_size):
            batch = torch.cat(tensors[start : start + batch_size]).to(device)
            probs, indices = net(batch).float().softmax(1).topk(min(topk, len(classes)), dim=1)
            for entry, ps, ids in zip(readable[start:], probs.tolist(), indices.tolist(), strict=False):
                entry["top"] = [{"class": classes[i], "index": i, "prob": p} for p, i in zip(ps, ids, strict=True)]
    return entries[0] if single else entries


def plot_prediction(image, result):
    """A figure of the image beside a bar chart of its top-k classes (a predict() result)."""
    import matplotlib.pyplot as plt

    names = [top["class"] for top in result["top"]]
    probs = [top["prob"] for top in result["top"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), width_ratios=(1, 2))
    left.imshow(image)
    left.axis("off")
    right.barh(names[::-1], probs[::-1], color="tab:blue")
    right.set(xlim=(0, 1), xlabel="probability", title=f"The {len(names)} most likely classes")
    fig.tight_layout()
    return fig


def predict_folder(net, folder, checkpoint, topk=3, batch_size=256, device=None):
    """predict() on every image file of a folder and its sub-folders (images.image_files: hidden
    files left out), in sorted order; a list of entries, whose "input" is the path inside ``folder``."""
    files = images.image_files(folder)
    results = predict(net, [str(p) for p in files], checkpoint, topk, batch_size, device)
    for result, path in zip(results, files, strict=True):
        result["input"] = path.relative_to(folder).as_posix()
    return results


def format_table(results):
    """Results as a text table: input, top-1 class and probability, then the other top-k."""
    width = max([len("input")] + [len(r["input"]) for r in results])
    lines = [f"{'input':<{width}}  {'top-1':<12} {'prob':>6}  others"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['input']:<{width}}  error: {r['error']}")
            continue
        best, *others = r["top"]
        rest = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in others)
        lines.append(f"{r['input']:<{width}}  {best['class']:<12} {best['prob']:>6.3f}  {rest}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Classify images with a checkpoint written by utils.train().")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="an image file, a folder of images or a URL")
    parser.add_argument(
        "--checkpoint",
        help=f"a .pth file written by train() (default: {DEFAULT_NAME}, or the shipped weights until it exists)",
    )
    parser.add_argument("--topk", type=int, default=3, help="classes to show per image (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    args = parser.parse_args(argv)

    path = args.checkpoint or DEFAULT_CHECKPOINT
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.exists():
        path = checkpoints.PRETRAINED_WEIGHTS
        print(f"No {DEFAULT_NAME} yet (notebook 3 or train.py trains it): using the shipped weights.",
              file=sys.stderr)  # fmt: skip
    try:
        net, checkpoint = checkpoints.load_model(path, device=args.device)
    except (FileNotFoundError, checkpoints.CheckpointError) as error:
        sys.exit(f"error: {error}")
    sources = []
    for source in args.inputs:
        if not is_url(source) and Path(source).is_dir():
            sources += [str(p) for p in images.image_files(source)]
        else:
            sources.append(source)
    results = predict(net, sources, checkpoint, topk=args.topk)
    print(format_table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
