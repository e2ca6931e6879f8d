"""What the notebooks teach, in notebook order: data (01), recipes and the training loop
(03), evaluation and pictures (04). The network is in model.py. The machinery lives beside
this file, and the few names of it that the notebooks call are imported here:

    runtime.py      folders, memory, device, seed, torchrun, memory format, compile, precision,
                    progress bars
    images.py       reading pictures and image folders (with a cache), the data sets by name
    checkpoints.py  the checkpoint format: saving, resuming, loading
    predict.py      classifying pictures, files, URLs and folders

The tutorial's two calls work as written:

    Acc, Loss, Lr = train(net, trainloader, testloader, epoch, optimizer, criterion,
                          scheduler, save_path, tbwriter, verbose=True)
    plot_history(epoch, Acc, Loss, Lr)

The second loader given to ``train`` is the *validation* loader: it picks the best
checkpoint and drives ReduceLROnPlateau. The test set is left for the testing notebook.
"""

import itertools
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

import checkpoints
import runtime
from checkpoints import (  # noqa: F401 (notebooks)
    PRETRAINED_WEIGHTS,
    CheckpointError,
    last_checkpoint_path,
    load_checkpoint,
    load_model,
)
from images import decode_image, load_split, stratified_split  # noqa: F401 (the notebooks call them as utils.*)
from runtime import DATA_DIR, LOG_DIR, MODEL_DIR, get_device, prepare_model, set_seed  # noqa: F401

# What train() records per epoch; the first four are the metrics a checkpoint and TensorBoard show.
HISTORY = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
METRICS = HISTORY[:4]
EMA_EVERY = 5  # batches between two updates of the weight average (train's ``ema``)
BATCHNORM_BATCHES = 20  # training batches that give the average its BatchNorm statistics
REFRESH_EVERY = 20  # batches between two reads of the running loss (a GPU sync) for the bar


# ----------------------------------------------------------------------------------------
# 01 Data: a validation split, normalisation, augmentation of whole batches, the loaders


def channel_stats(images, chunk=4096):
    """Per-channel mean and std of uint8 images (N, 3, H, W), as fractions of 255."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].double() / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean**2).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def normalize(images, mean, std):
    """uint8 images (N, 3, H, W) to the float inputs the network sees: (x / 255 - mean) / std
    per channel. Training batches and prediction inputs both go through here."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean) / std


def random_crop_flip(images, padding=4, flip=True, generator=None):
    """Random crop with zero padding and random horizontal flip of a batch (N, C, H, W) in one
    gather: each image gets its own offsets, and a flip reads the columns backwards."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    rows = dy + torch.arange(h, device=device)
    cols = torch.arange(w, device=device).expand(n, w)
    if flip:
        flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    cols = dx + cols
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def cutout(images, size, fill, generator=None):
    """Cutout (DeVries and Taylor, 2017) for a whole batch: in each image, one size x size
    square at a random centre, clipped by the border, set to ``fill`` (a value per channel).
    With the mean pixel as fill the square is zero after normalisation, as in the paper."""
    n, _, h, w = images.shape
    device = images.device
    top = torch.randint(0, h, (n, 1, 1), device=device, generator=generator) - size // 2
    left = torch.randint(0, w, (n, 1, 1), device=device, generator=generator) - size // 2
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    square = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return torch.where(square[:, None], fill.view(1, -1, 1, 1).to(images.dtype), images)


def trivial_augment(images, generator, group=8):
    """TrivialAugment Wide (Muller and Hutter, 2021) on uint8 images (N, 3, H, W): one op of
    torchvision's TrivialAugmentWide at a random magnitude per group of ``group`` images (one
    torchvision call draws one op for all its images). ``generator`` (on the CPU) seeds each
    group's draws, so that a resumed epoch is augmented the same way."""
    from torchvision.transforms import v2

    policy = v2.TrivialAugmentWide()
    seeds = torch.randint(2**62, (math.ceil(len(images) / group),), generator=generator).tolist()
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator
        groups = []
        for chunk, seed in zip(images.split(group), seeds, strict=True):
            torch.manual_seed(seed)
            groups.append(policy(chunk))
    return torch.cat(groups)


