"""``Specializer(model, policy, updater).run(stream)``: the engine, hooks and resumable state.

The specializer wires an :class:`~specialize.engine.Engine` to a head updater, a per-class
compute tracker and an optional drift alarm, runs it over a stream's inputs (never its
labels), and can save and resume the whole specialization state atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from backbones import MultiExitModel
from backbones.checkpoint import atomic_torch_save
from configkit import check_threads
from specialize.drift import ClassCostTracker, DriftDetector
from specialize.engine import Engine, EngineResult, StepHook, StepOutput, reference_step
from specialize.models.runtime import threads
from specialize.operating_point.audits import AuditLog, AuditSampler
from specialize.policy import ExitPolicy
from specialize.updater import HeadUpdater

STATE_FORMAT = 2  # 2: the drift alarm's detector, alarms and position


class _TrackerHook:
    def __init__(self, tracker: ClassCostTracker) -> None:
        self.tracker = tracker

    def on_step(self, output: StepOutput) -> None:
        valid = output.valid
        self.tracker.update(output.pred[valid], output.exit_index[valid], output.flops[valid])


class _AlarmHook:
    """Feeds predicted classes to a drift detector; on an alarm, resets the updater.

    Keeps the number of alarms and the positions of the last ``max_alarms`` of them.
    """

    def __init__(self, detector: DriftDetector, updater: HeadUpdater | None, reset: bool,
                 max_alarms: int = 1000) -> None:
        self.detector = detector
        self.updater = updater
        self.reset = reset
        self.recent: deque[int] = deque(maxlen=max_alarms)
        self.count = 0
        self.position = 0

    @property
    def alarms(self) -> list[int]:
        """Stream positions of the last ``max_alarms`` alarms, oldest first."""
        return list(self.recent)

    def on_step(self, output: StepOutput) -> None:
        for pred in output.pred[output.valid].tolist():
            self.position += 1
            if self.detector.update(pred):
                self.recent.append(self.position)
                self.count += 1
                if self.reset and self.updater is not None:
                    self.updater.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "alarms": self.alarms,
                "count": self.count, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        self.recent.clear()
        self.recent.extend(int(p) for p in state["alarms"])
        self.count, self.position = int(state["count"]), int(state["position"])


class Specializer:
    """Online test-time specialization of a multi-exit model over a stream.

    Args:
        model: The multi-exit model (its backbone and final head never change).
        policy: Confidence measure and thresholds.
        updater: The head updater (``None``: a frozen model, the baseline run).
        tracker: Per-class compute tracker (default: one with a 250-sample window).
        alarm: Optional drift detector on the predicted-class mix.
        reset_on_alarm: Reset the updater to the base heads when the alarm fires.
        step_fn: The inference routine (reference lazy forward, or the dynamic executor).
        on_bad_input: ``error`` or ``skip`` for malformed or non-finite inputs.
        hooks: More step hooks, called after the updater, tracker and alarm (e.g. an
            evaluator's online scoring; they are not part of :meth:`state_dict`).
        max_alarms: Alarm positions kept (the count of all alarms is kept too).
        audit_rate: Share of samples audited (run on to the final exit after answering;
            :mod:`specialize.operating_point.audits`); 0: none, and the engine runs as without
            audits.
        audit_seed: Seed of the audit draws.
        audit_temperature: Temperature of the final exit's softmax in the audits' belief
            estimate.
        controller: A :class:`~specialize.operating_point.controller.BudgetController` that sets the
            thresholds (``None``: the policy's fixed thresholds).
        num_threads: Torch CPU threads while :meth:`run` serves (restored afterwards;
            ``engine.num_threads`` of a run config); ``None``: leave torch's setting.
    """

    def __init__(
        self, model: MultiExitModel, policy: ExitPolicy, updater: HeadUpdater | None = None,
        *, tracker: ClassCostTracker | None = None, alarm: DriftDetector | None = None,
        reset_on_alarm: bool = False, step_fn=reference_step, on_bad_input: str = "error",
        hooks: Iterable[StepHook] = (), max_alarms: int = 1000, audit_rate: float = 0.0,
        audit_seed: int = 0, audit_temperature: float = 1.0, controller: Any = None,
        num_threads: int | None = None,
    ) -> None:
        self.model = model
        self.num_threads = check_threads("num_threads", num_threads)
        self.policy = policy
        self.updater = updater
        self.tracker = tracker or ClassCostTracker(model.num_classes, model.num_exits, 250)
        self.alarm_hook = (_AlarmHook(alarm, updater, reset_on_alarm, max_alarms) if alarm
                           else None)
        all_hooks: list[StepHook] = [_TrackerHook(self.tracker)]
        if updater is not None:
            all_hooks.insert(0, updater)
        if self.alarm_hook is not None:
            all_hooks.append(self.alarm_hook)
        self.audit_sampler = AuditSampler(audit_rate, audit_seed) if audit_rate > 0 else None
        self.audit_log = None
        if self.audit_sampler is not None:  # before the controller: it sees rollbacks at once
            self.audit_log = AuditLog(model.num_exits, updater, audit_temperature)
            all_hooks.append(self.audit_log)
        self.controller = controller
        if controller is not None:
            all_hooks.append(controller)
        self.engine = Engine(
            model, policy, hooks=[*all_hooks, *hooks], step_fn=step_fn, on_bad_input=on_bad_input,
            serving=updater.serving if updater is not None else None, audits=self.audit_sampler,
        )
        if controller is not None:
            controller.bind(self.engine, updater, self.alarm_hook)
        self.position = 0

    def run(self, stream, *, batch_size: int = 1, stop: int | None = None,
            progress: bool = True, desc: str | None = None,
            save_every: int | None = None, state_path: str | Path | None = None,
            keep_records: bool = True, result: EngineResult | None = None,
            on_save: Callable[[], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> EngineResult:
        """Run over ``stream.inputs`` from the current position.

        Args:
            stream: A ``streams.replay.Stream`` (only its inputs are read).
            batch_size: Samples per engine step (1 = the on-device case).
            stop: Stop before this stream position (default: the end).
            progress: Show a progress bar.
            desc: Progress bar label.
            save_every: Save at every stream position that is a multiple of this (needs
                ``state_path`` or ``on_save``; keep it a multiple of ``batch_size`` so that a
                resumed run sees the same batches).
            state_path: Where :meth:`save` writes.
            keep_records: Keep per-sample records in the result (memory grows with the
                stream; the aggregates are always kept). Ignored when ``result`` is given.
            result: Accumulate into this result (e.g. restored after a resume).
            on_save: Called instead of :meth:`save` at each save point and on a stop.
            should_stop: Checked after every step; ``True`` ends the run early at the
                current position, after a save (the position then says where it stopped).

        Returns:
            The result over the samples processed (``result`` itself when given).
        """
        stop = len(stream) if stop is None else stop
        if on_save is None and state_path is not None:
            on_save = partial(self.save, state_path, stream)
        if save_every is not None and on_save is None:
            raise ValueError("save_every needs state_path=... to know where to save")
        if result is None:
            result = EngineResult(self.model.num_exits, keep_records=keep_records)
        label = desc or f"{getattr(stream, 'name', 'stream')}"
        bar_options = {"total": max(stop - self.position, 0), "desc": label, "unit": "sample",
                       "disable": not progress, "mininterval": 0.5}
        with threads(self.num_threads), tqdm(**bar_options) as bar:
            while self.position < stop:
                end = stop if not save_every else min(
                    (self.position // save_every + 1) * save_every, stop)
                seen = result.samples
                inputs = stream.inputs(batch_size=batch_size, start=self.position, stop=end)
                self.engine.run(inputs, result=result, stop_when=should_stop, bar=bar)
                self.position += result.samples - seen
                if self.updater is not None:
                    self.updater.flush()
                stopping = should_stop is not None and should_stop()
                if on_save is not None and (save_every is not None or stopping):
                    on_save()
                if stopping:
                    break
        return result

    def close(self) -> None:
        """Stop the updater's background thread (if any)."""
        if self.updater is not None:
            self.updater.close()

    # ---- state

    def identity(self, stream=None) -> dict[str, Any]:
        """What a saved state must match to be resumed: model, policy and stream."""
        model = {"name": self.model.name, "build_args": _jsonable(self.model.build_args)}
        ident = {
            "model": model,
            "policy": {"measure": self.policy.measure,
                       "thresholds": _jsonable(self.policy.thresholds)},
            "updater": _jsonable(vars(self.updater.config)) if self.updater else None,
        }
        if self.alarm_hook is not None:
            ident["alarm"] = _jsonable(self.alarm_hook.detector.state_dict()["config"])
        if stream is not None:
            ident["stream"] = stream.fingerprint
        return ident

    def state_dict(self, stream=None) -> dict[str, Any]:
        """The whole specialization state (tensors and plain types only)."""
        return {
            "format": STATE_FORMAT,
            "identity": json.dumps(self.identity(stream), sort_keys=True),
            "model": self.model.state_dict(),
            "updater": self.updater.state_dict() if self.updater else None,
            "tracker": self.tracker.state_dict(),
            "alarm": self.alarm_hook.state_dict() if self.alarm_hook else None,
            "position": self.position,
            "audits": None if self.audit_log is None else {
                "sampler": self.audit_sampler.state_dict(), "log": self.audit_log.state_dict()},
            "controller": None if self.controller is None else self.controller.state_dict(),
        }

    def save(self, path: str | Path, stream=None) -> Path:
        """Write the state atomically (temp file, fsync, rename, folder fsync)."""
        return atomic_torch_save(self.state_dict(stream), path)

    def load(self, path: str | Path, stream=None) -> None:
        """Resume from a saved state; refuses a state of another model, config or stream."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
            raise ValueError(f"cannot read specialization state {path}: {err}; delete it to "
                             "start afresh") from err
        self.load_state_dict(state, stream, where=str(path))

    def load_state_dict(self, state: dict[str, Any], stream=None, *,
                        where: str = "the state") -> None:
        """Resume from :meth:`state_dict` output; refuses another model, config or stream.

        Args:
            state: What :meth:`state_dict` returned.
            stream: The stream the run continues on (its fingerprint must match).
            where: Names the state in error messages.

        Raises:
            ValueError: Another format, model, policy, updater config, alarm or stream.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{where}: state format {state.get('format')} is not "
                             f"{STATE_FORMAT}; delete it to start afresh")
        saved = json.loads(state["identity"])
        current = self.identity(stream)
        for key in current:
            if saved.get(key) != current[key]:
                raise ValueError(
                    f"{where} was saved for another {key} ({_short(saved.get(key))} != "
                    f"{_short(current[key])}); resume with the same config or delete the state"
                )
        self.model.load_state_dict(state["model"])
        if self.updater is not None:
            self.updater.load_state_dict(state["updater"])
        self.tracker.load_state_dict(state["tracker"])
        if self.alarm_hook is not None:
            self.alarm_hook.load_state_dict(state["alarm"])
        if self.audit_log is not None:
            self.audit_sampler.load_state_dict(state["audits"]["sampler"])
            self.audit_log.load_state_dict(state["audits"]["log"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.position = int(state["position"])


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else hashlib.sha256(text.encode()).hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
