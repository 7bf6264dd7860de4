"""Exits on timm models (no gating): staged where the family is known, else intermediates.

Users bring their own backbone: ``create_backbone("timm:convnext_atto", num_classes=10,
in_chans=3, input_size=(3, 64, 64))``. Exits are placed either by index into the model's
``feature_info`` (``exit_stages``) or by the name of a stage module (``exit_modules``, e.g.
``["blocks.2", "blocks.4", "blocks.5", "conv_head"]`` on EfficientNet).

For the families timm builds from a stem and a sequence of stages (EfficientNet / MobileNet
style ``blocks``, ResNet ``layer1..4``, ConvNeXt-style ``stem`` + ``stages``) the model runs
**stage by stage**: ``iter_exits`` computes nothing beyond the exit its caller stops at, and
``backbones.executor.DynamicExecutor`` serves it (batch 1 stops at the answering exit, batches
compact). EfficientNet's head convolution (``conv_head`` + ``bn2``, the 1280-d features its
ImageNet classifier reads) is one more stage, so an exit there reproduces the pretrained
classifier's input. Other models (ViT ...) fall back to ``forward_intermediates``: the
backbone runs once up to the last exit asked for, and the engine uses the reference path.

Pretrained models expect their own input normalisation: ``input_mean``, ``input_std`` and
``interpolation`` are recorded in ``preprocessing`` for the stream's transform.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from backbones.contract import ExitOutputs, forward_exits_lazily
from backbones.cost import BlockCost, CostProfile
from backbones.heads import create_head

Unit = tuple[str, nn.Module]


class _Chain(nn.Module):
    """Modules applied in order, held without registering them twice (no state of its own)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "chain", list(modules))

    def forward(self, x: Tensor) -> Tensor:
        for module in self.chain:
            x = module(x)
        return x


def timm_stages(backbone: nn.Module) -> tuple[nn.Module, list[Unit]] | None:
    """A timm model as ``stem`` and named stages, or ``None`` for families not known here.

    Every feature ``forward_intermediates`` returns is the output of one stage, named as the
    ``module`` of its ``feature_info`` entry.
    """
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    if isinstance(backbone, EfficientNet):
        units = [(f"blocks.{i}", block) for i, block in enumerate(backbone.blocks)]
        units.append(("conv_head", _Chain(backbone.conv_head, backbone.bn2)))
        return _Chain(backbone.conv_stem, backbone.bn1), units
    if isinstance(backbone, ResNet):
        units = [("act1", _Chain(backbone.conv1, backbone.bn1, backbone.act1)),
                 ("layer1", _Chain(backbone.maxpool, backbone.layer1))]
        units += [(f"layer{i}", getattr(backbone, f"layer{i}")) for i in (2, 3, 4)]
        return _Chain(), units
    stages = getattr(backbone, "stages", None)
    if isinstance(getattr(backbone, "stem", None), nn.Module) and isinstance(stages, nn.Sequential):
        return backbone.stem, [(f"stages.{i}", stage) for i, stage in enumerate(stages)]
    return None


