"""Data: image folders, errors, the validation split, normalisation, the two loaders."""

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import utils


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


def test_unreadable_image_is_named(tmp_path):
    folder = write_folder(tmp_path / "set")
    (folder / "test" / "dog" / "broken.jpg").write_bytes(b"not a picture")
    with pytest.raises(ValueError, match=r"Cannot read image .*broken\.jpg"):
        utils.load_split(folder, "test", root=tmp_path)


def test_cifar10_download_failure_says_what_to_do(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match="Could not download CIFAR-10.*offline copy"):
        utils.load_split("cifar10", "train", root=tmp_path)


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


def test_fast_loader_and_dataloader_give_the_same_evaluation_batches():
    fast = utils.get_loaders("synthetic", val_size=100, eval_batch_size=64, fast=True, device="cpu")
    plain = utils.get_loaders("synthetic", val_size=100, eval_batch_size=64, fast=False, num_workers=0)
    assert isinstance(plain[0], torch.utils.data.DataLoader)
    for (x1, y1), (x2, y2) in zip(fast[2], plain[2], strict=True):
        assert torch.equal(y1, y2)
        torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-5)
    x, y = next(iter(plain[0]))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32


def test_real_cifar10_copy_loads(offline_cifar, tmp_path):
    images, labels, classes = utils.load_split(offline_cifar, "test", root=tmp_path)
    assert images.shape == (10_000, 3, 32, 32)
    assert classes == list(utils.CIFAR10_CLASSES)
    assert torch.bincount(labels).tolist() == [1000] * 10
