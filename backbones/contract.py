"""The multi-exit model contract: what the engine, updater, curves and executor rely on.

Every model ``create_backbone`` returns keeps it: ``MultiExitNet`` (registered ResNet-family
backbones, LC-Net gated or not) and ``IntermediateExitNet`` (``timm:<model>``, ungated).
:class:`MultiExitModel` declares it as a ``typing.Protocol``; :func:`check_multi_exit_model`
checks a model against it and says what to fix.

Example:
    >>> from backbones import create_backbone
    >>> model = create_backbone("tiny_resnet", input_size=(1, 16, 16)).eval()
    >>> isinstance(model, MultiExitModel)
    True
    >>> check_multi_exit_model(model)
    >>> [info["stage"] for info in model.exit_info]
    [0, 1, 2, 3]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from backbones.cost import GATE_MODES, CostProfile
from backbones.gates import GateDecision

EXIT_INFO_KEYS = ("stage", "num_chs", "flops")


@dataclass
class ExitOutputs:
    """What a (lazy) multi-exit forward produced.

    Attributes:
        logits: One ``(B, num_classes)`` tensor per evaluated exit.
        features: The tensor each evaluated head read (the stage output).
        gates: Decisions of the gated blocks that ran, in execution order.
    """

    logits: list[Tensor] = field(default_factory=list)
    features: list[Tensor] = field(default_factory=list)
    gates: list[GateDecision] = field(default_factory=list)


@runtime_checkable
class MultiExitModel(Protocol):
    """A network with ``num_exits`` classifier heads along its depth.

    Implementations are ``nn.Module`` subclasses: the module API (``eval``, ``train``,
    ``parameters``, ``state_dict`` ...) is used as well and not repeated here. Exits are in
    depth order and the last one reads the deepest feature; only the heads may change after
    construction (the updater trains the early ones, anchoring swaps them), and a model whose
    heads changed re-measures its cost with :meth:`refresh_cost_profile`.
    """

    name: str
    """Registered name (``tiny_resnet``, ``timm:convnext_atto`` ...); checkpoints record it."""

    build_args: dict[str, Any]
    """Keyword arguments with which ``create_backbone(name, **build_args)`` rebuilds it."""

    num_classes: int
    """Classes of every exit head."""

    input_size: tuple[int, ...]
    """``(C, H, W)`` of one input; FLOPs are measured on it."""

    gate_mode: str
    """``parallel`` or ``sequential`` LC-Net cost accounting (``parallel`` when ungated)."""

    preprocessing: dict[str, Any] | None
    """What pretrained weights expect of the input: ``mean`` and ``std`` per channel (pixels
    in [0, 1]) and the resize ``interpolation``; ``None``: the data set's statistics."""

    heads: nn.ModuleList
    """The exit heads, one per exit; head ``k`` maps feature ``k`` to ``(B, num_classes)``."""

    exit_stages: list[int]
    """The stage (or feature index) each exit reads, sorted and unique."""

    exit_info: list[dict[str, Any]]
    """Per exit: ``stage``, ``num_chs`` (channels its head reads), ``flops`` (one sample
    answering there with every gate open, heads on the way included) and ``reduction``."""

    cost_profile: CostProfile
    """FLOPs of each part for one sample (``backbones.cost``); per-sample FLOPs read it."""

    @property
    def num_exits(self) -> int:
        """Number of exits (``len(heads)``)."""

    @property
    def gating(self) -> bool:
        """Whether any block carries LC-Net gates (gate decisions change the FLOPs)."""

    def __call__(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit for a batch ``(B, C, H, W)`` (the training path)."""

    def forward_exits(self, x: Tensor, last_exit: int | None = None) -> ExitOutputs:
        """Run up to exit ``last_exit`` (default: the last) and nothing beyond it.

        Returns:
            Logits and head inputs of exits ``0..last_exit`` and the gate decisions.
        """

    def iter_exits(self, x: Tensor, out: ExitOutputs | None = None) -> Iterator[ExitOutputs]:
        """Lazy forward: yield after each exit, one more exit filled in ``out`` each time."""

    def refresh_cost_profile(self) -> None:
        """Re-measure ``cost_profile`` and the ``exit_info`` FLOPs (after heads changed)."""

    def gate_parameters(self) -> list[nn.Parameter]:
        """Parameters of the LC-Net gates (empty when ungated; trained at their own rate)."""


def forward_exits_lazily(model: MultiExitModel, x: Tensor,
                         last_exit: int | None = None) -> ExitOutputs:
    """``forward_exits`` built on ``iter_exits``: consume exits ``0..last_exit``, then stop.

    Args:
        model: The model (its ``iter_exits`` computes each exit on demand).
        x: Input batch ``(B, C, H, W)``.
        last_exit: The last exit to evaluate (default: the last one).

    Returns:
        Logits and head inputs of exits ``0..last_exit`` and the gate decisions.

    Raises:
        ValueError: ``last_exit`` is not an exit index.
    """
    last_exit = model.num_exits - 1 if last_exit is None else last_exit
    if not 0 <= last_exit < model.num_exits:
        raise ValueError(f"last_exit must be in [0, {model.num_exits - 1}], got {last_exit}")
    out = ExitOutputs()
    for _ in zip(range(last_exit + 1), model.iter_exits(x, out)):
        pass
    return out


def check_multi_exit_model(model: object) -> None:
    """Check that ``model`` keeps the multi-exit contract; raise saying what to fix.

    Checks the declared members and their consistency (one head and one ``exit_info`` entry
    per exit, the keys of ``exit_info``, the gate mode); it runs nothing.

    Args:
        model: The model to check.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or lacks members of :class:`MultiExitModel`.
        ValueError: The members disagree with each other.
    """
    _require(isinstance(model, nn.Module), TypeError,
             f"a multi-exit model is an nn.Module, got {type(model).__name__}; build one with "
             "backbones.create_backbone(...)")
    missing = [name for name in _members() if not hasattr(model, name)]
    _require(not missing, TypeError,
             f"{type(model).__name__} lacks {', '.join(missing)} of the MultiExitModel contract "
             "(backbones.contract); build the model with backbones.create_backbone(...) or add "
             "them")
    _require(isinstance(model.heads, nn.ModuleList), TypeError,
             f"model.heads must be an nn.ModuleList, got {type(model.heads).__name__}; assign "
             "heads by index (model.heads[k] = head) instead of replacing the list")
    _require(model.num_exits == len(model.heads) == len(model.exit_info)
             == len(model.exit_stages) > 0, ValueError,
             f"num_exits ({model.num_exits}), heads ({len(model.heads)}), exit_info "
             f"({len(model.exit_info)}) and exit_stages ({len(model.exit_stages)}) must agree "
             "and be at least one; rebuild the model instead of editing them")
    for k, info in enumerate(model.exit_info):
        lacking = [key for key in EXIT_INFO_KEYS if key not in info]
        _require(not lacking, ValueError,
                 f"exit_info[{k}] lacks {', '.join(lacking)}; every exit needs "
                 f"{', '.join(EXIT_INFO_KEYS)}")
    _require(len(model.cost_profile.heads) == model.num_exits, ValueError,
             f"cost_profile covers {len(model.cost_profile.heads)} heads for {model.num_exits} "
             "exits; call model.refresh_cost_profile() after changing heads")
    _require(model.gate_mode in GATE_MODES, ValueError,
             f"gate_mode must be one of {GATE_MODES}, got {model.gate_mode!r}")


def _members() -> list[str]:
    """The names :class:`MultiExitModel` declares (attributes, properties and methods)."""
    declared = set(MultiExitModel.__annotations__)
    declared |= {name for name, value in vars(MultiExitModel).items()
                 if callable(value) or isinstance(value, property)}
    return sorted(name for name in declared if not name.startswith("_"))


def _require(condition: bool, error: type[Exception], message: str) -> None:
    if not condition:
        raise error(message)
