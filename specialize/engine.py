"""The online engine: runs a multi-exit model over a stream of inputs, one step at a time.

Per step (batch 1 by default) the engine evaluates exits in order, stops at the first exit
whose confidence clears its threshold (``backbones.exit_rule``: the one place the rule
lives), and records each sample's prediction, exit, confidence and FLOPs. Then it calls its
hooks: the head updater learns from the selected exit's prediction, trackers record the
compute per predicted class. The engine never sees labels: streams hand it inputs only.

Bad inputs (checked by ``backbones.inputs.InputChecker`` before anything runs):

==========================================  ===========================  ==============
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

Memory is set by configuration, never by stream length: a step's output (feature maps
included) lives until its hooks have seen it; after that only running aggregates survive,
plus a few numbers per sample when records are asked for (:class:`EngineResult`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from backbones import MultiExitModel
from backbones.cost import flops_per_sample
from backbones.executor.runner import AuditRecorder, AuditTrace
from backbones.exit_rule import accepts, confidence, exit_thresholds
from backbones.inputs import InputChecker
from specialize.policy import ExitPolicy


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
        audit: The audited samples' every exit's answer (``None``: none audited); their
            FLOPs after the answer are ``audit.extra_flops``, not in ``flops``.
    """

    pred: Tensor
    exit_index: Tensor
    confidence: Tensor
    flops: Tensor
    selected_logits: Tensor
    features: list[Tensor]
    valid: Tensor
    audit: AuditTrace | None = None


class StepHook(Protocol):
    """Anything the engine notifies after each step (updaters, trackers)."""

    def on_step(self, output: StepOutput) -> None:
        """Consume one step's output."""