class IntermediateExitNet(nn.Module):
    """A timm model with exit heads on its stages (keeps the ``MultiExitModel`` contract).

    Args:
        backbone: A timm model with ``forward_intermediates`` and ``feature_info``.
        num_classes: Classes of every exit.
        input_size: ``(C, H, W)`` of one input.
        exit_stages: Indices into ``feature_info`` that get an exit (default: all).
        exit_modules: Instead of ``exit_stages``: names of the stages that get an exit
            (staged families only; see :func:`timm_stages`).
        head: Exit head kind.
        head_hidden: Hidden width of MLP / conv heads.
        head_pool: Output size of the heads' average pool (1: global), one for all exits or
            one per exit.
        preprocessing: ``mean``, ``std`` (per channel) and ``interpolation`` the backbone's
            pretrained weights expect; ``None``: the data set's statistics.
        name: Name used to rebuild the model (``timm:<model>``).
        build_args: Keyword arguments that rebuild it.
    """

    gate_mode = "parallel"
    gating = False

    def __init__(
        self, backbone: nn.Module, *, num_classes: int, input_size: Sequence[int],
        exit_stages: Sequence[int] | None = None, exit_modules: Sequence[str] | None = None,
        head: str = "pool_fc", head_hidden: int = 128, head_pool: int | Sequence[int] = 1,
        preprocessing: dict[str, Any] | None = None, name: str = "",
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.build_args = dict(build_args or {})
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.preprocessing = preprocessing
        staged = timm_stages(backbone)
        object.__setattr__(self, "_staged", staged)  # views of backbone modules, not owned
        self.exit_modules = _exit_modules(backbone, staged, exit_stages, exit_modules)
        self.exit_stages = self._exit_indices(exit_stages)
        channels = self._exit_channels()
        pools = _per_exit(head_pool, len(channels), "head_pool")
        self.heads = nn.ModuleList(
            create_head(head, chs, num_classes, head_hidden, pool)
            for chs, pool in zip(channels, pools)
        )
        self.cost_profile = self._profile()
        reductions = self._exit_reductions()
        self.exit_info = [
            {"stage": s, "module": m, "num_chs": c, "reduction": r, "flops": f}
            for s, m, c, r, f in zip(self.exit_stages, self.exit_modules, channels, reductions,
                                     self.cost_profile.exit_flops())
        ]

    # ---- structure

    @property
    def staged(self) -> bool:
        """Whether the model runs stage by stage (lazy exits, the dynamic executor)."""
        return self._staged is not None

    @property
    def stem(self) -> nn.Module:
        """The modules before the first stage (staged models only)."""
        self._require_staged()
        return self._staged[0]

    @property
    def stages(self) -> list[list[nn.Module]]:
        """Each stage as a one-block list, up to the last exit (staged models only)."""
        self._require_staged()
        return [[unit] for _, unit in self._staged[1][: self.exit_stages[-1] + 1]]

    def _require_staged(self) -> None:
        if self._staged is None:
            raise NotImplementedError(
                f"{self.name} is not a staged timm family (EfficientNet, ResNet, stem+stages); "
                "it runs through forward_intermediates and the reference path")

    def _exit_indices(self, exit_stages: Sequence[int] | None) -> list[int]:
        if self._staged is None:
            infos = _feature_infos(self.backbone)
            return list(range(len(infos))) if exit_stages is None else list(exit_stages)
        names = [name for name, _ in self._staged[1]]
        return [names.index(module) for module in self.exit_modules]

    def _exit_channels(self) -> list[int]:
        with torch.no_grad():
            features = self._probe().features
        return [int(f.shape[1]) for f in features]

    def _exit_reductions(self) -> list[int | None]:
        by_module = {info["module"]: info.get("reduction") for info in
                     _feature_infos(self.backbone)}
        return [by_module.get(module) for module in self.exit_modules]

    @property
    def num_exits(self) -> int:
        """Number of exits."""
        return len(self.heads)

    def gate_parameters(self) -> list[nn.Parameter]:
        """No gates on timm backbones."""
        return []

    # ---- forward

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit."""
        return self.forward_exits(x).logits

    def forward_exits(self, x: Tensor, last_exit: int | None = None) -> ExitOutputs:
        """Run the backbone up to the stage of ``last_exit`` and evaluate the heads on the way."""
        return forward_exits_lazily(self, x, last_exit)

    def iter_exits(self, x: Tensor, out: ExitOutputs | None = None) -> Iterator[ExitOutputs]:
        """Lazy forward: yield after each exit; stop consuming to stop computing.

        Staged models compute each stage when the caller asks for the next exit; others run
        ``forward_intermediates`` once, up to the last exit.
        """
        out = ExitOutputs() if out is None else out
        for k, feature in enumerate(self._features(x)):
            out.features.append(feature)
            out.logits.append(self.heads[k](feature))
            yield out

    def _features(self, x: Tensor) -> Iterator[Tensor]:
        """The input of every exit head in order, computed lazily where staged."""
        if self._staged is None:
            yield from self.backbone.forward_intermediates(
                x, indices=self.exit_stages, stop_early=True, intermediates_only=True)
            return
        stem, units = self._staged
        x = stem(x)
        wanted = set(self.exit_stages)
        for index, (_, unit) in enumerate(units[: self.exit_stages[-1] + 1]):
            x = unit(x)
            if index in wanted:
                yield x

    def _probe(self) -> ExitOutputs:
        """Features of one zero input, with throwaway identity heads (for shapes)."""
        param = next(self.backbone.parameters())
        x = torch.zeros(1, *self.input_size, dtype=param.dtype, device=param.device)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return ExitOutputs(features=list(self._features(x)))
        finally:
            self.backbone.train(was_training)

    # ---- cost

    def refresh_cost_profile(self) -> None:
        """Re-measure ``cost_profile`` and ``exit_info`` FLOPs (after heads were replaced)."""
        self.cost_profile = self._profile()
        for info, flops in zip(self.exit_info, self.cost_profile.exit_flops()):
            info["flops"] = flops

    def _profile(self) -> CostProfile:
        """FLOPs of the stem, every stage and every head, counted by FlopCounterMode."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                stem, segments, features = self._segment_flops()
                heads = tuple(_counted(head, f) for head, f in zip(self.heads, features))
        finally:
            self.train(was_training)
        blocks = tuple((BlockCost(s, 0, 0, 0, 0, gated=False),) for s in segments)
        exit_stages = self.exit_stages if self._staged is not None else range(len(segments))
        return CostProfile(stem=stem, blocks=blocks, heads=heads, exit_stages=tuple(exit_stages))

    def _segment_flops(self) -> tuple[int, list[int], list[Tensor]]:
        param = next(self.backbone.parameters())
        x = torch.zeros(1, *self.input_size, dtype=param.dtype, device=param.device)
        if self._staged is None:  # one segment per exit, each up to its intermediate
            totals, features = [], []
            for stage in self.exit_stages:
                with FlopCounterMode(display=False) as counter:
                    features.append(self.backbone.forward_intermediates(
                        x, indices=[stage], stop_early=True, intermediates_only=True)[0])
                totals.append(counter.get_total_flops())
            return 0, [b - a for a, b in zip([0, *totals[:-1]], totals)], features
        stem, units = self._staged
        with FlopCounterMode(display=False) as counter:
            x = stem(x)
        stem_flops, segments, features = counter.get_total_flops(), [], []
        for index, (_, unit) in enumerate(units[: self.exit_stages[-1] + 1]):
            with FlopCounterMode(display=False) as counter:
                x = unit(x)
            segments.append(counter.get_total_flops())
            if index in self.exit_stages:
                features.append(x)
        return stem_flops, segments, features


def _counted(module: nn.Module, x: Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def _feature_infos(backbone: nn.Module) -> list[dict[str, Any]]:
    infos = backbone.feature_info
    return infos.get_dicts() if hasattr(infos, "get_dicts") else list(infos)


def _per_exit(value: int | Sequence[int], count: int, what: str) -> list[int]:
    values = [value] * count if isinstance(value, int) else list(value)
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} entries for {count} exits; give one "
                         "value or one per exit")
    return values


