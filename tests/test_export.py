"""export.py: BatchNorm folding, ONNX, torch.export programs and int8 ONNX, each checked
against the PyTorch network's outputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import checkpoints
import export
import utils
from images import make_synthetic
from model import MobileNetV2


def random_network(small_input, alpha=0.25):
    """A small network in eval mode whose BatchNorm layers are far from the identity (as
    after training, unlike at initialisation) and whose logits are of a trained network's size."""
    torch.manual_seed(0)
    net = MobileNetV2(num_classes=10, alpha=alpha, small_input=small_input)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.1)
    return net.eval()


def save_checkpoint(net, path, mean, std):
    """A checkpoint as train() writes it, built by the same function."""
    data = {"classes": [f"class_{i}" for i in range(10)], "mean": mean, "std": std}
    history = {key: [] for key in utils.HISTORY}
    checkpoints.atomic_save(checkpoints.make_checkpoint(net, data, epochs=1, history=history, best_val_acc=0.0), path)


def logits(net, images):
    with torch.no_grad():
        return net(images).numpy()


@pytest.fixture(scope="module")
def synthetic():
    """Normalised synthetic images: (mean, std, test images (200, 3, 32, 32))."""
    train_images, _, _ = make_synthetic("train")
    mean, std = utils.channel_stats(train_images)
    return mean, std, utils.normalize(make_synthetic("test")[0], mean, std)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic):
    """Everything the command line writes for one checkpoint of the CIFAR network: exporting
    to ONNX takes seconds, so it is done once for all tests."""
    mean, std, _ = synthetic
    folder = tmp_path_factory.mktemp("export")
    net = random_network(small_input=True)
    save_checkpoint(net, folder / "net.pth", mean, std)
    paths = {kind: folder / f"net.{kind}" for kind in ("onnx", "pt2", "int8")}
    export.main([str(folder / "net.pth"), "--onnx", str(paths["onnx"]), "--pt2", str(paths["pt2"]),
                 "--int8", str(paths["int8"]), "--calibration-data", "synthetic", "--calibration-size", "256"])  # fmt: skip
    return net, paths


@pytest.mark.parametrize("small_input", [False, True])
def test_fold_batchnorm_keeps_the_outputs(small_input):
    net = random_network(small_input)
    folded = export.fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 52  # the original is left as it was
    assert not folded.training
    images = torch.randn(4, 3, 32, 32)
    expected = logits(net, images)
    assert expected.std() > 0.5  # outputs large enough for the comparison to mean something
    np.testing.assert_allclose(logits(folded, images), expected, atol=1e-5, rtol=0)


def test_onnx_matches_pytorch_for_any_batch_size(exported, synthetic):
    net, paths = exported
    model = onnx.load(paths["onnx"])
    onnx.checker.check_model(model, full_check=True)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # named, not fixed
    session = ort.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    for images in (synthetic[2][:1], synthetic[2][:7]):
        (outputs,) = session.run(["logits"], {"images": images.numpy()})
        assert outputs.shape == (len(images), 10)
        np.testing.assert_allclose(outputs, logits(net, images), atol=1e-4, rtol=0)


def test_program_matches_pytorch_for_any_batch_size(exported, synthetic):
    net, paths = exported
    program = torch.export.load(paths["pt2"]).module()
    for images in (synthetic[2][:1], synthetic[2][:7]):
        np.testing.assert_allclose(logits(program, images), logits(net, images), atol=1e-5, rtol=0)


def test_export_program_of_the_paper_network(tmp_path, synthetic):
    net = random_network(small_input=False)
    program = torch.export.load(export.export_program(net, tmp_path / "net.pt2")).module()
    images = synthetic[2][:3]
    np.testing.assert_allclose(logits(program, images), logits(net, images), atol=1e-5, rtol=0)


def test_int8_onnx_stays_close_to_float(exported, synthetic):
    net, paths = exported
    images = synthetic[2]
    session = ort.InferenceSession(paths["int8"], providers=["CPUExecutionProvider"])
    (quantized,) = session.run(["logits"], {"images": images.numpy()})
    expected = logits(net, images)
    assert (quantized.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert np.abs(quantized - expected).mean() < 0.05 * expected.std()
    assert paths["int8"].stat().st_size < paths["onnx"].stat().st_size / 2


def test_command_line_refuses_incomplete_requests(tmp_path):
    for args in ([], ["--int8", str(tmp_path / "net.int8")]):
        with pytest.raises(SystemExit):
            export.main([str(tmp_path / "net.pth"), *args])


def test_release_is_the_weights_in_float16_with_their_metadata(tmp_path, synthetic):
    mean, std, images = synthetic
    net = random_network(small_input=True)
    save_checkpoint(net, tmp_path / "net.pth", mean, std)
    export.main([str(tmp_path / "net.pth"), "--release", str(tmp_path / "release.pth")])
    assert not (tmp_path / "release.onnx").exists()  # nothing else asked for, nothing else written
    release = utils.load_checkpoint(tmp_path / "release.pth")
    assert {v.dtype for v in release["model"].values() if v.is_floating_point()} == {torch.float16}
    assert "optimizer" not in release and release["mean"] == mean and release["classes"][0] == "class_0"
    loaded, _ = utils.load_model(tmp_path / "release.pth")
    np.testing.assert_allclose(logits(loaded, images[:8]), logits(net, images[:8]), atol=0.05, rtol=0.01)
