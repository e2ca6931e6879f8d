"""One GPU campaign: training speed, then accuracy experiments side by side, then one table.

    python3 benchmarks/gpu_campaign.py           # on a GPU machine: under 9 minutes in all
    python benchmarks/gpu_campaign.py --smoke    # the same code paths on the CPU, tiny settings

Every phase ends by the deadline, --budget-s seconds after the start:

  0. data     extract --data-archive into data/ unless the folder is there already, decode
              it once into the cache that every later process reads, print the environment.
  1. speed    benchmarks/train_speed.py for each SPEED_RUNS line, one at a time (a timing
              needs the GPU to itself), within --speed-budget-s.
  2. accuracy benchmarks/accuracy.py for each EXPERIMENTS line, --parallel processes at a time
              on the one GPU. One is started only while the seconds it needs are left; one
              still running at the deadline is stopped and reported as timed out.
  3. summary  experiment, epochs, accuracies, seconds and status, printed last and written to
              <out-dir>/summary.md and summary.json.

Each process writes its log and JSON to --out-dir (runs/campaign) as it finishes; the summary
is rewritten after each one, so a campaign stopped part way keeps what it finished. Where the
environment variable OUT names a folder, the summary and campaign.tar.gz (the JSON files and
logs) are copied there too, after each process.
"""

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import checkpoints  # noqa: E402
import utils  # noqa: E402

# One benchmarks/accuracy.py command line each: an experiment of its EXPERIMENTS, then
# train.py options that override it. The number is the seconds it needs on an H200 shared
# with the others (start-up, training, test): it is started only while that much time is
# left. Longest first, so that the one that sets the campaign's length starts at once.
EXPERIMENTS = {
    "long-cifar-100 --epochs 80": 380,  # the long recipe; 80 epochs fit the budget, 100 do not yet
    "default-cifar-10 --compile": 200,  # compiling (about a minute) competes for the CPU with the others
    "default-cifar-10 --no-amp": 120,
    "strong-cifar-10": 110,
    "ema-cifar-10": 95,
    "default-cifar-10": 90,
    "default-cifar-10 --amp-dtype bfloat16": 90,
    "default-cifar-10 --batch-size 512 --lr 0.4": 80,  # twice the batch, twice the peak rate
    "default-paper-10": 60,
    "tutorial-paper-10": 60,
}

# benchmarks/train_speed.py runs, by name. The eager rows of every precision come first and
# take well under a minute; the compiled rows follow, each compiling for 30-90 s, in the
# order of what they are expected to bring to a network this small, whose steps are bound by
# kernel launches: CUDA graphs first, kernel autotuning last. Rows cut off by the phase's
# deadline are missing from that run's JSON, the others stay.
SPEED_RUNS = {
    "speed-512": "--batch-size 512 --amp-dtype float16 bfloat16 none",
    "speed-256": "--batch-size 256 --amp-dtype float16 bfloat16 none "
    "--compile-mode default reduce-overhead max-autotune-no-cudagraphs",
}
SPEED_OPTIONS = ["--steps", "50", "--warmup", "10"]
SPEED_RUN_NEEDS_S = 30  # the eager rows: a run that cannot finish those is not started

# --smoke: the same phases on the CPU, in about a minute on two cores.
SMOKE_EXPERIMENTS = 2
SMOKE_TRAIN_OPTIONS = ["--epochs", "1", "--alpha", "0.25", "--val-size", "100", "--batch-size", "64",
                       "--device", "cpu"]  # fmt: skip
SMOKE_SPEED_OPTIONS = ["--steps", "1", "--warmup", "1", "--batch-size", "16", "--device", "cpu", "--paper-strides"]
# Compiling takes minutes on two cores: the smoke run times the compiled rows' code eagerly.
SMOKE_ENV = {"TORCH_COMPILE_DISABLE": "1"}


@dataclass
class Job:
    """One process of the campaign and what became of it."""

    name: str  # its files: <name>.log, <name>.json
    command: list
    needs_s: float  # not started with less time than this left before the deadline
    line: str = ""  # the command line as EXPERIMENTS or SPEED_RUNS gives it
    status: str = "pending"  # then running, and at the end ok, failed, timed out or not started
    started: float | None = None  # seconds since the campaign's start
    ended: float | None = None
    returncode: int | None = None


