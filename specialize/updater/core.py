"""``HeadUpdater``: wires the buffers, trainer, worker and health monitor; serves and publishes.

Threads: the caller's (the engine's) serves under :meth:`serving`, prepares observations,
audits and restores; the trainer belongs to whoever holds ``_train_lock`` (the caller in
``sync`` mode, the background worker of ``worker.py`` in ``async`` mode); ``_lock``
(re-entrant) guards the serving heads against publishing and restores.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from backbones.contract import MultiExitModel
from backbones.heads import precomputed_prefix
from specialize.updater.anchoring import anchor_heads, is_anchored
from specialize.updater.buffer import build_buffers
from specialize.updater.config import UpdaterConfig
from specialize.updater.faults import bad_heads
from specialize.updater.heads import (
    HeadsState,
    head_tensors,
    load_heads,
    snapshot_heads,
)
from specialize.updater.health import HealthMonitor, Verdict
from specialize.updater.model import check_model, configure_model, trainable_part
from specialize.updater.observation import ExitFeatures, Observation, ObservationPreparer
from specialize.updater.trainer import HeadTrainer
from specialize.updater.worker import TrainingWorker

__all__ = ["HeadUpdater"]

_STATE_VERSION = 1
MAX_ROLLBACK_EVENTS = 100  # rollbacks remembered with their position (the last ones)


class HeadUpdater:
    """Specializes the early exit heads of a multi-exit model online (see the package doc).

    Construction calls :func:`configure_model` and :func:`check_model`, anchors the early heads
    when ``config.strategy == "anchored"`` (:func:`specialize.updater.anchoring.anchor_heads`: the
    model then serves mixtures and the updater trains their ``spec`` parts), saves the base heads
    (for :meth:`reset`), sizes the replay buffers from ``config.buffer_mb`` and, in ``async``
    mode, starts the background thread.

    Args:
        model: A ``MultiExitNet`` (``heads``, ``num_exits``, ``num_classes``, ``input_size``,
            ``forward_exits``); it is modified in place (eval mode, frozen backbone).
        config: The updater configuration (default: ``UpdaterConfig()``).

    Attributes:
        model: The served model.
        config: The configuration.
        error: The exception that stopped the background thread, or ``None``.
    """

    def __init__(self, model: MultiExitModel, config: UpdaterConfig | None = None) -> None:
        self.config = config or UpdaterConfig()
        self.model = configure_model(model)
        check_model(model)
        self.num_exits = len(model.heads)
        self.num_classes = int(model.num_classes)
        self._serving_heads = self._early_heads(model)
        splits = [precomputed_prefix(head) for head in self._serving_heads]
        prefixes = [head[:split] if split else None
                    for head, split in zip(self._serving_heads, splits)]
        # may raise: anchor only after it succeeded
        self._buffers = build_buffers(model, self._serving_heads, prefixes, self.config)
        if self.config.strategy == "anchored" and self.config.enabled:
            anchor_heads(model, self.config.anchor_weight)  # wraps the same head modules
        early = {id(p) for p in self._serving_heads.parameters()}
        self._frozen = [p for p in model.parameters() if id(p) not in early]
        self._lock = threading.RLock()  # serving() vs publishing, restores and _last_good
        self._base = snapshot_heads(self._serving_heads)
        with self._lock:  # _last_good: the worker's non-finite restore reads it too
            self._last_good = self._base
        train_heads = (self._serving_heads if self.config.mode == "sync"
                       else copy.deepcopy(self._serving_heads))
        self._trainer = HeadTrainer(train_heads, splits, self._buffers, self.config)
        self._serving_tensors = head_tensors(self._serving_heads)
        self._train_tensors = head_tensors(train_heads)
        self._train_lock = threading.Lock()  # held by whoever touches the trainer
        self._epoch = 0  # bumped by every restore; stale shadow weights are never published
        self._version = 0  # bumped whenever the served heads change (heads_version)
        self._trainer_epoch = 0
        self._pending: HeadsState | None = None
        self._counters = {"observed": 0, "accepted": 0, "low_confidence": 0,
                          "nonfinite_samples": 0, "dropped": 0, "published": 0,
                          "rollbacks": 0, "degraded_windows": 0, "healthy_windows": 0,
                          "resets": 0, "bad_heads_injected": 0}
        self._rollback_events: list[dict[str, Any]] = []
        self._preparer = ObservationPreparer(self.config, self.num_classes, self.num_exits,
                                             prefixes, self._buffers, self._counters)
        self._health = HealthMonitor(self.config)
        self._closed = False
        self._worker: TrainingWorker | None = None
        if self.config.mode == "async" and self.config.enabled:
            self._worker = TrainingWorker(self._train, self.config.queue_size)

    @property
    def heads_version(self) -> int:
        """Bumped whenever the served heads change.

        A sync update round, an async publication, a rollback or a reset bump it (the budget
        controller reruns the heads then).
        """
        return self._version

    @property
    def rollback_count(self) -> int:
        """Rollbacks the health check made so far."""
        return self._counters["rollbacks"]

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the background thread, or ``None``."""
        return None if self._worker is None else self._worker.error

    # ---- construction helpers

    def _early_heads(self, model: MultiExitModel) -> nn.ModuleList:
        """The early heads that train (an anchored model's ``spec`` parts)."""
        if self.config.strategy == "plain" and is_anchored(model):
            raise ValueError(
                "the model's heads are anchored (by an earlier anchored HeadUpdater) but this "
                "updater's strategy is 'plain'; use strategy='anchored' or first call "
                "specialize.updater.anchoring.unanchor_heads(model)")
        return nn.ModuleList(trainable_part(head) for head in list(model.heads)[:-1])

    # ---- serving

    @contextmanager
    def serving(self) -> Iterator[nn.Module]:
        """Hold the publish lock for one inference step: every head has one consistent version.

        Yields:
            The served model.
        """
        with self._lock:
            yield self.model

    # ---- observe

    def observe(self, features: Sequence[ExitFeatures], exit_index: Tensor,
                selected_logits: Tensor, confidence: Tensor, valid: Tensor | None = None) -> None:
        """Learn from one inference batch: each sample teaches the heads before its exit.

        Contract, for a batch of ``B`` samples and ``K`` exits:

        * ``features[k]`` is what head ``k`` read, given either as a tensor with ``B`` rows
          aligned with the batch (rows of samples that did not evaluate exit ``k`` are
          ignored, whatever they hold; ``ExitOutputs.features`` and the engine's
          ``StepOutput.features`` fit) or as a pair ``(features_k, rows_k)`` holding only the
          batch rows ``rows_k`` (int64) that did (an ``ExecutorResult`` fits as
          ``list(zip(result.features, result.evaluated))``).
          A sample answered at exit ``j`` needs ``features[0..j-1]``; later entries,
          including the final exit's, may be missing and are ignored.
        * ``exit_index`` ``(B,)``: the exit that answered each sample.
        * ``selected_logits`` ``(B, C)``: that exit's logits (the pseudo-label source).
        * ``confidence`` ``(B,)``: that exit's confidence (compared with ``min_confidence``).
        * ``valid`` ``(B,)`` bool: rows to use (e.g. to drop padding); ``None``: all.

        Samples with non-finite logits, confidence, targets or needed features are dropped and
        counted. The parameter-free leading layers of each head (pooling, flatten) run here,
        so only the small pooled vectors are kept. In ``sync`` mode, update rounds run inline
        before this returns; in ``async`` mode the prepared batch is queued without blocking
        (dropped and counted when the queue is full) and the caller's tensors are not
        referenced afterwards.

        Raises:
            ValueError: Shapes disagree or needed features are missing.
            RuntimeError: The updater was closed.
        """
        if not self.config.enabled:
            return
        if self._closed:
            raise RuntimeError("observe() on a closed HeadUpdater; create a new one")
        self._maybe_inject()
        observation = self._preparer.prepare(features, exit_index, selected_logits, confidence,
                                             valid)
        if self.config.mode == "sync":
            self._train(observation)
        elif not self._worker.submit(observation):  # a full queue, or the worker failed
            self._counters["dropped"] += observation.num_samples

    def _maybe_inject(self) -> None:
        """Serve bad early heads once ``inject_bad_head_at`` samples were observed (a test).

        Checked before a batch is counted, so the audits of the batches served so far (and
        the snapshot a healthy window closing on them takes) see the good heads.
        """
        at = self.config.inject_bad_head_at
        if at is None or self._counters["bad_heads_injected"] or self._counters["observed"] < at:
            return
        with self._lock:
            bad = bad_heads(snapshot_heads(self._serving_heads))
        self._restore(bad)
        if self.config.mode == "sync":
            with self._train_lock:
                self._sync_epoch()
        self._counters["bad_heads_injected"] = 1

    def on_step(self, output: Any) -> None:
        """Engine hook: ``observe`` one ``specialize.engine.StepOutput``."""
        self.observe(output.features, output.exit_index, output.selected_logits,
                     output.confidence, output.valid)

    # ---- training (the caller's thread in sync mode, the worker's in async mode)

    def _train(self, observation: Observation) -> None:
        with self._train_lock:
            self._sync_epoch()
            epoch = self._trainer_epoch
            sync = self.config.mode == "sync"
            if sync and (self.model.training or any(p.requires_grad for p in self._frozen)):
                check_model(self.model)  # raises, saying what changed since construction
            with self._lock if sync else nullcontext():  # sync trains the serving heads
                rounds, finite = self._trainer.add(observation)
                if sync and rounds:
                    self._version += 1
                if not finite:  # a step overflowed: back to the last good heads
                    self._trainer.counters["nonfinite_params"] += 1
                    with self._lock:  # not while a rollback replaces the last good heads
                        self._trainer.restore(self._last_good)
                    return
            if rounds and not sync:
                self._publish(epoch)

    def _sync_epoch(self) -> None:
        """Apply a restore that happened since the trainer last ran (async rollbacks)."""
        with self._lock:
            epoch, pending = self._epoch, self._pending
        if epoch != self._trainer_epoch:
            if pending is not None:
                self._trainer.restore(pending)
            self._trainer_epoch = epoch

    def _publish(self, epoch: int) -> bool:
        """Copy the shadow heads into the serving heads atomically (async mode)."""
        with self._lock, torch.no_grad():
            if epoch != self._epoch:  # a rollback or reset overtook this round
                return False
            for serving, trained in zip(self._serving_tensors, self._train_tensors):
                serving.copy_(trained)
            self._counters["published"] += 1
            self._version += 1
            return True

    # ---- control

    def flush(self) -> None:
        """Wait until every queued observation has been trained on (async; no-op in sync)."""
        if self._worker is not None:
            self._worker.flush()

    def close(self) -> None:
        """Finish queued work and stop the background thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> HeadUpdater:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reset(self) -> None:
        """Return exactly to the heads saved at construction; empty buffers and optimizer.

        The class prior of ``pseudo_label="prior"`` starts afresh too (the stream changed).
        Counters, the sampling generator and the audit baseline carry on.
        """
        self.flush()
        with self._train_lock:
            with self._lock:
                self._restore(self._base)
                self._last_good = self._base
            self._sync_epoch()
        self._health.reset()
        if self._preparer.prior is not None:
            self._preparer.prior.reset()
        self._counters["resets"] += 1

    def _restore(self, heads_state: HeadsState) -> None:
        """Serve ``heads_state`` now; the trainer follows (inline in sync, next item in async)."""
        with self._lock:
            load_heads(self._serving_heads, heads_state)
            self._epoch += 1
            self._version += 1
            self._pending = heads_state

    # ---- health

    def audit(self, exit_index: Tensor, answered_pred: Tensor, final_pred: Tensor) -> bool:
        """Record whether early answers agree with the final exit; roll back when they degrade.

        Feed the samples the engine answered early and also ran to the final exit (an audit
        sample); rows answered at the final exit are ignored. The first ``audit_baseline``
        audited answers set the baseline disagreement rate (feed them before the heads move,
        i.e. from the start of the stream). Every following ``audit_window`` audited answers
        form a window: a window whose rate exceeds ``baseline + audit_margin`` rolls the heads
        back to the last good snapshot (to the base heads when the previous window also
        rolled back) and empties the buffers and optimizer; a healthy window makes the
        current heads the last good snapshot.

        Args:
            exit_index: ``(B,)`` the exit that answered each sample.
            answered_pred: ``(B,)`` the class that was answered.
            final_pred: ``(B,)`` the final exit's class for the same samples.

        Returns:
            Whether this call rolled the heads back.
        """
        exit_index = exit_index.reshape(-1)
        if not answered_pred.shape == final_pred.shape == exit_index.shape:
            raise ValueError("audit() expects exit_index, answered_pred and final_pred of one "
                             f"shape (B,), got {tuple(exit_index.shape)}, "
                             f"{tuple(answered_pred.shape)}, {tuple(final_pred.shape)}")
        early = (exit_index >= 0) & (exit_index < self.num_exits - 1)  # -1: skipped input
        rolled = False
        verdicts = self._health.update((answered_pred != final_pred)[early])
        for verdict, audited in zip(verdicts, self._health.closed_at, strict=True):
            if self._act_on(verdict):
                rolled = True
                self._record_rollback(verdict, audited)
        return rolled

    def _record_rollback(self, verdict: Verdict, audited: int) -> None:
        """Remember where a rollback happened (the last ``MAX_ROLLBACK_EVENTS``)."""
        self._rollback_events.append({
            "observed": self._counters["observed"], "audited": audited,
            "to": "base" if verdict is Verdict.ROLL_BACK_TO_BASE else "last_good",
            "window_disagreement": self._health.last_window_rate,
            "baseline_disagreement": self._health.baseline_rate})
        del self._rollback_events[:-MAX_ROLLBACK_EVENTS]

    def _act_on(self, verdict: Verdict) -> bool:
        """Carry out a closed window's verdict; return whether the heads were rolled back."""
        if verdict is Verdict.HEALTHY:
            with self._lock:
                self._last_good = snapshot_heads(self._serving_heads)
            self._counters["healthy_windows"] += 1
            return False
        self._counters["degraded_windows"] += 1
        if verdict is Verdict.DEGRADED:
            return False
        with self._lock:  # the worker's non-finite restore reads _last_good
            if verdict is Verdict.ROLL_BACK_TO_BASE:
                self._last_good = self._base
            self._restore(self._last_good)
        if self.config.mode == "sync":
            with self._train_lock:
                self._sync_epoch()
        self._counters["rollbacks"] += 1
        return True

    # ---- state

    def stats(self) -> dict[str, Any]:
        """Counters and buffer fill (plain Python values).

        Returns:
            ``observed`` (valid samples seen), ``accepted`` (samples that taught),
            ``low_confidence``, ``nonfinite_samples``, ``dropped`` (async), ``samples_trained``,
            ``updates`` (rounds), ``steps``, ``skipped_losses`` (non-finite losses or
            gradients), ``nonfinite_params`` (steps undone), ``published``, ``buffer_fill``
            and ``buffer_capacity`` (per early exit), ``buffer_bytes``, ``rollbacks``,
            ``degraded_windows``, ``healthy_windows``, ``resets``, ``audited``,
            ``baseline_disagreement``, ``last_window_disagreement``, ``bad_heads_injected``
            (1 once ``inject_bad_head_at`` served bad heads), ``rollback_events`` (the last
            rollbacks: ``observed``, samples observed then, the stream position when no input
            was skipped; ``audited``, audited early answers when the window closed; ``to``,
            ``last_good`` or ``base``; the window's and the baseline's disagreement) and
            ``error``.
        """
        trainer = self._trainer.counters
        worker_dropped = 0 if self._worker is None else self._worker.dropped
        return {
            "mode": self.config.mode,
            "enabled": self.config.enabled,
            **self._counters,
            "dropped": self._counters["dropped"] + worker_dropped,
            "samples_trained": trainer["samples"],
            "updates": trainer["updates"],
            "steps": trainer["steps"],
            "skipped_losses": trainer["skipped_losses"],
            "nonfinite_params": trainer["nonfinite_params"],
            "buffer_fill": [buffer.fill for buffer in self._buffers],
            "buffer_capacity": [buffer.capacity for buffer in self._buffers],
            "buffer_bytes": sum(buffer.nbytes for buffer in self._buffers),
            "audited": self._health.audited,
            "baseline_disagreement": self._health.baseline_rate,
            "last_window_disagreement": self._health.last_window_rate,
            "rollback_events": [dict(event) for event in self._rollback_events],
            "error": None if self.error is None else repr(self.error),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: heads, optimizer, buffers, RNG, counters.

        Tensors and plain Python values only (``torch.load(weights_only=True)`` reads it). In
        ``async`` mode queued work is flushed first. The backbone is not included: save the
        model's own checkpoint alongside.
        """
        self.flush()
        with self._train_lock, self._lock:
            self._sync_epoch()
            return {
                "version": _STATE_VERSION,
                "config": dataclasses.asdict(self.config),
                "num_exits": self.num_exits,
                "trainer": self._trainer.state_dict(),
                "serving_heads": snapshot_heads(self._serving_heads),
                "base_heads": [dict(s) for s in self._base],
                "last_good_heads": [dict(s) for s in self._last_good],
                "counters": dict(self._counters),
                "audit": self._health.state_dict(),
                "rollback_events": [dict(event) for event in self._rollback_events],
                "prior": (None if self._preparer.prior is None
                          else self._preparer.prior.state_dict()),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into this updater and its model's heads.

        The current config wins for hyperparameters (``lr``...); the buffer layout (model,
        ``target``, ``buffer_mb``) must match the saved one.

        Raises:
            ValueError: Unknown version, or a state from a different model or buffer layout.
        """
        if state.get("version") != _STATE_VERSION or state.get("num_exits") != self.num_exits:
            raise ValueError(
                f"updater state version {state.get('version')} with {state.get('num_exits')} "
                f"exits does not match version {_STATE_VERSION} with {self.num_exits} exits"
            )
        self.flush()
        with self._train_lock:
            self._trainer.load_state_dict(state["trainer"])
            with self._lock:
                load_heads(self._serving_heads, state["serving_heads"])
                self._pending = None
                self._trainer_epoch = self._epoch
                self._base = state["base_heads"]
                self._last_good = state["last_good_heads"]
            self._counters.update({k: int(v) for k, v in state["counters"].items()})
            self._health.load_state_dict(state["audit"])
            self._rollback_events = [dict(e) for e in state.get("rollback_events", [])]
            if self._preparer.prior is not None and state.get("prior") is not None:
                self._preparer.prior.load_state_dict(state["prior"])
