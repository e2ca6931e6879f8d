"""The network: the tutorial's and the paper's facts, torchvision compatibility, the CIFAR option."""

import pytest
import torch
import torchvision
from torch import nn
from torchinfo import summary

from model import INVERTED_RESIDUAL_SETTING, ConvBNReLU, InvertedResidual, MobileNetV2, _make_divisible


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def blocks(net):
    return [m for m in net.features if isinstance(m, InvertedResidual)]


def test_parameter_count_matches_the_tutorial():
    assert n_params(MobileNetV2(num_classes=10)) == 2_236_682


def test_torchinfo_summary_matches_the_tutorial():
    stats = summary(MobileNetV2(num_classes=10), (2, 3, 32, 32), verbose=0)
    assert stats.total_params == 2_236_682
    assert round(stats.total_mult_adds / 1e6, 2) == 12.32
    # torchinfo 1.8.0 labels the unit "(Units.MEGABYTES)" on Python 3.11+ (TylerYep/torchinfo#350),
    # the tutorial shows "(M)"; the figure itself is what matters.
    assert "Total mult-adds" in str(stats) and ": 12.32" in str(stats)


def test_small_input_keeps_parameters_and_costs_about_88m_mult_adds():
    net = MobileNetV2(num_classes=10, small_input=True)
    assert n_params(net) == 2_236_682
    stats = summary(net, (1, 3, 32, 32), verbose=0)
    assert round(stats.total_mult_adds / 1e6) == 88  # published figure for this variant: 87.98 M


@pytest.mark.parametrize("alpha, millions", [(0.5, 0.70), (0.75, 1.37), (1.0, 2.24), (1.4, 4.33)])
def test_width_multiplier_parameter_counts(alpha, millions):
    net = MobileNetV2(num_classes=10, alpha=alpha, small_input=True)
    assert round(n_params(net) / 1e6, 2) == millions


def test_last_layer_keeps_1280_channels_below_alpha_1():
    assert MobileNetV2(10, alpha=0.5).classifier[1].in_features == 1280
    assert MobileNetV2(10, alpha=1.4).classifier[1].in_features == 1792


def test_make_divisible_rounds_to_multiples_and_never_drops_10_percent():
    assert _make_divisible(32 * 0.75) == 24
    assert _make_divisible(16 * 0.35) == 8
    for ch in range(1, 500):
        out = _make_divisible(ch)
        assert out % 8 == 0 and out >= 0.9 * ch


def test_architecture_table_is_the_papers():
    assert INVERTED_RESIDUAL_SETTING == [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    assert len(blocks(MobileNetV2())) == sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING) == 17


@pytest.mark.parametrize("small_input", [False, True])
def test_shortcuts_only_where_stride_1_and_channels_match(small_input):
    net = MobileNetV2(num_classes=10, small_input=small_input)
    with_shortcut = [i for i, m in enumerate(net.features) if isinstance(m, InvertedResidual) and m.use_shortcut]
    assert with_shortcut == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    for block in blocks(net):
        conv = [m for m in block.conv.modules() if isinstance(m, nn.Conv2d)]
        depthwise = [c for c in conv if c.groups > 1][0]
        same_shape = depthwise.stride == (1, 1) and conv[0].in_channels == conv[-1].out_channels
        assert block.use_shortcut == same_shape


def test_blocks_use_relu6_and_a_linear_projection():
    net = MobileNetV2()
    for block in blocks(net):
        *expand_and_depthwise, projection, norm = block.conv
        assert all(isinstance(m, ConvBNReLU) and isinstance(m[2], nn.ReLU6) for m in expand_and_depthwise)
        assert isinstance(projection, nn.Conv2d) and projection.kernel_size == (1, 1)
        assert isinstance(norm, nn.BatchNorm2d)  # and no activation after it
    assert isinstance(net.classifier[0], nn.Dropout) and net.classifier[0].p == 0.2


def test_weight_initialisation_is_the_tutorials():
    torch.manual_seed(0)
    net = MobileNetV2(num_classes=10)
    linear = net.classifier[1]
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(linear.bias == 0)
    bn = net.features[0][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    conv = net.features[0][0]  # kaiming normal, fan_out = 32 * 3 * 3
    assert conv.weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.15)


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_state_dict_is_interchangeable_with_torchvision(num_classes):
    ours = MobileNetV2(num_classes=num_classes).eval()
    theirs = torchvision.models.mobilenet_v2(num_classes=num_classes).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    fresh = MobileNetV2(num_classes=num_classes).eval()
    fresh.load_state_dict(torchvision.models.mobilenet_v2(num_classes=num_classes).state_dict(), strict=True)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("small_input, final_size", [(False, 1), (True, 4)])
def test_output_and_feature_shapes(batch, small_input, final_size):
    net = MobileNetV2(num_classes=10, small_input=small_input).eval()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        assert net(x).shape == torch.Size([batch, 10])
        assert net.forward_features(x).shape == torch.Size([batch, 1280, final_size, final_size])


def test_gradients_reach_the_first_layer():
    net = MobileNetV2(num_classes=10)
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    first = net.features[0][0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_config_rebuilds_the_same_network():
    net = MobileNetV2(num_classes=7, alpha=0.75, small_input=True, dropout=0.1)
    again = MobileNetV2(**net.config)
    again.load_state_dict(net.state_dict(), strict=True)
    assert again.config == net.config


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("small_input", [False, True])
def test_channels_last_gives_the_same_outputs(device, small_input, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare full float32 on CUDA
    torch.manual_seed(0)
    net = MobileNetV2(num_classes=10, small_input=small_input).to(device).eval()
    x = torch.randn(4, 3, 32, 32, device=device)
    with torch.no_grad():
        expected = net(x)
        net = net.to(memory_format=torch.channels_last)
        got = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
