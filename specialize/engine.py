"""The online engine: runs a multi-exit model over a stream of inputs, one step at a time.

Per step (batch 1 by default) the engine evaluates exits in order, stops at the first exit
whose confidence clears its threshold (``backbones.exit_rule``: the one place the rule
lives), and records each sample's prediction, exit, confidence and FLOPs. Then it calls its
hooks: the head updater learns from the selected exit's prediction, trackers record the
compute per predicted class. The engine never sees labels: streams hand it inputs only.

Bad inputs (checked by :class:`InputChecker` before anything runs; ``backbones.inputs``):

==========================================  ===========================  =====================
input                                       ``on_bad_input=error``       ``on_bad_input=skip``
==========================================  ===========================  =====================
rows with NaN or inf values                 ``ValueError`` naming the    those rows skipped:
                                            row                          ``valid`` false,
                                                                         counted, not learned
float64, float16, bfloat16                  cast to the model's float32  the same
integer or bool dtype (raw uint8 images)    ``ValueError``               ``ValueError``
wrong type, dimensions, channels or size    ``ValueError``               ``ValueError``
empty batch (0 rows)                        empty output, no hook runs   the same
==========================================  ===========================  =====================

Why: ``skip`` is for sporadic corrupt samples (a sensor glitch) in a stream that is otherwise
fine. A wrong shape or an integer dtype means the whole stream is prepared wrongly, so every
batch would be skipped: that is an error either way, whose message says how to fix it.
Another floating dtype is cast rather than refused, since float32 is the precision the model
computes in anyway (float16 converts exactly; float64 values beyond float32's range become
inf, so their rows count as non-finite). An empty batch has nothing to run, skip or learn.
Skipped rows reach the hooks marked invalid, and the updater never observes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from backbones import MultiExitModel
from backbones.cost import flops_per_sample
from backbones.exit_rule import accepts, confidence, exit_thresholds
from backbones.inputs import check_finite, finite_rows, prepare_inputs
from specialize.policy import ExitPolicy

BAD_INPUT_ACTIONS = ("error", "skip")


@dataclass
class StepOutput:
    """What one engine step produced for a batch of ``B`` samples.

    Attributes:
        pred: Predicted class ``(B,)``; -1 for skipped (bad) inputs.
        exit_index: Exit that answered ``(B,)``; -1 for skipped inputs.
        confidence: Confidence of the answering exit ``(B,)``.
        flops: FLOPs spent on each sample ``(B,)`` (a multiply-add counts 2).
        selected_logits: Logits of the answering exit ``(B, C)``.
        features: Per evaluated exit, the head inputs: rows aligned with the batch, or a
            ``(features_k, rows_k)`` pair naming the batch rows it holds.
        valid: Which samples were processed ``(B,)`` bool.
    """

    pred: Tensor
    exit_index: Tensor
    confidence: Tensor
    flops: Tensor
    selected_logits: Tensor
    features: list[Tensor]
    valid: Tensor


class StepHook(Protocol):
    """Anything the engine notifies after each step (updaters, trackers)."""

    def on_step(self, output: StepOutput) -> None:
        """Consume one step's output."""


def reference_step(model: MultiExitModel, x: Tensor, policy: ExitPolicy) -> StepOutput:
    """Run exits lazily until every sample in ``x`` has answered (no compaction).

    Args:
        model: A multi-exit model in eval mode.
        x: Valid inputs ``(B, C, H, W)``.
        policy: Confidence measure and thresholds.

    Returns:
        The step output (``valid`` all true).
    """
    batch = x.shape[0]
    if batch == 0:  # nothing to run (the lazy forward cannot reduce over no rows)
        return _blank_output(torch.ones(0, dtype=torch.bool), model.num_classes)
    thresholds = exit_thresholds(policy.thresholds, model.num_exits)
    exit_index = torch.full((batch,), -1, dtype=torch.long)
    chosen_conf = torch.zeros(batch)
    selected = None
    outputs = None
    for k, outputs in enumerate(model.iter_exits(x)):
        logits = outputs.logits[k]
        conf = confidence(logits, policy.measure)
        newly = (exit_index < 0) & accepts(conf, thresholds[k])
        if k == model.num_exits - 1:
            newly = exit_index < 0
        exit_index[newly] = k
        chosen_conf[newly] = conf[newly].float()
        selected = logits.clone() if selected is None else torch.where(newly[:, None], logits,
                                                                       selected)
        if bool((exit_index >= 0).all()):
            break
    flops = flops_per_sample(model, outputs.gates, exit_index)
    return StepOutput(
        pred=selected.argmax(dim=1), exit_index=exit_index, confidence=chosen_conf,
        flops=flops, selected_logits=selected, features=outputs.features,
        valid=torch.ones(batch, dtype=torch.bool),
    )


