"""Exit heads: the small classifiers placed after backbone stages."""

from __future__ import annotations

from torch import nn

HEAD_KINDS = ("pool_fc", "pool_mlp", "conv_pool_fc")


def create_head(
    kind: str, in_chs: int, num_classes: int, hidden: int = 128, pool_size: int = 1
) -> nn.Sequential:
    """Build an exit head.

    Args:
        kind: ``pool_fc`` (average pool -> FC), ``pool_mlp`` (pool -> FC -> ReLU -> FC)
            or ``conv_pool_fc`` (3x3 conv -> BN -> ReLU -> pool -> FC).
        in_chs: Channels of the feature map the head reads.
        num_classes: Number of classes.
        hidden: Width of the hidden layer (``pool_mlp``, ``conv_pool_fc``).
        pool_size: The pool's output is ``pool_size x pool_size`` (1: global average pool).
            Early exits of small-input models gain much from keeping some spatial layout
            (4 on Fashion-MNIST: exit 0 of the tiny ResNet 81 -> 89 % on frozen features) for
            a few thousand FLOPs.

    Returns:
        The head, mapping ``(B, in_chs, H, W)`` to logits ``(B, num_classes)``.
    """
    if not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(f"head pool_size must be an integer >= 1, got {pool_size!r}")
    pool = [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(1)]
    pooled = in_chs * pool_size**2
    if kind == "pool_fc":
        layers = [*pool, nn.Linear(pooled, num_classes)]
    elif kind == "pool_mlp":
        layers = [*pool, nn.Linear(pooled, hidden), nn.ReLU(inplace=True),
                  nn.Linear(hidden, num_classes)]
    elif kind == "conv_pool_fc":
        layers = [nn.Conv2d(in_chs, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                  nn.ReLU(inplace=True), *pool, nn.Linear(hidden * pool_size**2, num_classes)]
    else:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    return nn.Sequential(*layers)


# Parameter-free, deterministic layers that may be applied once, before the head trains.
_PRECOMPUTABLE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d,
                  nn.Flatten, nn.Identity)


def precomputed_prefix(head: nn.Module) -> int:
    """How many leading layers of ``head`` are parameter-free and may run ahead of training.

    Training (the updater, head fitting on a frozen backbone) applies them once per sample
    and keeps the small result (e.g. a pooled vector instead of a feature map); the layers
    after them see exactly what they would have seen. ``0`` when nothing can be split off or
    the whole head is parameter-free.
    """
    if not isinstance(head, nn.Sequential):
        return 0
    count = 0
    for layer in head:
        if not isinstance(layer, _PRECOMPUTABLE) or any(True for _ in layer.parameters()):
            break
        count += 1
    return count if count < len(head) else 0


def split_head(head: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(prefix, body)`` with ``body(prefix(x)) == head(x)``: the prefix is parameter-free.

    A head class that holds other heads (``specialize.updater.anchoring.AnchoredHead``) splits
    itself through a ``split_prefix()`` method. The prefix is ``nn.Identity()`` when nothing
    can be split off.
    """
    if hasattr(head, "split_prefix"):
        return head.split_prefix()
    count = precomputed_prefix(head)
    return (head[:count], head[count:]) if count else (nn.Identity(), head)
