"""The benchmark scripts run end to end on synthetic data and print what the README quotes."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import utils

ROOT = utils.ROOT
sys.path.insert(0, str(ROOT / "benchmarks"))
import augment_cost  # noqa: E402

import precision  # noqa: E402


def run_script(tmp_path, script, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


def test_train_speed_prints_a_table_and_ends_with_the_speedup(tmp_path):
    done = run_script(tmp_path, "train_speed.py", "--steps", "1", "--warmup", "1", "--batch-size", "16",
                      "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    rows = [re.fullmatch(r"((?:tutorial|project): .*?)\s+([\d.]+)\s+([\d.]+)x", line) for line in lines]
    rows = [row.groups() for row in rows if row]
    assert [name.split(":")[0] for name, _, _ in rows] == ["tutorial", "project", "project"]
    baseline = float(rows[0][1])
    assert all(float(ratio) == pytest.approx(float(speed) / baseline, abs=0.006) for _, speed, ratio in rows)
    defaults = [ratio for name, _, ratio in rows if name.endswith("(default)")]
    assert len(defaults) == 1
    assert lines[-1] == f"speedup: {defaults[0]}x"


@pytest.fixture(scope="module")
def accuracy_run(tmp_path_factory):
    """benchmarks/accuracy.py on synthetic data, 2 epochs: (its JSON record, its folder)."""
    tmp_path = tmp_path_factory.mktemp("accuracy")
    out = tmp_path / "metrics.json"
    done = run_script(tmp_path, "accuracy.py", "default-paper-10", "--data", "synthetic", "--epochs", "2",
                      "--alpha", "0.25", "--val-size", "100", "--batch-size", "64", "--device", "cpu",
                      "--model-dir", str(tmp_path / "model"), "--log-dir", str(tmp_path / "logs"),
                      "--metrics-out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), tmp_path


def test_accuracy_writes_per_epoch_metrics(accuracy_run):
    record, _ = accuracy_run
    assert record["recipe"] == utils.get_recipe("default", batch_size=64)
    assert record["model"]["small_input"] is False  # the experiment's network, not train.py's default
    assert record["args"]["epochs"] == 2  # an option after the name overrides the experiment's
    assert len(record["history"]["val_acc"]) == len(record["history"]["seconds"]) == 2
    assert 0 <= record["test_acc"] <= 100 and 0 <= record["test_acc_flip_tta"] <= 100


def test_precision_compares_each_precision_with_float64(accuracy_run):
    _, folder = accuracy_run
    checkpoint = folder / "model" / "default-paper-10_last.pth"
    done = run_script(folder, "precision.py", "--batch-size", "8", "--device", "cpu", "--checkpoint", str(checkpoint))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [
        row
        for row in map(str.split, done.stdout.splitlines())
        if row[-5:-4] in (["float32"], ["bfloat16"], ["float16"])
    ]
    assert [(row[0], row[-5]) for row in rows] == [
        ("initialised", "float32"), ("initialised", "bfloat16"), ("initialised", "float16"),
        ("default-paper-10_last.pth,", "float32"), ("default-paper-10_last.pth,", "bfloat16"),
        ("default-paper-10_last.pth,", "float16"),
    ]  # fmt: skip
    cosines = [[float(v) for v in row[-3:]] for row in rows]
    assert min(cosines[0] + cosines[3]) > 0.999  # float32 is the control
    # bf16 keeps 8 bits of mantissa: its gradients are visibly further from float64's.
    assert cosines[1][0] < cosines[0][0] and cosines[4][0] < cosines[3][0]


def test_accuracy_names_its_experiments_on_a_typo(tmp_path):
    done = run_script(tmp_path, "accuracy.py", "default-paper-100")
    assert done.returncode != 0
    assert "default-paper-10" in done.stderr and "tutorial-paper-10" in done.stderr


def test_emulated_autocast_rounds_like_a_low_precision_kernel():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 8)
    reference = {k: v.clone() for k, v in layer.state_dict().items()}
    precision.emulate_autocast(layer, torch.bfloat16)
    x = torch.randn(4, 64, requires_grad=True)
    out = layer(x)
    exact = torch.nn.functional.linear(x.detach(), layer.weight.detach(), layer.bias.detach())
    in_bf16 = torch.nn.functional.linear(
        x.detach().bfloat16(), layer.weight.detach().bfloat16(), layer.bias.detach().bfloat16()
    )
    assert torch.equal(out, out.bfloat16().float())  # outputs are bf16 values
    assert not torch.equal(out, exact)
    torch.testing.assert_close(out, in_bf16.float(), rtol=1e-2, atol=1e-2)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.equal(x.grad, x.grad.bfloat16().float())  # and so are the gradients
    assert layer.state_dict().keys() == reference.keys()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in reference.items())


def test_accuracy_can_emulate_bf16(tmp_path):
    out = tmp_path / "metrics.json"
    done = run_script(tmp_path, "accuracy.py", "default-paper-10", "--emulate", "bfloat16", "--data", "synthetic",
                      "--epochs", "1", "--alpha", "0.25", "--val-size", "100", "--batch-size", "64", "--device", "cpu",
                      "--model-dir", str(tmp_path / "model"), "--log-dir", str(tmp_path / "logs"),
                      "--metrics-out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["emulated_autocast"] == "bfloat16"
    assert record["args"]["run_name"] == "default-paper-10-emulated-bfloat16"
    assert utils.load_model(tmp_path / "model" / "default-paper-10-emulated-bfloat16.pth")  # plain MobileNetV2 keys


def test_emulated_float16_keeps_small_gradients_as_a_grad_scaler_would():
    layer = precision.emulate_autocast(torch.nn.Linear(16, 4), torch.float16)
    x = torch.randn(2, 16, requires_grad=True)
    (layer(x) * 1e-9).sum().backward()  # gradients far below fp16's smallest normal number
    assert x.grad.abs().min() > 0
    expected = layer.weight.detach().to(torch.float16).float().sum(0).expand(2, 16) * 1e-9
    torch.testing.assert_close(x.grad, expected, rtol=2e-3, atol=0)


def test_augment_cost_prints_one_row_per_augmentation(tmp_path):
    done = run_script(tmp_path, "augment_cost.py", "--images", "256", "--batch-size", "64", "--device", "cpu")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [re.fullmatch(r"(crop \+ flip.*?)\s+([\d.]+)\s+([\d.]+)x", line) for line in done.stdout.splitlines()]
    rows = [row.groups() for row in rows if row]
    assert [name for name, _, _ in rows] == list(augment_cost.SETTINGS)
    baseline = float(rows[0][1])  # the seconds are printed rounded to 1 ms: compare within 5 %
    assert all(float(ratio) == pytest.approx(float(seconds) / baseline, rel=0.05) for _, seconds, ratio in rows)
