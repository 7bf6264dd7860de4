"""A run's budget controller and audits: their inputs, and the summary's ``budget`` section.

:func:`specialize.run.run_experiment` calls in here when ``policy.budget`` is set or
``engine.audit_rate`` is above 0 (:func:`budget_enabled`). The controller's evidence is one
pass of every exit over the checkpoint's validation images (:class:`BudgetInputs`, made once
per run and shared by both replays); the same pass fits the temperature of the audits' belief
estimate. The section's true drops are measured on the evaluation side, with labels: the
final exit's accuracy on the stream's samples (:func:`stream_pass`) minus the served
accuracy, and the same on eval_in at the replay's final thresholds. The engine never sees them.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backbones.checkpoint import atomic_torch_save, read_checkpoint
from backbones.gates import GateDecision
from backbones.heads import split_head
from specialize.evaluation.curves import sweep
from specialize.evaluation.passes import (
    ExitPass,
    HeadInputs,
    exit_pass,
    operating_point,
    rerun_heads,
)
from specialize.models.zoo import cache_dir, validation_data
from specialize.operating_point.calibration import fit_temperature
from specialize.operating_point.controller import BudgetController
from specialize.operating_point.search import normal_quantile
from specialize.policy import calibrate_thresholds
from specialize.run.state import weights_hash
from specialize.summary import BudgetReplay, BudgetSection

if TYPE_CHECKING:
    from specialize.run.config import RunConfig
    from specialize.specializer import Specializer

DEFAULT_AUDIT_RATE = 0.02  # with a budget and no engine.audit_rate: about 60 of 3,000 samples

__all__ = ["BudgetInputs", "audit_rate", "budget_enabled", "budget_phase", "budget_replay",
           "budget_section", "cached_validation_pass", "pass_state",
           "specialized_stream_pass", "stream_pass"]


def audit_rate(config: RunConfig) -> float:
    """``engine.audit_rate``, or its default: 0.02 with a budget, else 0."""
    if config.engine.audit_rate is not None:
        return config.engine.audit_rate
    return DEFAULT_AUDIT_RATE if config.policy.budget is not None else 0.0


def budget_enabled(config: RunConfig) -> bool:
    """Whether the run has a budget or audits (then the summary has a ``budget`` section)."""
    return config.policy.budget is not None or audit_rate(config) > 0


class BudgetInputs:
    """The validation pass and temperature, made on first use (a resumed run may not need them).

    Args:
        model: The run's model (base heads while the pass runs).
        checkpoint: Its checkpoint file (the header names the validation data).
        transform: The stream's input transform, fitted to the model.
        config: The run config (measure, evaluation batch size, progress).
    """

    def __init__(self, model, checkpoint: str, transform, config: RunConfig) -> None:
        self.model, self.checkpoint, self.transform, self.config = (model, checkpoint,
                                                                    transform, config)
        self._evidence: ExitPass | None = None
        self._temperature: float | None = None

    def _load(self) -> None:
        meta = read_checkpoint(self.checkpoint)
        try:
            data = validation_data(meta.get("train_config") or {})
        except (ValueError, TypeError):
            if self.config.policy.budget is not None:
                raise
            self._temperature = 1.0  # audits without a budget: the raw softmax
            return
        self._evidence = cached_validation_pass(self.model, data, self.transform, self.config)
        cached = self._evidence.head_inputs
        with torch.no_grad():
            final_logits = split_head(self.model.heads[-1])[1](cached.inputs[-1])
        self._temperature = fit_temperature(final_logits, self._evidence.labels)

    @property
    def evidence(self) -> ExitPass | None:
        """Every exit's answers on the validation set (``None``: the checkpoint has none)."""
        if self._temperature is None:
            self._load()
        return self._evidence

    @property
    def temperature(self) -> float:
        """The final exit's temperature on validation data (1.0 without validation data)."""
        if self._temperature is None:
            self._load()
        return self._temperature

    def controller(self) -> BudgetController | None:
        """A fresh controller for one replay (``None`` without a budget)."""
        policy = self.config.policy
        if policy.budget is None:
            return None
        return BudgetController(self.evidence, policy.budget,
                                confidence=policy.budget_confidence,
                                retune_every=policy.retune_every,
                                history_size=policy.history_size, measure=policy.measure,
                                shared=policy.budget_thresholds == "shared")


