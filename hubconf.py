"""torch.hub entry point: the network, with or without the weights that ship with the project.

    net = torch.hub.load("<owner>/<repo>", "mobilenetv2_cifar10", pretrained=True)
    net = torch.hub.load("path/to/this/folder", "mobilenetv2_cifar10", source="local", pretrained=True)

The network expects 32x32 RGB images as float tensors in [0, 1] (``ToTensor``), normalised
per channel with the statistics of the images they were trained on, which the weights file
also holds:

    mean = (0.4914, 0.4822, 0.4467), std = (0.2452, 0.2429, 0.2607)
    classes = airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck

``predict.py`` does all of that for a picture, a folder or a URL. Only torch and model.py are
imported here, so loading through torch.hub changes nothing else in the caller's process.
"""

from pathlib import Path

import torch

from model import MobileNetV2

dependencies = ["torch"]

# Also checkpoints.PRETRAINED_WEIGHTS; written out here so that hubconf imports no more than it needs.
PRETRAINED_WEIGHTS = Path(__file__).resolve().parent / "model" / "pretrained" / "mobilenetv2-cifar10.pth"


def mobilenetv2_cifar10(pretrained=False, small_input=True, num_classes=10, **kwargs):
    """MobileNetV2 for CIFAR-10, in eval mode when ``pretrained``.

    pretrained:   load the shipped weights (model/pretrained/README.md: how they were trained
                  and how accurate they are); they fit only the default settings.
    small_input:  True keeps the first convolution and the 24-channel stage at stride 1 for
                  32x32 images (model.py); False gives the paper's strides.
    num_classes, **kwargs: as MobileNetV2 takes them (alpha, round_nearest, dropout).
    """
    net = MobileNetV2(num_classes=num_classes, small_input=small_input, **kwargs)
    if not pretrained:
        return net
    checkpoint = torch.load(PRETRAINED_WEIGHTS, map_location="cpu", weights_only=True)
    if checkpoint["model_config"] != net.config:
        raise ValueError(
            f"The shipped weights are for MobileNetV2(**{checkpoint['model_config']}), "
            f"not MobileNetV2(**{net.config}): leave small_input, num_classes and the others at their defaults."
        )
    # The weights file holds one state_dict, under the key its "weights" names (checkpoints.py).
    key = "ema_model" if checkpoint["weights"] == "ema" else "model"
    net.load_state_dict(checkpoint[key])  # float16 in the file, float32 in the network
    return net.eval()
