"""``DynamicExecutor``: walks the compiled plans stage by stage and applies the exit rule.

See the package docstring (``backbones.executor``) for what is skipped and how FLOPs count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from backbones.contract import MultiExitModel
from backbones.cost import flops_per_sample
from backbones.executor.convs import run_steps
from backbones.executor.plans import BlockPlan, GatedBlockPlan, HeadPlan, plan_stages
from backbones.exit_rule import (
    accepts,
    confidence,
    exit_thresholds,
    normalize_thresholds,
    select_exits,
)
from backbones.inputs import check_finite, prepare_inputs

Thresholds = float | Sequence[float] | Tensor


@dataclass
class ExecutorResult:
    """What :meth:`DynamicExecutor.run` returns for a batch of ``B`` samples.

    Attributes:
        pred: int64 ``(B,)``: argmax of the answering exit's logits.
        exit_index: int64 ``(B,)``: the exit that answered.
        confidence: ``(B,)``: that exit's confidence.
        flops: int64 ``(B,)``: FLOPs LC-Net accounts for the sample (``backbones.cost``).
        flops_executed: int64 ``(B,)``: conv/linear FLOPs that actually ran for the sample.
        logits: ``(B, num_classes)``: logits of the answering exit.
        features: Entry ``k`` is the tensor head ``k`` read, one row per sample that
            evaluated exit ``k`` (the stage output itself, not a copy).
        evaluated: Entry ``k`` is int64 ``(n_k,)``: the batch indices of the rows of
            ``features[k]``.
    """

    pred: Tensor
    exit_index: Tensor
    confidence: Tensor
    flops: Tensor
    flops_executed: Tensor
    logits: Tensor
    features: list[Tensor] = field(default_factory=list)
    evaluated: list[Tensor] = field(default_factory=list)
    audit: AuditTrace | None = None


@dataclass
class AuditTrace:
    """Every exit's answer for the audited samples of a batch (run on after they answered).

    An audited sample is answered as usual at its first confident exit; then the network keeps
    computing up to the final exit, so each of its exits' confidence and prediction is known.
    The final exit's answer is the reference a label-free audit compares the answer with.

    Attributes:
        rows: int64 ``(n,)``: the batch rows audited.
        confidence: ``(n, K)``: every exit's confidence.
        pred: int64 ``(n, K)``: every exit's prediction.
        final_logits: ``(n, num_classes)``: the final exit's logits.
        extra_flops: int64 ``(n,)``: FLOPs spent after the answer, to reach the final exit (the
            answer's own FLOPs stay in the result's ``flops``).
    """

    rows: Tensor
    confidence: Tensor
    pred: Tensor
    final_logits: Tensor
    extra_flops: Tensor


class AuditRecorder:
    """Collects an :class:`AuditTrace` exit by exit while a batch runs.

    Args:
        audit: bool ``(B,)``: which batch rows are audited (they must reach every exit).
        num_exits: Exits of the model.
    """

    def __init__(self, audit: Tensor, num_exits: int) -> None:
        self.mask = audit
        self.rows = audit.nonzero().view(-1)
        self.slot = torch.cumsum(audit.long(), 0) - 1  # batch row -> trace row
        count = self.rows.numel()
        self.num_exits = num_exits
        self.confidence = torch.empty(count, num_exits)
        self.pred = torch.empty(count, num_exits, dtype=torch.long)
        self.final_logits: Tensor | None = None
        self.final_flops = torch.zeros(count, dtype=torch.long)

    def record(self, rows: Tensor, k: int, logits: Tensor, conf: Tensor,
               flops: Tensor | int) -> None:
        """Exit ``k`` ran on batch ``rows``: keep what the audited ones among them answered."""
        here = self.mask.index_select(0, rows)
        if rows.numel() != self.rows.numel() or not bool(here.all()):
            index = here.nonzero().view(-1)
            rows, logits, conf = rows[index], logits[index], conf[index]
            flops = flops[index] if isinstance(flops, Tensor) else flops
        slots = self.slot[rows]
        self.confidence[slots, k] = conf.float()
        self.pred[slots, k] = logits.argmax(dim=1)
        if k == self.num_exits - 1:
            self.final_logits = logits.new_empty(self.rows.numel(), logits.shape[1])
            self.final_logits[slots] = logits
            self.final_flops[slots] = torch.as_tensor(flops, dtype=torch.long)

    def result(self, answer_flops: Tensor) -> AuditTrace:
        """The trace, given every batch row's FLOPs up to its answer."""
        assert self.final_logits is not None, "audited rows must reach the final exit"
        return AuditTrace(self.rows, self.confidence, self.pred, self.final_logits,
                          self.final_flops - answer_flops.index_select(0, self.rows))