class InMemoryLoader:
    """Batches of (images, labels) from a data set held whole, as uint8, on the device: a
    drop-in for a DataLoader, without worker processes or per-image Python, as augmentation
    (``augment`` crop and flip, ``trivial_augment``, ``cutout``) and normalisation work on a
    whole batch. Under torchrun each process reads its own share of every shuffled epoch."""

    def __init__(self, images, labels, batch_size, mean, std, shuffle=False, augment=False, drop_last=False, seed=0,
                 device="cpu", rank=0, world_size=1, classes=None, trivial_augment=False, cutout=0):  # fmt: skip
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.trivial_augment, self.cutout = trivial_augment, cutout
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        # What a checkpoint records of the data (data_info).
        self.classes, self.mean, self.std = classes, tuple(mean), tuple(std)
        # On the device once, so that normalising a batch copies nothing from the host.
        self._mean = torch.tensor(mean, device=self.device)
        self._std = torch.tensor(std, device=self.device)
        self._mean_pixel = (self._mean * 255).round().to(torch.uint8)  # cutout's fill

    def set_epoch(self, epoch):
        """Make the shuffle and augmentation of the next pass a function of ``epoch``."""
        self.epoch = epoch

    def _shard_size(self):
        n = len(self.labels)
        # Training shards must be equal, or DDP waits forever on the rank with more batches.
        return n // self.world_size if self.shuffle else len(range(self.rank, n, self.world_size))

    def __len__(self):
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        g = torch.Generator(device=self.device)
        n = len(self.labels)
        if self.shuffle:
            g.manual_seed(self.seed * 100_003 + epoch)  # the same order on every rank
            order = torch.randperm(n, device=self.device, generator=g)
            order = order[self.rank : self.world_size * self._shard_size() : self.world_size]
        else:
            order = torch.arange(self.rank, n, self.world_size, device=self.device)
        g.manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank + 1)
        policy_g = torch.Generator().manual_seed(g.initial_seed())  # on the CPU: no GPU sync per batch
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[idx]
            if self.augment:
                images = random_crop_flip(images, generator=g)
            if self.trivial_augment:
                images = trivial_augment(images, policy_g)
            if self.cutout:
                images = cutout(images, self.cutout, self._mean_pixel, generator=g)
            yield normalize(images, self._mean, self._std), self.labels[idx]


def get_loaders(source="cifar10", root=DATA_DIR, batch_size=128, val_size=0.1, augment=True, device=None, seed=0,
                eval_batch_size=512, trivial_augment=False, cutout=0):  # fmt: skip
    """Train, validation and test loaders (InMemoryLoader) and the class names.

    source:     "cifar10", "synthetic", or an image folder with train/ and test/ (load_split).
    val_size:   training images held out for validation (stratified_split): a fraction or a
                count; 0 gives no validation loader (None).
    augment:    random crop and flip for training; trivial_augment and cutout add to it.
    batch_size: training batch; under torchrun, the global batch summed over processes.
    The loaders carry the classes, mean and std, which checkpoints record for prediction.
    """
    train_images, train_labels, classes = load_split(source, "train", root)
    test_images, test_labels, _ = load_split(source, "test", root)
    train_idx, val_idx = stratified_split(train_labels, val_size, seed, classes)
    if len(train_idx) < batch_size:  # the last incomplete batch is dropped: nothing would be left
        raise ValueError(
            f"The training split has {len(train_idx)} images, fewer than one batch of {batch_size}: "
            "choose a smaller batch size."
        )
    mean, std = channel_stats(train_images[train_idx])
    rank, world_size, _ = runtime.distributed_env()
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must divide evenly between the {world_size} processes.")
    device = runtime.get_device(device, verbose=False)

    def loader(images, labels, training):
        if len(labels) == 0:
            return None
        # batch_size is the global batch: under torchrun each process takes its share.
        return InMemoryLoader(
            images, labels, batch_size // world_size if training else eval_batch_size, mean, std, shuffle=training,
            augment=training and augment, drop_last=training, seed=seed, device=device, rank=rank,
            world_size=world_size, classes=list(classes), trivial_augment=training and trivial_augment,
            cutout=cutout if training else 0,
        )  # fmt: skip

    return (
        loader(train_images[train_idx], train_labels[train_idx], True),
        loader(train_images[val_idx], train_labels[val_idx], False),
        loader(test_images, test_labels, False),
        list(classes),
    )


