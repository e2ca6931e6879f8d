"""predict.py: reading every kind of image, preprocessing as in training, predictions, the
command line, downloads from a local server, and load_model's errors on bad checkpoints."""

import contextlib
import io
import re
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import utils
from images import image_files, make_synthetic
from model import MobileNetV2

# ----------------------------------------------------------------------------------------
# A small trained checkpoint, shared by the tests of one module run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, net, checkpoint, test images uint8 (16, 3, 32, 32)) after a few steps
    of a real train() run on a slice of the synthetic set: what the tests read is what train() writes."""
    torch.manual_seed(0)
    images, labels, classes = make_synthetic("train", train_size=256)
    mean, std = utils.channel_stats(images)
    loader = utils.InMemoryLoader(images, labels, 64, mean, std, shuffle=True, drop_last=True, classes=classes)
    net = MobileNetV2(num_classes=10, alpha=0.25)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pth"
    utils.train(net, loader, None, 1, optimizer, torch.nn.CrossEntropyLoss(), save_path=path, verbose=False)
    net, checkpoint = utils.load_model(path, device="cpu")
    return path, net, checkpoint, make_synthetic("test", test_size=16)[0]


def save_pictures(images, folder):
    """uint8 images (N, 3, H, W) as PNG files (lossless); their paths in order."""
    folder.mkdir(exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def png_header(width, height):
    """A PNG of a few dozen bytes that claims width x height RGB pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100)))


# ----------------------------------------------------------------------------------------
# Preprocessing and predictions


def test_preprocess_gives_the_training_inputs(trained):
    _, _, checkpoint, images = trained
    mean, std = checkpoint["mean"], checkpoint["std"]
    loader = utils.InMemoryLoader(images, torch.zeros(len(images), dtype=torch.int64), len(images), mean, std)
    expected, _ = next(iter(loader))
    pictures = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    assert torch.equal(predict.preprocess(pictures, mean, std), expected)
    assert predict.preprocess(Image.new("RGB", (640, 480)), mean, std).shape == (1, 3, 32, 32)


