"""Exits on any timm model that supports ``forward_intermediates`` (no gating).

Users bring their own backbone (ConvNeXt, EfficientNet, ViT, ...): ``create_backbone(
"timm:convnext_atto", num_classes=10, in_chans=3, input_size=(3, 64, 64))``. Each exit reads
one of the model's intermediate feature maps (indices into its ``feature_info``); the lazy
forward asks timm to stop early after the last requested intermediate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from backbones.contract import ExitOutputs
from backbones.cost import BlockCost, CostProfile
from backbones.heads import create_head


class IntermediateExitNet(nn.Module):
    """A timm model with exit heads on its intermediates (keeps the ``MultiExitModel`` contract).

    Args:
        backbone: A timm model with ``forward_intermediates`` and ``feature_info``.
        num_classes: Classes of every exit.
        input_size: ``(C, H, W)`` of one input.
        exit_stages: Indices into ``feature_info`` that get an exit (default: all).
        head: Exit head kind.
        head_hidden: Hidden width of MLP / conv heads.
        head_pool: Output size of the heads' average pool (1: global).
        name: Name used to rebuild the model (``timm:<model>``).
        build_args: Keyword arguments that rebuild it.
    """

    gate_mode = "parallel"
    gating = False

    def __init__(
        self, backbone: nn.Module, *, num_classes: int, input_size: Sequence[int],
        exit_stages: Sequence[int] | None = None, head: str = "pool_fc", head_hidden: int = 128,
        head_pool: int = 1, name: str = "", build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        infos = backbone.feature_info
        infos = infos.get_dicts() if hasattr(infos, "get_dicts") else list(infos)
        self.exit_stages = list(range(len(infos))) if exit_stages is None else list(exit_stages)
        if not self.exit_stages or sorted(set(self.exit_stages)) != self.exit_stages:
            raise ValueError(f"exit_stages must be sorted, unique, non-empty: {exit_stages}")
        if self.exit_stages[-1] >= len(infos) or self.exit_stages[0] < 0:
            raise ValueError(f"exit_stages must lie in [0, {len(infos) - 1}]: {exit_stages}")
        self.backbone = backbone
        self.name = name
        self.build_args = dict(build_args or {})
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.heads = nn.ModuleList(
            create_head(head, infos[s]["num_chs"], num_classes, head_hidden, head_pool)
            for s in self.exit_stages
        )
        self.cost_profile = self._profile()
        self.exit_info = [
            {"stage": s, "num_chs": infos[s]["num_chs"], "reduction": infos[s].get("reduction"),
             "flops": f}
            for s, f in zip(self.exit_stages, self.cost_profile.exit_flops())
        ]

    def refresh_cost_profile(self) -> None:
        """Re-measure ``cost_profile`` and ``exit_info`` FLOPs (after heads were replaced)."""
        self.cost_profile = self._profile()
        for info, flops in zip(self.exit_info, self.cost_profile.exit_flops()):
            info["flops"] = flops

    @property
    def num_exits(self) -> int:
        """Number of exits."""
        return len(self.heads)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit."""
        return self.forward_exits(x).logits

    def forward_exits(self, x: Tensor, last_exit: int | None = None) -> ExitOutputs:
        """Run the backbone until the intermediate of ``last_exit`` and evaluate the heads."""
        last_exit = self.num_exits - 1 if last_exit is None else last_exit
        if not 0 <= last_exit < self.num_exits:
            raise ValueError(f"last_exit must be in [0, {self.num_exits - 1}], got {last_exit}")
        features = self._intermediates(x, self.exit_stages[: last_exit + 1])
        logits = [head(f) for head, f in zip(self.heads, features)]
        return ExitOutputs(logits=logits, features=list(features))

    def iter_exits(self, x: Tensor, out: ExitOutputs | None = None) -> Iterator[ExitOutputs]:
        """Yield after each exit (the backbone runs once, to the last exit)."""
        full = self.forward_exits(x)
        out = ExitOutputs() if out is None else out
        for logits, features in zip(full.logits, full.features):
            out.logits.append(logits)
            out.features.append(features)
            yield out

    def _intermediates(self, x: Tensor, indices: list[int]) -> list[Tensor]:
        return self.backbone.forward_intermediates(
            x, indices=indices, stop_early=True, intermediates_only=True
        )

    def gate_parameters(self) -> list[nn.Parameter]:
        """No gates on generic timm backbones."""
        return []

    def _profile(self) -> CostProfile:
        param = next(self.parameters())
        x = torch.zeros(1, *self.input_size, dtype=param.dtype, device=param.device)
        bodies = []
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for stage in self.exit_stages:
                with FlopCounterMode(display=False) as counter:
                    feature = self._intermediates(x, [stage])[0]
                bodies.append(counter.get_total_flops())
            heads = []
            for head, stage in zip(self.heads, self.exit_stages):
                feature = self._intermediates(x, [stage])[0]
                with FlopCounterMode(display=False) as counter:
                    head(feature)
                heads.append(counter.get_total_flops())
        self.train(was_training)
        segments = [b - a for a, b in zip([0, *bodies[:-1]], bodies)]
        blocks = tuple((BlockCost(s, 0, 0, 0, 0, gated=False),) for s in segments)
        return CostProfile(stem=0, blocks=blocks, heads=tuple(heads),
                           exit_stages=tuple(range(len(segments))))


def timm_exits(
    model_name: str, *, num_classes: int = 10, in_chans: int = 3,
    input_size: Sequence[int] | None = None, exit_stages: Sequence[int] | None = None,
    head: str = "pool_fc", head_hidden: int = 128, head_pool: int = 1, gating: bool = False,
    **timm_kwargs: Any,
) -> IntermediateExitNet:
    """Build exits on ``timm.create_model(model_name)`` (never downloads weights).

    Args:
        model_name: Any timm model name whose class implements ``forward_intermediates``.
        num_classes: Classes of every exit.
        in_chans: Input channels.
        input_size: ``(C, H, W)``; default ``(in_chans, 224, 224)``.
        exit_stages: Indices into the model's ``feature_info`` (default: all).
        head: Exit head kind.
        head_hidden: Hidden width of MLP / conv heads.
        head_pool: Output size of the heads' average pool (1: global).
        gating: Must be False: LC-Net gating exists for ResNet-family blocks only.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``img_size`` for ViTs).

    Returns:
        The multi-exit model.
    """
    if gating:
        raise ValueError(
            f"timm:{model_name} has no LC-Net gates; pass gating=False, or use a registered "
            "ResNet-family backbone (see list_backbones()) for gated models"
        )
    build_args = {k: v for k, v in locals().items() if k not in ("model_name", "timm_kwargs")}
    build_args.update(timm_kwargs)
    input_size = tuple(input_size or (in_chans, 224, 224))
    backbone = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans,
                                 **timm_kwargs)
    if not hasattr(backbone, "forward_intermediates"):
        raise ValueError(f"timm model {model_name!r} does not support forward_intermediates")
    return IntermediateExitNet(
        backbone, num_classes=num_classes, input_size=input_size, exit_stages=exit_stages,
        head=head, head_hidden=head_hidden, head_pool=head_pool, name=f"timm:{model_name}",
        build_args=build_args,
    )
