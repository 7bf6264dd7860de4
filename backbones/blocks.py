"""Gated residual blocks built on timm's ``BasicBlock`` and ``Bottleneck``.

The gated blocks subclass timm's blocks, so every timm ResNet-family constructor
(``timm.models.resnet.ResNet``, ``make_blocks``, the registered ``resnet18`` etc.) builds
them with ``block=GatedBasicBlock`` or ``block=GatedBottleneck``. They add one ``BlockGate``
and a ``forward_gated`` that returns the gate decisions; ``forward`` keeps the ``x -> x``
signature so the blocks still work inside ``nn.Sequential``.

Gated forward (LC-Net eq. 2 and 4)::

    S_L, S_C = gate(x)
    h = act1(bn1(conv1(x))) * S_C          # first conv's output, per channel
    ...rest of the residual branch F...
    out = act_out(F(x) * S_L + shortcut(x))

With ``S_L = 0`` the output is ``act_out(shortcut(x))`` exactly; with all gates at 1 it is the
timm block's output exactly.
"""

from __future__ import annotations

from typing import Any

from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from backbones.gates import BlockGate, GateDecision


def _scale_channels(x: Tensor, channel_salience: Tensor) -> Tensor:
    return x * channel_salience[:, :, None, None]


def _merge(residual: Tensor, shortcut: Tensor, block_salience: Tensor) -> Tensor:
    return residual * block_salience[:, None, None, None] + shortcut


class _GatedMixin:
    """Shared parts of the gated blocks: the gate and the shortcut/merge tail.

    Args:
        inplanes: Input channels.
        planes: The timm block's ``planes``.
        *args: Positional arguments of the timm block.
        gate_negative_slope: Leaky ReLU-1 slope of the gates in training.
        **kwargs: Keyword arguments of the timm block.
    """

    gate: BlockGate
    conv1: nn.Conv2d
    downsample: nn.Module | None
    se: nn.Module | None
    drop_path: nn.Module | None

    def __init__(
        self, inplanes: int, planes: int, *args: Any, gate_negative_slope: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)  # the timm block
        self.gate = BlockGate(inplanes, self.conv1.out_channels,
                              negative_slope=gate_negative_slope)

    def _shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def _branch_tail(self, h: Tensor) -> Tensor:
        if self.se is not None:
            h = self.se(h)
        if self.drop_path is not None:
            h = self.drop_path(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Gated forward, output only (for use inside ``nn.Sequential``)."""
        return self.forward_gated(x)[0]  # type: ignore[attr-defined]


class GatedBasicBlock(_GatedMixin, BasicBlock):
    """timm ``BasicBlock`` with LC-Net gates; ``S_C`` scales the first 3x3 conv's output.

    Takes ``BasicBlock``'s arguments (``planes``: output channels) and
    ``gate_negative_slope``, the gates' leaky ReLU-1 slope in training.
    """

    def forward_gated(self, x: Tensor) -> tuple[Tensor, GateDecision]:
        """Return the block output and its gate decisions."""
        decision = self.gate(x)
        h = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        h = self.aa(_scale_channels(h, decision.channel_salience))
        h = self._branch_tail(self.bn2(self.conv2(h)))
        out = _merge(h, self._shortcut(x), decision.block_salience)
        return self.act2(out), decision


class GatedBottleneck(_GatedMixin, Bottleneck):
    """timm ``Bottleneck`` with LC-Net gates; ``S_C`` scales the first 1x1 conv's output.

    Takes ``Bottleneck``'s arguments (``planes``: the bottleneck width; output channels are
    ``planes * 4``) and ``gate_negative_slope``, the gates' leaky ReLU-1 slope in training.
    """

    def forward_gated(self, x: Tensor) -> tuple[Tensor, GateDecision]:
        """Return the block output and its gate decisions."""
        decision = self.gate(x)
        h = self.act1(self.bn1(self.conv1(x)))
        h = _scale_channels(h, decision.channel_salience)
        h = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(h)))))
        h = self._branch_tail(self.bn3(self.conv3(h)))
        out = _merge(h, self._shortcut(x), decision.block_salience)
        return self.act3(out), decision


GATED_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {
    BasicBlock: GatedBasicBlock,
    Bottleneck: GatedBottleneck,
}


def is_gated(block: nn.Module) -> bool:
    """Whether ``block`` carries LC-Net gates."""
    return isinstance(block, _GatedMixin)


def block_output_activation(block: nn.Module) -> nn.Module:
    """The activation applied after the residual sum (``act2`` or ``act3``)."""
    return block.act3 if isinstance(block, Bottleneck) else block.act2
