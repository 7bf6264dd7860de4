"""``MultiExitNet``: a staged backbone with an exit head after chosen stages.

The network is ``stem -> stages[0] -> ... -> stages[S-1]``; exit ``k`` reads the output of
stage ``exit_stages[k]``. ``model(x)`` returns the logits of every exit (the training and
reference path); ``forward_exits(x, last_exit)`` stops after the exit it is asked for and
also returns what each head read and the gate decisions of every gated block that ran.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from backbones.blocks import is_gated
from backbones.contract import ExitOutputs, forward_exits_lazily
from backbones.cost import GATE_MODES, CostProfile, profile_cost
from backbones.gates import GateDecision, ReLU1
from backbones.heads import create_head


class MultiExitNet(nn.Module):
    """A backbone split into stages, with one exit head after each chosen stage.

    Keeps the ``MultiExitModel`` contract (``backbones.contract``); the dynamic executor also
    reads its ``stem`` and ``stages``.

    Args:
        stem: Module applied to the input before the first stage.
        stages: The stages (``nn.Sequential`` of blocks, gated or not).
        stage_channels: Output channels of each stage.
        num_classes: Number of classes of every head.
        input_size: ``(C, H, W)`` of one input; used to measure FLOPs from shapes.
        exit_stages: Stage index of each exit (sorted, unique); default: every stage.
        head: Head kind (see ``backbones.heads.create_head``).
        head_hidden: Hidden width of ``pool_mlp`` / ``conv_pool_fc`` heads.
        head_pool: Output size of the heads' average pool (1: global).
        gate_mode: ``parallel`` or ``sequential`` LC-Net configuration (cost accounting and
            the executor; the reference forward computes the same values in both).
        stage_reductions: Spatial reduction of each stage output (for ``exit_info``).
        name: Registered name of the architecture.
        build_args: The keyword arguments that rebuild this model with ``create_backbone``.
    """

    preprocessing = None  # trained on the data set's own normalisation

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        stage_channels: Sequence[int],
        *,
        num_classes: int,
        input_size: Sequence[int],
        exit_stages: Sequence[int] | None = None,
        head: str = "pool_fc",
        head_hidden: int = 128,
        head_pool: int = 1,
        gate_mode: str = "parallel",
        stage_reductions: Sequence[int] | None = None,
        name: str = "",
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        exit_stages = list(range(len(stages))) if exit_stages is None else list(exit_stages)
        _check_exit_stages(exit_stages, len(stages))
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        self.name = name
        self.build_args = dict(build_args or {})
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.gate_mode = gate_mode
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.exit_stages = exit_stages
        self.heads = nn.ModuleList(
            create_head(head, stage_channels[s], num_classes, head_hidden, head_pool)
            for s in exit_stages
        )
        self.cost_profile: CostProfile = profile_cost(self, self.input_size)
        reductions = stage_reductions or [None] * len(stages)
        self.exit_info = [
            {"stage": s, "num_chs": stage_channels[s], "reduction": reductions[s], "flops": f}
            for s, f in zip(exit_stages, self.cost_profile.exit_flops())
        ]

    def refresh_cost_profile(self) -> None:
        """Re-measure ``cost_profile`` and ``exit_info`` FLOPs (after heads were replaced)."""
        self.cost_profile = profile_cost(self, self.input_size)
        for info, flops in zip(self.exit_info, self.cost_profile.exit_flops()):
            info["flops"] = flops

    @property
    def num_exits(self) -> int:
        """Number of exits."""
        return len(self.heads)

    @property
    def gating(self) -> bool:
        """Whether any block carries LC-Net gates."""
        return any(is_gated(block) for stage in self.stages for block in stage)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit (the training and reference path)."""
        return self.forward_exits(x).logits

    def forward_exits(self, x: Tensor, last_exit: int | None = None) -> ExitOutputs:
        """Run the network up to ``last_exit`` (default: the final exit).

        Args:
            x: Input batch ``(B, C, H, W)``.
            last_exit: The last exit to evaluate; nothing after its stage runs.

        Returns:
            Logits and head inputs of exits ``0..last_exit`` and the gate decisions.
        """
        return forward_exits_lazily(self, x, last_exit)

    def iter_exits(self, x: Tensor, out: ExitOutputs | None = None) -> Iterator[ExitOutputs]:
        """Lazy forward: yield after each exit; stop consuming to stop computing.

        Args:
            x: Input batch ``(B, C, H, W)``.
            out: Container to fill (a new one by default).

        Yields:
            The same ``ExitOutputs``, one more exit filled in at each step.
        """
        out = ExitOutputs() if out is None else out
        x = self.stem(x)
        next_exit = 0
        for stage_index, stage in enumerate(self.stages[: self.exit_stages[-1] + 1]):
            x = self._run_stage(stage, x, out.gates)
            while next_exit < self.num_exits and self.exit_stages[next_exit] == stage_index:
                out.features.append(x)
                out.logits.append(self.heads[next_exit](x))
                next_exit += 1
                yield out

    @staticmethod
    def _run_stage(stage: nn.Module, x: Tensor, gates: list[GateDecision]) -> Tensor:
        for block in stage:
            if is_gated(block):
                x, decision = block.forward_gated(x)
                gates.append(decision)
            else:
                x = block(x)
        return x

    def gate_parameters(self) -> list[nn.Parameter]:
        """Parameters of the L-Net/C-Net gates (trained with their own learning rate)."""
        return [p for name, p in self.named_parameters() if ".gate." in name]

    def set_gate_negative_slope(self, slope: float) -> None:
        """Set the leaky ReLU-1 slope every gate uses in training."""
        for module in self.modules():
            if isinstance(module, ReLU1):
                module.negative_slope = slope


def _check_exit_stages(exit_stages: list[int], num_stages: int) -> None:
    if not exit_stages:
        raise ValueError("exit_stages is empty; give at least one stage index for an exit")
    if sorted(set(exit_stages)) != exit_stages:
        raise ValueError(f"exit_stages must be sorted and unique, got {exit_stages}")
    if exit_stages[0] < 0 or exit_stages[-1] >= num_stages:
        raise ValueError(f"exit_stages must lie in [0, {num_stages - 1}], got {exit_stages}")
