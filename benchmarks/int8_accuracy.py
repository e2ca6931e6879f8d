"""What int8 quantisation costs in accuracy: a trained checkpoint on the whole test set,
as PyTorch float32, as ONNX float32 (BatchNorm folded) and as ONNX int8 (export.quantize_onnx,
calibrated on 512 training images), all on the CPU.

    python benchmarks/int8_accuracy.py model/mobilenetv2.pth --data data/cifar10-jpeg
"""

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export  # noqa: E402
import utils  # noqa: E402


def onnx_predictions(path, images, batch_size=500):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    batches = [
        session.run(None, {"images": images[i : i + batch_size].numpy()})[0] for i in range(0, len(images), batch_size)
    ]
    return torch.cat([torch.from_numpy(b) for b in batches]).argmax(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="cifar10", help="the data source the checkpoint was trained on")
    args = parser.parse_args()

    net, checkpoint = utils.load_model(args.checkpoint, device="cpu")
    test_images, test_labels, _ = utils.load_split(args.data, "test")
    images = utils.normalize(test_images, checkpoint["mean"], checkpoint["std"])
    loader = utils.InMemoryLoader(test_images, test_labels, 500, checkpoint["mean"], checkpoint["std"])
    float_preds = utils.evaluate(net, loader)["preds"]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export.export_onnx(export.fold_batchnorm(net), Path(tmp) / "net.onnx")
        calibration = export.calibration_batch(args.data, checkpoint)
        int8_path = export.quantize_onnx(onnx_path, Path(tmp) / "net-int8.onnx", calibration)
        onnx_preds = onnx_predictions(onnx_path, images)
        int8_preds = onnx_predictions(int8_path, images)

    print(f"{args.checkpoint}: {checkpoint['model_config']}, {len(test_labels)} test images")
    print(f"{'path':<28}{'accuracy':>10}{'same top-1 as float32':>24}")
    for name, preds in (("PyTorch float32", float_preds), ("ONNX float32, BN folded", onnx_preds),
                        ("ONNX int8", int8_preds)):  # fmt: skip
        accuracy = 100 * (preds == test_labels).double().mean().item()
        agreement = 100 * (preds == float_preds).double().mean().item()
        print(f"{name:<28}{accuracy:>9.2f}%{agreement:>23.2f}%")


if __name__ == "__main__":
    main()
