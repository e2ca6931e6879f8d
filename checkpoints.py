"""Checkpoints: one format, built, saved, resumed and loaded here.

A checkpoint is a dict of state_dicts and plain values, written atomically (a crash leaves
the previous file whole) and loaded with ``weights_only=True`` (loading never runs code):

    format        CHECKPOINT_FORMAT, so that other files are told apart
    arch          "MobileNetV2"
    model_config  the keyword arguments that rebuild the network (MobileNetV2.config)
    classes       the class names, in label order
    mean, std     the per-channel normalisation the network was trained with
    model         the trained weights' state_dict (no DataParallel/DDP/compile prefixes)
    ema_model     the weight average's state_dict, or None
    weights       which of the two predicts: "ema" or "trained"
    epochs        the run's planned number of epochs
    epoch         the epochs done when it was written
    history       per-epoch lists: train_loss, train_acc, val_loss, val_acc, lr, seconds
                  (and ema_val_loss, ema_val_acc)
    metrics       the last value of each history list
    best_val_acc  the best validation accuracy so far
The resumable <name>_last.pth adds what continuing needs: optimizer, scheduler, scaler (their
state_dicts, or None), rng ({"cpu", "cuda"} random states) and ema_updates.
"""

import contextlib
import os
import pickle
from pathlib import Path

import torch

from model import MobileNetV2
from runtime import MODEL_DIR, get_device, unwrap_model

CHECKPOINT_FORMAT = "mobilenetv2-cifar10-checkpoint/1"
# The trained weights that ship with the project (model/pretrained/README.md says how they
# were trained); notebooks 4 and 5 and predict.py fall back on them, hubconf.py loads them.
PRETRAINED_WEIGHTS = MODEL_DIR / "pretrained" / "mobilenetv2-cifar10.pth"


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint of this project."""


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename it over ``path``: a
    crash or Ctrl-C mid-write leaves the previous file whole."""
    with _replacing(path) as f:
        torch.save(obj, f)


def atomic_write(path, data):
    """``data`` (bytes or text) written to ``path`` whole or not at all, as atomic_save writes."""
    with _replacing(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def _replacing(path):
    """A binary file to write, renamed over ``path`` once written; removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def last_checkpoint_path(save_path):
    """Where train() keeps the resumable checkpoint next to the best one."""
    save_path = Path(save_path)
    return save_path.with_name(f"{save_path.stem}_last{save_path.suffix}")


def data_info(loader, data=None):
    """What a checkpoint records of the data, so that prediction preprocesses as training did:
    ``data`` ({"classes", "mean", "std"}) as given, else the loader's attributes of those
    names, which get_loaders' loaders have."""
    data = data or {key: getattr(loader, key, None) for key in ("classes", "mean", "std")}
    missing = [key for key in ("classes", "mean", "std") if data.get(key) is None]
    if missing:
        raise ValueError(
            f"A checkpoint needs the data's {', '.join(missing)}, and the training loader does not tell them. "
            "Pass them to train() or fit(): data={'classes': [...], 'mean': (r, g, b), 'std': (r, g, b)}, "
            "the values your Normalize step uses."
        )
    return {
        "classes": list(data["classes"]),
        "mean": tuple(float(v) for v in data["mean"]),
        "std": tuple(float(v) for v in data["std"]),
    }


def make_checkpoint(net, data, epochs, history, best_val_acc, optimizer=None, scheduler=None, scaler=None,
                    ema_model=None):  # fmt: skip
    """The checkpoint dict: the trained weights ("model", no wrapper prefixes) and, with
    ``ema_model``, their average ("ema_model"); "weights" says which of the two predicts
    (load_model uses it). Also what rebuilds the network (arch, model_config), what prediction
    needs (data_info's classes, mean, std) and the run so far. Given ``optimizer``, also all
    that resuming needs: optimizer, scheduler, gradient scaler, random state, EMA updates."""
    base = unwrap_model(net)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": type(base).__name__,
        "model_config": getattr(base, "config", None),
        **data,
        "model": base.state_dict(),
        "epochs": epochs,
        "epoch": len(history["val_acc"]),
        "history": history,
        "metrics": {key: values[-1] for key, values in history.items() if values},
        "best_val_acc": best_val_acc,
        "weights": "ema" if ema_model is not None else "trained",
        "ema_model": ema_model.module.state_dict() if ema_model is not None else None,
    }
    if optimizer is not None:
        device = next(base.parameters()).device
        checkpoint["optimizer"] = optimizer.state_dict()
        checkpoint["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        checkpoint["scaler"] = scaler.state_dict() if scaler is not None else None
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        checkpoint["rng"] = {"cpu": torch.get_rng_state(), "cuda": cuda_rng}
        checkpoint["ema_updates"] = int(ema_model.n_averaged) if ema_model is not None else 0
    return checkpoint


def predicting_weights(checkpoint):
    """The key of the state_dict that predicts: "ema_model" for a run with a weight average
    (its "weights" says "ema"), else "model"."""
    return "ema_model" if checkpoint.get("weights") == "ema" else "model"


def release_checkpoint(checkpoint, dtype=torch.float16):
    """A checkpoint to give away: the weights that predict (the average, with EMA) in
    ``dtype``, half the size in float16, with the metadata, without the training state."""
    kept = ("format", "arch", "model_config", "classes", "mean", "std", "epochs", "epoch", "history", "metrics",
            "best_val_acc", "weights")  # fmt: skip
    key = predicting_weights(checkpoint)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint[key].items()}
    return {"model": None, "ema_model": None, **{k: checkpoint.get(k) for k in kept}, key: weights}