# ----------------------------------------------------------------------------------------
# 03 Training: a recipe (loss, optimizer, schedule), the loop, evaluation, the weight average


RECIPES = {
    # This project's default. Each choice was measured against the tutorial's (benchmarks/README.md).
    "default": {
        "batch_size": 256,
        "lr": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "decay_norm_and_bias": False,  # weight decay on BatchNorm and biases only hurts
        "label_smoothing": 0.1,
        "schedule": "onecycle",  # warm-up, then decay to ~0, along half cosines ("linear": straight lines), per batch
        "warmup": 0.15,  # fraction of the steps spent warming up
        "augment": True,  # random crop and flip
        "trivial_augment": False,  # TrivialAugment Wide on top
        "cutout": 0,  # side of the Cutout square in pixels; 0 = none
        "ema": 0.0,  # decay of an average of the weights, updated every 5 batches; 0 = none
    },
}
# The tutorial's recipe, kept to compare against: constant 0.1 until the validation loss
# stalls, plain momentum, weight decay on every parameter, no augmentation.
RECIPES["tutorial"] = {**RECIPES["default"], "lr": 0.1, "nesterov": False, "decay_norm_and_bias": True,
                       "label_smoothing": 0.0, "schedule": "plateau", "warmup": 0.0, "augment": False}  # fmt: skip
RECIPES["long"] = {**RECIPES["default"], "trivial_augment": True, "cutout": 12, "ema": 0.99}


