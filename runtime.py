"""Where the code runs: the project's folders, memory, device, seed, torchrun, memory
format, torch.compile, precision and progress bars. Everything here serves training and
prediction without being what the notebooks teach; utils.py is that.
"""

import ctypes
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.std import tqdm as std_tqdm

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"  # data sets and the cache of decoded images
MODEL_DIR = ROOT / "model"  # checkpoints
LOG_DIR = ROOT / "logs"  # TensorBoard runs and saved figures


def keep_freed_memory():
    """Keep freed memory in the process instead of handing it back to the OS (glibc only).

    glibc gives every block over 32 MB its own mmap and unmaps it when freed, so on the CPU each
    training step faults in and zero-fills its activations anew (one activation of the 32x32
    stage at batch 256 is 151 MB): half the time went to the kernel. With these two settings
    the CIFAR option trains about 2x faster on a 2-core CPU, for a higher peak memory
    (benchmarks/README.md, "The allocator"). Called when this module is imported, so every
    notebook and script has it; MOBILENETV2_KEEP_FREED_MEMORY=0 keeps glibc's defaults.
    Returns whether the settings took effect (False on macOS, Windows, musl, or when turned off).
    """
    if os.environ.get("MOBILENETV2_KEEP_FREED_MEMORY") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    # No block gets its own mmap, and freed memory at the top of the heap is never trimmed.
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


KEEPS_FREED_MEMORY = keep_freed_memory()


def distributed_env():
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def is_main_process():
    return distributed_env()[0] == 0


def get_device(device=None, verbose=True):
    """The device to train on: CUDA when present, else Apple MPS, else the CPU.

    ``device`` overrides the choice ("cpu", "cuda", "cuda:1", "mps"). Under torchrun each
    process takes the GPU of its local rank.
    """
    if device is None or device == "auto":
        _, world_size, local_rank = distributed_env()
        if torch.cuda.is_available():
            device = f"cuda:{local_rank}" if world_size > 1 else "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"Device {device} was asked for, but PyTorch sees no CUDA GPU here.")
    if verbose and is_main_process():
        if device.type == "cuda":
            count = torch.cuda.device_count()
            name = torch.cuda.get_device_name(device)
            print(f"Using device: {device} ({name}; {count} GPU{'s' if count > 1 else ''} visible)")
        else:
            print(f"Using device: {device}")
    return device


def set_seed(seed=0, deterministic=False):
    """Seed Python-side and PyTorch random numbers so that a run can be repeated.

    On the CPU the same seed gives the same losses. On a GPU some kernels are not
    deterministic unless ``deterministic=True`` (which is slower).
    """
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global generator that user code calls)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def unwrap_model(net):
    """The plain MobileNetV2 inside DataParallel / DistributedDataParallel / torch.compile."""
    while True:
        if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


def channels_last_is_faster(net, device):
    """Whether training ``net`` on ``device`` is faster in channels_last memory format, as
    measured with benchmarks/train_speed.py: yes on CUDA, and on the CPU for small_input;
    on the CPU the paper's network, whose late maps are 2x2 and 1x1, is faster in NCHW."""
    return device.type == "cuda" or bool(getattr(net, "config", {}).get("small_input", False))


