"""Registry of multi-exit backbones: ``@register_backbone`` entry points, timm style."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from backbones.contract import MultiExitModel

_ENTRYPOINTS: dict[str, Callable[..., MultiExitModel]] = {}


def register_backbone(fn: Callable[..., MultiExitModel]) -> Callable[..., MultiExitModel]:
    """Register ``fn`` under its function name as a backbone entry point."""
    if fn.__name__ in _ENTRYPOINTS:
        raise ValueError(f"backbone {fn.__name__!r} is registered twice")
    _ENTRYPOINTS[fn.__name__] = fn
    return fn


def list_backbones(pattern: str = "*") -> list[str]:
    """Names of the registered backbones matching a shell-style ``pattern``."""
    return sorted(name for name in _ENTRYPOINTS if fnmatch.fnmatch(name, pattern))


def create_backbone(name: str, **kwargs: object) -> MultiExitModel:
    """Build a registered multi-exit backbone.

    Args:
        name: A name from ``list_backbones()``, or ``timm:<model>`` for exits on any timm
            model that supports ``forward_intermediates`` (no gating).
        **kwargs: Arguments of the entry point (``num_classes``, ``in_chans``,
            ``input_size``, ``gating``, ``gate_mode``, ``exit_stages``, ``head`` ...).

    Returns:
        The model: a ``MultiExitNet`` for registered names, an ``IntermediateExitNet`` for
        ``timm:`` names; both keep the ``MultiExitModel`` contract. Its ``build_args`` are
        set so that checkpoints can rebuild it.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    if name.startswith("timm:"):
        from backbones.timm_exits import timm_exits

        return timm_exits(name.removeprefix("timm:"), **kwargs)
    if name not in _ENTRYPOINTS:
        known = ", ".join(list_backbones())
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {known} (or timm:<model_name>)"
        )
    return _ENTRYPOINTS[name](**kwargs)