def get_recipe(name="default", **overrides):
    """A copy of ``RECIPES[name]`` with ``overrides`` applied (None values are ignored)."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    recipe = dict(RECIPES[name])
    unknown = set(overrides) - set(recipe)
    if unknown:
        raise ValueError(f"Unknown recipe settings {sorted(unknown)}; known: {sorted(recipe)}.")
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    return recipe


def make_optimizer(net, recipe):
    """SGD with momentum. Without ``decay_norm_and_bias``, BatchNorm weights and all biases
    (the 1-D parameters) are exempt from weight decay, which would only shrink their scale."""
    params = [p for p in net.parameters() if p.requires_grad]
    decayed = [p for p in params if p.ndim > 1 or recipe["decay_norm_and_bias"]]
    exempt = [p for p in params if not (p.ndim > 1 or recipe["decay_norm_and_bias"])]
    groups = [{"params": decayed, "weight_decay": recipe["weight_decay"]}, {"params": exempt, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    # On CUDA the fused kernel updates every weight in one launch, and lets a GradScaler
    # skip its per-step read of the overflow flag from the GPU.
    fused = all(p.is_cuda for p in params)
    return torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=recipe["nesterov"],
                           fused=fused or None)  # fmt: skip


def make_scheduler(optimizer, recipe, epochs, steps_per_epoch):
    """The recipe's learning-rate schedule. fit() steps OneCycleLR after every batch and
    ReduceLROnPlateau once per epoch, on the validation loss."""
    if recipe["schedule"] == "plateau":
        # The tutorial's settings: x0.94 after one epoch without improvement.
        return lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=0.94, patience=1, min_lr=1e-6)
    if recipe["schedule"] in ("onecycle", "linear"):
        return lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe["lr"],
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=recipe["warmup"],
            div_factor=10,  # start at lr/10
            final_div_factor=1000,  # end at lr/10,000
            cycle_momentum=False,
            # A straight decay to zero was the best schedule on short budgets in "Budgeted
            # Training" (Li et al., 2020, arXiv:1905.04753).
            anneal_strategy="linear" if recipe["schedule"] == "linear" else "cos",
        )
    raise ValueError(f"Unknown schedule {recipe['schedule']!r}; choose 'onecycle', 'linear' or 'plateau'.")


def make_criterion(recipe):
    return nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])


def weight_average(net, decay):
    """An exponential moving average of ``net``'s weights, updated every EMA_EVERY batches:
    w_avg = decay * w_avg + (1 - decay) * w. Its ``module`` is a MobileNetV2 to evaluate, save
    and predict with. Make it after prepare_model, so that it is a copy on the same device.
    BatchNorm statistics are not averaged but recomputed for it (refresh_batchnorm): averaged
    ones made it call every image one class (benchmarks/README.md)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(runtime.unwrap_model(net), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


def train(net, trainloader, testloader, epoch, optimizer, criterion, scheduler=None, save_path=None, tbwriter=None,
          verbose=True, **options):  # fmt: skip
    """The tutorial's call: fit() with the tutorial's arguments in its order, returning the
    tutorial's Acc = {"train_acc", "val_acc"}, Loss = {"train_loss", "val_loss"} and Lr.
    ``testloader`` is the *validation* loader; ``options`` are fit's keyword arguments."""
    history = fit(net, trainloader, testloader, epoch, optimizer, criterion, scheduler,
                  save_path=save_path, tbwriter=tbwriter, verbose=verbose, **options)  # fmt: skip
    Acc = {"train_acc": history["train_acc"], "val_acc": history["val_acc"]}
    Loss = {"train_loss": history["train_loss"], "val_loss": history["val_loss"]}
    return Acc, Loss, history["lr"]


def fit(net, train_loader, val_loader, epochs, optimizer, criterion, scheduler=None, *, save_path=None,
        tbwriter=None, verbose=True, resume=False, amp=None, ema=None, data=None, hparams=None):  # fmt: skip
    """Train ``net`` (made ready by prepare_model) for ``epochs`` in all; return the history:
    per-epoch lists train_loss, train_acc, val_loss, val_acc (%), lr (the last batch's), seconds
    (ema_val_* too).

    val_loader picks the best checkpoint, save_path; the resumable <stem>_last.pth goes beside
    it, and resume=True continues from it. amp: autocast_dtype's. ema: a weight_average to
    validate and predict with. data: classes, mean, std, if the loader lacks them. hparams:
    more values for TensorBoard's hparams tab."""
    device = runtime.model_device(net)
    amp_dtype = runtime.autocast_dtype(device, amp)
    scaler = runtime.grad_scaler(device, amp_dtype)
    per_batch = isinstance(scheduler, (lr_scheduler.OneCycleLR, lr_scheduler.CyclicLR))  # else once per epoch
    data = checkpoints.data_info(train_loader, data) if save_path else None  # an error now, not after an epoch
    main = runtime.is_main_process()
    show = verbose and main
    history, best_val_acc = {key: [] for key in HISTORY}, -math.inf
    if resume:
        history, best_val_acc = checkpoints.resume_training(save_path, net, optimizer, scheduler, scaler, epochs, ema)
        if show:
            print(f"Resuming from {last_checkpoint_path(save_path)} after epoch {len(history['val_acc'])}/{epochs}.")
    elif tbwriter is not None and main:
        _add_graph(tbwriter, runtime.unwrap_model(net), train_loader, device)

    epoch = start = len(history["val_acc"])
    try:
        for epoch in range(start, epochs):
            began, title = time.perf_counter(), f"Epoch {epoch + 1}/{epochs}"
            if hasattr(train_loader, "set_epoch"):  # a resumed run sees the batches of an uninterrupted one
                train_loader.set_epoch(epoch)
            train_metrics = train_one_epoch(net, train_loader, optimizer, criterion, scheduler if per_batch else None,
                                            scaler, amp_dtype, ema, desc=f"Train {title}", progress=show)  # fmt: skip
            # Without validation data the training metrics stand in.
            val_metrics = train_metrics if val_loader is None else evaluate(
                net, val_loader, criterion, amp=amp, desc=f"Val {title}", progress=show)  # fmt: skip
            if ema is not None:  # the average gets BatchNorm statistics of its own, then is validated
                refresh_batchnorm(ema.module, train_loader)
            ema_metrics = None if ema is None or val_loader is None else evaluate(
                ema.module, val_loader, criterion, amp=amp, desc=f"EMA Val {title}", progress=show)  # fmt: skip
            if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_metrics["loss"])
            elif scheduler is not None and not per_batch:
                scheduler.step()
            _record_epoch(history, train_metrics, val_metrics, ema_metrics, time.perf_counter() - began)
            if show:
                print(_epoch_line(history, epochs))
            if main and tbwriter is not None:
                _log_epoch(tbwriter, history)
            if main and save_path:
                best_val_acc = checkpoints.save_checkpoints(save_path, net, data, epochs, history, best_val_acc,
                                                optimizer, scheduler, scaler, ema)  # fmt: skip
    except KeyboardInterrupt:
        if show and save_path and epoch > start:
            print(f"\nInterrupted in epoch {epoch + 1}; {last_checkpoint_path(save_path)} holds epoch {epoch}: "
                  "continue with resume=True.")  # fmt: skip
        raise
    if main and tbwriter is not None and history["val_acc"]:
        _log_hparams(tbwriter, net, train_loader, optimizer, criterion, scheduler, epochs, history, hparams)
    return history