def model_device(net):
    """The device of ``net``'s weights (the CPU for a network without any)."""
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def uses_channels_last(net):
    """Whether ``net`` was prepared in channels_last: its first 4-D weight says so."""
    weight = next((p for p in net.parameters() if p.ndim == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def prepare_model(net, device=None, *, channels_last=None, sync_batchnorm=False, compile=False):
    """Make ``net`` ready to train, always in this order: device, memory format, SyncBatchNorm,
    DistributedDataParallel (under torchrun) or DataParallel (several GPUs in one process, as
    the tutorial does), torch.compile; on CUDA, cuDNN picks its fastest kernels (pick_fast_kernels).
    DDP must come after the memory format, or it keeps
    gradient buckets of the wrong strides and copies every gradient.

    channels_last: None picks the faster layout (channels_last_is_faster). Under torchrun the
    process group must exist already (train.py starts it). A model that is already wrapped
    keeps its wrapping, so calling this twice is harmless.
    """
    device = get_device(device, verbose=False)
    pick_fast_kernels(device)
    wrapped = isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or hasattr(net, "_orig_mod")
    if not wrapped:
        if channels_last is None:
            channels_last = channels_last_is_faster(net, device)
        net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if distributed_env()[1] > 1:
            if not dist.is_initialized():
                raise RuntimeError("Under torchrun, start the process group before preparing the model (see train.py).")
            if sync_batchnorm:
                if device.type != "cuda":
                    raise ValueError(
                        "sync_batchnorm needs CUDA; on the CPU each process normalises over its own batch."
                    )
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        elif device.type == "cuda" and torch.cuda.device_count() > 1:
            net = nn.DataParallel(net)
    if compile and not hasattr(net, "_orig_mod"):
        net = compiled(net, mode=None if compile is True else compile)
    return net


class CompiledModel(nn.Module):
    """``torch.compile(module)`` that runs ``module`` eagerly, after one warning, if compiling
    fails. Its state_dict is the module's own, under ``_orig_mod.`` as torch.compile's is."""

    def __init__(self, module, mode=None):
        super().__init__()
        self._orig_mod = module
        # Kept out of the module tree, so that parameters and state_dict are not listed twice.
        self.__dict__["_compiled"] = torch.compile(module, mode=mode)

    def forward(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as error:  # dynamo and inductor raise many kinds; the eager run re-raises real bugs
                warnings.warn(f"torch.compile failed, running without it from now on: {error}", stacklevel=2)
                self.__dict__["_compiled"] = None
        return self._orig_mod(*args, **kwargs)


def compiled(model, mode=None):
    """``model`` through torch.compile (CompiledModel) in ``mode`` (None, "reduce-overhead"
    for CUDA graphs, "max-autotune-no-cudagraphs", ...), or ``model`` itself with a warning
    where compiling is not supported."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("torch.compile is not supported here; training without it.", stacklevel=2)
        return model
    return CompiledModel(model, mode)


def all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def pick_fast_kernels(device):
    """Let cuDNN time its kernels and keep the fastest (the input size never changes), unless
    set_seed(deterministic=True) asked for repeatable ones."""
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True


def autocast_dtype(device, amp):
    """The dtype to autocast to, or None. ``amp``: None = float16 on CUDA, off on the CPU;
    True = float16; False = off; "bfloat16"/"float16" = that one. float16 rather than bfloat16,
    which cost this network accuracy (benchmarks/README.md, "Mixed precision")."""
    if isinstance(amp, str):
        if amp not in ("bfloat16", "float16"):
            raise ValueError(f"amp={amp!r}: choose True, False, None, 'bfloat16' or 'float16'.")
        return getattr(torch, amp)
    if amp is None:
        amp = device.type == "cuda"
    return torch.float16 if amp else None


def grad_scaler(device, amp_dtype):
    """A GradScaler for float16 autocast, which needs one to keep small gradients from
    rounding to zero; None otherwise."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


# Progress bars: widgets in a notebook front end, plain text in terminals and logs

# Where the text of a bar is kept instead of redrawn (papermill's --log-output, CI logs,
# files), each update is one more line, so it updates this often.
TEXT_PROGRESS_INTERVAL = 15  # seconds


def progress_bar(iterable, desc=None, total=None, disable=False, leave=True):
    """A tqdm bar over ``iterable`` (``set_postfix`` works): a widget in a notebook that a
    front end shows (JupyterLab, Jupyter Notebook, VS Code), plain text everywhere else.

    Plain text is what papermill (``make run``), a terminal and a log can show. In a terminal
    it redraws itself as usual; elsewhere it writes one update, with the rate and the time
    left, every TEXT_PROGRESS_INTERVAL seconds.
    """
    if _notebook_front_end():
        from tqdm.notebook import tqdm as widget_bar

        return widget_bar(iterable, desc=desc, total=total, disable=disable, leave=leave)
    options = {"desc": desc, "total": total, "disable": disable, "leave": leave, "file": sys.stderr}
    if not sys.stderr.isatty():
        # maxinterval too: tqdm's monitor thread would otherwise redraw a slow bar every 10 s.
        options.update(mininterval=TEXT_PROGRESS_INTERVAL, maxinterval=TEXT_PROGRESS_INTERVAL)
    return _TextBar(iterable, **options)


class _TextBar(std_tqdm):
    """tqdm's text bar, with a postfix that waits for the next update instead of writing one
    at once: where each update is a line of a log, a loop that sets one often adds many."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def _notebook_front_end():
    """Whether this runs in a Jupyter kernel whose notebook is open in a front end.

    papermill and nbclient run kernels without one: widgets then reach no screen, and the
    terminal of ``make run`` shows a bar's first frame only. jupyter_server, behind JupyterLab
    and Jupyter Notebook, starts its kernels with JPY_SESSION_NAME set, and VS Code defines
    ``__vsc_ipynb_file__`` in the notebook's namespace; papermill and nbclient do neither.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or "IPKernelApp" not in shell.config:
        return False  # plain Python, or IPython in a terminal
    return "JPY_SESSION_NAME" in os.environ or "__vsc_ipynb_file__" in shell.user_ns
