"""Registered ResNet-family multi-exit backbones, gated with LC-Net (timm blocks underneath)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from timm.models.resnet import BasicBlock, Bottleneck, ResNet, make_blocks
from torch import nn

from backbones.blocks import GATED_BLOCKS
from backbones.multi_exit import MultiExitNet
from backbones.registry import register_backbone


@dataclass(frozen=True)
class ExitOptions:
    """How a ResNet-family backbone is gated and where its exits sit (every builder's options).

    Attributes:
        gating: Build LC-Net gated blocks (``False``: plain timm blocks, the baseline).
        gate_mode: ``parallel`` or ``sequential``.
        gate_negative_slope: Leaky ReLU-1 slope of the gates in training.
        exit_stages: Stages followed by an exit (default: all).
        head: Exit head kind.
        head_hidden: Hidden width of MLP / conv heads.
        head_pool: Output size of the heads' average pool (1: global).
    """

    gating: bool = True
    gate_mode: str = "parallel"
    gate_negative_slope: float = 0.01
    exit_stages: Sequence[int] | None = None
    head: str = "pool_fc"
    head_hidden: int = 128
    head_pool: int = 1

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[ExitOptions, dict[str, Any]]:
        """The options named in ``kwargs``, and the other keyword arguments."""
        names = {f.name for f in fields(cls)}
        options = cls(**{k: v for k, v in kwargs.items() if k in names})
        return options, {k: v for k, v in kwargs.items() if k not in names}

    def build_args(self) -> dict[str, Any]:
        """Every option by name, as ``create_backbone`` takes them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def block(self, block: type[nn.Module]) -> tuple[type[nn.Module], dict[str, Any]]:
        """The block class to build (gated or not) and its extra keyword arguments."""
        if self.gating:
            return GATED_BLOCKS[block], {"gate_negative_slope": self.gate_negative_slope}
        return block, {}

    def network(
        self, name: str, stem: nn.Module, stages: Sequence[nn.Module],
        infos: Sequence[dict[str, Any]], reduction_scale: int, *, num_classes: int,
        input_size: Sequence[int], build_args: dict[str, Any],
    ) -> MultiExitNet:
        """The ``MultiExitNet`` of ``stem`` and ``stages`` with these exits and gate mode.

        ``infos`` is timm's ``feature_info`` of each stage (``num_chs``, ``reduction``); the
        reductions are divided by ``reduction_scale``, the factor by which the stem reduces
        less than timm's. The other arguments are ``MultiExitNet``'s.
        """
        return MultiExitNet(
            stem, stages, [info["num_chs"] for info in infos], num_classes=num_classes,
            input_size=input_size, exit_stages=self.exit_stages, head=self.head,
            head_hidden=self.head_hidden, head_pool=self.head_pool, gate_mode=self.gate_mode,
            stage_reductions=[info["reduction"] // reduction_scale for info in infos],
            name=name, build_args=build_args,
        )


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if hasattr(module, "zero_init_last"):
            module.zero_init_last()


def small_resnet(
    name: str,
    block: type[nn.Module],
    channels: Sequence[int],
    layers: Sequence[int],
    *,
    num_classes: int = 10,
    in_chans: int = 1,
    input_size: Sequence[int] | None = None,
    stem_width: int | None = None,
    **options: Any,
) -> MultiExitNet:
    """A ResNet for 28x28 / 32x32 inputs: 3x3 stride-1 stem, stages built by timm.

    Args:
        name: Registered name (recorded in the model).
        block: timm ``BasicBlock`` or ``Bottleneck``.
        channels: Width of each stage (``planes``; Bottleneck outputs 4x that).
        layers: Blocks per stage.
        num_classes: Classes of every exit.
        in_chans: Input channels.
        input_size: ``(C, H, W)``; default ``(in_chans, 28, 28)``.
        stem_width: Stem output channels (default ``channels[0]``).
        **options: Gating and exits: the fields of :class:`ExitOptions` (``gating``,
            ``gate_mode``, ``gate_negative_slope``, ``exit_stages``, ``head``,
            ``head_hidden``, ``head_pool``).

    Returns:
        The multi-exit network.
    """
    exits = ExitOptions(**options)
    build_args = {"num_classes": num_classes, "in_chans": in_chans, "input_size": input_size,
                  "stem_width": stem_width, **exits.build_args()}
    input_size = tuple(input_size or (in_chans, 28, 28))
    _check_in_chans(in_chans, input_size)
    stem_width = stem_width or channels[0]
    stem = nn.Sequential(
        nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(stem_width),
        nn.ReLU(inplace=True),
    )
    block_fn, block_kwargs = exits.block(block)
    stage_modules, feature_info = make_blocks(
        (block_fn,) * len(channels), tuple(channels), tuple(layers), stem_width, **block_kwargs,
    )
    # make_blocks counts reductions from timm's stride-4 stem; this stem has stride 1
    model = exits.network(
        name, stem, [module for _, module in stage_modules], feature_info, 4,
        num_classes=num_classes, input_size=input_size, build_args=build_args,
    )
    _init_weights(model)
    return model


def timm_resnet(
    name: str,
    block: type[nn.Module],
    layers: Sequence[int],
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    input_size: Sequence[int] | None = None,
    small_input: bool = False,
    **kwargs: Any,
) -> MultiExitNet:
    """A timm ResNet-family model (resnet18/34/50, wide, ResNeXt) with gates and exits.

    Args:
        name: Registered name.
        block: timm ``BasicBlock`` or ``Bottleneck``.
        layers: Blocks per stage.
        num_classes: Classes of every exit.
        in_chans: Input channels.
        input_size: ``(C, H, W)``; default ``(in_chans, 224, 224)`` (32 with small_input).
        small_input: Replace the 7x7/2 stem and max-pool with a 3x3/1 stem (CIFAR style).
        **kwargs: Gating and exits: the fields of :class:`ExitOptions` (``gating``,
            ``gate_mode``, ``gate_negative_slope``, ``exit_stages``, ``head``,
            ``head_hidden``, ``head_pool``); the rest is passed to
            ``timm.models.resnet.ResNet`` (``base_width``, ``cardinality``, ``channels`` ...).

    Returns:
        The multi-exit network.
    """
    exits, resnet_kwargs = ExitOptions.split(kwargs)
    build_args = {"num_classes": num_classes, "in_chans": in_chans, "input_size": input_size,
                  "small_input": small_input, **exits.build_args(), **resnet_kwargs}
    input_size = tuple(input_size or (in_chans, 32, 32) if small_input else
                       input_size or (in_chans, 224, 224))
    _check_in_chans(in_chans, input_size)
    block_fn, block_kwargs = exits.block(block)
    net = ResNet(block=block_fn, layers=tuple(layers), num_classes=0, in_chans=in_chans,
                 block_args=block_kwargs, **resnet_kwargs)
    if small_input:
        net.conv1 = nn.Conv2d(in_chans, net.bn1.num_features, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)  # small_input: stride 1
    model = exits.network(
        name, stem, [net.layer1, net.layer2, net.layer3, net.layer4], net.feature_info[1:],
        4 if small_input else 1, num_classes=num_classes, input_size=input_size,
        build_args=build_args,
    )
    if small_input:
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _check_in_chans(in_chans: int, input_size: Sequence[int]) -> None:
    if len(input_size) != 3 or input_size[0] != in_chans:
        raise ValueError(
            f"input_size must be (in_chans, H, W) with in_chans={in_chans}, got {input_size}"
        )


@register_backbone
def tiny_resnet(**kwargs: Any) -> MultiExitNet:
    """Default for 28/32 px: BasicBlock, widths 16-32-64-128, 2 blocks per stage, 4 exits."""
    return small_resnet("tiny_resnet", BasicBlock, (16, 32, 64, 128), (2, 2, 2, 2), **kwargs)


@register_backbone
def tiny_resnet_bottleneck(**kwargs: Any) -> MultiExitNet:
    """Bottleneck variant for 28/32 px: planes 8-16-32-64 (outputs 32-64-128-256)."""
    return small_resnet(
        "tiny_resnet_bottleneck", Bottleneck, (8, 16, 32, 64), (1, 1, 1, 1), **kwargs
    )


@register_backbone
def resnet18(**kwargs: Any) -> MultiExitNet:
    """Timm ResNet-18 with LC-Net gates and 4 exits."""
    return timm_resnet("resnet18", BasicBlock, (2, 2, 2, 2), **kwargs)


@register_backbone
def resnet34(**kwargs: Any) -> MultiExitNet:
    """Timm ResNet-34 with LC-Net gates and 4 exits."""
    return timm_resnet("resnet34", BasicBlock, (3, 4, 6, 3), **kwargs)


@register_backbone
def resnet50(**kwargs: Any) -> MultiExitNet:
    """Timm ResNet-50 with LC-Net gates and 4 exits."""
    return timm_resnet("resnet50", Bottleneck, (3, 4, 6, 3), **kwargs)


@register_backbone
def wide_resnet50_2(**kwargs: Any) -> MultiExitNet:
    """Timm Wide-ResNet-50-2 with LC-Net gates and 4 exits."""
    return timm_resnet("wide_resnet50_2", Bottleneck, (3, 4, 6, 3), base_width=128, **kwargs)


@register_backbone
def resnext50_32x4d(**kwargs: Any) -> MultiExitNet:
    """Timm ResNeXt-50 32x4d with LC-Net gates and 4 exits."""
    return timm_resnet(
        "resnext50_32x4d", Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4, **kwargs
    )