def _exit_modules(backbone: nn.Module, staged: tuple[nn.Module, list[Unit]] | None,
                  exit_stages: Sequence[int] | None,
                  exit_modules: Sequence[str] | None) -> list[str]:
    """The stage module name of every exit, checked against the model."""
    infos = _feature_infos(backbone)
    if exit_stages is not None and exit_modules is not None:
        raise ValueError("give exit_stages (feature_info indices) or exit_modules (stage "
                         "names), not both")
    if exit_modules is None:
        stages = list(range(len(infos))) if exit_stages is None else list(exit_stages)
        if not stages or sorted(set(stages)) != stages:
            raise ValueError(f"exit_stages must be sorted, unique, non-empty: {exit_stages}")
        if stages[0] < 0 or stages[-1] >= len(infos):
            raise ValueError(f"exit_stages must lie in [0, {len(infos) - 1}]: {exit_stages}")
        return [infos[s]["module"] for s in stages]
    if staged is None:
        raise ValueError("exit_modules needs a staged timm family (EfficientNet, ResNet, "
                         "stem+stages); use exit_stages (feature_info indices) for this model")
    names = [name for name, _ in staged[1]]
    unknown = [m for m in exit_modules if m not in names]
    order = [names.index(m) for m in exit_modules if m in names]
    if unknown or not order or order != sorted(set(order)):
        raise ValueError(f"exit_modules must be distinct stage names in depth order, from "
                         f"{', '.join(names)}; got {list(exit_modules)}")
    return list(exit_modules)


