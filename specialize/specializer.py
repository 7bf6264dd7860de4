"""``Specializer(model, policy, updater).run(stream)``: the engine, hooks and resumable state.

The specializer wires an :class:`~specialize.engine.Engine` to a head updater, a per-class
compute tracker and an optional drift alarm, runs it over a stream's inputs (never its
labels), and can save and resume the whole specialization state atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from backbones import MultiExitModel
from specialize.drift import ClassCostTracker, DriftDetector
from specialize.engine import Engine, EngineResult, StepOutput, reference_step
from specialize.policy import ExitPolicy
from specialize.updater import HeadUpdater

STATE_FORMAT = 1


class _TrackerHook:
    def __init__(self, tracker: ClassCostTracker) -> None:
        self.tracker = tracker

    def on_step(self, output: StepOutput) -> None:
        valid = output.valid
        self.tracker.update(output.pred[valid], output.exit_index[valid], output.flops[valid])


class _AlarmHook:
    """Feeds predicted classes to a drift detector; on an alarm, resets the updater."""

    def __init__(self, detector: DriftDetector, updater: HeadUpdater | None, reset: bool) -> None:
        self.detector = detector
        self.updater = updater
        self.reset = reset
        self.alarms: list[int] = []
        self.position = 0

    def on_step(self, output: StepOutput) -> None:
        for pred in output.pred[output.valid].tolist():
            self.position += 1
            if self.detector.update(pred):
                self.alarms.append(self.position)
                if self.reset and self.updater is not None:
                    self.updater.reset()


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
    """

    def __init__(
        self, model: MultiExitModel, policy: ExitPolicy, updater: HeadUpdater | None = None,
        *, tracker: ClassCostTracker | None = None, alarm: DriftDetector | None = None,
        reset_on_alarm: bool = False, step_fn=reference_step, on_bad_input: str = "error",
    ) -> None:
        self.model = model
        self.policy = policy
        self.updater = updater
        self.tracker = tracker or ClassCostTracker(model.num_classes, model.num_exits, 250)
        self.alarm_hook = _AlarmHook(alarm, updater, reset_on_alarm) if alarm else None
        hooks: list[Any] = [_TrackerHook(self.tracker)]
        if updater is not None:
            hooks.insert(0, updater)
        if self.alarm_hook is not None:
            hooks.append(self.alarm_hook)
        self.engine = Engine(
            model, policy, hooks=hooks, step_fn=step_fn, on_bad_input=on_bad_input,
            serving=updater.serving if updater is not None else None,
        )
        self.position = 0

    def run(self, stream, *, batch_size: int = 1, stop: int | None = None,
            progress: bool = True, desc: str | None = None,
            save_every: int | None = None, state_path: str | Path | None = None
            ) -> EngineResult:
        """Run over ``stream.inputs`` from the current position.

        Args:
            stream: A ``streams.replay.Stream`` (only its inputs are read).
            batch_size: Samples per engine step (1 = the on-device case).
            stop: Stop before this stream position (default: the end).
            progress: Show a progress bar.
            desc: Progress bar label.
            save_every: Save the state every this many samples (needs ``state_path``).
            state_path: Where :meth:`save` writes.

        Returns:
            Records of the samples processed in this call.
        """
        stop = len(stream) if stop is None else stop
        if save_every is not None and state_path is None:
            raise ValueError("save_every needs state_path=... to know where to save")
        chunk = save_every or max(stop - self.position, 1)
        parts = []
        while self.position < stop:
            end = min(self.position + chunk, stop)
            inputs = stream.inputs(batch_size=batch_size, start=self.position, stop=end)
            label = desc or f"{getattr(stream, 'name', 'stream')}"
            parts.append(self.engine.run(inputs, total=end - self.position,
                                         progress=progress, desc=label))
            self.position = end
            if self.updater is not None:
                self.updater.flush()
            if state_path is not None and save_every is not None:
                self.save(state_path, stream)
        return _merge(parts)

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
            "position": self.position,
        }

    def save(self, path: str | Path, stream=None) -> Path:
        """Write the state atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            torch.save(self.state_dict(stream), temp)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return path

    def load(self, path: str | Path, stream=None) -> None:
        """Resume from a saved state; refuses a state of another model, config or stream."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
            raise ValueError(f"cannot read specialization state {path}: {err}; delete it to "
                             "start afresh") from err
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: state format {state.get('format')} is not "
                             f"{STATE_FORMAT}; delete it to start afresh")
        saved = json.loads(state["identity"])
        current = self.identity(stream)
        for key in current:
            if saved.get(key) != current[key]:
                raise ValueError(
                    f"{path} was saved for another {key} ({_short(saved.get(key))} != "
                    f"{_short(current[key])}); resume with the same config or delete the state"
                )
        self.model.load_state_dict(state["model"])
        if self.updater is not None:
            self.updater.load_state_dict(state["updater"])
        self.tracker.load_state_dict(state["tracker"])
        self.position = int(state["position"])


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else hashlib.sha256(text.encode()).hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _merge(parts: list[EngineResult]) -> EngineResult:
    if len(parts) == 1:
        return parts[0]
    empty = torch.zeros(0, dtype=torch.long)
    if not parts:
        return EngineResult(empty, empty, torch.zeros(0), empty,
                            torch.zeros(0, dtype=torch.bool))

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    return EngineResult(cat("pred"), cat("exit_index"), cat("confidence"), cat("flops"),
                        cat("valid"), seconds=sum(p.seconds for p in parts))