def job_name(line):
    """A file name for an EXPERIMENTS line: "default-cifar-10 --lr 0.4" -> "default-cifar-10_lr-0.4"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", line.replace(" --", "_")).strip("-")


def run_jobs(jobs, parallel, deadline, log_dir, clock, env=None, on_finish=None):
    """Run ``jobs`` in order, at most ``parallel`` at a time, each writing its output to
    <log_dir>/<name>.log. ``clock()`` gives seconds since the campaign's start, ``deadline``
    is on that clock. A job is started only while its ``needs_s`` are left before the
    deadline; one still running at the deadline is killed with its child processes (compile
    workers, data loader workers). ``on_finish(job)`` is called as each job ends."""
    pending, running = list(jobs), {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                if deadline - clock() < job.needs_s:
                    job.status = "not started"
                    continue
                log = open(log_dir / f"{job.name}.log", "w")  # noqa: SIM115 (closed when the job ends)
                log.write(f"$ {shlex.join(job.command)}\n")
                log.flush()
                # A session of its own, so that killing the group reaches its children too.
                process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           cwd=ROOT, start_new_session=True)  # fmt: skip
                job.status, job.started = "running", clock()
                running[job.name] = (job, process, log)
            time.sleep(0.2)
            for name, (job, process, log) in list(running.items()):
                returncode = process.poll()
                if returncode is None and clock() >= deadline:
                    kill_group(process)
                    returncode = process.wait()
                    job.status = "timed out"
                elif returncode is None:
                    continue
                else:
                    job.status = "ok" if returncode == 0 else "failed"
                job.returncode, job.ended = returncode, clock()
                log.close()
                del running[name]
                if on_finish is not None:
                    on_finish(job)
    finally:  # interrupted: leave no training process behind on the GPU
        for _, process, _ in running.values():
            kill_group(process)


def kill_group(process):
    """Kill ``process`` and every process of its session (start_new_session made one)."""
    with contextlib.suppress(ProcessLookupError):  # the whole group has ended already
        os.killpg(process.pid, signal.SIGKILL)


def prepare_data(data, archive, root=utils.DATA_DIR, report=print):
    """Make the image folder ``data`` ready: extracted from ``archive`` (which holds it as its
    top folder) when only the archive is there, and decoded once into the cache under ``root``
    (train.py's), so that the processes that follow all read the cache instead of each
    decoding 60,000 files. ``report`` gets what it did, a line at a time."""
    if data != "synthetic" and not data.is_dir():
        if not archive.is_file():
            raise SystemExit(f"No data: neither the folder {data} nor the archive {archive} exists.")
        report(f"extracting {archive} into {data.parent}/")
        with tarfile.open(archive) as tar:
            tar.extractall(data.parent, filter="data")
        if not data.is_dir():
            raise SystemExit(f"{archive} holds no folder {data.name}/.")
    for split in ("train", "test"):
        images, _, classes = utils.load_split(data, split, root)
        report(f"data: {data} {split}, {len(images)} images of {len(classes)} classes")


def environment():
    """What the campaign ran on, for the log and the summary."""
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        env.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   gpu_memory_free_gib=round(free / 2**30, 1), gpu_memory_total_gib=round(total / 2**30, 1))  # fmt: skip
    else:
        env["device"] = "CPU"
    return env


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def overlap(job, other):
    if None in (job.started, job.ended, other.started, other.ended):
        return 0.0
    return max(0.0, min(job.ended, other.ended) - max(job.started, other.started))


def experiment_result(job, jobs, out_dir):
    """One summary row: the scheduler's view of ``job`` and what its train.py record says.
    Every numeric test_acc* key of the record is kept (test_acc, test_acc_flip_tta, ...),
    and with a weight average its figures too, as ema_val_acc and ema_test_acc*."""
    record = read_json(out_dir / f"{job.name}.json") if job.status in ("ok", "failed", "timed out") else None
    status = "failed" if job.status == "ok" and record is None else job.status
    wall = job.ended - job.started if job.ended is not None else None
    beside = sum(overlap(job, other) for other in jobs if other is not job)
    result = {"experiment": job.line, "name": job.name, "status": status, "wall_seconds": wall,
              "running_beside": beside / wall if wall else None}  # fmt: skip
    if record is not None:
        history = record.get("history", {})
        val_acc = history.get("val_acc") or [None]
        result.update(epochs=len(history.get("seconds", [])), val_acc=val_acc[-1],
                      train_seconds=record.get("train_seconds"))  # fmt: skip
        result.update({k: v for k, v in record.items() if k.startswith("test_acc") and isinstance(v, int | float)})
        if history.get("ema_val_acc"):
            result["ema_val_acc"] = history["ema_val_acc"][-1]
        result.update({f"ema_{k}": v for k, v in (record.get("ema") or {}).items()})
    return result


def validation_accuracy(result):
    """The final validation accuracy of the weights that predict (the average, with EMA)."""
    return result["ema_val_acc"] if result.get("ema_val_acc") is not None else result["val_acc"]


def ship_weights(summary, out_dir, path):
    """The final weights of the experiment with the best validation accuracy (never chosen on
    the test set), as the float16 checkpoint that the project ships (checkpoints.release_checkpoint),
    at ``path``; its name."""
    done = [e for e in summary["experiments"] if e["status"] == "ok" and e.get("val_acc") is not None]
    if not done:
        return None
    best = max(done, key=validation_accuracy)
    checkpoint = utils.load_checkpoint(out_dir / "model" / f"{best['name']}_last.pth")
    checkpoints.atomic_save(checkpoints.release_checkpoint(checkpoint), path)
    return best["experiment"]


def speed_result(job, out_dir):
    return {"name": job.name, "command": job.line, "status": job.status,
            "record": read_json(out_dir / f"{job.name}.json")}  # fmt: skip


def cell(value, digits=2):
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_markdown(summary):
    """The speed rows and the experiments as Markdown tables."""
    lines = ["## Training speed", "", "| run | path | images/s | vs tutorial |", "| --- | --- | ---: | ---: |"]
    for run in summary["speed"]:
        rows = (run["record"] or {}).get("rows", [])
        if not rows:
            lines.append(f"| {run['name']} ({run['status']}) | | | |")
        for row in rows:
            speed = cell(row["images_per_s"], 1) if row["images_per_s"] is not None else "failed"
            lines.append(f"| {run['name']} ({run['status']}) | {row['path']} | {speed} | {cell(row['vs_tutorial'])} |")
    test_keys = list(dict.fromkeys(k for e in summary["experiments"] for k in e if k.startswith("test_acc")))
    ema_keys = list(dict.fromkeys(k for e in summary["experiments"] for k in e if k.startswith("ema_")))
    header = ["experiment", "epochs", "val_acc", *test_keys, *ema_keys, "train s", "wall s", "beside", "status"]
    lines += [
        "",
        "## Accuracy",
        "",
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 2) + " --- |",
    ]
    for e in summary["experiments"]:
        values = [f"`{e['experiment']}`", cell(e.get("epochs")), cell(e.get("val_acc")),
                  *(cell(e.get(k)) for k in test_keys + ema_keys), cell(e.get("train_seconds"), 1),
                  cell(e["wall_seconds"], 1),
                  cell(e["running_beside"], 1), e["status"]]  # fmt: skip
        lines.append("| " + " | ".join(values) + " |")
    lines += ["", f"{summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget; "
              "beside: the mean number of other experiments running at the same time."]  # fmt: skip
    return "\n".join(lines) + "\n"


def bundle(out_dir):
    """campaign.tar.gz of the folder's JSON files and logs (not the checkpoints), in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(out_dir.iterdir()):
            if path.suffix in (".json", ".log", ".md"):
                tar.add(path, arcname=f"campaign/{path.name}")
    return buffer.getvalue()


def speed_job(name, line, data, out_dir, options):
    """A train_speed.py run of SPEED_RUNS, writing <out_dir>/<name>.json."""
    data_option = [] if data == "synthetic" else ["--data", str(data)]  # without, it makes a synthetic folder
    command = [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), *shlex.split(line), *data_option,
               "--json", str(out_dir / f"{name}.json"), *options]  # fmt: skip
    return Job(name, command, SPEED_RUN_NEEDS_S, line)


