"""train / evaluate / checkpoints on synthetic data and tiny models."""

import contextlib
import itertools
import math
import re

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.tensorboard import SummaryWriter

import checkpoints
import runtime
import utils
from model import MobileNetV2


@pytest.fixture(scope="module")
def loaders():
    return utils.get_loaders("synthetic", batch_size=64, val_size=100, device="cpu")


def tiny_net(seed=0):
    utils.set_seed(seed)
    return MobileNetV2(num_classes=10, alpha=0.25)


def sgd(net, lr=0.02):
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)


def run(loaders, epochs=2, seed=0, scheduler=None, save_path=None, verbose=False, compile=False, **kwargs):
    net = runtime.prepare_model(tiny_net(seed), "cpu", compile=compile)
    optimizer = sgd(net)
    scheduler = scheduler(optimizer) if scheduler else None
    history = utils.train(net, loaders[0], loaders[1], epochs, optimizer, nn.CrossEntropyLoss(), scheduler,
                          save_path, None, verbose, **kwargs)  # fmt: skip
    return net, optimizer, scheduler, history


def test_training_lowers_the_loss(loaders):
    _, _, _, (acc, loss, _) = run(loaders, epochs=2)
    assert loss["train_loss"][1] < loss["train_loss"][0] - 0.1
    assert acc["train_acc"][1] > acc["train_acc"][0]


def test_the_same_seed_gives_the_same_losses(loaders):
    _, _, _, (acc1, loss1, _) = run(loaders, seed=3)
    _, _, _, (acc2, loss2, _) = run(loaders, seed=3)
    _, _, _, (_, loss3, _) = run(loaders, seed=4)
    assert loss1 == loss2 and acc1 == acc2
    assert loss1 != loss3


def test_histories_are_returned_per_epoch_whatever_verbose_says(loaders, capsys):
    _, _, _, (acc, loss, lr) = run(loaders, epochs=2)
    assert capsys.readouterr().out == ""
    assert set(acc) == {"train_acc", "val_acc"} and set(loss) == {"train_loss", "val_loss"}
    assert all(len(v) == 2 for v in [*acc.values(), *loss.values(), lr])
    assert all(0 <= a <= 100 for a in acc["val_acc"])


def test_epoch_line_has_the_tutorials_format(loaders, capsys):
    run(loaders, epochs=1, verbose=True)
    out = capsys.readouterr()
    line = re.compile(
        r"Epoch \[  1/  1\]  Train Loss:\d+\.\d{6}  Train Acc:\d+\.\d{2}% Val Loss:\d+\.\d{6}  "
        r"Val Acc:\d+\.\d{2}%  Learning Rate:0\.020000  Time:\d+\.\ds"
    )
    assert line.search(out.out), out.out
    assert "Train Epoch 1/1" in out.err and "Train Acc=" in out.err and "Val Epoch 1/1" in out.err


