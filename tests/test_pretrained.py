"""The weights that ship with the project (model/pretrained/), hubconf.py, and the fallback
on them in predict.py."""

import hashlib
import re
from pathlib import Path

import pytest
import torch

import checkpoints
import hubconf
import predict
import utils

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = checkpoints.PRETRAINED_WEIGHTS
CARD = (WEIGHTS.parent / "README.md").read_text(encoding="utf-8")
SAMPLES = sorted((ROOT / "samples").iterdir())


def stated(label):
    """A figure of the weights' README, from its line '- <label>: <value>'."""
    match = re.search(rf"^- {re.escape(label)}: \**([^*\s]+)", CARD, re.MULTILINE)
    assert match, f"model/pretrained/README.md has no line '- {label}: ...'"
    return match.group(1)


def test_the_weights_are_the_ones_their_readme_describes():
    assert WEIGHTS.stat().st_size < 5_000_000
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == stated("sha256")
    checkpoint = utils.load_checkpoint(WEIGHTS)  # weights_only=True
    weights = checkpoint[checkpoints.predicting_weights(checkpoint)]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    assert "optimizer" not in checkpoint  # no training state
    assert checkpoint["epoch"] == checkpoint["epochs"] == int(stated("epochs"))


def test_the_weights_classify_the_samples():
    net, checkpoint = utils.load_model(WEIGHTS)
    results = predict.predict(net, [str(p) for p in SAMPLES], checkpoint)
    assert [r["top"][0]["class"] for r in results] == [p.stem for p in SAMPLES]


def test_torch_hub_gives_the_network_with_the_shipped_weights():
    net = torch.hub.load(str(ROOT), "mobilenetv2_cifar10", source="local", pretrained=True)
    reference, checkpoint = utils.load_model(WEIGHTS)
    assert not net.training
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(inputs), reference(inputs))
    # The normalisation hubconf documents is the one the weights were trained with.
    for name in ("mean", "std"):
        documented = re.search(rf"{name} = \(([^)]*)\)", hubconf.__doc__).group(1)
        assert [float(x) for x in documented.split(",")] == [round(x, 4) for x in checkpoint[name]]
    assert ", ".join(checkpoint["classes"]) in hubconf.__doc__


def test_torch_hub_without_weights_builds_what_model_py_builds():
    net = torch.hub.load(str(ROOT), "mobilenetv2_cifar10", source="local", small_input=False, num_classes=100)
    assert net.training
    assert net.config["small_input"] is False and net(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="num_classes"):
        hubconf.mobilenetv2_cifar10(pretrained=True, num_classes=100)


def test_predict_falls_back_on_the_shipped_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(predict, "DEFAULT_CHECKPOINT", tmp_path / "mobilenetv2.pth")
    assert predict.main([str(ROOT / "samples")]) == 0
    captured = capsys.readouterr()
    assert "using the shipped weights" in captured.err
    rows = captured.out.splitlines()[1:]
    assert [row.split()[1] for row in rows] == [p.stem for p in SAMPLES]


@pytest.mark.skipif(not (utils.DATA_DIR / "cifar10-jpeg").is_dir(), reason="needs data/cifar10-jpeg")
def test_the_stated_test_accuracy_is_measured_again():
    net, checkpoint = utils.load_model(WEIGHTS)
    images, labels, classes = utils.load_split(utils.DATA_DIR / "cifar10-jpeg", "test")
    assert classes == checkpoint["classes"]
    inputs = utils.normalize(images, checkpoint["mean"], checkpoint["std"])
    loader = list(zip(inputs.split(500), labels.split(500), strict=True))
    assert f"{utils.evaluate(net, loader, amp=False)['acc']:.2f}" == stated("test accuracy")
    assert f"{utils.evaluate(net, loader, amp=False, tta='flip')['acc']:.2f}" == stated("flip TTA")
