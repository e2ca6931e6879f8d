"""Data: image folders as users have them, errors, the validation split, normalisation, the
two loaders, and the progress bars."""

import io
import re
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import runtime
import utils
from images import ImageError, data_source_problem, image_files, make_synthetic, to_rgb


def write_folder(root, classes=("cat", "dog"), per_class=4, size=32, splits=("train", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_loads_with_labels_and_classes(tmp_path):
    folder = write_folder(tmp_path / "set", classes=("cat", "dog", "emu"), per_class=3)
    images, labels, classes = utils.load_split(folder, "train", root=tmp_path)
    assert classes == ["cat", "dog", "emu"]
    assert images.shape == (9, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = np.array(Image.open(folder / "train" / "cat" / "0.png"))
    assert torch.equal(images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_images_of_other_sizes_are_resized(tmp_path):
    folder = write_folder(tmp_path / "set", size=48)
    images, _, _ = utils.load_split(folder, "test", root=tmp_path)
    assert images.shape[-2:] == (32, 32)


def test_decoded_folder_is_cached_and_refreshed_when_a_file_changes(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "set")
    first, _, _ = utils.load_split(folder, "train", root=tmp_path)
    assert len(list((tmp_path / "cache").glob("set-train-*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(Image, "open", no_decoding)
    again, _, _ = utils.load_split(folder, "train", root=tmp_path)
    assert torch.equal(first, again)
    monkeypatch.undo()

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "train" / "cat" / "0.png")
    changed, _, _ = utils.load_split(folder, "train", root=tmp_path)
    assert changed[0].sum() == 0
    assert len(list((tmp_path / "cache").glob("set-train-*.pt"))) == 2


def test_folder_without_train_or_test_is_named(tmp_path):
    folder = write_folder(tmp_path / "set", splits=("train",))
    with pytest.raises(ValueError, match=r"has no test/ sub-folder"):
        utils.load_split(folder, "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        utils.load_split(tmp_path / "nowhere", "train", root=tmp_path)


def test_class_folders_that_differ_are_listed(tmp_path):
    folder = write_folder(tmp_path / "set")
    write_folder(folder, classes=("emu",), splits=("test",))
    with pytest.raises(ValueError, match=r"only in train: \[\], only in test: \['emu'\]"):
        utils.load_split(folder, "train", root=tmp_path)


def test_empty_class_is_named(tmp_path):
    folder = write_folder(tmp_path / "set")
    (folder / "train" / "emu").mkdir()
    (folder / "test" / "emu").mkdir()
    with pytest.raises(ValueError, match=r"emu holds no images"):
        utils.load_split(folder, "train", root=tmp_path)


def save(image, path, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def write_user_folder(root, train_counts=(60, 25, 5), test_count=3):
    """A folder as people bring it: classes of very different sizes, sub-folders, suffixes in
    any case, JPEG and PNG, grayscale and non-square pictures, and the files that macOS and
    Windows leave behind."""
    rng = np.random.default_rng(0)
    suffixes = [".jpg", ".JPG", ".png", ".Png", ".jpeg"]
    for split, counts in (("train", train_counts), ("test", (test_count,) * len(train_counts))):
        for c, count in enumerate(counts):
            class_dir = root / split / f"kind{c}"
            for i in range(count):
                width, height = (48, 32) if i % 3 else (32, 40)
                if i % 4 == 1:
                    image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))  # grayscale
                else:
                    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                nested = f"batch{i % 2}/" if i % 3 == 2 else ""
                save(image, class_dir / f"{nested}{i:03d}{suffixes[i % len(suffixes)]}")
            (class_dir / "._000.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # macOS AppleDouble
            (class_dir / ".DS_Store").write_bytes(bytes(40))
            (class_dir / "Thumbs.db").write_bytes(bytes(40))
            (class_dir / "notes.txt").write_text("where these were taken")
            save(Image.new("RGB", (8, 8)), class_dir / ".thumbnails" / "000.png")  # a hidden folder
    return root


def test_image_files_leave_out_hidden_and_other_files_and_go_into_sub_folders(tmp_path):
    folder = write_user_folder(tmp_path / "photos", train_counts=(12,))
    names = [str(p.relative_to(folder / "train" / "kind0")) for p in image_files(folder / "train" / "kind0")]
    assert len(names) == 12
    assert {"001.JPG", "003.Png", "004.jpeg", "batch0/002.png", "batch1/005.jpg"} <= set(names)
    assert not [n for n in names if n.startswith(".") or "/." in n or not n.lower().endswith((".jpg", ".jpeg", ".png"))]
    assert names == sorted(names)
    with pytest.raises(FileNotFoundError, match="No folder at"):
        image_files(tmp_path / "nowhere")


def test_user_folder_loads_with_the_default_split(tmp_path):
    folder = write_user_folder(tmp_path / "photos")
    train, val, test, classes = utils.get_loaders(folder, root=tmp_path, batch_size=16, device="cpu")
    assert classes == ["kind0", "kind1", "kind2"]
    # 10 % of 90 is 9: 6 and 2.5 and 0.5 by size, each class at least one.
    assert torch.bincount(val.labels).tolist() == [6, 2, 1]
    assert torch.bincount(train.labels).tolist() == [54, 23, 4]
    assert len(test.labels) == 9
    assert train.images.shape[1:] == (3, 32, 32)
    gray = np.asarray(Image.open(folder / "train" / "kind0" / "001.JPG"))
    assert gray.ndim == 2  # saved as grayscale, read as RGB with three equal channels
    images, _, _ = utils.load_split(folder, "train", root=tmp_path)
    assert torch.equal(images[1][0], images[1][1]) and torch.equal(images[1][1], images[1][2])


def test_unreadable_images_are_named_and_counted(tmp_path):
    folder = write_folder(tmp_path / "set", per_class=6)
    (folder / "train" / "dog" / "2_broken.jpg").write_bytes(b"not a picture")
    (folder / "train" / "cat" / "sub").mkdir()
    data = (folder / "train" / "cat" / "0.png").read_bytes()
    (folder / "train" / "cat" / "sub" / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "train" / "cat" / "empty.png").write_bytes(b"")
    message = r"3 of the 15 images in .*train cannot be read \(the other 12 are fine\)"
    for attempt in ("decoded", "cached"):
        with pytest.raises(ImageError, match=message) as error:
            utils.load_split(folder, "train", root=tmp_path)
        for name in ("dog/2_broken.jpg", "cat/sub/cut.png", "cat/empty.png"):
            assert str(folder / "train" / name) in str(error.value), attempt
    assert len(list((tmp_path / "cache").glob("set-train-*.pt"))) == 1  # decoded once


def test_the_decoding_version_is_part_of_the_cache_key(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "set")
    plain, _, _ = utils.load_split(folder, "train", root=tmp_path)
    decode_as_before = to_rgb

    def inverted(image, name="image"):
        return Image.eval(decode_as_before(image, name), lambda value: 255 - value)

    monkeypatch.setattr("images.to_rgb", inverted)
    cached, _, _ = utils.load_split(folder, "train", root=tmp_path)
    assert torch.equal(cached, plain)  # a new decoding without a new version: the cache still answers
    monkeypatch.setattr("images.DECODING_VERSION", 2)
    changed, _, _ = utils.load_split(folder, "train", root=tmp_path)
    assert torch.equal(changed, 255 - plain)
    assert len(list((tmp_path / "cache").glob("set-train-*.pt"))) == 2


def test_cifar10_download_failure_says_what_to_do(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    expected = r'Could not download CIFAR-10 .*no network.*README.md, "Data folders".*make run DATA=data/cifar10-jpeg'
    with pytest.raises(RuntimeError, match=expected):
        utils.load_split("cifar10", "train", root=tmp_path)
    assert re.match("error: " + expected, data_source_problem("cifar10", root=tmp_path))


def test_data_source_problem_names_what_is_wrong_or_nothing(tmp_path):
    folder = write_folder(tmp_path / "set")
    assert data_source_problem(folder, root=tmp_path) is None
    assert len(list((tmp_path / "cache").glob("set-*.pt"))) == 2  # the notebooks will not decode again
    assert data_source_problem(tmp_path / "nowhere", root=tmp_path) == (
        f"error: Data folder {tmp_path / 'nowhere'} does not exist."
    )


def test_stratified_split_is_seeded_disjoint_and_proportional():
    labels = torch.arange(1000) % 10
    labels[:100] = 0  # an unbalanced class
    train_idx, val_idx = utils.stratified_split(labels, 200, seed=1)
    assert len(val_idx) == 200 and len(train_idx) == 800
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(1000))
    full = torch.bincount(labels).double() / len(labels)
    held = torch.bincount(labels[val_idx], minlength=10).double() / len(val_idx)
    assert torch.allclose(full, held, atol=0.01)
    again, _ = utils.stratified_split(labels, 200, seed=1)
    other, _ = utils.stratified_split(labels, 200, seed=2)
    assert torch.equal(train_idx, again) and not torch.equal(train_idx, other)


def test_stratified_split_fraction_zero_and_too_big():
    labels = torch.arange(100) % 4
    assert len(utils.stratified_split(labels, 0.1)[1]) == 10
    assert len(utils.stratified_split(labels, 0)[1]) == 0
    with pytest.raises(ValueError, match="val_size=100"):
        utils.stratified_split(labels, 100)
    with pytest.raises(ValueError, match=r"val_size=3 must leave each of the 4 classes .* between 4 and 96"):
        utils.stratified_split(labels, 3)


def test_cifar10_sized_split_is_the_same_as_a_fraction_or_a_count():
    labels = torch.arange(50_000) % 10
    fraction = utils.stratified_split(labels, 0.1)
    count = utils.stratified_split(labels, 5000)
    assert torch.equal(fraction[1], count[1]) and torch.equal(fraction[0], count[0])
    assert torch.bincount(labels[fraction[1]]).tolist() == [500] * 10


def test_every_class_gives_at_least_one_validation_image():
    labels = torch.tensor([0] * 200 + [1] * 3 + [2] * 2)
    train_idx, val_idx = utils.stratified_split(labels, 0.1)
    # 10 % of 205 is 20: one from each small class (their shares round to 0), the rest from the large one.
    assert torch.bincount(labels[val_idx]).tolist() == [18, 1, 1]
    assert torch.bincount(labels[train_idx]).tolist() == [182, 2, 1]
    tiny = torch.tensor([0, 0, 1, 1])
    assert torch.bincount(tiny[utils.stratified_split(tiny, 0.1)[1]]).tolist() == [1, 1]  # 10 % of 4 rounds to 0


def test_a_class_too_small_to_split_is_named():
    labels = torch.tensor([0] * 50 + [1] * 1 + [2] * 40)
    with pytest.raises(ValueError, match=r"fewer than 2 training images .*'emu' \(1\).*val_size=0"):
        utils.stratified_split(labels, 0.1, classes=["cat", "emu", "dog"])
    with pytest.raises(ValueError, match=r"'yak' \(0\)"):
        utils.stratified_split(labels, 0.1, classes=["cat", "emu", "dog", "yak"])
    assert len(utils.stratified_split(labels, 0, classes=["cat", "emu", "dog"])[0]) == 91


def test_channel_stats_are_per_channel_fractions():
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    images[:, 0] = 255
    images[:5, 1] = 255
    mean, std = utils.channel_stats(images, chunk=3)
    assert mean == (1.0, 0.5, 0.0)
    assert std == (0.0, 0.5, 0.0)


def test_random_crop_flip_takes_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = utils.random_crop_flip(images, padding=2, generator=g)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for image, crop in zip(padded, out, strict=True):
        candidates = [image[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        plain = any(torch.equal(crop, c) for c in candidates)
        mirrored = any(torch.equal(crop, c.flip(2)) for c in candidates)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 16 < flips < 48  # about half are mirrored
    unchanged = utils.random_crop_flip(images, padding=0, flip=False, generator=g)
    assert torch.equal(unchanged, images)


def make_loader(n=10, **kwargs):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    labels = torch.arange(n)
    return utils.InMemoryLoader(images, labels, mean=(0, 0, 0), std=(1 / 255,) * 3, **kwargs)


def seen(loader):
    return [labels.tolist() for _, labels in loader]


def test_in_memory_loader_covers_every_sample_once_in_order():
    loader = make_loader(10, batch_size=4)
    assert len(loader) == 3
    assert seen(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    images, _ = next(iter(loader))
    assert images.dtype == torch.float32 and images[1, 0, 0, 0].item() == 1.0  # normalised value


def test_in_memory_loader_shuffles_per_epoch_reproducibly():
    loader = make_loader(10, batch_size=4, shuffle=True, drop_last=True)
    assert len(loader) == 2
    first, second = seen(loader), seen(loader)
    assert first != second
    loader.set_epoch(0)
    assert seen(loader) == first
    assert len(set(sum(first, []))) == 8


def test_in_memory_loader_shards_between_ranks():
    shards = [seen(make_loader(10, batch_size=2, shuffle=True, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])  # equal, or DDP would hang
    assert set(sum(shards[0], [])).isdisjoint(sum(shards[1], []))
    evals = [seen(make_loader(9, batch_size=2, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(sum(evals[0] + evals[1], [])) == list(range(9))  # evaluation sees all, once


def test_get_loaders_synthetic_split_and_metadata():
    train, val, test, classes = utils.get_loaders("synthetic", batch_size=50, val_size=100, device="cpu")
    assert len(classes) == 10 and train.classes == classes
    assert sum(len(y) for _, y in val) == 100 and sum(len(y) for _, y in test) == 200
    assert len(train) == 900 // 50
    assert len(train.mean) == 3 and all(0 < s < 1 for s in train.std)
    assert utils.get_loaders("synthetic", val_size=0, device="cpu")[1] is None
    assert sum(len(y) for _, y in utils.get_loaders("synthetic", device="cpu")[1]) == 100  # 10 % by default


def test_get_loaders_says_when_there_is_not_one_training_batch():
    with pytest.raises(ValueError, match="The training split has 900 images, fewer than one batch of 1000"):
        utils.get_loaders("synthetic", batch_size=1000, device="cpu")


def test_real_cifar10_copy_loads(offline_cifar, tmp_path):
    images, labels, classes = utils.load_split(offline_cifar, "test", root=tmp_path)
    assert images.shape == (10_000, 3, 32, 32)
    assert classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------------------
# Progress bars


class FakeKernelShell:
    """What IPython's get_ipython() returns inside a Jupyter kernel, as far as progress_bar looks."""

    config = {"IPKernelApp": {}}

    def __init__(self, user_ns=None):
        self.user_ns = user_ns or {}


@pytest.mark.parametrize(
    ("shell", "env", "widgets"),
    [
        (None, {}, False),  # plain Python
        (FakeKernelShell(), {}, False),  # a kernel run by papermill or nbclient
        (FakeKernelShell(), {"JPY_SESSION_NAME": "/home/me/01_data.ipynb"}, True),  # JupyterLab, Notebook 7
        (FakeKernelShell({"__vsc_ipynb_file__": "/home/me/01_data.ipynb"}), {}, True),  # VS Code
    ],
)
def test_progress_bar_is_a_widget_only_where_a_front_end_draws_it(monkeypatch, shell, env, widgets):
    import IPython
    from tqdm.notebook import tqdm_notebook

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert runtime._notebook_front_end() is widgets
    if not widgets:
        bar = runtime.progress_bar(range(3), desc="Train", disable=True)
        assert not isinstance(bar, tqdm_notebook)


def test_progress_bar_writes_text_with_rate_and_time_left_when_not_in_a_terminal(monkeypatch):
    log = io.StringIO()  # not a terminal, as papermill's kernel output is not
    monkeypatch.setattr("sys.stderr", log)
    bar = runtime.progress_bar(range(40), desc="Train Epoch 1/1")
    assert bar.mininterval == bar.maxinterval == runtime.TEXT_PROGRESS_INTERVAL
    for i in bar:
        if i == 20:
            bar.set_postfix({"Train Acc": "0.500"})
    text = log.getvalue()
    assert re.search(r"Train Epoch 1/1: 100%\|.*\| 40/40 \[\d\d:\d\d<\d\d:\d\d, .*it/s, Train Acc=0.500\]", text)
    # The start and the end: 40 quick steps are one interval, and a postfix waits for an update.
    assert text.count("Train Epoch") == 2


# ----------------------------------------------------------------------------------------
# Stronger augmentation: Cutout and TrivialAugment, per image, seeded


def test_cutout_sets_one_square_per_image_clipped_by_the_border():
    images = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    fill = torch.tensor([1, 2, 3], dtype=torch.uint8)
    out = utils.cutout(images, 8, fill, generator=torch.Generator().manual_seed(0))
    cut = (out != images).all(1)  # (N, H, W): pixels replaced in every channel
    assert torch.equal(out.permute(0, 2, 3, 1)[cut], fill.expand(int(cut.sum()), 3))
    areas = cut.sum((1, 2))
    assert areas.max() == 64 and areas.min() >= 16  # 8 x 8, or less where the border cuts it
    assert (areas < 64).any()  # some squares do reach past the border
    rows, cols = cut.any(2), cut.any(1)
    assert torch.equal(rows.sum(1) * cols.sum(1), areas)  # each cut region is one rectangle
    again = utils.cutout(images, 8, fill, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_trivial_augment_draws_per_group_of_images_and_repeats_with_its_seed():
    images = make_synthetic("train", train_size=1)[0].expand(64, -1, -1, -1).contiguous()
    out = utils.trivial_augment(images, torch.Generator().manual_seed(0), group=8)
    assert out.shape == images.shape and out.dtype == torch.uint8
    groups = out.view(8, 8, 3, 32, 32)
    assert all(torch.equal(g[0], g[i]) for g in groups for i in range(8))  # one draw per group
    distinct = {bytes(g[0].flatten().tolist()) for g in groups}
    assert len(distinct) >= 4  # eight draws, most of them different
    assert torch.equal(out, utils.trivial_augment(images, torch.Generator().manual_seed(0), group=8))
    before = torch.get_rng_state()
    utils.trivial_augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(before, torch.get_rng_state())  # the global generator (dropout's) is untouched


def test_in_memory_loader_repeats_its_strong_augmentation_for_the_same_epoch():
    images, labels, classes = make_synthetic("train", train_size=128)
    mean, std = utils.channel_stats(images)

    def batches(epoch):
        loader = utils.InMemoryLoader(images, labels, 32, mean, std, shuffle=True, augment=True, seed=3,
                                      trivial_augment=True, cutout=8)  # fmt: skip
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    first, again, other = batches(2), batches(2), batches(3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    plain = utils.InMemoryLoader(images, labels, 32, mean, std, shuffle=True, augment=True, seed=3)
    plain.set_epoch(2)
    assert not torch.equal(next(iter(plain))[0], first[0])  # the policy and cutout did change the images