class ConstantNet(nn.Module):
    """Predicts class 0 with fixed logits, so the expected metrics can be worked out by hand."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, 0.0, 0.0]))

    def forward(self, x):
        return self.bias.expand(len(x), 3)


def test_metrics_are_per_sample_not_a_mean_of_batch_means():
    # Batches of 3 and 1: a mean of batch means would weigh the single sample three times.
    batches = [(torch.zeros(3, 1), torch.tensor([0, 0, 0])), (torch.zeros(1, 1), torch.tensor([1]))]
    result = utils.evaluate(ConstantNet(), batches)
    assert result["acc"] == 75.0
    expected = nn.functional.cross_entropy(torch.tensor([[2.0, 0, 0]] * 4), torch.tensor([0, 0, 0, 1]))
    assert result["loss"] == pytest.approx(expected.item())
    assert result["per_class_acc"] == [100.0, 0.0, 0.0]
    assert result["confusion"].tolist() == [[3, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert result["probs"].shape == (4, 3) and result["preds"].tolist() == [0, 0, 0, 0]


def test_flip_tta_averages_the_image_and_its_mirror():
    class LeftHalf(nn.Module):
        def forward(self, x):  # class 1 when the left half is brighter
            left, right = x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))
            return torch.stack([right - left, left - right], 1) * 10

    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0
    plain = utils.evaluate(LeftHalf(), [(x, torch.tensor([1]))])
    tta = utils.evaluate(LeftHalf(), [(x, torch.tensor([1]))], tta=True)
    assert plain["acc"] == 100.0 and plain["tta"] is None and tta["tta"] == "flip"
    assert tta["probs"][0].tolist() == pytest.approx([0.5, 0.5])


def test_epoch_schedulers_step_once_per_epoch(loaders):
    _, optimizer, scheduler, (_, _, lr) = run(loaders, epochs=3, scheduler=lambda o: lr_scheduler.StepLR(o, 1, 0.5))
    assert scheduler.last_epoch == 3
    assert lr == pytest.approx([0.02, 0.01, 0.005])


def test_one_cycle_steps_after_every_batch_and_records_the_last_batchs_lr(loaders):
    def one_cycle(optimizer):
        return lr_scheduler.OneCycleLR(optimizer, 0.05, epochs=2, steps_per_epoch=len(loaders[0]),
                                       anneal_strategy="linear")  # fmt: skip

    _, _, scheduler, (_, _, lr) = run(loaders, epochs=2, scheduler=one_cycle)
    assert scheduler.last_epoch == 2 * len(loaders[0])
    # One step past its end the schedule would extrapolate below zero; the history keeps the
    # rate the last batch trained with: the schedule's floor, lr / 25 / 10,000.
    assert lr[-1] == pytest.approx(0.05 / 25 / 10_000)


def test_reduce_on_plateau_steps_on_the_validation_loss(loaders):
    class Recording(lr_scheduler.ReduceLROnPlateau):
        seen = []

        def step(self, metrics):
            self.seen.append(metrics)
            super().step(metrics)

    _, _, scheduler, (_, loss, _) = run(loaders, epochs=2, scheduler=lambda o: Recording(o))
    assert scheduler.seen == loss["val_loss"]


def test_checkpoints_best_and_last_with_plain_metadata(loaders, tmp_path):
    net = nn.DataParallel(tiny_net())  # as the tutorial wraps it; no "module." may leak out
    path = tmp_path / "m.pth"
    utils.train(net, loaders[0], loaders[1], 2, sgd(net), nn.CrossEntropyLoss(), None, path, verbose=False)
    best = utils.load_checkpoint(path)
    last = utils.load_checkpoint(tmp_path / "m_last.pth")
    assert not any(k.startswith("module.") for k in best["model"])
    assert best["model_config"] == MobileNetV2(10, alpha=0.25).config
    assert best["classes"] == loaders[0].classes and best["mean"] == loaders[0].mean
    assert last["epoch"] == 2 and len(last["history"]["val_acc"]) == 2
    assert best["metrics"]["val_acc"] == max(last["history"]["val_acc"]) == last["best_val_acc"]
    assert {"optimizer", "scheduler", "rng"} <= set(last) and "optimizer" not in best
    restored, checkpoint = utils.load_model(path, device="cpu")
    assert not restored.training and checkpoint["epoch"] == best["epoch"]


@contextlib.contextmanager
def interrupted_at_evaluation(call, monkeypatch):
    """Ctrl-C at the ``call``-th call of utils.evaluate inside the block, which must stop there."""
    evaluate = utils.evaluate
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(utils, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(utils, "evaluate", evaluate)


def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(loaders, tmp_path, monkeypatch):
    def schedule(o):
        return lr_scheduler.OneCycleLR(o, 0.05, epochs=3, steps_per_epoch=len(loaders[0]))

    straight, _, _, (acc, loss, lr) = run(loaders, epochs=3, scheduler=schedule)
    path = tmp_path / "m.pth"
    with interrupted_at_evaluation(2, monkeypatch):  # the second epoch's validation
        run(loaders, epochs=3, scheduler=schedule, save_path=path)
    assert utils.load_checkpoint(tmp_path / "m_last.pth")["epoch"] == 1

    # A fresh process would rebuild everything from scratch, then resume from the file.
    resumed, _, _, (acc2, loss2, lr2) = run(loaders, epochs=3, seed=99, scheduler=schedule, save_path=path,
                                            resume=True)  # fmt: skip
    assert (acc2, loss2, lr2) == (acc, loss, lr)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_errors_are_clear(loaders, tmp_path):
    with pytest.raises(FileNotFoundError, match="m_last.pth"):
        run(loaders, epochs=1, save_path=tmp_path / "m.pth", resume=True)
    run(loaders, epochs=1, save_path=tmp_path / "m.pth")
    with pytest.raises(ValueError, match="m_last.pth is from a run of 1 epochs; resume it with epoch=1"):
        run(loaders, epochs=2, save_path=tmp_path / "m.pth", resume=True)


def test_non_finite_loss_stops_training_and_keeps_the_best_checkpoint(loaders, tmp_path):
    class BreaksInEpochTwo(nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, labels):
            loss = super().forward(logits, labels)
            if logits.requires_grad:
                self.calls += 1
                if self.calls == len(loaders[0]) + 3:
                    return loss * float("nan")
            return loss

    net = tiny_net()
    path = tmp_path / "m.pth"
    with pytest.raises(FloatingPointError, match=r"^Train Epoch 2/3: the loss became nan at batch 3/"):
        utils.train(net, loaders[0], loaders[1], 3, sgd(net), BreaksInEpochTwo(), None, path, verbose=False)
    assert utils.load_checkpoint(path)["epoch"] == 1
    best = utils.load_checkpoint(path)["model"]
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    checkpoints.atomic_save({"a": torch.ones(3)}, path)

    def fails_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_tensorboard_gets_curves_graph_and_hparams(loaders, tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    writer = SummaryWriter(tmp_path / "run")
    net = tiny_net()
    utils.train(net, loaders[0], loaders[1], 2, sgd(net), nn.CrossEntropyLoss(), None, None, writer, verbose=False)
    writer.close()
    events = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "run"))
    events.Reload()
    runs = events.Runs()
    assert {"Loss_train", "Loss_val", "Accuracy_train", "Accuracy_val"} <= set(runs)
    assert len(events.Scalars("Loss_val", "Loss")) == 2
    assert "Learning Rate" in runs["."]["scalars"]
    assert runs["."]["graph"]
    hparams = events.PluginRunToTagToContent("hparams")["."]
    assert "_hparams_/session_start_info" in hparams
    assert len(events.Scalars(".", "hparam/val_acc")) == 1


def test_recipes_build_optimizer_scheduler_and_criterion():
    net = tiny_net()
    recipe = utils.get_recipe("default", lr=0.3, batch_size=None)
    assert recipe["lr"] == 0.3 and recipe["batch_size"] == utils.RECIPES["default"]["batch_size"]
    optimizer = utils.make_optimizer(net, recipe)
    decayed, plain = optimizer.param_groups
    assert all(p.ndim > 1 for p in decayed["params"]) and plain["weight_decay"] == 0
    assert isinstance(utils.make_scheduler(optimizer, recipe, 2, 10), lr_scheduler.OneCycleLR)
    assert utils.make_criterion(recipe).label_smoothing == recipe["label_smoothing"]
    tutorial = utils.get_recipe("tutorial")
    assert len(utils.make_optimizer(net, tutorial).param_groups) == 1
    assert isinstance(utils.make_scheduler(sgd(net), tutorial, 2, 10), lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ValueError, match="Unknown recipe 'fast'"):
        utils.get_recipe("fast")
    with pytest.raises(ValueError, match="Unknown recipe settings"):
        utils.get_recipe("default", learning_rate=0.1)


def test_get_device_picks_cpu_here_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert utils.get_device() == torch.device("cpu")
    assert "Using device: cpu" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        utils.get_device("cuda")


def test_plot_history_returns_and_saves_three_figures(tmp_path):
    acc = {"train_acc": [10, 20], "val_acc": [12, 18]}
    loss = {"train_loss": [2.0, 1.5], "val_loss": [2.1, 1.7]}
    figures = utils.plot_history(2, acc, loss, [0.1, 0.05], save_dir=tmp_path)
    assert len(figures) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "loss.png", "lr.png"]
    assert [len(line.get_xdata()) for line in figures[1].axes[0].lines] == [2, 2]


def test_float16_autocast_scales_gradients_and_saves_the_scaler(loaders, tmp_path):
    path = tmp_path / "m.pth"
    _, _, _, (acc, loss, _) = run(loaders, epochs=1, save_path=path, amp="float16")
    assert math.isfinite(loss["train_loss"][0]) and len(acc["val_acc"]) == 1
    scaler = utils.load_checkpoint(utils.last_checkpoint_path(path))["scaler"]
    assert scaler is not None and scaler["scale"] > 0  # resumable with its loss scale
    with pytest.raises(ValueError, match="'float32'.*'bfloat16' or 'float16'"):
        run(loaders, epochs=1, amp="float32")


def test_compile_trains_and_saves_plain_keys(loaders, tmp_path):
    path = tmp_path / "m.pth"
    run(loaders, epochs=1, save_path=path, compile=True)
    keys = utils.load_checkpoint(path)["model"]
    assert not any("_orig_mod" in k for k in keys)
    utils.load_model(path, device="cpu")


def test_compile_falls_back_to_eager_where_unsupported(loaders, monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.warns(UserWarning, match="torch.compile is not supported here"):
        _, _, _, (acc, _, _) = run(loaders, epochs=1, compile=True)
    assert len(acc["train_acc"]) == 1


def test_default_autocast_is_float16_on_cuda_and_off_on_the_cpu():
    # float16, not bfloat16: benchmarks/README.md, "Mixed precision", has the measurements behind it.
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert runtime.autocast_dtype(cuda, None) == torch.float16
    assert runtime.autocast_dtype(cpu, None) is None
    assert runtime.autocast_dtype(cpu, True) == torch.float16
    assert runtime.autocast_dtype(cuda, False) is None
    assert runtime.autocast_dtype(cuda, "bfloat16") == torch.bfloat16
    assert isinstance(runtime.grad_scaler(cpu, torch.float16), torch.amp.GradScaler)
    assert runtime.grad_scaler(cuda, torch.bfloat16) is None


def test_a_plain_dataloader_over_an_image_folder_gives_a_checkpoint_that_predicts(tmp_path):
    # The tutorial's way: torchvision's ImageFolder with Normalize, in a torch DataLoader; the
    # checkpoint is told the classes and normalisation, which prediction needs.
    import numpy as np
    import torchvision
    from PIL import Image
    from torchvision import transforms

    import predict

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "train" / name / f"{i}.png"
            )
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    folder = torchvision.datasets.ImageFolder(
        tmp_path / "train", transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    )
    loader = torch.utils.data.DataLoader(folder, batch_size=8, shuffle=True)
    net = MobileNetV2(num_classes=2, alpha=0.25)
    utils.train(net, loader, None, 1, sgd(net), nn.CrossEntropyLoss(), None, tmp_path / "m.pth", verbose=False,
                data={"classes": folder.classes, "mean": mean, "std": std})  # fmt: skip
    restored, checkpoint = utils.load_model(tmp_path / "m.pth", device="cpu")
    assert (checkpoint["classes"], checkpoint["mean"], checkpoint["std"]) == (["cat", "dog"], mean, std)
    result = predict.predict(restored, str(tmp_path / "train" / "dog" / "0.png"), checkpoint, topk=2)
    assert {top["class"] for top in result["top"]} == {"cat", "dog"}


def test_a_loader_that_cannot_tell_its_classes_fails_before_training_with_what_to_pass(tmp_path):
    dataset = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    net = MobileNetV2(num_classes=2, alpha=0.25)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"needs the data's classes, mean, std.*data=\{'classes'"):
        utils.train(net, loader, None, 1, sgd(net), nn.CrossEntropyLoss(), None, tmp_path / "m.pth", verbose=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing was trained
    data = {"classes": ["a", "b"], "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    utils.train(net, loader, None, 1, sgd(net), nn.CrossEntropyLoss(), None, tmp_path / "m.pth", verbose=False,
                data=data)  # fmt: skip
    checkpoint = utils.load_checkpoint(tmp_path / "m.pth")
    assert {k: checkpoint[k] for k in data} == data


def test_the_checkpoint_builder_is_what_train_writes(loaders, tmp_path):
    net, optimizer, _, _ = run(loaders, epochs=1, save_path=tmp_path / "m.pth")
    last = utils.load_checkpoint(tmp_path / "m_last.pth")
    built = checkpoints.make_checkpoint(net, checkpoints.data_info(loaders[0]), 1, last["history"], last["best_val_acc"],
                                  optimizer)  # fmt: skip
    assert set(built) == set(last)
    assert all(torch.equal(built["model"][k], v) for k, v in last["model"].items())
    assert {k: built[k] for k in ("classes", "mean", "std", "epoch", "metrics")} == {
        k: last[k] for k in ("classes", "mean", "std", "epoch", "metrics")
    }


def test_a_checkpoint_of_format_1_written_by_hand_loads_and_resumes(loaders, tmp_path):
    # Every key that format 1 has held since it was introduced, written without the project's
    # builder: a change to the code that keeps the format must still load and resume it.
    net = runtime.prepare_model(tiny_net(), "cpu")
    optimizer = sgd(net)
    history = utils.fit(net, loaders[0], loaders[1], 1, optimizer, nn.CrossEntropyLoss(), verbose=False)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    old = {
        "format": "mobilenetv2-cifar10-checkpoint/1", "arch": "MobileNetV2", "model_config": net.config,
        "classes": loaders[0].classes, "mean": loaders[0].mean, "std": loaders[0].std, "model": weights,
        "epochs": 2, "epoch": 1, "history": history, "metrics": {k: v[-1] for k, v in history.items()},
        "best_val_acc": history["val_acc"][-1], "weights": "trained", "ema_model": None,
        "optimizer": optimizer.state_dict(), "scheduler": None, "scaler": None,
        "rng": {"cpu": torch.get_rng_state(), "cuda": None}, "ema_updates": 0,
    }  # fmt: skip
    torch.save(old, tmp_path / "old_last.pth")
    torch.save({k: v for k, v in old.items() if k not in ("optimizer", "scheduler", "scaler", "rng")},
               tmp_path / "old.pth")  # fmt: skip

    restored, checkpoint = utils.load_model(tmp_path / "old.pth")
    assert all(torch.equal(weights[k], v) for k, v in restored.state_dict().items())
    assert checkpoint["classes"] == loaders[0].classes
    resumed = runtime.prepare_model(tiny_net(seed=5), "cpu")
    history = utils.fit(resumed, loaders[0], loaders[1], 2, sgd(resumed), nn.CrossEntropyLoss(),
                        save_path=tmp_path / "old.pth", resume=True, verbose=False)  # fmt: skip
    assert len(history["val_acc"]) == 2 and history["train_loss"][0] == old["history"]["train_loss"][0]


def test_cudnn_benchmark_stays_off_when_deterministic_algorithms_are_on(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    try:
        utils.set_seed(0, deterministic=True)
        runtime.pick_fast_kernels(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is False
        torch.use_deterministic_algorithms(False)
        runtime.pick_fast_kernels(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        runtime.pick_fast_kernels(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_failed_compile_warns_once_and_trains_eagerly(loaders, monkeypatch):
    def broken_compile(model, **kwargs):
        def forward(*args, **kwargs):
            raise RuntimeError("backend exploded")

        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(
        UserWarning, match="torch.compile failed, running without it from now on: backend exploded"
    ) as caught:
        _, _, _, (acc, _, _) = run(loaders, epochs=2, compile=True)
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    assert len(acc["train_acc"]) == 2


# ----------------------------------------------------------------------------------------
# Accuracy ingredients: weight averaging, multi-view TTA, weight-decay groups, recipes


def test_weight_average_follows_its_formula_and_gets_batchnorm_statistics_of_its_own():
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    average = utils.weight_average(net, 0.9)
    start = net[0].weight.detach().clone()
    average.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
    average.update_parameters(net)
    torch.testing.assert_close(average.module[0].weight, 0.9 * start + 0.1 * (start + 1))
    assert torch.equal(average.module[1].running_mean, torch.full((2,), 2.0))  # copied, not averaged

    images = torch.randn(64, 3, 4, 4) * 3 + 1
    loader = utils.InMemoryLoader((images * 20 + 100).clamp(0, 255).to(torch.uint8), torch.zeros(64, dtype=torch.int64),
                                  16, (0.0,) * 3, (1 / 255,) * 3, shuffle=True, augment=True)  # fmt: skip
    loader.set_epoch(5)
    rng = torch.get_rng_state()
    utils.refresh_batchnorm(average.module, loader, batches=4)
    assert loader.epoch == 5 and torch.equal(rng, torch.get_rng_state())  # training goes on as without
    inputs = torch.cat([x for x, _ in itertools.islice(iter(loader), 4)])
    with torch.no_grad():
        expected = average.module[0](inputs).mean((0, 2, 3))
    torch.testing.assert_close(average.module[1].running_mean, expected)
    assert not average.module.training or average.training  # left in the mode it was in


@pytest.fixture(scope="module")
def strong_loaders():
    return utils.get_loaders("synthetic", batch_size=64, val_size=100, device="cpu", trivial_augment=True, cutout=8)


def run_with_ema(loaders, epochs, save_path=None, resume=False, seed=0, interrupt=None):
    net = tiny_net(seed)
    optimizer = sgd(net)
    scheduler = lr_scheduler.OneCycleLR(optimizer, 0.05, epochs=epochs, steps_per_epoch=len(loaders[0]))
    ema = utils.weight_average(net, 0.9)
    history = utils.fit(net, loaders[0], loaders[1], epochs, optimizer, nn.CrossEntropyLoss(), scheduler,
                        save_path=save_path, verbose=False, resume=resume, ema=ema)  # fmt: skip
    return net, ema, history


def test_ema_is_validated_beside_the_weights_and_is_what_the_checkpoint_predicts_with(strong_loaders, tmp_path):
    net, ema, history = run_with_ema(strong_loaders, 2, tmp_path / "m.pth")
    assert len(history["ema_val_acc"]) == len(history["val_acc"]) == 2
    assert history["ema_val_loss"] != history["val_loss"]
    assert int(ema.n_averaged) == 2 * (len(strong_loaders[0]) // utils.EMA_EVERY)  # every 5th batch of each epoch
    last = utils.load_checkpoint(tmp_path / "m_last.pth")
    assert last["weights"] == "ema" and last["ema_updates"] == int(ema.n_averaged)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in last["model"].items())  # trained weights kept
    restored, best = utils.load_model(tmp_path / "m.pth", device="cpu")
    assert best["best_val_acc"] == max(history["ema_val_acc"])  # chosen by the average's accuracy
    assert all(torch.equal(v, best["ema_model"][k]) for k, v in restored.state_dict().items())
    assert not all(torch.equal(v, best["model"][k]) for k, v in restored.state_dict().items())


def test_resume_with_ema_and_strong_augmentation_ends_like_an_uninterrupted_run(strong_loaders, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    straight, straight_ema, history = run_with_ema(strong_loaders, 3)
    with interrupted_at_evaluation(3, monkeypatch):  # the second epoch's first validation
        run_with_ema(strong_loaders, 3, tmp_path / "m.pth")
    assert utils.load_checkpoint(tmp_path / "m_last.pth")["epoch"] == 1

    resumed, resumed_ema, resumed_history = run_with_ema(strong_loaders, 3, tmp_path / "m.pth", resume=True, seed=99)
    seconds = history.pop("seconds"), resumed_history.pop("seconds")  # the only thing that differs
    assert resumed_history == history and len(seconds[0]) == len(seconds[1]) == 3
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight_ema.state_dict().values(), resumed_ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="trained with a weight average"):
        run(strong_loaders, epochs=3, save_path=tmp_path / "m.pth", resume=True)


def test_flip_translate_tta_averages_six_views():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    views = utils.tta_views(images, "flip-translate")
    assert len(views) == 6 and torch.equal(views[1], images.flip(3))
    # Up-left: the pixel at (i, j) comes from (i - 1, j - 1), edges reflected.
    assert torch.equal(views[2][..., 1:, 1:], images[..., :-1, :-1])
    assert torch.equal(views[4][..., :-1, :-1], images[..., 1:, 1:])  # down-right
    assert torch.equal(views[3][..., 1:, 1:], images.flip(3)[..., :-1, :-1])

    class Counts(nn.Module):  # class 0 from the mean brightness: the same under every view
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)

    result = utils.evaluate(Counts(), [(images, torch.tensor([0, 0]))], tta="flip-translate")
    assert result["tta"] == "flip-translate" and result["acc"] == 100.0
    with pytest.raises(ValueError, match="tta='rotate'"):
        utils.evaluate(Counts(), [(images, torch.tensor([0, 0]))], tta="rotate")


def test_linear_schedule_warms_up_and_decays_along_straight_lines():
    recipe = utils.get_recipe("default", schedule="linear", warmup=0.25, lr=0.4)
    scheduler = utils.make_scheduler(utils.make_optimizer(tiny_net(), recipe), recipe, 2, 10)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    steps = torch.tensor(lrs).diff()
    # 20 steps, 25 % warm-up: up from lr/10 to the peak at step 4, then down in equal steps.
    assert lrs[0] == pytest.approx(0.04) and lrs[4] == pytest.approx(0.4)
    assert torch.allclose(steps[:4], steps[0].expand(4)) and steps[0] > 0
    assert torch.allclose(steps[4:], steps[4].expand(15)) and steps[4] < 0
    assert lrs[-1] == pytest.approx(0.4 / 10_000, abs=1e-9)
    with pytest.raises(ValueError, match="Unknown schedule 'step'"):
        utils.make_scheduler(scheduler.optimizer, {**recipe, "schedule": "step"}, 2, 10)


def test_every_recipe_builds():
    net = tiny_net()
    for name in utils.RECIPES:
        recipe = utils.get_recipe(name)
        optimizer = utils.make_optimizer(net, recipe)
        utils.make_scheduler(optimizer, recipe, 2, 10)
        utils.make_criterion(recipe)