def accuracy_job(line, needs_s, data, out_dir, options):
    """An accuracy.py run of an EXPERIMENTS line, writing <out_dir>/<name>.json; its
    checkpoints and TensorBoard run go under <out_dir> too, apart from other runs'."""
    name = job_name(line)
    command = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), *shlex.split(line), "--data", str(data),
               "--run-name", name, "--metrics-out", str(out_dir / f"{name}.json"),
               "--model-dir", str(out_dir / "model"), "--log-dir", str(out_dir / "tensorboard"), *options]  # fmt: skip
    return Job(name, command, needs_s, line)


def main(argv=None):
    started = time.monotonic()

    def clock():
        return time.monotonic() - started

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="image folder, or synthetic (default: data/cifar10-jpeg; --smoke: synthetic)")
    parser.add_argument("--data-archive", type=Path, default=ROOT / "shared" / "cifar10-jpeg.tar.gz",
                        help="a .tar.gz holding the data folder, extracted when the folder is missing")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "campaign", help="an empty or new folder")
    parser.add_argument("--budget-s", type=float, default=530, help="the deadline, in seconds from the start")
    parser.add_argument(
        "--speed-budget-s", type=float, help="the speed phase's share of it (default: 100; --smoke: 200)"
    )
    parser.add_argument("--parallel", type=int, help="accuracy processes at a time (default: 6; --smoke: 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU, the first 2 experiments")
    args = parser.parse_args(argv)

    default_data = "synthetic" if args.smoke else str(ROOT / "data" / "cifar10-jpeg")
    data = args.data or default_data
    data = data if data == "synthetic" else Path(data).resolve()
    parallel = args.parallel or (2 if args.smoke else 6)
    experiments = list(EXPERIMENTS.items())[: SMOKE_EXPERIMENTS if args.smoke else None]
    train_options = SMOKE_TRAIN_OPTIONS if args.smoke else []
    speed_options = SMOKE_SPEED_OPTIONS if args.smoke else SPEED_OPTIONS
    out_dir = args.out_dir.resolve()
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty: move it away, or name another --out-dir.")
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_to = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    # GPU processes need a core or two each for Python and kernel launches, not all of them.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // parallel))
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, **(SMOKE_ENV if args.smoke else {})}

    campaign_log = open(out_dir / "campaign.log", "w")  # noqa: SIM115 (open for the whole campaign)

    def say(text):
        stamped = f"[{clock():5.0f} s] {text}"
        print(stamped, flush=True)
        campaign_log.write(stamped + "\n")
        campaign_log.flush()

    say(f"phase 0, data and environment: {data}")
    prepare_data(data, args.data_archive, report=say)
    env = environment()
    say("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))

    speed_jobs = [speed_job(name, line, data, out_dir, speed_options) for name, line in SPEED_RUNS.items()]
    accuracy_jobs = [accuracy_job(line, needs_s, data, out_dir, train_options) for line, needs_s in experiments]

    def write_summary():
        summary = {"environment": env, "budget_s": args.budget_s, "elapsed_s": clock(), "smoke": args.smoke,
                   "speed": [speed_result(job, out_dir) for job in speed_jobs],
                   "experiments": [experiment_result(job, accuracy_jobs, out_dir) for job in accuracy_jobs]}  # fmt: skip
        markdown = summary_markdown(summary)
        for folder in [out_dir] if copy_to is None else [out_dir, copy_to]:
            checkpoints.atomic_write(folder / "summary.json", json.dumps(summary, indent=2))
            checkpoints.atomic_write(folder / "summary.md", markdown)
        if copy_to is not None:
            checkpoints.atomic_write(copy_to / "campaign.tar.gz", bundle(out_dir))
        return summary, markdown

    def finished(job):
        say(f"{job.name}: {job.status} after {job.ended - job.started:.0f} s (exit code {job.returncode})")
        write_summary()

    deadline = args.budget_s
    speed_deadline = min(deadline, clock() + (args.speed_budget_s or (200 if args.smoke else 100)))
    say(f"phase 1, training speed: {len(speed_jobs)} runs, one at a time, until {speed_deadline:.0f} s")
    run_jobs(speed_jobs, 1, speed_deadline, out_dir, clock, child_env, finished)

    say(f"phase 2, accuracy: {len(accuracy_jobs)} experiments, {parallel} at a time, until {deadline:.0f} s")
    run_jobs(accuracy_jobs, parallel, deadline, out_dir, clock, child_env, finished)
    for job in speed_jobs + accuracy_jobs:
        if job.status == "not started":
            say(f"{job.name}: not started, {job.needs_s:.0f} s needed")

    say("phase 3, summary")
    summary, markdown = write_summary()
    shipped = ship_weights(summary, out_dir, (copy_to or out_dir) / "mobilenetv2-cifar10.pth")
    say(f"weights to ship: the final weights of {shipped}, in float16" if shipped else "no weights to ship")
    campaign_log.close()
    print("\n" + markdown, end="")
    return 0 if all(e["status"] == "ok" for e in summary["experiments"]) else 1


if __name__ == "__main__":
    sys.exit(main())
