"""FLOPs of every conv and linear from shapes, per exit and per sample from gate decisions.

FLOPs are counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them: a
multiply-add is 2 FLOPs; convolutions and linear layers count, biases, normalisation,
activations, pooling and element-wise products do not. (Papers in this field mostly print
MACs = FLOPs / 2; everything this project prints is FLOPs.)

Gated blocks follow LC-Net's two configurations:

* ``parallel``: the first conv runs beside the gates, so it always computes all its filters;
  the rest of the residual branch runs only when ``S_L > 0``, and the second conv reads only
  the channels with ``S_C > 0``.
* ``sequential``: the gates run first; when ``S_L > 0`` the first conv computes only the kept
  filters and the second conv reads only those channels; ``S_L = 0`` skips the whole branch.

In both, the gate FCs and the shortcut (downsample) always run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from backbones.gates import GateDecision

GATE_MODES = ("parallel", "sequential")


def conv_flops(conv: nn.Conv2d, out_hw: tuple[int, int], in_channels: int | None = None) -> int:
    """FLOPs of one sample through ``conv`` (2 per multiply-add, bias not counted).

    Args:
        conv: The convolution.
        out_hw: Spatial size of its output.
        in_channels: Input channels actually read (default: all); for grouped convs each
            kept input channel feeds ``out_channels / groups`` filters.

    Returns:
        The FLOPs as an integer.
    """
    kh, kw = conv.kernel_size
    reads = conv.in_channels if in_channels is None else in_channels
    per_output = kh * kw * (conv.out_channels // conv.groups)
    return 2 * out_hw[0] * out_hw[1] * per_output * reads


def linear_flops(linear: nn.Linear) -> int:
    """FLOPs of one sample through ``linear`` (2 per multiply-add, bias not counted)."""
    return 2 * linear.in_features * linear.out_features


@dataclass(frozen=True)
class BlockCost:
    """FLOPs of one block, split the way gating changes them (one sample).

    Attributes:
        always: FLOPs that run whatever the gates say (gate FCs, downsample shortcut).
        first_conv: The first conv with all filters.
        second_conv: The conv that reads the first conv's channels, with all of them.
        rest: Everything else in the residual branch (e.g. the Bottleneck's last 1x1).
        mid_chs: Channels of the first conv's output (the C-Net width); 0 if ungated.
        gated: Whether the block has gates.
    """

    always: int
    first_conv: int
    second_conv: int
    rest: int
    mid_chs: int
    gated: bool

    @property
    def open(self) -> int:
        """FLOPs with every gate open."""
        return self.always + self.first_conv + self.second_conv + self.rest


@dataclass(frozen=True)
class CostProfile:
    """FLOPs of a multi-exit network for one sample, from shapes.

    Attributes:
        stem: FLOPs of the stem.
        blocks: Per stage, the cost of each block.
        heads: FLOPs of each exit head.
        exit_stages: The stage after which each exit sits.
    """

    stem: int
    blocks: tuple[tuple[BlockCost, ...], ...]
    heads: tuple[int, ...]
    exit_stages: tuple[int, ...]

    def exit_flops(self) -> list[int]:
        """Cost of answering at each exit with every gate open (heads on the way included)."""
        stage_totals = [sum(block.open for block in stage) for stage in self.blocks]
        flops = []
        for exit_index, stage in enumerate(self.exit_stages):
            body = self.stem + sum(stage_totals[: stage + 1])
            flops.append(body + sum(self.heads[: exit_index + 1]))
        return flops

    def flat_blocks(self) -> list[BlockCost]:
        """All blocks in execution order."""
        return [block for stage in self.blocks for block in stage]


def _module_flops(module: nn.Module, output: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        return conv_flops(module, tuple(output.shape[-2:]))
    if isinstance(module, nn.Linear):
        return linear_flops(module)
    return 0


def measure_module_flops(run: callable, modules: Sequence[nn.Module]) -> dict[nn.Module, int]:
    """Run ``run()`` once (batch of one) and return the FLOPs of each conv/linear it used."""
    flops: dict[nn.Module, int] = {}
    handles = []
    for module in modules:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod: nn.Module, _inp: tuple, out: Tensor) -> None:
                flops[mod] = flops.get(mod, 0) + _module_flops(mod, out)
            handles.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return flops


def _subtree_flops(module: nn.Module | None, flops: dict[nn.Module, int]) -> int:
    if module is None:
        return 0
    return sum(flops.get(sub, 0) for sub in module.modules())


def block_cost(block: nn.Module, flops: dict[nn.Module, int]) -> BlockCost:
    """Split a block's measured FLOPs into the parts gating acts on."""
    total = _subtree_flops(block, flops)
    gate = getattr(block, "gate", None)
    if gate is None:
        return BlockCost(total, 0, 0, 0, 0, gated=False)
    always = _subtree_flops(gate, flops) + _subtree_flops(block.downsample, flops)
    first, second = flops[block.conv1], flops[block.conv2]
    return BlockCost(
        always=always,
        first_conv=first,
        second_conv=second,
        rest=total - always - first - second,
        mid_chs=block.conv1.out_channels,
        gated=True,
    )


def profile_cost(model: nn.Module, input_size: Sequence[int]) -> CostProfile:
    """Measure the FLOPs of every part of a ``MultiExitNet`` with one dummy sample.

    Args:
        model: A ``MultiExitNet`` (needs ``stem``, ``stages``, ``heads``, ``exit_stages``).
        input_size: ``(C, H, W)`` of one input.

    Returns:
        The model's cost profile.
    """
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops = measure_module_flops(lambda: model(x), list(model.modules()))
    finally:
        model.train(was_training)
    return CostProfile(
        stem=_subtree_flops(model.stem, flops),
        blocks=tuple(tuple(block_cost(b, flops) for b in stage) for stage in model.stages),
        heads=tuple(_subtree_flops(head, flops) for head in model.heads),
        exit_stages=tuple(model.exit_stages),
    )


def gated_block_flops(cost: BlockCost, decision: GateDecision, gate_mode: str) -> Tensor:
    """Per-sample FLOPs of one gated block given its gate decisions.

    Args:
        cost: The block's cost split.
        decision: Its gate outputs for the batch.
        gate_mode: ``parallel`` or ``sequential`` (see the module docstring).

    Returns:
        int64 tensor ``(B,)``.
    """
    alive = (decision.block_salience > 0).long()
    kept = (decision.channel_salience > 0).sum(dim=1)
    per_channel_second = cost.second_conv // cost.mid_chs
    per_channel_first = cost.first_conv // cost.mid_chs
    branch = alive * (per_channel_second * kept + cost.rest)
    if gate_mode == "parallel":
        first = torch.full_like(branch, cost.first_conv)
    elif gate_mode == "sequential":
        first = alive * per_channel_first * kept
    else:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    return cost.always + first + branch


def flops_at_exits(
    profile: CostProfile, gates: Sequence[GateDecision], gate_mode: str, batch: int,
    num_exits: int | None = None,
) -> Tensor:
    """Per-sample cumulative FLOPs of answering at each exit, from the gate decisions.

    Args:
        profile: The model's cost profile.
        gates: Decisions of the gated blocks that ran, in execution order.
        gate_mode: ``parallel`` or ``sequential``.
        batch: Batch size (needed when no block is gated).
        num_exits: How many exits to cover (default: all exits whose blocks ran).

    Returns:
        int64 tensor ``(B, num_exits)``; column k is the cost of answering at exit k.
    """
    num_exits = len(profile.exit_stages) if num_exits is None else num_exits
    gate_iter = iter(gates)
    stage_flops = []
    for stage in profile.blocks[: profile.exit_stages[num_exits - 1] + 1]:
        total = torch.zeros(batch, dtype=torch.long)
        for block in stage:
            if block.gated:
                total = total + gated_block_flops(block, next(gate_iter), gate_mode)
            else:
                total = total + block.open
        stage_flops.append(total)
    stage_cumulative = torch.stack(stage_flops, dim=1).cumsum(dim=1) + profile.stem
    exit_body = stage_cumulative[:, list(profile.exit_stages[:num_exits])]
    heads = torch.tensor(profile.heads[:num_exits], dtype=torch.long).cumsum(0)
    return exit_body + heads


def flops_per_sample(model: nn.Module, gates: Sequence[GateDecision], exit_index: Tensor) -> Tensor:
    """FLOPs of each sample answering at its exit, given its forward pass's gate decisions.

    Args:
        model: The ``MultiExitNet`` that ran.
        gates: The gate decisions of that forward pass (``ExitOutputs.gates``).
        exit_index: int tensor ``(B,)`` of the exit each sample answered at.

    Returns:
        int64 tensor ``(B,)``.
    """
    needed = int(exit_index.max()) + 1
    table = flops_at_exits(model.cost_profile, gates, model.gate_mode, len(exit_index), needed)
    return table.gather(1, exit_index.long().view(-1, 1)).squeeze(1)


# ------------------------------------------------------------------------- printing FLOPs
FLOPS_CONVENTION = "FLOPs (a multiply-add counts 2)"


@dataclass(frozen=True)
class FlopsUnit:
    """A unit to print FLOPs in: ``name`` is ``scale`` FLOPs (``MFLOPs`` is ``1e6``)."""

    name: str
    scale: float

    def convert(self, values: Any) -> np.ndarray:
        """``values`` (a number or an array of numbers) in this unit, as float64."""
        return np.asarray(values, dtype=np.float64) / self.scale

    def format(self, value: Any, digits: int = 2) -> str:
        """The number alone in this unit (``12.30``), or ``n/a`` if not a finite number."""
        return f"{value / self.scale:.{digits}f}" if _finite_number(value) else "n/a"


FLOPS_UNITS = (FlopsUnit("GFLOPs", 1e9), FlopsUnit("MFLOPs", 1e6), FlopsUnit("kFLOPs", 1e3),
               FlopsUnit("FLOPs", 1.0))


def flops_unit(values: Iterable[Any]) -> FlopsUnit:
    """One unit for a set of FLOPs figures, so a table or plot prints them all alike.

    Args:
        values: FLOPs figures; ``None`` and non-finite ones are ignored.

    Returns:
        The largest unit of :data:`FLOPS_UNITS` in which the largest magnitude is at least 1
        (plain ``FLOPs`` when there is no finite figure).

    Example:
        >>> flops_unit([2.4e6, 37.2e6]).name
        'MFLOPs'
    """
    largest = max((abs(v) for v in values if _finite_number(v)), default=0.0)
    return next(unit for unit in FLOPS_UNITS if largest >= unit.scale or unit.scale == 1.0)


def format_flops(flops: Any, unit: FlopsUnit | None = None) -> str:
    """Human-readable FLOPs with the unit's name, e.g. ``12.30 MFLOPs``.

    Args:
        flops: A FLOPs figure (``None`` or non-finite prints ``n/a``).
        unit: The unit to print in; default :func:`flops_unit` of this one figure.

    Returns:
        ``"<number> <unit>"`` with two decimals, or ``"n/a"``.
    """
    if not _finite_number(flops):
        return "n/a"
    unit = unit or flops_unit([flops])
    return f"{unit.format(flops)} {unit.name}"


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
