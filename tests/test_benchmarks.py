"""The benchmark scripts run end to end on synthetic data and print what the README quotes."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import runtime
import utils

ROOT = runtime.ROOT
sys.path.insert(0, str(ROOT / "benchmarks"))
import augment_cost  # noqa: E402
import gpu_campaign  # noqa: E402
import precision  # noqa: E402
import train_speed  # noqa: E402


def run_script(tmp_path, script, *args, timeout=300, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


def test_train_speed_prints_a_table_and_ends_with_the_speedup(tmp_path):
    done = run_script(tmp_path, "train_speed.py", "--steps", "1", "--warmup", "1", "--batch-size", "16",
                      "--device", "cpu", "--json", "speed.json")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    rows = [
        re.fullmatch(r"((?:tutorial|project|allocator): .*?)\s+([\d.]+)\s+([\d.]+)x\s*(\d*)", line) for line in lines
    ]
    rows = [row.groups() for row in rows if row]
    assert [name.split(":")[0] for name, *_ in rows] == ["tutorial", "project", "project", "allocator", "allocator"]
    # images/s are printed to 0.1 and ratios to 0.01: each ratio lies within what that rounding allows.
    baseline = float(rows[0][1])
    for _, speed, ratio, _ in rows:
        low, high = (float(speed) - 0.05) / (baseline + 0.05), (float(speed) + 0.05) / max(baseline - 0.05, 1e-9)
        assert low - 0.005 <= float(ratio) <= high + 0.005
    defaults = [ratio for name, _, ratio, _ in rows if name.endswith("(default)")]
    assert len(defaults) == 1
    assert lines[-1] == f"speedup: {defaults[0]}x"
    # The allocator rows ran in processes of their own, with freed memory kept and with glibc's
    # defaults, and each reports its peak memory; the allocator ratio is the first over the second.
    record = json.loads((tmp_path / "speed.json").read_text())
    kept, glibc = record["rows"][-2:]
    assert (kept["keeps_freed_memory"], glibc["keeps_freed_memory"]) == (runtime.KEEPS_FREED_MEMORY, False)
    assert [int(peak) for *_, peak in rows[-2:]] == [kept["peak_rss_mb"], glibc["peak_rss_mb"]]
    assert kept["peak_rss_mb"] > 100 and glibc["peak_rss_mb"] > 100
    assert record["allocator_speedup"] == pytest.approx(kept["images_per_s"] / glibc["images_per_s"])
    assert lines[-2] == f"allocator fix: {record['allocator_speedup']:.2f}x"


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
    # Seconds are printed to the ms and ratios to 0.01: each ratio lies within what that rounding allows.
    baseline = float(rows[0][1])
    for _, seconds, ratio in rows:
        low, high = (float(seconds) - 5e-4) / (baseline + 5e-4), (float(seconds) + 5e-4) / max(baseline - 5e-4, 1e-9)
        assert low - 0.005 <= float(ratio) <= high + 0.005


def test_gpu_campaign_smoke_runs_every_phase_and_keeps_every_result(tmp_path):
    out_dir, copied = tmp_path / "campaign", tmp_path / "out"
    done = run_script(tmp_path, "gpu_campaign.py", "--smoke", "--out-dir", str(out_dir), env={"OUT": str(copied)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = list(gpu_campaign.EXPERIMENTS)[: gpu_campaign.SMOKE_EXPERIMENTS]
    names = [gpu_campaign.job_name(line) for line in lines]
    for name in names:
        record = json.loads((out_dir / f"{name}.json").read_text())
        assert len(record["history"]["val_acc"]) == 1  # the smoke run's --epochs 1 overrides the experiment's
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [e["name"] for e in summary["experiments"]] == names
    for e in summary["experiments"]:
        assert e["status"] == "ok" and e["epochs"] == 1
        assert all(0 <= e[key] <= 100 for key in ("val_acc", "test_acc", "test_acc_flip_tta"))
        assert 0 < e["train_seconds"] <= e["wall_seconds"]
    table = done.stdout[done.stdout.index("## Accuracy") :]
    for line in lines:
        assert re.search(rf"\| `{re.escape(line)}` \| 1 \|.*\| ok \|", table)
    assert [run["name"] for run in summary["speed"]] == list(gpu_campaign.SPEED_RUNS)
    for run, line in zip(summary["speed"], gpu_campaign.SPEED_RUNS.values(), strict=True):
        args = shlex.split(line)
        compiled = len(args) - args.index("--compile-mode") - 1 if "--compile-mode" in args else 0
        rows = run["record"]["rows"]
        assert run["status"] == "ok" and run["record"] == json.loads((out_dir / f"{run['name']}.json").read_text())
        kinds = ["tutorial"] + ["project"] * 6 + ["allocator"] * 2 + ["project"] * compiled
        assert [row["path"].split(":")[0] for row in rows] == kinds
        assert all(row["images_per_s"] > 0 for row in rows)
    with tarfile.open(copied / "campaign.tar.gz") as tar:
        bundled = set(tar.getnames())
    assert {f"campaign/{name}.json" for name in [*names, *gpu_campaign.SPEED_RUNS]} <= bundled
    assert (copied / "summary.md").read_text() == (out_dir / "summary.md").read_text()
    # The weights to ship: the best experiment's final weights (the average, with EMA), float16.
    shipped = utils.load_checkpoint(copied / "mobilenetv2-cifar10.pth")
    best = max(summary["experiments"], key=gpu_campaign.validation_accuracy)  # chosen on validation, not test
    last = utils.load_checkpoint(out_dir / "model" / f"{best['name']}_last.pth")
    weights = "ema_model" if last["weights"] == "ema" else "model"
    assert shipped["weights"] == last["weights"] and "optimizer" not in shipped
    assert all(v.dtype == torch.float16 for v in shipped[weights].values() if v.is_floating_point())
    torch.testing.assert_close(shipped[weights], {k: v.half() if v.is_floating_point() else v
                                                  for k, v in last[weights].items()})  # fmt: skip
    net, _ = utils.load_model(copied / "mobilenetv2-cifar10.pth", device="cpu")
    assert next(net.parameters()).dtype == torch.float32  # loaded into a float32 network


def test_gpu_campaign_stops_what_runs_past_the_deadline_and_skips_what_cannot_finish(tmp_path):
    python = [sys.executable, "-c"]
    jobs = [
        gpu_campaign.Job("quick", [*python, "print('done')"], 0, "quick"),
        gpu_campaign.Job("broken", [*python, "raise SystemExit(3)"], 0, "broken"),
        gpu_campaign.Job("sleeper", [*python, "import time; time.sleep(120)"], 0, "sleeper"),
        gpu_campaign.Job("too-long", [*python, "pass"], 10**6, "too-long"),
    ]
    began, finished = time.monotonic(), []
    gpu_campaign.run_jobs(jobs, 2, 5, tmp_path, lambda: time.monotonic() - began, on_finish=finished.append)
    assert [job.status for job in jobs] == ["ok", "failed", "timed out", "not started"]
    assert [job.returncode for job in jobs] == [0, 3, -signal.SIGKILL, None]
    assert sorted(job.name for job in finished) == ["broken", "quick", "sleeper"]
    assert (tmp_path / "quick.log").read_text().endswith("done\n")
    assert not (tmp_path / "too-long.log").exists()
    experiments = [gpu_campaign.experiment_result(job, jobs, tmp_path) for job in jobs]
    # "quick" exited 0 but wrote no JSON record: as an experiment it failed.
    assert [e["status"] for e in experiments] == ["failed", "failed", "timed out", "not started"]
    markdown = gpu_campaign.summary_markdown(
        {"speed": [], "experiments": experiments, "elapsed_s": 5.0, "budget_s": 5.0}
    )
    assert re.search(r"\| `sleeper` \|.*\| timed out \|", markdown)
    assert re.search(r"\| `too-long` \|.*\| not started \|", markdown)


def test_gpu_campaign_extracts_the_archive_once_and_decodes_it(tmp_path):
    folder = train_speed.synthetic_folder(tmp_path / "made" / "tiny-jpeg", per_class=2)
    archive = tmp_path / "tiny-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="tiny-jpeg")
    data = tmp_path / "data" / "tiny-jpeg"
    gpu_campaign.prepare_data(data, archive, root=tmp_path)
    images, labels, classes = utils.load_split(data, "train", root=tmp_path)
    assert len(images) == len(labels) == 20 and len(classes) == 10
    assert len(list((tmp_path / "cache").glob("tiny-jpeg-*.pt"))) == 2  # train and test, decoded once
    archive.unlink()
    gpu_campaign.prepare_data(data, archive, root=tmp_path)  # the folder is there: no archive needed
    with pytest.raises(SystemExit, match="neither the folder"):
        gpu_campaign.prepare_data(tmp_path / "data" / "other", archive, root=tmp_path)