def cached_validation_pass(model, data, transform, config: RunConfig) -> ExitPass:
    """The controller's validation pass, read from the cache when this model made it before.

    The backbone is frozen and the pass runs with the checkpoint's base heads, so it is a
    function of the weights, the data, the input transform, the measure and the batches: the
    cache key hashes all of them. A Tiny-ImageNet run saves about 20,000 backbone passes this
    way. Files live under ``cache_dir()/passes`` (written atomically, read with
    ``weights_only=True``); delete them freely.
    """
    policy, evaluation = config.policy, config.evaluation
    digest = hashlib.sha256()
    for part in (weights_hash(model), repr(transform), policy.measure, evaluation.batch_size,
                 data.name, len(data.labels)):
        digest.update(f"{part}\0".encode())
    digest.update(data.labels.numpy().tobytes())
    digest.update(hashlib.sha256(data.images.numpy().tobytes()).digest())
    path = cache_dir() / "passes" / f"validation-{digest.hexdigest()[:24]}.pt"
    if path.exists():
        try:
            return _pass_from_file(path)
        except Exception:  # noqa: BLE001 - any unreadable cache file: recompute, rewrite it
            path.unlink(missing_ok=True)
    evidence = exit_pass(model, data.images, data.labels, transform, measure=policy.measure,
                         batch_size=evaluation.batch_size, progress=config.progress,
                         desc="validation (budget)", keep_head_inputs=True)
    _pass_to_file(evidence, path)
    return evidence


def _pass_to_file(passed: ExitPass, path: Path) -> None:
    kept = passed.head_inputs
    atomic_torch_save({
        "confidence": passed.confidence, "pred": passed.pred, "flops": passed.flops,
        "labels": passed.labels, "prefixes": list(kept.prefixes), "inputs": list(kept.inputs),
        "gates": [(g.block_salience, g.channel_salience) for g in kept.gates],
        "batch_size": kept.batch_size}, path)


def _pass_from_file(path: Path) -> ExitPass:
    state = torch.load(path, map_location="cpu", weights_only=True)
    kept = HeadInputs(state["prefixes"], state["inputs"],
                      [GateDecision(*g) for g in state["gates"]], int(state["batch_size"]))
    return ExitPass(state["confidence"], state["pred"], state["flops"], state["labels"],
                    head_inputs=kept)


def budget_replay(specializer: Specializer, result) -> BudgetReplay | None:
    """What a replay's controller and audits report (``None`` when neither ran)."""
    controller, log = specializer.controller, specializer.audit_log
    if controller is None and log is None:
        return None
    replay = BudgetReplay(mean_flops=result.mean_flops)
    engine = specializer.engine
    thresholds = engine.policy.thresholds_tensor(engine.model.num_exits)[:-1].tolist()
    replay.thresholds = [t if math.isfinite(t) else None for t in thresholds]
    if controller is not None:
        last = controller.history[-1]
        replay.retunes, replay.history = controller.retunes, list(controller.history)
        replay.estimated_drop, replay.estimated_bound = last["drop"], last["bound"]
    if log is not None:
        belief, error = log.belief_drop
        replay.audits, replay.disagreement = log.count, log.disagreement
        replay.audit_flops_share = (result.audit_flops_sum / result.flops_sum
                                    if result.flops_sum else None)
        replay.belief_drop, replay.belief_drop_se = belief, error
        replay.exit_agreement, replay.audit_rollbacks = log.exit_agreement, log.rollbacks
    return replay


def stream_pass(model, stream, config: RunConfig) -> ExitPass:
    """Every exit over the stream's samples, with their labels (evaluation side only).

    Head inputs are kept (in memory, not in the run state), so that
    :func:`specialized_stream_pass` reruns only the heads.
    """
    return exit_pass(model, stream.raw_images(), stream.evaluator().labels, stream.transform,
                     measure=config.policy.measure, batch_size=config.evaluation.batch_size,
                     progress=config.progress, desc="stream (final exit)",
                     keep_head_inputs=True)


def specialized_stream_pass(model, streamed: ExitPass, stream, config: RunConfig) -> ExitPass:
    """Every exit over the stream's samples with the heads served now (the specialized ones).

    Reruns only the heads on the base pass's cached inputs; a run resumed past that pass has
    none, and runs the whole pass again. Evaluation side: the specialized hindsight.
    """
    rerun = rerun_heads(model, streamed, config.policy.measure)
    return rerun if rerun is not None else stream_pass(model, stream, config)


def pass_state(passed: ExitPass) -> dict[str, Any]:
    """What a run state saves of a pass: its answers and labels (head inputs stay in memory)."""
    return {name: getattr(passed, name) for name in ("confidence", "pred", "flops", "labels")}


def budget_phase(config: RunConfig, session, model, checkpoint: str,
                 stream) -> tuple[BudgetInputs | None, ExitPass | None]:
    """The run's budget inputs and its ``stream_pass`` phase (``None, None``: both off).

    The stream pass runs with the base heads, right after the curves before, and is saved
    with the run's state; the validation pass runs when a replay first needs it.
    """
    if not budget_enabled(config):
        return None, None
    streamed = session.phase("stream_pass", lambda: stream_pass(model, stream, config),
                             pass_state, lambda state: ExitPass(**state))
    return BudgetInputs(model, checkpoint, stream.transform, config), streamed


