"""CPU inference speed of MobileNetV2: the tutorial's way against the fastest ways found.

For both stride options, the paper's (small_input=False, ~6M multiply-adds per image) and
the CIFAR one (small_input=True, ~88M), it measures batch-1 latency (median over many runs
after warm-up, ms) and batch-256 throughput (images/s) of:

  eager (tutorial)      model.eval(), float32, NCHW, autograd on (the tutorial's predict
                        has no torch.no_grad), BatchNorm unfolded
  folded BN             torch.inference_mode() and BatchNorm folded into the convolutions
  folded BN, NHWC       the same with channels_last tensors
  TorchScript frozen    torch.jit.trace + torch.jit.optimize_for_inference (freezes, then
                        rewrites for oneDNN); deprecated in recent PyTorch, still measured
  torch.compile         inductor, one compilation per batch size (10-40 s each on two cores;
                        --quick leaves it out)
  onnxruntime           export.export_onnx, all graph optimisations, --threads threads
  onnxruntime int8      export.quantize_onnx, calibrated on synthetic images

It prints a table with each path's ratio to eager, then, as its last line,
`speedup: N.NNx`: eager's batch-1 latency over the fastest path's, for the CIFAR network.
Random weights time the same as trained ones; --checkpoint uses a trained network instead
(for its own stride option; the other stays random).

    python benchmarks/inference.py            # a few minutes on two cores
    python benchmarks/inference.py --quick    # about a minute: shorter timing, no torch.compile
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export  # noqa: E402
import utils  # noqa: E402
from images import make_synthetic  # noqa: E402
from model import MobileNetV2  # noqa: E402

TITLES = {False: "small_input=False (paper strides)", True: "small_input=True (CIFAR strides)"}


def seconds_per_run(run, images, budget, min_runs, warmup):
    """Median seconds of ``run(images)``, timed one call at a time for ``budget`` seconds
    (at least ``min_runs`` calls) after ``warmup`` calls that allocate memory and pick kernels."""
    for _ in range(warmup):
        run(images)
    times = []
    end = time.perf_counter() + budget
    while len(times) < min_runs or time.perf_counter() < end:
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pytorch_paths(net, compile_model):
    """{name: function of an NCHW float batch} for the PyTorch ways of running ``net``."""
    folded = export.fold_batchnorm(net)
    folded_nhwc = export.fold_batchnorm(net).to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warnings
        scripted = torch.jit.optimize_for_inference(torch.jit.trace(folded, example))

    def inference(module, memory_format=torch.contiguous_format):
        def run(images):
            with torch.inference_mode():
                return module(images.contiguous(memory_format=memory_format))

        return run

    paths = {
        "eager (tutorial)": net,
        "folded BN": inference(folded),
        "folded BN, NHWC": inference(folded_nhwc, torch.channels_last),
        "TorchScript frozen": inference(scripted),
    }
    if compile_model:
        paths["torch.compile"] = inference(torch.compile(folded, dynamic=False))
    return paths


def onnxruntime_paths(net, folder, threads, calibration_images):
    """{name: function of an NCHW float batch} for onnxruntime, float32 and int8."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    onnx_path = export.export_onnx(export.fold_batchnorm(net), folder / "net.onnx")
    int8_path = export.quantize_onnx(onnx_path, folder / "net-int8.onnx", calibration_images)
    paths = {}
    for name, path in (("onnxruntime", onnx_path), ("onnxruntime int8", int8_path)):
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        paths[name] = lambda images, session=session: session.run(None, {"images": images.numpy()})
    return paths


def measure(net, args, folder, calibration_images):
    """{path name: (batch-1 ms, batch-256 images/s)} for one network."""
    net.eval()
    paths = pytorch_paths(net, compile_model=not args.no_compile)
    paths.update(onnxruntime_paths(net, folder, args.threads, calibration_images))
    one, batch = torch.randn(1, 3, 32, 32), torch.randn(args.batch_size, 3, 32, 32)
    results = {}
    for name, run in paths.items():
        latency = seconds_per_run(run, one, args.seconds, min_runs=10, warmup=5)
        throughput = args.batch_size / seconds_per_run(run, batch, args.seconds, min_runs=3, warmup=1)
        results[name] = (1000 * latency, throughput)
        print(f"  {name:<20} {1000 * latency:8.2f} ms  {throughput:8.0f} images/s", flush=True)
    return results


def print_table(all_results, batch_size):
    """One row per path, one group of columns per network; x = how many times better than eager."""
    header = f"{'path':<20}" + "".join(f" | {TITLES[key]:^36}" for key in all_results)
    units = f"{'':<20}" + f" | {'batch 1 ms':>11} {'x':>5} {f'b{batch_size} img/s':>12} {'x':>5}" * len(all_results)
    print(header, units, "-" * len(units), sep="\n")
    for name in all_results[False]:
        cells = []
        for results in all_results.values():
            eager_ms, eager_rate = results["eager (tutorial)"]
            ms, rate = results[name]
            cells.append(f" | {ms:11.2f} {eager_ms / ms:5.1f} {rate:12.0f} {rate / eager_rate:5.1f}")
        print(f"{name:<20}" + "".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 s per measurement and no torch.compile")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for PyTorch and onnxruntime")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of the throughput runs")
    parser.add_argument("--checkpoint", help="time this trained network instead of random weights")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.no_compile = 0.5, True
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    trained = utils.load_model(args.checkpoint, device="cpu")[0] if args.checkpoint else None
    train_images, _, _ = make_synthetic("train", train_size=256)
    mean, std = utils.channel_stats(train_images)
    calibration_images = utils.normalize(train_images, mean, std)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads, load average {load}")  # fmt: skip

    all_results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for small_input in (False, True):
            if trained is not None and trained.config["small_input"] == small_input:
                net = trained
            else:
                net = MobileNetV2(num_classes=10, small_input=small_input)
            print(TITLES[small_input], flush=True)
            all_results[small_input] = measure(net, args, Path(tmp) / str(small_input), calibration_images)
    print()
    print_table(all_results, args.batch_size)

    cifar = all_results[True]
    eager_ms = cifar["eager (tutorial)"][0]
    fastest = min(cifar, key=lambda name: cifar[name][0])
    fastest_float = min((name for name in cifar if "int8" not in name), key=lambda name: cifar[name][0])
    print(f"\nsmall_input=True, batch 1: fastest float32 path {fastest_float!r} "
          f"({eager_ms / cifar[fastest_float][0]:.2f}x eager), fastest path {fastest!r}")  # fmt: skip
    print(f"speedup: {eager_ms / cifar[fastest][0]:.2f}x")


if __name__ == "__main__":
    main()
