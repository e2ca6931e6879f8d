"""runtime.keep_freed_memory: freed blocks stay in the process, and no arithmetic changes."""

import os
import subprocess
import sys
import textwrap

import pytest

import runtime

ROOT = runtime.ROOT

glibc_only = pytest.mark.skipif(not runtime.KEEPS_FREED_MEMORY, reason="needs Linux with glibc")


def run_python(code, keep_freed_memory):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOBILENETV2_KEEP_FREED_MEMORY": "1" if keep_freed_memory else "0"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@glibc_only
def test_importing_the_helpers_keeps_a_freed_block_in_the_process():
    # A 256 MB tensor is freed; glibc's default hands it back to the OS at once, the fix keeps it.
    code = """
        import os, torch, utils  # importing the helpers is all it takes
        from runtime import KEEPS_FREED_MEMORY
        def resident_mb():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        before = resident_mb()
        block = torch.ones(64 * 2**20)
        del block
        print(KEEPS_FREED_MEMORY, resident_mb() - before)
    """
    kept, kept_mb = run_python(code, keep_freed_memory=True)
    default, default_mb = run_python(code, keep_freed_memory=False)
    assert (kept, default) == ("True", "False")
    assert float(kept_mb) > 200 > 50 > float(default_mb)


@glibc_only
def test_the_allocator_changes_no_arithmetic():
    # Four training steps of the CIFAR option at batch 64, whose activations (38 MB) are above
    # glibc's mmap threshold: the same seed gives the same losses, bit for bit, either way.
    code = """
        import torch, utils
        from images import make_synthetic
        from model import MobileNetV2
        torch.set_num_threads(2)
        images, labels, _ = make_synthetic("train", train_size=256)
        mean, std = utils.channel_stats(images)
        loader = utils.InMemoryLoader(images, labels, 64, mean, std, shuffle=True, augment=True, drop_last=True)
        utils.set_seed(0)
        net = MobileNetV2(10, small_input=True)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        for x, y in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            print(loss.item().hex())
    """
    kept = run_python(code, keep_freed_memory=True)
    default = run_python(code, keep_freed_memory=False)
    assert len(kept) == 4
    assert kept == default


def test_turned_off_or_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setenv("MOBILENETV2_KEEP_FREED_MEMORY", "0")
    assert runtime.keep_freed_memory() is False
    monkeypatch.delenv("MOBILENETV2_KEEP_FREED_MEMORY")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert runtime.keep_freed_memory() is False