@dataclass
class _Walk:
    """Where a run is: the activation and each row's FLOPs so far (accounted, executed).

    FLOPs are ints for one sample and int64 ``(B,)`` tensors for a batch; the batched run
    drops answered rows from all three between exits.
    """

    x: Tensor
    flops: Tensor | int
    executed: Tensor | int


class DynamicExecutor:
    """Run a multi-exit model skipping what its gates and exits say to skip.

    Args:
        model: The network, in eval mode. Its stem and blocks are folded (BatchNorm into the
            convs) once, here; its heads are read live at every run.
        channels_last: Run batches in channels_last memory format from the stem output on
            (oneDNN's convs are several times faster in it on CPU for narrow layers); batch 1
            always runs contiguous (its convs are faster so).

    Example:
        >>> executor = DynamicExecutor(model.eval())
        >>> result = executor.run(x, thresholds=0.9)
        >>> result.pred, result.exit_index, result.flops
    """

    def __init__(self, model: MultiExitModel, *, channels_last: bool = True) -> None:
        if model.training:
            raise ValueError("DynamicExecutor needs the model in eval mode; call model.eval()")
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.channels_last = channels_last
        self.num_exits = model.num_exits
        self.gate_mode = model.gate_mode
        with torch.no_grad():
            self.stem, stages = plan_stages(model)
        self.stem_flops = model.cost_profile.stem
        self.heads = [HeadPlan(model.heads, k) for k in range(self.num_exits)]
        # Per stage up to the last exit: its block plans, then the exits that read its output.
        self.schedule: list[tuple[list[BlockPlan], list[int]]] = [
            (stages[s], [k for k, stage in enumerate(model.exit_stages) if stage == s])
            for s in range(model.exit_stages[-1] + 1)
        ]
        self._thresholds: dict[object, tuple[Tensor, list[Tensor]]] = {}

    @property
    def head_flops(self) -> tuple[int, ...]:
        """Cost of each exit head, read live (anchoring heads re-measures the profile)."""
        return self.model.cost_profile.heads

    @property
    def gated_blocks(self) -> list[GatedBlockPlan]:
        """The gated block plans, in execution order (their folded weights live here)."""
        return [b for blocks, _ in self.schedule for b in blocks if isinstance(b, GatedBlockPlan)]

    def run(
        self, x: Tensor, thresholds: Thresholds, measure: str = "max_softmax", *,
        path: str = "auto", check_inputs: bool = True, audit: Tensor | None = None,
    ) -> ExecutorResult:
        """Classify a batch, each sample stopping at its first confident exit.

        Args:
            x: Inputs ``(B, C, H, W)``.
            thresholds: Per-exit thresholds (see ``backbones.exit_rule.normalize_thresholds``:
                a number, or one value per early exit).
            measure: Confidence measure (``backbones.exit_rule.CONFIDENCE_MEASURES``).
            path: ``auto`` (sliced per-sample execution for ``B == 1``, batched otherwise),
                ``single`` (requires ``B == 1``) or ``batched``.
            check_inputs: Check ``x`` with ``backbones.inputs`` (``False``: the caller did,
                as the engine's ``InputChecker`` does; saves a pass over the input).
            audit: bool ``(B,)``: rows that, once answered, keep running to the final exit
                (``result.audit`` holds their every exit's answer; ``None``: no row).

        Returns:
            Per-sample predictions, exits, confidences, FLOPs, logits and head inputs (empty
            for an empty batch).

        Raises:
            ValueError: ``x`` is not a tensor of shape ``(B, *model.input_size)``, is not
                floating point (another floating dtype is cast to the model's, see
                ``backbones.inputs``), or holds NaN or inf values.
        """
        if check_inputs:
            x = prepare_inputs(x, self.model.input_size, self.dtype)
            check_finite(x, "fix the data (the engine counts and skips such rows with "
                            "on_bad_input=skip)")
        if path not in ("auto", "single", "batched"):
            raise ValueError(f"path must be 'auto', 'single' or 'batched', got {path!r}")
        if path == "single" and x.shape[0] != 1:
            raise ValueError(f"path='single' runs one sample, got a batch of {x.shape[0]}")
        per_exit = self._thresholds_for(thresholds)
        recorder = None
        if audit is not None and bool(audit.any()):
            recorder = AuditRecorder(audit.to(torch.bool), self.num_exits)
        with torch.no_grad():
            if path == "single" or (path == "auto" and x.shape[0] == 1):
                return self._run_single(x, per_exit, measure, recorder)
            return self._run_batched(x, per_exit, measure, recorder)

    def _thresholds_for(self, thresholds: Thresholds) -> list[Tensor]:
        """One ``(1,)`` threshold per exit as the rule compares it (cached: batch 1 is hot)."""
        if isinstance(thresholds, (int, float)):
            key: object = float(thresholds)
        elif isinstance(thresholds, Tensor):
            key = tuple(thresholds.detach().flatten().tolist())
        else:
            key = tuple(float(t) for t in thresholds)
        cached = self._thresholds.get(key)
        if cached is None:
            values = exit_thresholds(thresholds, self.num_exits)
            cached = (values, [values[k : k + 1] for k in range(self.num_exits)])
            if len(self._thresholds) > 64:
                self._thresholds.clear()
            self._thresholds[key] = cached
        return cached[1]

    def _walk(self, walk: _Walk, batched: bool) -> Iterator[tuple[int, Tensor]]:
        """Run the plans from the stem output on; yield ``(k, logits)`` at each exit ``k``.

        Block and head FLOPs are added to ``walk``; between yields the caller may drop rows
        from ``walk`` (``x``, ``flops`` and ``executed`` alike) and the walk goes on with the
        rest.
        """
        head_flops = self.head_flops
        for blocks, exits in self.schedule:
            for block in blocks:
                walk.x, flops, executed = (block.run_batch if batched else block.run_one)(walk.x)
                walk.flops += flops
                walk.executed += executed
            for k in exits:
                logits = self.heads[k](walk.x)
                walk.flops += head_flops[k]
                walk.executed += head_flops[k]
                yield k, logits

    def _run_single(self, x: Tensor, thresholds: list[Tensor], measure: str,
                    recorder: AuditRecorder | None = None) -> ExecutorResult:
        """Batch 1: exits in order, stopping at the first confident one (audited: at the last)."""
        walk = _Walk(run_steps(self.stem, x), self.stem_flops, self.stem_flops)
        features, result = [], None
        for k, logits in self._walk(walk, batched=False):
            features.append(walk.x)
            conf = confidence(logits, measure)
            if recorder is not None:
                recorder.record(recorder.rows, k, logits, conf, walk.flops)
            if result is None and (k == self.num_exits - 1
                                   or accepts(conf, thresholds[k]).item()):
                result = self._single_result(k, logits, conf, walk)
                if recorder is None:
                    break
        result.features = features
        result.evaluated = [torch.zeros(1, dtype=torch.long, device=x.device)] * len(features)
        if recorder is not None:
            result.audit = recorder.result(result.flops)
        return result

    @staticmethod
    def _single_result(k: int, logits: Tensor, conf: Tensor, walk: _Walk) -> ExecutorResult:
        device = logits.device
        return ExecutorResult(
            pred=logits.argmax(dim=1),
            exit_index=torch.full((1,), k, dtype=torch.long, device=device),
            confidence=conf,
            flops=torch.full((1,), walk.flops, dtype=torch.long, device=device),
            flops_executed=torch.full((1,), walk.executed, dtype=torch.long, device=device),
            logits=logits,
        )

    def _run_batched(self, x: Tensor, thresholds: list[Tensor], measure: str,
                     recorder: AuditRecorder | None = None) -> ExecutorResult:
        """A batch, stage by stage; rows that answered are dropped before the next stage.

        Audited rows stay until the final exit; ``open_rows`` then marks the rows still
        unanswered (``None`` without audits: every row left is unanswered).
        """
        batch, device = x.shape[0], x.device
        out = _BatchOutputs(batch, self.model.num_classes, device)
        rows = torch.arange(batch, device=device)
        flops = torch.full((batch,), self.stem_flops, dtype=torch.long, device=device)
        x = run_steps(self.stem, x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        walk = _Walk(x, flops, flops.clone())
        open_rows = None if recorder is None else torch.ones(batch, dtype=torch.bool)
        for k, logits in self._walk(walk, batched=True):
            out.features.append(walk.x)
            out.evaluated.append(rows)
            conf = confidence(logits, measure)
            if recorder is not None:
                recorder.record(rows, k, logits, conf, walk.flops)
            if k == self.num_exits - 1:
                last = None if open_rows is None else open_rows.nonzero().view(-1)
                if last is None or last.numel():
                    out.store(rows, k, logits, conf, walk.flops, walk.executed, last)
                return out.result(recorder)
            done = accepts(conf, thresholds[k])
            if open_rows is not None:
                done &= open_rows
            answered = done.nonzero().view(-1)
            if answered.numel() == 0:
                continue
            if recorder is None and answered.numel() == rows.numel():
                out.store(rows, k, logits, conf, walk.flops, walk.executed)
                return out.result()
            out.store(rows, k, logits, conf, walk.flops, walk.executed, answered)
            keep = ~done
            if open_rows is not None:
                open_rows = open_rows & keep
                keep = open_rows | recorder.mask.index_select(0, rows)
            stay = keep.nonzero().view(-1)
            if stay.numel() == 0:  # audited rows keep running, so none was audited
                return out.result()
            if stay.numel() == rows.numel():
                continue
            walk.x, rows = walk.x[stay], rows.index_select(0, stay)  # x[stay] keeps channels_last
            walk.flops = walk.flops.index_select(0, stay)
            walk.executed = walk.executed.index_select(0, stay)
            open_rows = None if open_rows is None else open_rows.index_select(0, stay)
        raise AssertionError("unreachable: the last exit always answers")


class _BatchOutputs:
    """Per-sample result tensors of a batched run, filled as samples exit."""

    def __init__(self, batch: int, num_classes: int, device: torch.device) -> None:
        long = {"dtype": torch.long, "device": device}
        self.pred = torch.empty(batch, **long)
        self.exit_index = torch.empty(batch, **long)
        self.flops = torch.empty(batch, **long)
        self.flops_executed = torch.empty(batch, **long)
        self.confidence: Tensor | None = None
        self.logits: Tensor | None = None
        self.features: list[Tensor] = []
        self.evaluated: list[Tensor] = []
        self.batch, self.num_classes = batch, num_classes

    def store(self, rows: Tensor, exit_index: int, logits: Tensor, conf: Tensor, flops: Tensor,
              executed: Tensor, answered: Tensor | None = None) -> None:
        """Record the samples ``rows[answered]`` (default: all ``rows``) as answered here."""
        if answered is not None:
            rows = rows.index_select(0, answered)
            logits, conf = logits.index_select(0, answered), conf.index_select(0, answered)
            flops, executed = flops.index_select(0, answered), executed.index_select(0, answered)
        if self.logits is None:
            self.logits = logits.new_empty(self.batch, logits.shape[1])
            self.confidence = conf.new_empty(self.batch)
        self.pred.index_copy_(0, rows, logits.argmax(dim=1))
        self.exit_index.index_fill_(0, rows, exit_index)
        self.flops.index_copy_(0, rows, flops)
        self.flops_executed.index_copy_(0, rows, executed)
        self.logits.index_copy_(0, rows, logits)
        self.confidence.index_copy_(0, rows, conf)

    def result(self, recorder: AuditRecorder | None = None) -> ExecutorResult:
        assert self.logits is not None and self.confidence is not None
        return ExecutorResult(
            pred=self.pred, exit_index=self.exit_index, confidence=self.confidence,
            flops=self.flops, flops_executed=self.flops_executed, logits=self.logits,
            features=self.features, evaluated=self.evaluated,
            audit=None if recorder is None else recorder.result(self.flops),
        )


def reference_result(
    model: MultiExitModel, x: Tensor, thresholds: Thresholds, measure: str = "max_softmax",
) -> ExecutorResult:
    """What the executor must reproduce, from the masked reference forward (all exits).

    Runs ``model.forward_exits(x)``, picks each sample's exit with
    ``backbones.exit_rule.select_exits`` and its FLOPs with ``backbones.cost.flops_per_sample``.
    ``flops_executed`` is the full path (the reference computes every exit).

    Args:
        model: The network, in eval mode.
        x: Inputs ``(B, C, H, W)``.
        thresholds: Per-exit thresholds (as for :meth:`DynamicExecutor.run`).
        measure: Confidence measure.

    Returns:
        The reference result; ``features[k]`` holds every sample (``evaluated[k]`` is all rows).
    """
    with torch.no_grad():
        out = model.forward_exits(x)
        confidences = torch.stack([confidence(logits, measure) for logits in out.logits], 1)
        exit_index = select_exits(confidences, normalize_thresholds(thresholds, len(out.logits)))
        stacked = torch.stack(out.logits, dim=1)
        logits = stacked[torch.arange(x.shape[0]), exit_index]
        flops = flops_per_sample(model, out.gates, exit_index)
    rows = torch.arange(x.shape[0], device=x.device)
    return ExecutorResult(
        pred=logits.argmax(dim=1),
        exit_index=exit_index,
        confidence=confidences.gather(1, exit_index.view(-1, 1)).squeeze(1),
        flops=flops,
        flops_executed=torch.full_like(flops, model.exit_info[-1]["flops"]),
        logits=logits,
        features=list(out.features),
        evaluated=[rows] * len(out.features),
    )
