"""Train MobileNetV2 from the command line: the training notebook as a script.

The options are the training notebook's parameters, in lower case. The same command runs
in one process or under torchrun, which starts one process per GPU (or CPU worker):

    python train.py --data data/cifar10-jpeg --epochs 10
    torchrun --nproc_per_node=4 train.py --data data/cifar10-jpeg --epochs 10
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py --data data/cifar10-jpeg --epochs 10

At the end the final weights are evaluated once on the test set (and with flip test-time
augmentation, reported separately); ``--metrics-out`` writes everything as JSON.
"""

import argparse
import json
import os
import platform
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

import runtime
import utils
from model import MobileNetV2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="cifar10", help='"cifar10", "synthetic", or a folder with train/ and test/')
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--recipe", default="default", choices=sorted(utils.RECIPES))
    p.add_argument("--batch-size", type=int, help="global batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--schedule", choices=["onecycle", "linear", "plateau"], help="(default: the recipe's)")
    p.add_argument("--warmup", type=float, help="fraction of the steps spent warming up (default: the recipe's)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="random crop and flip")
    p.add_argument("--trivial-augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--cutout", type=int, help="side of the Cutout square in pixels, 0 for none")
    p.add_argument("--ema", type=float, help="decay of the weight average, 0 for none")
    p.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=True,
                   help="the CIFAR option: stride 1 stem, 4x4 final map (default); --no-small-input is the paper's")  # fmt: skip
    p.add_argument("--alpha", type=float, default=1.0, help="width multiplier")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--val-size", type=float, default=0.1, help="validation images: a fraction, or a count")
    p.add_argument("--run-name", default="mobilenetv2", help="names model/<run>.pth and logs/<run>/")
    p.add_argument("--model-dir", type=Path, default=utils.MODEL_DIR)
    p.add_argument("--log-dir", type=Path, default=utils.LOG_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--resume", action="store_true", help="continue from model/<run>_last.pth")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun, BatchNorm statistics over all processes")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile the model (worth it on GPUs); MODE: reduce-overhead (CUDA graphs), "
                   "max-autotune-no-cudagraphs, ...")  # fmt: skip
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 autocast (default: on for CUDA, off on the CPU)")  # fmt: skip
    p.add_argument("--amp-dtype", choices=["bfloat16", "float16"], help="autocast to this type instead (implies --amp)")
    p.add_argument("--metrics-out", type=Path, help="write the histories, times and test results as JSON")
    return p.parse_args(argv)


def weights_agree_across_ranks(net):
    """True when every process holds the same parameters (DDP's promise, checked)."""
    flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


# Test-time augmentation (utils.evaluate's tta) -> the record's key for its test accuracy.
TTA_KEYS = {None: "test_acc", "flip": "test_acc_flip_tta", "flip-translate": "test_acc_flip_translate_tta"}


def accuracy_on_test(net, loader, amp):
    """Test accuracy (%) without and with each test-time augmentation, by record key, and
    the plain evaluation (per class, confusion matrix)."""
    results = {tta: utils.evaluate(net, loader, amp=amp, tta=tta) for tta in TTA_KEYS}
    return {key: results[tta]["acc"] for tta, key in TTA_KEYS.items()}, results[None]


def describe_accuracy(accuracies):
    return (f"{accuracies['test_acc']:.2f} % (TTA, reported apart: flip {accuracies['test_acc_flip_tta']:.2f} %, "
            f"flip and translate {accuracies['test_acc_flip_translate_tta']:.2f} %)")  # fmt: skip


@contextmanager
def process_group(device):
    """torchrun's process group for the whole run, NCCL on CUDA and gloo on the CPU, torn
    down at its end; nothing in a plain process."""
    if runtime.distributed_env()[1] == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        dist.barrier()  # let rank 0 finish writing before any process tears the group down
    finally:
        dist.destroy_process_group()


def main(argv=None, adapt_network=None, extra=None):
    """Train as the options say and return the run's record (what --metrics-out writes).

    adapt_network: a function applied to the freshly built network before it is prepared
    (benchmarks/accuracy.py uses it to emulate low precision); extra: more keys for the record.
    """
    args = parse_args(argv)
    device = utils.get_device(args.device)
    with process_group(device):
        return run(args, device, adapt_network, extra or {})


def run(args, device, adapt_network, extra):
    utils.set_seed(args.seed)
    recipe = utils.get_recipe(
        args.recipe,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        augment=args.augment,
        trivial_augment=args.trivial_augment,
        cutout=args.cutout,
        ema=args.ema,
    )
    val_size = int(args.val_size) if args.val_size >= 1 else args.val_size
    trainloader, valloader, testloader, classes = utils.get_loaders(
        args.data, batch_size=recipe["batch_size"], val_size=val_size, augment=recipe["augment"],
        trivial_augment=recipe["trivial_augment"], cutout=recipe["cutout"], device=device,
        seed=args.seed,
    )  # fmt: skip
    net = MobileNetV2(len(classes), alpha=args.alpha, small_input=args.small_input, dropout=args.dropout)
    if adapt_network is not None:
        net = adapt_network(net)
    net = utils.prepare_model(net, device, sync_batchnorm=args.sync_bn, compile=args.compile)
    criterion = utils.make_criterion(recipe)
    optimizer = utils.make_optimizer(net, recipe)
    scheduler = utils.make_scheduler(optimizer, recipe, args.epochs, len(trainloader))
    ema = utils.weight_average(net, recipe["ema"]) if recipe["ema"] else None
    main_process = runtime.is_main_process()
    amp = args.amp_dtype or args.amp
    tbwriter = SummaryWriter(args.log_dir / args.run_name) if main_process else None

    history = utils.fit(
        net, trainloader, valloader, args.epochs, optimizer, criterion, scheduler,
        save_path=args.model_dir / f"{args.run_name}.pth", tbwriter=tbwriter, resume=args.resume, amp=amp, ema=ema,
        hparams={"recipe": args.recipe, "data": str(args.data), "seed": args.seed},
    )  # fmt: skip
    test, plain = accuracy_on_test(net, testloader, amp)
    ema_test = accuracy_on_test(ema.module, testloader, amp)[0] if ema is not None else None
    in_sync = weights_agree_across_ranks(net) if dist.is_initialized() else True
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "recipe": recipe,
        "model": runtime.unwrap_model(net).config,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {os.cpu_count()} cores, {platform.machine()}",
        "processes": runtime.distributed_env()[1],
        "history": history,
        "train_seconds": sum(history["seconds"]),
        **test,
        "test_per_class_acc": dict(zip(classes, plain["per_class_acc"], strict=True)),
        "ema": ema_test,
        "weights_in_sync": in_sync,
        **extra,
    }
    if main_process:
        print(f"Accuracy of the final weights on the {len(plain['labels'])} test images: {describe_accuracy(test)}")
        if ema is not None:
            print(f"Accuracy of their average (EMA): {describe_accuracy(ema_test)}")
        for name, acc in zip(classes, plain["per_class_acc"], strict=True):
            print(f"Accuracy of {name:>5s} : {acc:.2f} %")
        if dist.is_initialized():
            print(f"Weights identical on all {dist.get_world_size()} processes: {in_sync}")
        tbwriter.close()
        if args.metrics_out:
            args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
            args.metrics_out.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