def odd_pictures(folder):
    """One file of each kind that a plain convert("RGB") gets wrong, 40x24 or 24x40 pixels."""
    folder.mkdir(parents=True)
    rgba = Image.new("RGBA", (40, 24), (200, 30, 40, 0))  # transparent: its colour must not show
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 24))
    rgba.save(folder / "rgba.png")
    Image.new("LA", (40, 24), (90, 0)).save(folder / "la.png")
    palette = Image.new("P", (40, 24), 1)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    palette.paste(0, (0, 0, 20, 24))
    palette.save(folder / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright, its left half is on top
    sideways = Image.new("RGB", (40, 24), (255, 0, 0))
    sideways.paste((0, 0, 255), (20, 0, 40, 24))
    sideways.save(folder / "sideways.jpg", exif=exif, quality=95)
    Image.fromarray(np.full((24, 40), 257 * 100, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("CMYK", (40, 24), (255, 0, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("L", (24, 40), 70).save(folder / "gray.JPG")
    return image_files(folder)


def test_training_and_prediction_decode_every_kind_of_file_alike(tmp_path):
    for split in ("train", "test"):
        paths = odd_pictures(tmp_path / "set" / split / "odd")
    images, _, _ = utils.load_split(tmp_path / "set", "test", root=tmp_path)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    for path, trained_on in zip(paths, utils.normalize(images, mean, std), strict=True):
        predicted_on = predict.preprocess(predict.load_image(path), mean, std)[0]
        assert torch.equal(trained_on, predicted_on), path.name

    pixels = {path.stem: image.permute(1, 2, 0) for path, image in zip(paths, images, strict=True)}
    assert pixels["rgba"][16, 2].tolist() == [0, 0, 255] and pixels["rgba"][16, 30].tolist() == [255] * 3
    assert pixels["palette"][16, 2].tolist() == [255] * 3 and pixels["palette"][16, 30].tolist() == [200, 30, 40]
    assert pixels["la"][0, 0].tolist() == [255] * 3
    assert pixels["sideways"][2, 16, 0] > 240 and pixels["sideways"][30, 16, 2] > 240  # red on top
    assert pixels["deep"][0, 0].tolist() == [100] * 3  # not clipped to white
    assert pixels["gray"][0, 0].tolist() == [70] * 3
    r, g, b = pixels["cmyk"][16, 16].tolist()
    assert g > 200 and r < 50 and b < 50


def test_predict_files_agree_with_the_network(trained, tmp_path):
    _, net, checkpoint, images = trained
    paths = save_pictures(images, tmp_path / "pictures")
    results = predict.predict(net, [str(p) for p in paths], checkpoint, topk=3)
    with torch.no_grad():
        x, _ = next(iter(utils.InMemoryLoader(images, torch.zeros(16, dtype=torch.int64), 16, checkpoint["mean"],
                                              checkpoint["std"])))  # fmt: skip
        probs = net(x).softmax(1)
    assert [r["input"] for r in results] == [str(p) for p in paths]
    for result, expected in zip(results, probs, strict=True):
        top = result["top"]
        assert len(top) == 3
        assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
        assert top[0]["index"] == int(expected.argmax())
        assert top[0]["prob"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert top[0]["class"] == checkpoint["classes"][top[0]["index"]]
        assert all(type(t["prob"]) is float and type(t["index"]) is int for t in top)


def test_predict_single_input_of_each_kind(trained, tmp_path):
    _, net, checkpoint, images = trained
    array = images[0].permute(1, 2, 0).numpy()
    path = save_pictures(images[:1], tmp_path)[0]
    results = [
        predict.predict(net, source, checkpoint, topk=2) for source in (str(path), path, Image.open(path), array)
    ]
    assert [r["input"] for r in results] == [str(path), str(path), "<PIL.Image 32x32 RGB>", "<array 32x32x3 uint8>"]
    assert all(r["top"] == results[0]["top"] for r in results)
    # More classes asked for than there are: all of them, no error.
    assert len(predict.predict(net, array, checkpoint, topk=50)["top"]) == 10


def test_predict_list_reports_bad_items_and_keeps_going(trained, tmp_path):
    _, net, checkpoint, images = trained
    good = save_pictures(images[:2], tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a picture")
    missing = tmp_path / "missing.png"
    results = predict.predict(net, [str(good[0]), str(broken), str(missing), str(good[1])], checkpoint, batch_size=1)
    assert [r["input"] for r in results] == [str(good[0]), str(broken), str(missing), str(good[1])]
    assert "top" in results[0] and "top" in results[3]
    assert str(broken) in results[1]["error"] and "top" not in results[1]
    assert str(missing) in results[2]["error"]
    with pytest.raises(predict.ImageError, match=re.escape(str(broken))):
        predict.predict(net, str(broken), checkpoint)


def test_predict_folder_and_command_line(trained, tmp_path, capsys):
    path, net, checkpoint, images = trained
    folder = tmp_path / "photos"
    save_pictures(images[:3], folder)
    save_pictures(images[3:4], folder / "more")[0].rename(folder / "more" / "03.PNG")
    (folder / "notes.txt").write_text("not an image, and not an image suffix either")
    (folder / "._00.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # what macOS leaves on some drives
    (folder / "zz_broken.jpg").write_bytes(b"")
    results = predict.predict_folder(net, folder, checkpoint, topk=2)
    expected = ("00.png", "01.png", "02.png", "more/03.PNG", "zz_broken.jpg")
    assert [r["input"] for r in results] == list(expected)
    assert "empty file" in results[4]["error"]

    assert (
        predict.main([str(folder), str(folder / "00.png"), "--checkpoint", str(path), "--topk", "2"]) == 1
    )  # one broken file
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["input", "top-1", "prob", "others"]
    assert len(lines) == 1 + 6
    assert lines[1].startswith(str(folder / "00.png")) and lines[1].split()[1] in checkpoint["classes"]
    assert "error:" in lines[5]
    with pytest.raises(SystemExit, match="No checkpoint file"):
        predict.main([str(folder), "--checkpoint", str(tmp_path / "nothing.pth")])


# ----------------------------------------------------------------------------------------
# Reading images of every kind

FORMAT_MODES = [
    ("PNG", "1"), ("PNG", "L"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "I;16"),
    ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("GIF", "P"), ("BMP", "1"), ("BMP", "L"), ("BMP", "RGB"),
    ("TIFF", "L"), ("TIFF", "RGB"), ("TIFF", "RGBA"), ("TIFF", "CMYK"), ("TIFF", "I;16"), ("TIFF", "I"),
    ("WEBP", "RGB"), ("WEBP", "RGBA"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "mode"), FORMAT_MODES)
def test_every_format_and_mode_reads_as_rgb(tmp_path, fmt, mode):
    path = tmp_path / f"picture.{fmt.lower()}"
    Image.new(mode, (12, 8)).save(path, fmt)
    image = predict.load_image(path)
    assert (image.mode, image.size) == ("RGB", (12, 8))


def test_colours_survive_conversion(tmp_path):
    red = (200, 30, 40)
    # Fully transparent pixels show white, half transparent ones are blended with white.
    rgba = Image.new("RGBA", (4, 4), (*red, 0))
    rgba.putpixel((1, 1), (*red, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    image = predict.load_image(tmp_path / "rgba.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == red
    assert image.getpixel((2, 2)) == (127, 127, 127)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, *red] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "palette.png", transparency=0)
    image = predict.load_image(tmp_path / "palette.png")
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == red

    # 16 bits: scaled to 8 (Pillow alone would clip every value above 255 to white).
    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.asarray(predict.load_image(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 100, 255]

    Image.new("CMYK", (8, 8), (255, 0, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = predict.load_image(tmp_path / "cmyk.jpg").getpixel((4, 4))
    assert g > 200 and r < 50 and b < 50  # cyan and yellow ink: green


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the camera was held rotated by 90 degrees
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "sideways.jpg", exif=exif)
    assert predict.load_image(tmp_path / "sideways.jpg").size == (20, 40)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert predict.load_image(tmp_path / "animated.gif").getpixel((5, 5)) == (255, 0, 0)


def test_large_photo_reads(tmp_path):
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(tmp_path / "large.jpg", quality=80)
    image = predict.load_image(tmp_path / "large.jpg")
    assert image.size == (4000, 3000)
    assert predict.preprocess(image, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).shape == (1, 3, 32, 32)


def test_arrays(tmp_path):
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    assert predict.load_image(rgb).getpixel((0, 0)) == (255, 0, 0)
    assert predict.load_image(np.full((6, 8), 70, dtype=np.uint8)).getpixel((0, 0)) == (70, 70, 70)
    assert predict.load_image(np.full((6, 8, 1), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    transparent = np.zeros((6, 8, 4), dtype=np.uint8)
    assert predict.load_image(transparent).getpixel((0, 0)) == (255, 255, 255)
    assert predict.load_image(transparent).size == (8, 6)

    with pytest.raises(predict.ImageError, match=re.escape("<array 0x32x3 uint8> is empty")):
        predict.load_image(np.zeros((0, 32, 3), dtype=np.uint8))
    with pytest.raises(predict.ImageError, match=r"<array 3x32x32 uint8>.*transpose\(1, 2, 0\)"):
        predict.load_image(np.zeros((3, 32, 32), dtype=np.uint8))
    with pytest.raises(predict.ImageError, match="<array 4x4 int64>: expected uint8"):
        predict.load_image(np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(predict.ImageError, match="no pixels"):
        predict.load_image(Image.new("RGB", (0, 5)))


def test_unreadable_files_raise_errors_naming_them(tmp_path):
    Image.new("RGB", (64, 64), (0, 128, 0)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am a text file\n")
    for name in ("truncated.jpg", "empty.png", "text.jpg"):
        with pytest.raises(predict.ImageError, match=re.escape(str(tmp_path / name))):
            predict.load_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.jpg"))):
        predict.load_image(tmp_path / "missing.jpg")


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    with pytest.raises(predict.ImageError, match=re.escape(str(tmp_path / "bomb.png")) + ".*decompression bomb"):
        predict.load_image(tmp_path / "bomb.png")

    Image.new("RGB", (100, 100)).save(tmp_path / "ordinary.png")
    monkeypatch.setattr("images.MAX_PIXELS", 5_000)
    with pytest.raises(predict.ImageError, match=r"100x100 pixels, over the limit of 5,000"):
        predict.load_image(tmp_path / "ordinary.png")


# ----------------------------------------------------------------------------------------
# Downloads, from a server on this machine


def _png_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """A few URLs that each misbehave in one way."""

    def do_GET(self):
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up first
            self._answer()

    def _answer(self):
        # The slow answers take far longer than any timeout the tests give, so a download
        # that ends with a timeout error ended by its own deadline, not by the server.
        if self.path == "/slow.png":
            time.sleep(30)
        if self.path == "/missing.png":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path == "/page.png" else "image/png")
        if self.path == "/declared-large.png":
            self.send_header("Content-Length", "5000000")
        self.end_headers()
        if self.path == "/large.png":  # no Content-Length: only counting while reading finds out
            for _ in range(50):
                self.wfile.write(bytes(10_000))
        elif self.path == "/trickle.png":  # every wait is short, the whole is not
            for _ in range(600):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self.wfile.write(_png_bytes())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_download_an_image(server, trained):
    _, net, checkpoint, _ = trained
    image = predict.load_image(f"{server}/blue.png")
    assert image.size == (48, 32) and image.getpixel((0, 0)) == (0, 0, 255)
    results = predict.predict(net, [f"{server}/blue.png", f"{server}/missing.png"], checkpoint)
    assert results[0]["input"] == f"{server}/blue.png" and len(results[0]["top"]) == 3
    assert "HTTP 404" in results[1]["error"]


@pytest.mark.parametrize(
    ("path", "kwargs", "message"),
    [
        ("/missing.png", {}, "HTTP 404"),
        ("/page.png", {}, "Content-Type 'text/html'"),
        ("/large.png", {"max_bytes": 100_000}, "larger than the limit of 100,000 bytes"),
        ("/declared-large.png", {"max_bytes": 100_000}, "larger than the limit"),
        ("/slow.png", {"timeout": 0.3}, "no complete answer within 0.3 s"),
        ("/trickle.png", {"timeout": 0.3}, "no complete answer within 0.3 s"),
    ],
)
def test_download_errors_are_clear(server, path, kwargs, message):
    url = f"{server}{path}"
    with pytest.raises(predict.ImageError, match=re.escape(url) + ".*" + re.escape(message)):
        predict.load_image(url, **kwargs)


def test_download_without_a_server_is_a_clear_error():
    with socket.socket() as s:  # a port that nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cat.png"
    with pytest.raises(predict.ImageError, match=re.escape(f"Could not download {url}")):
        predict.load_image(url, timeout=0.3)


# ----------------------------------------------------------------------------------------
# load_model on files that are not checkpoints: each error names the file


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "whole model", "text"])
def test_load_model_refuses_files_that_are_not_checkpoints(trained, tmp_path, kind):
    path, net, _, _ = trained
    bad = tmp_path / "bad.pth"
    if kind == "whole model":
        torch.save(net, bad)
    else:
        data = {
            "random bytes": np.random.default_rng(0).bytes(4096),
            "truncated": path.read_bytes()[: path.stat().st_size // 2],
            "text": b"this is a text file\n",
        }[kind]
        bad.write_bytes(data)
    with pytest.raises(utils.CheckpointError, match=re.escape(str(bad))) as error:
        utils.load_model(bad, device="cpu")
    if kind == "whole model":
        assert "convert" in str(error.value)


def test_load_model_errors_on_a_missing_file_or_another_class_count(trained, tmp_path):
    path, _, _, _ = trained
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.pth"))):
        utils.load_model(tmp_path / "missing.pth", device="cpu")
    with pytest.raises(utils.CheckpointError, match=re.escape(str(path)) + ".*10 classes, not 5"):
        utils.load_model(path, device="cpu", num_classes=5)