class ExecutorStep:
    """Engine step routine backed by ``backbones.executor.DynamicExecutor`` (real skipping).

    The executor folds BatchNorm once, at construction, and reads the heads live, so head
    updates are seen at the next step. Batch 1 runs the sliced per-sample path; larger
    batches compact samples that have exited.

    Args:
        model: The multi-exit model (a ``MultiExitNet`` built from timm ResNet blocks).
    """

    def __init__(self, model: MultiExitModel) -> None:
        from backbones.executor import DynamicExecutor

        self.model = model
        self.executor = DynamicExecutor(model.eval())

    def __call__(self, model: MultiExitModel, x: Tensor, policy: ExitPolicy) -> StepOutput:
        """Run one batch through the executor and convert its result."""
        if model is not self.model:
            raise ValueError("this ExecutorStep was built for another model")
        result = self.executor.run(x, policy.thresholds, policy.measure,
                                   check_inputs=False)  # Engine.step checked x
        return StepOutput(
            pred=result.pred, exit_index=result.exit_index, confidence=result.confidence,
            flops=result.flops, selected_logits=result.logits,
            features=list(zip(result.features, result.evaluated)),
            valid=torch.ones(x.shape[0], dtype=torch.bool),
        )


def make_step_fn(model: MultiExitModel, executor: bool):
    """The executor step when asked for and supported, else the reference lazy forward."""
    if not executor:
        return reference_step
    try:
        return ExecutorStep(model)
    except NotImplementedError as err:
        import warnings

        warnings.warn(f"dynamic executor unavailable ({err}); using the reference forward",
                      stacklevel=2)
        return reference_step


@dataclass
class EngineResult:
    """Per-sample records of a run, concatenated over steps (tensors of length N)."""

    pred: Tensor
    exit_index: Tensor
    confidence: Tensor
    flops: Tensor
    valid: Tensor
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        """Number of inputs skipped as invalid."""
        return int((~self.valid).sum())

    def exit_histogram(self, num_exits: int) -> list[int]:
        """Count of samples answered at each exit (skipped inputs excluded)."""
        return torch.bincount(self.exit_index[self.valid], minlength=num_exits).tolist()