def train_one_epoch(model, loader, optimizer, criterion, scheduler=None, scaler=None, amp_dtype=None, ema=None,
                    desc="Train", progress=True):  # fmt: skip
    """One pass over ``loader``: forward, loss, backward, step for each batch. ``scheduler``
    steps after every batch; ``ema`` is updated every EMA_EVERY batches. Returns {"loss",
    "acc", "count"}, per sample (acc in %), and "lr", the learning rate of the last batch. The running sums stay on the device and are read
    (a GPU sync) only every REFRESH_EVERY batches, for the bar and to stop on a non-finite loss.
    """
    model.train()
    device = runtime.model_device(model)
    memory_format = torch.channels_last if runtime.uses_channels_last(model) else torch.preserve_format
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad_batch = torch.full((), -1, device=device, dtype=torch.int64)
    count = 0
    bar = runtime.progress_bar(loader, desc=desc, disable=not progress)
    for i, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
            loss = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]  # before the scheduler moves it on
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None and (i + 1) % EMA_EVERY == 0:
            ema.update_parameters(runtime.unwrap_model(model))

        loss = loss.detach()
        loss_sum += loss * len(labels)
        correct += (outputs.argmax(1) == labels).sum()
        count += len(labels)
        first_bad_batch = torch.where(~torch.isfinite(loss) & (first_bad_batch < 0), i + 1, first_bad_batch)
        if (i + 1) % REFRESH_EVERY == 0 or i + 1 == len(loader):
            if first_bad_batch.item() >= 0:
                raise FloatingPointError(
                    f"{desc}: the loss became {loss_sum.item()} at batch {first_bad_batch.item()}/{len(loader)}. "
                    "Training stopped; the checkpoints on disk are from before. Try a lower learning rate."
                )
            bar.set_postfix(
                {"Train Acc": f"{correct.item() / count:.3f}", "Train Loss": f"{loss_sum.item() / count:.3g}"}
            )
    totals = runtime.all_reduce_sum(
        torch.stack([loss_sum, correct.double(), torch.tensor(float(count), device=device, dtype=torch.float64)])
    )
    loss_total, correct_total, count_total = totals.tolist()
    return {"loss": loss_total / count_total, "acc": 100 * correct_total / count_total, "count": int(count_total),
            "lr": lr}  # fmt: skip


@torch.no_grad()
def evaluate(net, loader, criterion=None, tta=False, amp=None, desc=None, progress=False):
    """Evaluate ``net`` on every sample of ``loader`` once, in eval mode. Returns a dict: loss,
    acc (%), per_class_acc (%), confusion (true x predicted counts), and per sample labels,
    preds, probs (on the CPU); under torchrun the totals cover all ranks. tta: the softmax
    averaged over views of each image (tta_views): "flip" (or True) or "flip-translate"."""
    device = runtime.model_device(net)
    tta = "flip" if tta is True else tta or None
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta={tta!r}: choose False, True, or one of {[v for v in TTA_VIEWS if v]}.")
    criterion = criterion or nn.CrossEntropyLoss()
    amp_dtype = runtime.autocast_dtype(device, amp)
    memory_format = torch.channels_last if runtime.uses_channels_last(net) else torch.preserve_format
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    all_labels, all_probs = [], []
    for images, labels in runtime.progress_bar(loader, desc=desc or "Eval", disable=not progress):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = torch.stack([net(view) for view in tta_views(images, tta)]) if tta else net(images)
        logits = logits.float()
        if tta:
            probs = logits.softmax(-1).mean(0)
            loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        else:
            probs = logits.softmax(-1)
            loss_sum += criterion(logits, labels) * len(labels)
        all_labels.append(labels)
        all_probs.append(probs)
    net.train(was_training)

    labels = torch.cat(all_labels)
    probs = torch.cat(all_probs)
    preds = probs.argmax(1)
    num_classes = probs.shape[1]
    confusion = torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)
    count = torch.tensor(float(len(labels)), device=device, dtype=torch.float64)
    confusion, loss_sum, count = (runtime.all_reduce_sum(t) for t in (confusion, loss_sum, count))
    confusion = confusion.cpu()
    per_class = 100 * confusion.diag().double() / confusion.sum(1).clamp_min(1)
    return {
        "loss": loss_sum.item() / count.item(),
        "acc": 100 * confusion.diag().sum().item() / count.item(),
        "per_class_acc": per_class.tolist(),
        "confusion": confusion,
        "labels": labels.cpu(),
        "preds": preds.cpu(),
        "probs": probs.cpu(),
        "tta": tta,
    }