def reference_step(model: MultiExitModel, x: Tensor, policy: ExitPolicy,
                   audit: Tensor | None = None) -> StepOutput:
    """Run exits lazily until every sample in ``x`` has answered (no compaction).

    Args:
        model: A multi-exit model in eval mode.
        x: Valid inputs ``(B, C, H, W)``.
        policy: Confidence measure and thresholds.
        audit: bool ``(B,)``: rows that run on to the final exit after answering.

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
    recorder = None if audit is None else AuditRecorder(audit, model.num_exits)
    every_row = torch.arange(batch)
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
        if recorder is not None:
            recorder.record(every_row, k, logits, conf, 0)
        elif bool((exit_index >= 0).all()):
            break
    flops = flops_per_sample(model, outputs.gates, exit_index)
    trace = None
    if recorder is not None:
        recorder.final_flops = flops_per_sample(
            model, outputs.gates, torch.full_like(exit_index, model.num_exits - 1))[recorder.rows]
        trace = recorder.result(flops)
    return StepOutput(
        pred=selected.argmax(dim=1), exit_index=exit_index, confidence=chosen_conf,
        flops=flops, selected_logits=selected, features=outputs.features,
        valid=torch.ones(batch, dtype=torch.bool), audit=trace,
    )


class ExecutorStep:
    """Engine step routine backed by ``backbones.executor.DynamicExecutor`` (real skipping).

    The executor folds BatchNorm once, at construction, and reads the heads live, so head
    updates are seen at the next step. Batch 1 runs the sliced per-sample path; larger
    batches compact samples that have exited.

    Args:
        model: The multi-exit model: a ``MultiExitNet``, or a ``timm:`` model that runs
            stage by stage (``NotImplementedError`` otherwise; see ``make_step_fn``).
    """

    def __init__(self, model: MultiExitModel) -> None:
        from backbones.executor import DynamicExecutor

        self.model = model
        self.executor = DynamicExecutor(model.eval())

    def __call__(self, model: MultiExitModel, x: Tensor, policy: ExitPolicy,
                 audit: Tensor | None = None) -> StepOutput:
        """Run one batch through the executor (``audit``: rows that run on to the final exit)."""
        if model is not self.model:
            raise ValueError("this ExecutorStep was built for another model")
        result = self.executor.run(x, policy.thresholds, policy.measure,
                                   check_inputs=False, audit=audit)  # Engine.step checked x
        return StepOutput(
            pred=result.pred, exit_index=result.exit_index, confidence=result.confidence,
            flops=result.flops, selected_logits=result.logits,
            features=list(zip(result.features, result.evaluated)),
            valid=torch.ones(x.shape[0], dtype=torch.bool), audit=result.audit,
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


_RECORD_DTYPES = {"pred": torch.long, "exit_index": torch.long, "confidence": torch.float32,
                  "flops": torch.long, "valid": torch.bool}


class _RecordBuffer:
    """Growable per-sample records (29 bytes a sample), doubling capacity as needed."""

    def __init__(self) -> None:
        self.size = 0
        self._data = {name: torch.empty(0, dtype=dtype) for name, dtype in _RECORD_DTYPES.items()}

    def append(self, values: dict[str, Tensor]) -> None:
        count = values["valid"].shape[0]
        capacity = self._data["valid"].shape[0]
        if self.size + count > capacity:
            capacity = max(2 * capacity, self.size + count, 1024)
            for name, old in self._data.items():
                grown = torch.empty(capacity, dtype=old.dtype)
                grown[: self.size] = old[: self.size]
                self._data[name] = grown
        for name, data in self._data.items():
            data[self.size : self.size + count] = values[name]
        self.size += count

    def get(self, name: str) -> Tensor:
        return self._data[name][: self.size]


def _record_property(name: str, doc: str) -> property:
    """A read-only view of one per-sample record (raises when records were not kept)."""
    return property(lambda self: self._record(name),
                    doc=f"{doc} Needs ``keep_records=True``.")


class EngineResult:
    """What the engine produced over a run: running aggregates, and per-sample records.

    The aggregates (samples, skipped samples, FLOPs, exit histogram, seconds) are always kept
    and take constant memory. Per-sample records (``pred``, ``exit_index``, ``confidence``,
    ``flops``, ``valid``: 29 bytes a sample, nothing else of a step is kept) exist only with
    ``keep_records=True``; an unbounded stream runs with ``keep_records=False``.

    Args:
        num_exits: Exits of the model (length of the exit histogram).
        keep_records: Keep the per-sample records.

    Attributes:
        samples: Samples seen, skipped ones included.
        skipped: Samples skipped as invalid.
        flops_sum: FLOPs spent over the valid samples (exact: an int for the engine's int64
            FLOPs; a multiply-add counts 2), audits included.
        audits: Samples audited (run on to the final exit after answering).
        audit_flops_sum: The part of ``flops_sum`` spent after audited samples answered.
        seconds: Wall-clock seconds of the engine steps.
        extra: Free-form values a caller attaches.
    """

    def __init__(self, num_exits: int, *, keep_records: bool = True) -> None:
        self.num_exits = int(num_exits)
        self.samples = 0
        self.skipped = 0
        self.flops_sum = 0
        self.audits = 0
        self.audit_flops_sum = 0
        self.seconds = 0.0
        self.extra: dict[str, Any] = {}
        self._exit_counts = torch.zeros(self.num_exits, dtype=torch.long)
        self._records = _RecordBuffer() if keep_records else None

    @property
    def keeps_records(self) -> bool:
        """Whether per-sample records are kept."""
        return self._records is not None

    def add(self, output: StepOutput) -> None:
        """Fold one step's output into the aggregates (and the records, when kept)."""
        valid = output.valid
        count = int(valid.shape[0])
        answered = int(valid.sum())
        self.samples += count
        self.skipped += count - answered
        exits = output.exit_index[valid] if answered < count else output.exit_index
        flops = output.flops[valid] if answered < count else output.flops
        self.flops_sum += flops.sum().item()
        self._exit_counts += torch.bincount(exits, minlength=self.num_exits)
        if output.audit is not None:
            extra = output.audit.extra_flops.sum().item()
            self.audits += int(output.audit.rows.numel())
            self.audit_flops_sum += extra
            self.flops_sum += extra
        if self._records is not None:
            self._records.append({name: getattr(output, name) for name in _RECORD_DTYPES})

    @property
    def answered(self) -> int:
        """Valid samples (those the model answered)."""
        return self.samples - self.skipped

    @property
    def mean_flops(self) -> float:
        """Mean FLOPs per valid sample, audits included (NaN when none was valid)."""
        return self.flops_sum / self.answered if self.answered else float("nan")

    @property
    def samples_per_second(self) -> float:
        """Throughput over the engine steps (skipped samples included)."""
        return self.samples / max(self.seconds, 1e-9)

    def exit_histogram(self, num_exits: int | None = None) -> list[int]:
        """Count of samples answered at each exit (skipped inputs excluded)."""
        counts = self._exit_counts.tolist()
        width = self.num_exits if num_exits is None else num_exits
        return counts + [0] * (width - len(counts))

    def _record(self, name: str) -> Tensor:
        if self._records is None:
            raise ValueError(f"EngineResult.{name}: per-sample records were not kept; run "
                             "with keep_records=True (the aggregates are always there)")
        return self._records.get(name)

    pred = _record_property("pred", "Predicted class per sample ``(N,)`` (-1: skipped).")
    exit_index = _record_property("exit_index", "Answering exit per sample ``(N,)`` (-1: skipped).")
    confidence = _record_property("confidence", "Confidence of the answering exit ``(N,)``.")
    flops = _record_property("flops", "FLOPs spent per sample ``(N,)``.")
    valid = _record_property("valid", "Whether each sample was processed ``(N,)`` bool.")

    def state_dict(self) -> dict[str, Any]:
        """The aggregates (plain values; the records are not part of the state)."""
        return {"num_exits": self.num_exits, "samples": self.samples, "skipped": self.skipped,
                "flops_sum": self.flops_sum, "seconds": self.seconds,
                "exit_counts": self._exit_counts.tolist(), "audits": self.audits,
                "audit_flops_sum": self.audit_flops_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from saved aggregates (records kept from here on start empty)."""
        if int(state["num_exits"]) != self.num_exits:
            raise ValueError(f"engine aggregates of {state['num_exits']} exits do not fit a "
                             f"model with {self.num_exits}")
        self.samples, self.skipped = int(state["samples"]), int(state["skipped"])
        self.flops_sum, self.seconds = state["flops_sum"], float(state["seconds"])
        self._exit_counts = torch.tensor(state["exit_counts"], dtype=torch.long)
        self.audits = int(state.get("audits", 0))
        self.audit_flops_sum = state.get("audit_flops_sum", 0)


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
        audits: Draws which samples are audited
            (``specialize.operating_point.audits.AuditSampler``; the step routine must then
            take an ``audit`` row mask); ``None``: no audits.

    Attributes:
        policy: The policy of the next step; a budget controller replaces it between steps.
    """

    def __init__(
        self, model: MultiExitModel, policy: ExitPolicy, *, hooks: Iterable[StepHook] = (),
        step_fn: Callable[..., StepOutput] = reference_step,
        on_bad_input: str = "error",
        serving: Callable[[], contextlib.AbstractContextManager] | None = None,
        audits: Any = None,
    ) -> None:
        self.model = model.eval()
        self.policy = policy
        self.hooks = list(hooks)
        self.step_fn = step_fn
        self.check = InputChecker(model.input_size, on_bad_input,
                                  next(model.parameters()).dtype)
        self.serving = serving or contextlib.nullcontext
        self.audits = audits

    @torch.no_grad()
    def _infer(self, x: Tensor, audit: Tensor | None = None) -> StepOutput:
        with self.serving():
            if audit is None or not bool(audit.any()):
                return self.step_fn(self.model, x, self.policy)
            return self.step_fn(self.model, x, self.policy, audit=audit)

    def step(self, x: Tensor) -> StepOutput:
        """Process one batch: infer valid rows, then call every hook.

        An empty batch returns an empty output and calls no hook; skipped rows reach the
        hooks marked invalid (``output.valid``), so nothing learns from them.
        """
        x, valid = self.check(x)
        if x.shape[0] == 0:
            return _blank_output(valid, self.model.num_classes)
        audit = None if self.audits is None else self.audits.draw(valid)
        if bool(valid.all()):
            output = self._infer(x, audit)
        else:
            output = _scatter_valid(
                self._infer(x[valid], None if audit is None else audit[valid])
                if valid.any() else None, valid, self.model.num_classes)
        for hook in self.hooks:
            hook.on_step(output)
        return output

    def run(self, inputs: Iterable[Tensor], *, total: int | None = None,
            progress: bool = True, desc: str = "stream", keep_records: bool = True,
            result: EngineResult | None = None,
            stop_when: Callable[[], bool] | None = None, bar: Any = None) -> EngineResult:
        """Process every batch of ``inputs``; memory stays constant unless records are kept.

        Each step's full output goes to the hooks and is then dropped: only the result's
        aggregates (and, with ``keep_records``, a few numbers per sample) survive.

        Args:
            inputs: Batches ``(B, C, H, W)``.
            total: Samples expected (progress bar).
            progress: Show a progress bar.
            desc: Progress bar label.
            keep_records: Keep per-sample records (ignored when ``result`` is given).
            result: Accumulate into this result (to continue a run) instead of a new one.
            stop_when: Checked after every step; ``True`` stops before the next batch.
            bar: An open tqdm bar to advance instead of a new one (``total``, ``progress``
                and ``desc`` are then not used).

        Returns:
            The result (``result`` itself when given).
        """
        import time

        from tqdm.auto import tqdm

        if result is None:
            result = EngineResult(self.model.num_exits, keep_records=keep_records)
        start = time.perf_counter()
        with contextlib.nullcontext(bar) if bar is not None else tqdm(
                total=total, desc=desc, unit="sample", disable=not progress,
                mininterval=0.5) as bar:
            for x in inputs:
                result.add(self.step(x))
                bar.update(x.shape[0])
                if stop_when is not None and stop_when():
                    break
        result.seconds += time.perf_counter() - start
        return result


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
    if output.audit is not None:
        full.audit = dataclasses.replace(output.audit, rows=valid_rows[output.audit.rows])
    for features in output.features:
        if isinstance(features, tuple):  # (features_k, rows_k) from the executor
            full.features.append((features[0], valid_rows[features[1]]))
            continue
        rows = features.new_zeros((batch, *features.shape[1:]))
        rows[valid] = features
        full.features.append(rows)
    return full
