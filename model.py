"""MobileNetV2 (Sandler et al., 2018, https://arxiv.org/abs/1801.04381) for CIFAR-10.

The names and signatures follow the tutorial this project is built on, and the module
layout follows ``torchvision.models.mobilenet_v2``, so a state_dict moves between the two
unchanged. ``small_input=True`` is the one departure from the paper, for 32x32 images.
"""

import torch
from torch import nn

# The paper's Table 2, one row per stage of inverted residual blocks:
# t = expansion factor, c = output channels, n = number of blocks, s = stride of the first block.
INVERTED_RESIDUAL_SETTING = [
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(ch, divisor=8, min_ch=None):
    """Round a channel count to the nearest multiple of ``divisor`` (as the reference
    TensorFlow implementation does), never going more than 10% below ``ch``."""
    if min_ch is None:
        min_ch = divisor
    new_ch = max(min_ch, int(ch + divisor / 2) // divisor * divisor)
    if new_ch < 0.9 * ch:
        new_ch += divisor
    return new_ch


class ConvBNReLU(nn.Sequential):
    """Convolution, BatchNorm, ReLU6. ``groups=in_channel`` makes it depthwise."""

    def __init__(self, in_channel, out_channel, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channel, out_channel, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channel),
            # Out of place: on the CPU no slower, and no more memory (benchmarks/README.md).
            # ReLU6 has no parameters, so the state_dict is torchvision's either way.
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> linear 1x1 projection, plus a shortcut when the
    block keeps the shape (stride 1 and as many output channels as input channels)."""

    def __init__(self, in_channel, out_channel, stride, expand_ratio):
        super().__init__()
        hidden_channel = in_channel * expand_ratio
        self.use_shortcut = stride == 1 and in_channel == out_channel

        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_channel, hidden_channel, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU(hidden_channel, hidden_channel, stride=stride, groups=hidden_channel),
                # No activation after the projection: ReLU on a low-dimensional output
                # destroys information (the paper's "linear bottleneck").
                nn.Conv2d(hidden_channel, out_channel, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channel),
            ]
        )
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_shortcut:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2.

    num_classes:   size of the classifier's output.
    alpha:         width multiplier; every layer's channels are scaled by it.
    round_nearest: channel counts are rounded to a multiple of this.
    small_input:   keep the first convolution and the first 24-channel stage at stride 1,
                   for 32x32 images (see the NOTE below). False gives the paper's network.
    dropout:       dropout probability before the classifier.
    """

    def __init__(self, num_classes=1000, alpha=1.0, round_nearest=8, small_input=False, dropout=0.2):
        super().__init__()
        # Plain values that rebuild this network; checkpoints store them.
        self.config = {
            "num_classes": num_classes,
            "alpha": alpha,
            "round_nearest": round_nearest,
            "small_input": small_input,
            "dropout": dropout,
        }
        input_channel = _make_divisible(32 * alpha, round_nearest)
        # The paper keeps the last layer at 1280 channels when alpha < 1.
        last_channel = _make_divisible(1280 * max(1.0, alpha), round_nearest)

        # NOTE: the paper's strides reduce a 224x224 image 32 times, to 7x7, but a 32x32
        # CIFAR image to 2x2 in the 64- and 96-channel stages and to a single pixel in the
        # last four blocks, where a 3x3 depthwise convolution sees only its own pixel. That
        # is a main reason the tutorial stalls near 54%. small_input=True keeps the first
        # convolution and the 24-channel stage at stride 1, so the image is reduced 8 times,
        # to 4x4. The parameters are the same; the multiply-adds grow 14x (6.2 M -> 88 M).
        first_stride = 1 if small_input else 2
        setting = [(t, c, n, 1 if small_input and c == 24 else s) for t, c, n, s in INVERTED_RESIDUAL_SETTING]

        features = [ConvBNReLU(3, input_channel, stride=first_stride)]
        for t, c, n, s in setting:
            output_channel = _make_divisible(c * alpha, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        """The last feature map, before pooling: (N, 1280, H/32, W/32), or H/8 with small_input."""
        return self.features(x)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)