TTA_VIEWS = (None, "flip", "flip-translate")


def tta_views(images, tta):
    """The views of a batch that test-time augmentation averages: the images and their
    mirror images ("flip"), and for "flip-translate" each of these shifted by one pixel
    up-left and down-right as well (edges reflected): six views, as airbench uses."""
    views = [images, images.flip(3)]
    if tta == "flip-translate":
        h, w = images.shape[-2:]
        padded = [F.pad(view, (1, 1, 1, 1), mode="reflect") for view in views]
        views += [p[..., :h, :w] for p in padded] + [p[..., 2:, 2:] for p in padded]
    return views


def refresh_batchnorm(net, loader, batches=BATCHNORM_BATCHES):
    """Recompute ``net``'s BatchNorm statistics over the first ``batches`` batches of
    ``loader`` (torch's update_bn), without using up random numbers or the loader's epoch, so
    that the training run goes on as it would have without."""
    from torch.optim.swa_utils import update_bn

    device = runtime.model_device(net)
    epoch = getattr(loader, "epoch", None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        update_bn(itertools.islice(loader, batches), net, device)
    if epoch is not None:
        loader.epoch = epoch


def _record_epoch(history, train_metrics, val_metrics, ema_metrics, seconds):
    values = (train_metrics["loss"], train_metrics["acc"], val_metrics["loss"], val_metrics["acc"], train_metrics["lr"],
              seconds)  # fmt: skip
    for key, value in zip(HISTORY, values, strict=True):
        history[key].append(value)
    if ema_metrics is not None:
        history.setdefault("ema_val_loss", []).append(ema_metrics["loss"])
        history.setdefault("ema_val_acc", []).append(ema_metrics["acc"])


def _epoch_line(history, epochs):
    """The tutorial's line for the epoch just recorded."""
    last = {key: values[-1] for key, values in history.items()}
    return (
        f"Epoch [{len(history['val_acc']):>3d}/{epochs:>3d}]  Train Loss:{last['train_loss']:.6f}  "
        f"Train Acc:{last['train_acc']:.2f}% Val Loss:{last['val_loss']:.6f}  Val Acc:{last['val_acc']:.2f}%  "
        f"Learning Rate:{last['lr']:.6f}  Time:{last['seconds']:.1f}s"
        + (f"  EMA Val Acc:{last['ema_val_acc']:.2f}%" if "ema_val_acc" in last else "")
    )


def _log_epoch(tbwriter, history):
    step = len(history["val_acc"])
    tbwriter.add_scalars("Loss", {"train": history["train_loss"][-1], "val": history["val_loss"][-1]}, step)
    accuracy = {"train": history["train_acc"][-1], "val": history["val_acc"][-1]}
    if "ema_val_acc" in history:
        accuracy["val (EMA)"] = history["ema_val_acc"][-1]
    tbwriter.add_scalars("Accuracy", accuracy, step)
    tbwriter.add_scalar("Learning Rate", history["lr"][-1], step)
    tbwriter.add_scalar("Seconds per epoch", history["seconds"][-1], step)


def _log_hparams(tbwriter, model, loader, optimizer, criterion, scheduler, epochs, history, extra):
    """The run's settings beside its final metrics, for TensorBoard's hparams tab."""
    group = optimizer.param_groups[0]
    values = {
        "epochs": epochs,
        "batch_size": getattr(loader, "batch_size", None),
        "optimizer": type(optimizer).__name__,
        "scheduler": type(scheduler).__name__ if scheduler is not None else "none",
        "label_smoothing": getattr(criterion, "label_smoothing", 0.0),
        **{key: group[key] for key in ("lr", "momentum", "weight_decay", "nesterov") if key in group},
        **getattr(runtime.unwrap_model(model), "config", {}),
        **(extra or {}),
    }
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
    tbwriter.add_hparams(values, {f"hparam/{key}": history[key][-1] for key in METRICS}, run_name=".")
    tbwriter.flush()


def _add_graph(tbwriter, net, loader, device):
    """Trace the model for TensorBoard's graph tab, in eval mode on zeros so that no
    BatchNorm statistics or random numbers are used up."""
    sample = next(iter(loader))[0][:2]
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # add_graph traces with torch.jit
        tbwriter.add_graph(net, torch.zeros_like(sample, device=device))
    net.train()


# ----------------------------------------------------------------------------------------
# 04 Evaluation pictures: curves, image grids, per-class accuracy, confusion matrix


def plot_history(epoch, Acc, Loss, Lr, save_dir=None):
    """The tutorial's three figures: loss, accuracy and learning rate per epoch.

    ``epoch`` is kept for the tutorial's call; the curves use as many epochs as were run.
    Returns the figures; with ``save_dir`` also writes loss.png, accuracy.png and lr.png.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figures = {}
    for name, series, ylabel in (
        ("loss", Loss, "Loss"),
        ("accuracy", Acc, "Accuracy (%)"),
        ("lr", {"lr": Lr}, "Learning rate"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, values in series.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label.replace("_", " "))
        ax.set(xlabel="Epoch", ylabel=ylabel, title=f"{ylabel} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        figures[name] = fig
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(save_dir) / f"{name}.png", dpi=100)
    return figures["loss"], figures["accuracy"], figures["lr"]


def denormalize(images, mean, std):
    """Normalised (N, 3, H, W) float images back to displayable (N, H, W, 3) values in [0, 1]."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def show_images(images, labels, classes, preds=None, ncols=8, mean=None, std=None, size=1.6):
    """A grid of images titled with their class; with ``preds``, titled "pred (true)" in
    green when right and red when wrong. ``images`` are uint8 (N, 3, H, W), or normalised
    floats together with ``mean`` and ``std``."""
    import matplotlib.pyplot as plt

    if len(images) == 0:
        raise ValueError("show_images got no images to show.")
    if images.dtype == torch.uint8:
        pictures = images.permute(0, 2, 3, 1).cpu().numpy()
    else:
        pictures = denormalize(images, mean, std)
    nrows = math.ceil(len(pictures) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * 1.15 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[: len(pictures)]):
        ax.imshow(pictures[i])
        true = classes[int(labels[i])]
        if preds is None:
            ax.set_title(true, fontsize=9)
        else:
            pred = classes[int(preds[i])]
            ax.set_title(f"{pred} ({true})", fontsize=9, color="green" if pred == true else "red")
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(per_class_acc, classes):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    bars = ax.bar(classes, per_class_acc, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set(ylabel="Accuracy (%)", ylim=(0, 105), title="Test accuracy per class")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(confusion, classes):
    """Rows are the true classes, columns the predictions; each row sums to 100%."""
    import matplotlib.pyplot as plt

    confusion = torch.as_tensor(confusion).double()
    percent = 100 * confusion / confusion.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="Predicted", ylabel="True", title="Confusion matrix (% of each true class)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            value = percent[i, j].item()
            ax.text(
                j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value > 50 else "black"
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def most_confident_mistakes(result, k=16):
    """Indices of the wrong predictions in an evaluate() result, most confident first."""
    wrong = torch.nonzero(result["preds"] != result["labels"]).flatten()
    confidence = result["probs"][wrong, result["preds"][wrong]]
    return wrong[confidence.argsort(descending=True)[:k]]
