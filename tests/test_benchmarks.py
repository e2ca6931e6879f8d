"""The benchmark scripts run end to end on synthetic data and print what the README quotes."""

import json
import os
import re
import subprocess
import sys

import pytest

import utils

ROOT = utils.ROOT


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
    assert all(float(speed) > 0 for _, speed, _ in rows)
    assert rows[0][2] == "1.00"
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
    assert all(-1 <= c <= 1 for row in cosines for c in row)
    assert min(cosines[0] + cosines[3]) > 0.999  # float32 is the control


def test_accuracy_names_its_experiments_on_a_typo(tmp_path):
    done = run_script(tmp_path, "accuracy.py", "default-paper-100")
    assert done.returncode != 0
    assert "default-paper-10" in done.stderr and "tutorial-paper-10" in done.stderr