def timm_exits(
    model_name: str, *, num_classes: int = 10, in_chans: int = 3,
    input_size: Sequence[int] | None = None, exit_stages: Sequence[int] | None = None,
    exit_modules: Sequence[str] | None = None, head: str = "pool_fc", head_hidden: int = 128,
    head_pool: int | Sequence[int] = 1, gating: bool = False,
    input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None,
    interpolation: str = "bilinear", **timm_kwargs: Any,
) -> IntermediateExitNet:
    """Build exits on ``timm.create_model(model_name)`` (never downloads weights).

    Args:
        model_name: Any timm model name whose class implements ``forward_intermediates``.
        num_classes: Classes of every exit.
        in_chans: Input channels.
        input_size: ``(C, H, W)``; default ``(in_chans, 224, 224)``.
        exit_stages: Indices into the model's ``feature_info`` (default: all).
        exit_modules: Instead: stage names (``blocks.2``, ``conv_head`` ...; staged families).
        head: Exit head kind.
        head_hidden: Hidden width of MLP / conv heads.
        head_pool: Output size of the heads' average pool (1: global), or one per exit.
        gating: Must be False: LC-Net gating exists for ResNet-family blocks only.
        input_mean: Per-channel mean the weights expect (pixels in [0, 1]); with
            ``input_std``; ``None``: the data set's.
        input_std: Per-channel standard deviation the weights expect.
        interpolation: How inputs are resized to ``input_size`` (``bilinear``, ``bicubic``).
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``img_size`` for ViTs).

    Returns:
        The multi-exit model.
    """
    if gating:
        raise ValueError(
            f"timm:{model_name} has no LC-Net gates; pass gating=False, or use a registered "
            "ResNet-family backbone (see list_backbones()) for gated models"
        )
    if (input_mean is None) != (input_std is None):
        raise ValueError("give input_mean and input_std together (or neither)")
    build_args = {k: v for k, v in locals().items() if k not in ("model_name", "timm_kwargs")}
    build_args.update(timm_kwargs)
    input_size = tuple(input_size or (in_chans, 224, 224))
    backbone = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans,
                                 **timm_kwargs)
    if not hasattr(backbone, "forward_intermediates"):
        raise ValueError(f"timm model {model_name!r} does not support forward_intermediates")
    preprocessing = None
    if input_mean is not None or interpolation != "bilinear":
        preprocessing = {"mean": None if input_mean is None else tuple(input_mean),
                         "std": None if input_std is None else tuple(input_std),
                         "interpolation": interpolation}
    return IntermediateExitNet(
        backbone, num_classes=num_classes, input_size=input_size, exit_stages=exit_stages,
        exit_modules=exit_modules, head=head, head_hidden=head_hidden, head_pool=head_pool,
        preprocessing=preprocessing, name=f"timm:{model_name}", build_args=build_args,
    )
