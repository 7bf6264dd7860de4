"""LC-Net gates: ReLU-1 activations, and the L-Net / C-Net pair that shares one pooling.

LC-Net (sections 3.1 to 3.3) puts two tiny nets beside every residual block. Both read the
globally average-pooled block input: the L-Net (one FC unit) predicts the block salience
``S_L`` that scales the residual branch, the C-Net (one FC unit per channel of the block's
first conv) predicts the channel salience ``S_C`` that scales that conv's output. ReLU-1 maps
both to [0, 1]; an exact zero means "not computed". Training uses a leaky ReLU-1 so that
gradients flow outside [0, 1]; evaluation uses the hard ReLU-1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


def relu1(x: Tensor) -> Tensor:
    """ReLU-1: ``min(max(x, 0), 1)`` (LC-Net eq. 5)."""
    return x.clamp(0.0, 1.0)


def leaky_relu1(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """Leaky ReLU-1: slope 1 on [0, 1] and ``negative_slope`` outside it, continuous at 0 and 1.

    Args:
        x: Input tensor.
        negative_slope: Slope below 0 and above 1.

    Returns:
        ``x`` on [0, 1]; ``slope * x`` below 0; ``1 + slope * (x - 1)`` above 1.
    """
    inside = x.clamp(0.0, 1.0)
    return inside + negative_slope * (x - inside)


class ReLU1(nn.Module):
    """ReLU-1 at inference; in training, ReLU-1 values with leaky ReLU-1 gradients.

    LC-Net (section 3.3.1) trains with a leaky ReLU-1 so that gradients flow outside [0, 1].
    Using the leaky *values* in training lets the network learn to rely on saliences above 1
    or below 0, which inference (hard ReLU-1) then removes: a train/inference mismatch that
    compounds through the blocks. So by default the forward value is the hard ReLU-1 in both
    modes and only the gradient is leaky (a straight-through estimator); set
    ``straight_through=False`` for the paper's literal leaky values in training.

    Args:
        negative_slope: Slope of the leaky variant outside [0, 1] in training mode.
        straight_through: Leaky gradient with hard values (default) or leaky values too.
    """

    def __init__(self, negative_slope: float = 0.01, straight_through: bool = True) -> None:
        super().__init__()
        if negative_slope < 0:
            raise ValueError(f"negative_slope must be >= 0, got {negative_slope}")
        self.negative_slope = negative_slope
        self.straight_through = straight_through

    def forward(self, x: Tensor) -> Tensor:
        """Apply ReLU-1; in training mode with leaky gradients (or leaky values)."""
        if not self.training or self.negative_slope == 0:
            return relu1(x)
        leaky = leaky_relu1(x, self.negative_slope)
        if self.straight_through:
            return leaky + (relu1(x) - leaky).detach()
        return leaky

    def extra_repr(self) -> str:  # noqa: D102
        return f"negative_slope={self.negative_slope}, straight_through={self.straight_through}"


class GateDecision(NamedTuple):
    """The gate outputs of one block for a batch.

    Attributes:
        block_salience: ``S_L``, shape ``(B,)``; zero skips the residual branch.
        channel_salience: ``S_C``, shape ``(B, C_mid)``; zero channels are not computed.
    """

    block_salience: Tensor
    channel_salience: Tensor


class BlockGate(nn.Module):
    """L-Net and C-Net of one block, sharing a single global average pool.

    Both FC layers are stored as one ``nn.Linear`` with ``1 + mid_chs`` outputs (row 0 is the
    L-Net), so the gate costs one matrix product; its FLOPs equal those of the two separate
    FC layers.

    Args:
        in_chs: Channels of the block input.
        mid_chs: Output channels of the block's first conv (C-Net units).
        negative_slope: Leaky ReLU-1 slope used in training.
        init_bias: Initial bias of both FCs; 1.0 starts every gate open (salience 1).
    """

    def __init__(
        self, in_chs: int, mid_chs: int, negative_slope: float = 0.01, init_bias: float = 1.0
    ) -> None:
        super().__init__()
        self.in_chs = in_chs
        self.mid_chs = mid_chs
        self.fc = nn.Linear(in_chs, 1 + mid_chs)
        self.act = ReLU1(negative_slope)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.constant_(self.fc.bias, init_bias)

    def forward(self, x: Tensor) -> GateDecision:
        """Return the block and channel salience of input ``x`` of shape ``(B, C, H, W)``."""
        scores = self.act(self.fc(x.mean(dim=(2, 3))))
        return GateDecision(scores[:, 0], scores[:, 1:])


def open_gates(batch: int, mid_chs: int, like: Tensor) -> GateDecision:
    """Gate decisions with every gate fully open (what an ungated block computes)."""
    ones = torch.ones(batch, 1 + mid_chs, dtype=like.dtype, device=like.device)
    return GateDecision(ones[:, 0], ones[:, 1:])
