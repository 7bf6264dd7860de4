"""Folded convolutions: BatchNorm folded into the conv weights once, sliced by channel.

The executor's building blocks: :class:`FoldedConv` (a conv with its BatchNorm folded, able
to compute only some filters or read only some input channels) and
:func:`compile_sequential`, which turns a stem or shortcut into folded functional steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Step = Callable[[Tensor], Tensor]


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv.

    Args:
        conv: The convolution.
        bn: The BatchNorm that follows it (its running statistics are used).

    Returns:
        ``(weight, bias)``, contiguous and detached, such that
        ``conv2d(x, weight, bias) == bn(conv(x))`` up to rounding.
    """
    if bn.running_var is None or bn.running_mean is None:
        raise NotImplementedError("BatchNorm without running statistics cannot be folded")
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return weight.detach().contiguous(), bias.detach().contiguous()


class FoldedConv:
    """A conv with BatchNorm folded in, and its weight sliced by output or input channel.

    A conv that is sliced by input channel (``slice_inputs=True``) also keeps its weight laid
    out ``(in, kh, kw, out)``: selecting input channels from that layout is a gather of
    contiguous rows, which feeds an im2col matrix product. That path serves one sample whose
    conv weight outweighs its activation (deep stages), where gathering and repacking a conv
    weight column-wise costs more than the conv itself.
    """

    __slots__ = ("weight", "bias", "stride", "padding", "dilation", "groups", "by_input")

    def __init__(self, conv: nn.Conv2d, bn: nn.Module | None, slice_inputs: bool = False) -> None:
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={conv.padding_mode!r} is not supported")
        if bn is None:
            self.weight = conv.weight.detach().contiguous()
            self.bias = None if conv.bias is None else conv.bias.detach().contiguous()
        elif isinstance(bn, nn.BatchNorm2d):
            self.weight, self.bias = fold_conv_bn(conv, bn)
        else:
            raise NotImplementedError(
                f"cannot fold {type(bn).__name__} into a conv; only BatchNorm2d is supported"
            )
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        gemm = slice_inputs and not isinstance(conv.padding, str)
        self.by_input = self.weight.permute(1, 2, 3, 0).contiguous() if gemm else None

    def __call__(self, x: Tensor) -> Tensor:
        """The whole conv (every filter, every input channel)."""
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def output_sliced(self, x: Tensor, kept: Tensor) -> Tensor:
        """Only the filters ``kept`` (their weight rows; a contiguous gather)."""
        return F.conv2d(x, self.weight.index_select(0, kept), self.bias.index_select(0, kept),
                        self.stride, self.padding, self.dilation, self.groups)

    def input_sliced(self, h: Tensor, kept: Tensor) -> Tensor:
        """The conv reading only input channels ``kept``; ``h`` holds just those channels."""
        if self.by_input is None or h.shape[0] > 1:
            return self._columns_sliced(h, kept)
        out_channels = self.weight.shape[0]
        height = _conv_size(h.shape[2], self.weight.shape[2], self.stride[0], self.padding[0],
                            self.dilation[0])
        width = _conv_size(h.shape[3], self.weight.shape[3], self.stride[1], self.padding[1],
                           self.dilation[1])
        if out_channels < 2 * height * width:  # the activation dominates: a plain conv
            return self._columns_sliced(h, kept)
        columns = F.unfold(h, self.weight.shape[2:], self.dilation, self.padding, self.stride)
        weight = self.by_input.index_select(0, kept).view(-1, out_channels)
        out = torch.addmm(self.bias, columns[0].t(), weight)
        return out.t().view(1, out_channels, height, width)

    def _columns_sliced(self, h: Tensor, kept: Tensor) -> Tensor:
        return F.conv2d(h, self.weight.index_select(1, kept), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


def select_channels(x: Tensor, kept: Tensor) -> Tensor:
    """``x[:, kept]`` in the memory format of ``x`` (advanced indexing drops channels_last)."""
    if x.is_contiguous():
        return x.index_select(1, kept)
    return x.permute(0, 2, 3, 1).index_select(3, kept).permute(0, 3, 1, 2)


def _conv_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _relu(x: Tensor) -> Tensor:
    return x.relu_()


def compile_sequential(module: nn.Module | None, what: str) -> list[Step]:
    """Turn a stem / shortcut (conv, BN, ReLU, pooling) into folded functional steps."""
    if module is None:
        return []
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    steps: list[Step] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d):
            bn = layers[i + 1] if i + 1 < len(layers) else None
            folds = isinstance(bn, nn.BatchNorm2d)
            steps.append(FoldedConv(layer, bn if folds else None))
            i += 2 if folds else 1
            continue
        if isinstance(layer, nn.ReLU):
            steps.append(_relu)
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            steps.append(layer)
        elif not isinstance(layer, nn.Identity):
            raise NotImplementedError(
                f"DynamicExecutor: unsupported layer {type(layer).__name__} in the {what}; "
                "supported: Conv2d (+BatchNorm2d), ReLU, MaxPool2d, AvgPool2d, Identity"
            )
        i += 1
    return steps


def run_steps(steps: list[Step], x: Tensor) -> Tensor:
    """Apply ``steps`` in order."""
    for step in steps:
        x = step(x)
    return x