def save_checkpoints(save_path, model, data, epochs, history, best_val_acc, optimizer, scheduler, scaler, ema_model):
    """After an epoch: ``save_path`` when the validation accuracy of the weights that predict
    (the average, with EMA) improved, and the resumable <stem>_last.pth every time. Returns
    the best validation accuracy so far."""
    val_acc = history["ema_val_acc" if "ema_val_acc" in history else "val_acc"][-1]
    improved = val_acc > best_val_acc
    best_val_acc = max(best_val_acc, val_acc)
    if improved:
        atomic_save(make_checkpoint(model, data, epochs, history, best_val_acc, ema_model=ema_model), save_path)
    resumable = make_checkpoint(model, data, epochs, history, best_val_acc, optimizer, scheduler, scaler, ema_model)
    atomic_save(resumable, last_checkpoint_path(save_path))
    return best_val_acc


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True``, which never runs code from the file,
    and explain what is wrong with a file that is not one of this project's checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error) or "GLOBAL" in str(error):
            raise CheckpointError(
                f"{path} holds pickled Python objects, most likely a whole model saved with "
                "torch.save(net). Loading it would run code from the file, so it is refused. "
                "If you trust the file, convert it once:\n"
                f"    net = torch.load({str(path)!r}, weights_only=False)\n"
                "    torch.save({'model': net.state_dict()}, 'converted.pth')\n"
                "and load the state_dict into MobileNetV2(...)."
            ) from error
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {error}") from error
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as error:
        # What the unpickler raises on arbitrary bytes depends on the bytes.
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another kind of file): {error}"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a checkpoint written by this project's train(). "
            "A bare state_dict loads with net.load_state_dict(torch.load(path, weights_only=True))."
        )
    return checkpoint


def resume_training(save_path, model, optimizer, scheduler, scaler, epochs, ema_model=None):
    """Restore what make_checkpoint saved in <save_path stem>_last.pth into the objects given,
    so that the run ends as if it had never stopped. Returns (history, best_val_acc)."""
    if save_path is None:
        raise ValueError("resume=True needs save_path: the checkpoint to resume is <save_path stem>_last.pth.")
    path = last_checkpoint_path(save_path)
    base = unwrap_model(model)
    device = next(base.parameters()).device
    checkpoint = load_checkpoint(path, map_location=device)
    if checkpoint["epochs"] != epochs:
        raise ValueError(
            f"{path} is from a run of {checkpoint['epochs']} epochs; resume it with epoch="
            f"{checkpoint['epochs']} (schedules such as OneCycleLR are planned for the whole run), "
            "or start a new run to train for longer."
        )
    if (ema_model is not None) != (checkpoint.get("weights") == "ema"):
        had = "with" if checkpoint.get("weights") == "ema" else "without"
        raise ValueError(f"{path} was trained {had} a weight average (ema); resume it {had} one too.")
    base.load_state_dict(checkpoint["model"])
    if ema_model is not None:
        ema_model.module.load_state_dict(checkpoint["ema_model"])
        ema_model.n_averaged.fill_(checkpoint["ema_updates"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint["scheduler"] is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint["scaler"] is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return checkpoint["history"], checkpoint["best_val_acc"]


def load_model(path, device=None, num_classes=None):
    """Rebuild the network a checkpoint was trained as, in eval mode, from its own metadata.

    Returns (net, checkpoint); the checkpoint dict holds ``classes``, ``mean``, ``std``,
    ``metrics`` and ``history``. The weights are those its "weights" names: the average of the
    weights when trained with ``ema``. ``num_classes``, if given, must match the checkpoint's.
    """
    checkpoint = load_checkpoint(path)
    config = checkpoint.get("model_config")
    if checkpoint.get("arch") != "MobileNetV2" or not isinstance(config, dict):
        raise CheckpointError(f"{path} is a checkpoint of {checkpoint.get('arch')!r}, not of MobileNetV2.")
    if num_classes is not None and config["num_classes"] != num_classes:
        raise CheckpointError(f"{path} was trained for {config['num_classes']} classes, not {num_classes}.")
    net = MobileNetV2(**config)
    try:
        net.load_state_dict(checkpoint[predicting_weights(checkpoint)])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the weights do not fit MobileNetV2({config}): {error}") from error
    net = net.to(get_device(device, verbose=False)).eval()
    return net, checkpoint
