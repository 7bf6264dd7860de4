import pytest
import torch
from timm.models.resnet import BasicBlock, Bottleneck, downsample_conv

from backbones.blocks import GatedBasicBlock, GatedBottleneck
from tests.conftest import randomize_batchnorm

CASES = [
    (BasicBlock, GatedBasicBlock, 8, 8, 1),
    (BasicBlock, GatedBasicBlock, 8, 16, 2),
    (Bottleneck, GatedBottleneck, 16, 4, 1),
    (Bottleneck, GatedBottleneck, 8, 8, 2),
]


def _pair(plain_cls, gated_cls, inplanes, planes, stride):
    out = planes * plain_cls.expansion
    down = None
    if stride != 1 or inplanes != out:
        down = downsample_conv(inplanes, out, 1, stride=stride)
    plain = plain_cls(inplanes, planes, stride=stride, downsample=down).eval()
    randomize_batchnorm(plain)
    gated = gated_cls(inplanes, planes, stride=stride, downsample=down).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)
    return plain, gated


def _set_gate(gated, block_value, channel_value):
    with torch.no_grad():
        gated.gate.fc.weight.zero_()
        gated.gate.fc.bias.fill_(channel_value)
        gated.gate.fc.bias[0] = block_value


@pytest.mark.parametrize(("plain_cls", "gated_cls", "inplanes", "planes", "stride"), CASES)
def test_open_gates_reproduce_the_timm_block_exactly(
    plain_cls, gated_cls, inplanes, planes, stride
):
    plain, gated = _pair(plain_cls, gated_cls, inplanes, planes, stride)
    _set_gate(gated, 5.0, 5.0)  # ReLU-1 saturates at 1
    x = torch.randn(2, inplanes, 8, 8)
    with torch.no_grad():
        assert torch.equal(gated(x), plain(x))


@pytest.mark.parametrize(("plain_cls", "gated_cls", "inplanes", "planes", "stride"), CASES)
def test_zero_block_salience_gives_the_shortcut_exactly(
    plain_cls, gated_cls, inplanes, planes, stride
):
    plain, gated = _pair(plain_cls, gated_cls, inplanes, planes, stride)
    _set_gate(gated, -5.0, 1.0)
    x = torch.randn(2, inplanes, 8, 8).relu()
    with torch.no_grad():
        shortcut = x if gated.downsample is None else gated.downsample(x)
        assert torch.equal(gated(x), torch.relu(shortcut))


def test_channel_salience_scales_the_first_conv_output():
    plain, gated = _pair(BasicBlock, GatedBasicBlock, 8, 8, 1)
    _set_gate(gated, 5.0, 0.5)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        h = plain.act1(plain.bn1(plain.conv1(x))) * 0.5
        expected = torch.relu(plain.bn2(plain.conv2(h)) + x)
        assert torch.allclose(gated(x), expected, atol=1e-6)


def test_forward_gated_returns_the_decision():
    _, gated = _pair(BasicBlock, GatedBasicBlock, 8, 8, 1)
    out, decision = gated.forward_gated(torch.randn(3, 8, 8, 8))
    assert out.shape == (3, 8, 8, 8)
    assert decision.block_salience.shape == (3,)
    assert decision.channel_salience.shape == (3, 8)