class InputChecker:
    """Validates engine inputs, per case (the module docstring lists them).

    Args:
        input_size: ``(C, H, W)`` the model expects.
        on_bad_input: What rows with NaN or inf values do: ``error`` raises; ``skip`` marks
            them invalid (counted, never learned from). Inputs of the wrong type, shape or an
            integer dtype raise either way.
        dtype: The model's floating dtype; other floating inputs are cast to it.
    """

    def __init__(self, input_size: tuple[int, ...], on_bad_input: str = "error",
                 dtype: torch.dtype = torch.float32) -> None:
        if on_bad_input not in BAD_INPUT_ACTIONS:
            raise ValueError(f"on_bad_input must be one of {BAD_INPUT_ACTIONS}, "
                             f"got {on_bad_input!r}")
        self.input_size = tuple(input_size)
        self.on_bad_input = on_bad_input
        self.dtype = dtype

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x in the model's dtype, valid rows (B,) bool)``, or raise.

        Raises:
            ValueError: Wrong type, shape or integer dtype; or NaN/inf values with
                ``on_bad_input="error"``. The message names the problem and the fix.
        """
        x = prepare_inputs(x, self.input_size, self.dtype)
        if self.on_bad_input == "skip":
            return x, finite_rows(x)
        check_finite(x, "fix the data or set engine.on_bad_input=skip to count and skip "
                        "such samples")
        return x, torch.ones(x.shape[0], dtype=torch.bool)


class Engine:
    """Runs a multi-exit model over inputs and notifies hooks after every step.

    Args:
        model: A multi-exit model (switched to eval mode; the engine never trains it).
        policy: Confidence measure and thresholds.
        hooks: Objects with ``on_step(StepOutput)`` (updater, trackers), called in order.
        step_fn: The inference routine (default: the reference lazy forward; the dynamic
            executor plugs in here).
        on_bad_input: ``error`` or ``skip`` (see :class:`InputChecker`).
        serving: Context-manager factory held around each inference step (the async updater
            provides one so that a step never sees half-published heads).
    """

    def __init__(
        self, model: MultiExitModel, policy: ExitPolicy, *, hooks: Iterable[StepHook] = (),
        step_fn: Callable[[MultiExitModel, Tensor, ExitPolicy], StepOutput] = reference_step,
        on_bad_input: str = "error",
        serving: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.model = model.eval()
        self.policy = policy
        self.hooks = list(hooks)
        self.step_fn = step_fn
        self.check = InputChecker(model.input_size, on_bad_input,
                                  next(model.parameters()).dtype)
        self.serving = serving or contextlib.nullcontext

    @torch.no_grad()
    def _infer(self, x: Tensor) -> StepOutput:
        with self.serving():
            return self.step_fn(self.model, x, self.policy)

    def step(self, x: Tensor) -> StepOutput:
        """Process one batch: infer valid rows, then call every hook.

        An empty batch returns an empty output and calls no hook; skipped rows reach the
        hooks marked invalid (``output.valid``), so nothing learns from them.
        """
        x, valid = self.check(x)
        if x.shape[0] == 0:
            return _blank_output(valid, self.model.num_classes)
        if bool(valid.all()):
            output = self._infer(x)
        else:
            output = _scatter_valid(self._infer(x[valid]) if valid.any() else None, valid,
                                    self.model.num_classes)
        for hook in self.hooks:
            hook.on_step(output)
        return output

    def run(self, inputs: Iterable[Tensor], *, total: int | None = None,
            progress: bool = True, desc: str = "stream") -> EngineResult:
        """Process every batch of ``inputs`` and return the concatenated records."""
        import time

        from tqdm.auto import tqdm

        records: list[StepOutput] = []
        start = time.perf_counter()
        with tqdm(total=total, desc=desc, unit="sample", disable=not progress,
                  mininterval=0.5) as bar:
            for x in inputs:
                records.append(self.step(x))
                bar.update(x.shape[0])
        return _concat(records, time.perf_counter() - start)


def _blank_output(valid: Tensor, num_classes: int) -> StepOutput:
    """The output of a batch where no row ran (``pred`` and ``exit_index`` -1)."""
    batch = valid.shape[0]
    return StepOutput(
        pred=torch.full((batch,), -1, dtype=torch.long),
        exit_index=torch.full((batch,), -1, dtype=torch.long),
        confidence=torch.zeros(batch), flops=torch.zeros(batch, dtype=torch.long),
        selected_logits=torch.zeros(batch, num_classes), features=[], valid=valid,
    )


def _scatter_valid(output: StepOutput | None, valid: Tensor, num_classes: int) -> StepOutput:
    full = _blank_output(valid, num_classes)
    if output is None:
        return full
    batch = valid.shape[0]
    for name in ("pred", "exit_index", "confidence", "flops", "selected_logits"):
        getattr(full, name)[valid] = getattr(output, name).to(getattr(full, name).dtype)
    valid_rows = valid.nonzero().squeeze(1)
    for features in output.features:
        if isinstance(features, tuple):  # (features_k, rows_k) from the executor
            full.features.append((features[0], valid_rows[features[1]]))
            continue
        rows = features.new_zeros((batch, *features.shape[1:]))
        rows[valid] = features
        full.features.append(rows)
    return full


def _concat(records: list[StepOutput], seconds: float) -> EngineResult:
    if not records:
        empty = torch.zeros(0, dtype=torch.long)
        return EngineResult(empty, empty, torch.zeros(0), empty,
                            torch.zeros(0, dtype=torch.bool), seconds)
    return EngineResult(
        pred=torch.cat([r.pred for r in records]),
        exit_index=torch.cat([r.exit_index for r in records]),
        confidence=torch.cat([r.confidence for r in records]),
        flops=torch.cat([r.flops for r in records]),
        valid=torch.cat([r.valid for r in records]),
        seconds=seconds,
    )
