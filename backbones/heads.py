"""Exit heads: the small classifiers placed after backbone stages."""

from __future__ import annotations

from torch import nn

HEAD_KINDS = ("pool_fc", "pool_mlp", "conv_pool_fc")


def create_head(kind: str, in_chs: int, num_classes: int, hidden: int = 128) -> nn.Sequential:
    """Build an exit head.

    Args:
        kind: ``pool_fc`` (global average pool -> FC), ``pool_mlp`` (pool -> FC -> ReLU -> FC)
            or ``conv_pool_fc`` (3x3 conv -> BN -> ReLU -> pool -> FC).
        in_chs: Channels of the feature map the head reads.
        num_classes: Number of classes.
        hidden: Width of the hidden layer (``pool_mlp``, ``conv_pool_fc``).

    Returns:
        The head, mapping ``(B, in_chs, H, W)`` to logits ``(B, num_classes)``.
    """
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if kind == "pool_fc":
        layers = [*pool, nn.Linear(in_chs, num_classes)]
    elif kind == "pool_mlp":
        layers = [*pool, nn.Linear(in_chs, hidden), nn.ReLU(inplace=True),
                  nn.Linear(hidden, num_classes)]
    elif kind == "conv_pool_fc":
        layers = [nn.Conv2d(in_chs, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                  nn.ReLU(inplace=True), *pool, nn.Linear(hidden, num_classes)]
    else:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    return nn.Sequential(*layers)