def _drop_at(passed: ExitPass | None, thresholds: list[float | None]) -> float | None:
    """True accuracy drop (points) against the final exit at ``thresholds`` on a labelled set."""
    if passed is None or not thresholds:
        return None
    values = torch.tensor([math.inf if t is None else t for t in thresholds] + [-math.inf],
                          dtype=torch.float64)
    final = 100.0 * float(passed.correct[:, -1].double().mean())
    return final - operating_point(passed, values)["accuracy"]


def _hindsight(passed: ExitPass, max_drop: float, shared: bool = True,
               ) -> dict[str, Any]:
    """The cheapest thresholds whose true drop on ``passed`` is within ``max_drop``.

    ``shared``: one threshold for every early exit (exact), else one per exit (the greedy
    refinement of ``calibrate_thresholds``, never worse than the shared optimum).
    """
    arrays = (passed.confidence.numpy(), passed.correct.numpy(), passed.flops.numpy())
    chosen = calibrate_thresholds(*arrays, max_drop=max(max_drop, 0.0), shared=shared)
    point = sweep(*arrays, np.array(chosen.thresholds)[None])
    final = 100.0 * float(np.mean(arrays[1][:, -1]))
    values = [t if math.isfinite(t) else None for t in chosen.thresholds]
    threshold = values[0] if values else None
    return {"threshold": threshold if shared else values,
            "mean_flops": float(point.flops[0]), "drop": final - float(point.accuracy[0]),
            "max_drop": max_drop}


def budget_section(config: RunConfig, inputs: BudgetInputs | None, records: Any,
                   streamed: ExitPass, streamed_after: ExitPass | None = None,
                   ) -> BudgetSection:
    """The summary's ``budget`` section, true drops beside the label-free estimates.

    Args:
        config: The run config.
        inputs: The validation pass (``None`` when the run resumed past both replays).
        records: The run's :class:`~specialize.run.summarize.RunRecords`.
        streamed: Every exit over the stream's samples with the base heads (labels inside).
        streamed_after: The same with the specialized heads (``None``: no specializing
            replay), for the specialized hindsight.
    """
    policy = config.policy
    final = 100.0 * float(streamed.correct[:, -1].double().mean())
    section = BudgetSection(
        budget=policy.budget, confidence=policy.budget_confidence if policy.budget else None,
        z=normal_quantile(policy.budget_confidence) if policy.budget is not None else None,
        retune_every=policy.retune_every if policy.budget is not None else None,
        audit_rate=audit_rate(config), final_exit_stream_accuracy=final)
    if inputs is not None:
        section.temperature = inputs.temperature
        section.validation_samples = None if inputs.evidence is None else len(inputs.evidence)
    for name, replay, passes in (("specializing", records.specializing, records.after),
                                 ("frozen", records.frozen, records.before)):
        if replay is None or replay.budget is None:
            continue
        entry = BudgetReplay.from_json_dict(replay.budget.to_json_dict())
        entry.true_drop_stream = final - replay.record.accuracy
        entry.true_drop_eval_in = _drop_at(passes.eval_in, entry.thresholds)
        setattr(section, name, entry)
    if section.frozen is not None and section.specializing is not None:
        section.flops_ratio = section.specializing.mean_flops / section.frozen.mean_flops
    if policy.budget is not None:
        held_out = records.after.eval_in if records.after is not None else None
        section.hindsight = _hindsights(policy.budget, streamed, streamed_after, held_out,
                                        section)
    return section


def _hindsights(budget: float, streamed: ExitPass, streamed_after: ExitPass | None,
                held_out: ExitPass | None, section: BudgetSection) -> dict[str, Any]:
    """The labelled limits a replay's cost is compared with (stream samples, offline).

    ``budget``/``budget_per_exit``: frozen heads, true drop within the budget (one shared
    threshold / one per exit); ``same_drop``: frozen heads at the frozen controller's own true
    drop; ``specialized``/``specialized_per_exit``: the specializing replay's final heads
    (what they would allow if they had served the whole stream) within the budget. A stream
    that shows its images more than once (the Tiny-ImageNet subsets draw 3,000 samples from
    600 images) flatters the specialized heads here: they trained on those very images.
    ``specialized_eval_in[_per_exit]``: the same heads on ``held_out`` (eval_in after, fresh
    images of the stream's classes), the limit that validation data can certify.
    """
    limits = {"budget": _hindsight(streamed, budget),
              "budget_per_exit": _hindsight(streamed, budget, shared=False)}
    if section.frozen is not None:
        limits["same_drop"] = _hindsight(streamed, section.frozen.true_drop_stream)
    if streamed_after is not None:
        limits["specialized"] = _hindsight(streamed_after, budget)
        limits["specialized_per_exit"] = _hindsight(streamed_after, budget, shared=False)
    if held_out is not None:
        limits["specialized_eval_in"] = _hindsight(held_out, budget)
        limits["specialized_eval_in_per_exit"] = _hindsight(held_out, budget, shared=False)
    return limits
