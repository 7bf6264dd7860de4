"""Online specialization of the early exit heads from the model's own answers.

A sample answered at exit ``j`` teaches the heads of exits ``0..j-1`` (evaluated, not
selected) the selected exit's prediction: a hard label or its distribution softened at a
temperature. Only those heads train; the backbone (gates included) and the final head stay
frozen, so the model can always fall back to its original behaviour.

The module reads like tent's ``tent.py``: :func:`configure_model` freezes everything but the
early heads, :func:`collect_params` returns what trains, :func:`check_model` asserts the
preconditions with messages that say how to fix them, and :meth:`HeadUpdater.reset` returns to
the heads saved at construction.

How the engine drives a :class:`HeadUpdater`::

    with HeadUpdater(model, UpdaterConfig(mode="async")) as updater:   # close() on exit
        for x in stream.inputs(batch_size=1):
            with updater.serving():             # one consistent version of every head
                step = infer(model, x)          # exit choice; features of evaluated heads
            updater.observe(step.features, step.exit_index, step.selected_logits,
                            step.confidence, step.valid)
            updater.audit(exit_index, answered_pred, final_pred)  # optional, see audit()
        updater.flush()                         # wait for queued work (end of run)

``specialize.engine.Engine(model, policy, hooks=[updater], serving=updater.serving)`` does
the same: :meth:`HeadUpdater.on_step` is the engine hook.

``sync`` mode trains inline every ``update_every`` samples (deterministic: for experiments and
tests); ``async`` mode hands observations to a background thread that trains a shadow copy of
the heads and publishes its weights atomically under the lock :meth:`HeadUpdater.serving`
holds, so inference never waits for training and never reads half-written weights.

Memory: when a head starts with parameter-free layers (``AdaptiveAvgPool2d(1)``,
``Flatten``), they are applied once in :meth:`HeadUpdater.observe` and the replay buffer stores
the pooled vector, not the feature map; the updates train the remaining layers on it, which is
mathematically the same as training the whole head on the map.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import logging
import math
import queue
import threading
import traceback
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from configkit import check_choice, check_fields, check_int, check_number
from specialize.anchoring import AnchoredHead, anchor_heads, is_anchored

__all__ = [
    "HeadUpdater",
    "ReplayBuffer",
    "UpdaterConfig",
    "check_model",
    "collect_params",
    "configure_model",
]

_LOG = logging.getLogger(__name__)
STRATEGIES = ("plain", "anchored")
_STATE_VERSION = 1
_MIB = 2**20
_STOP = object()  # queue sentinel that ends the background thread
# Parameter-free, deterministic layers that may be applied once at observe time.
_PRECOMPUTABLE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d,
                  nn.Flatten, nn.Identity)

# One entry of ``observe(features=...)``: a tensor with one row per sample of the batch, or
# ``(features_k, rows_k)`` holding only the rows ``rows_k`` (batch indices) that ran exit k.
ExitFeatures = Tensor | tuple[Tensor, Tensor]


@dataclass
class UpdaterConfig:
    """How the early heads are specialized (one field per knob; validated on construction)."""

    # "sync": update inline every update_every samples (deterministic); "async": background
    # thread trains a shadow copy of the heads and publishes it atomically
    mode: str = "sync"
    # "plain": serve the specialized early heads as they are; "anchored": serve each as a
    # mixture with its frozen original head (specialize.anchoring), so that inputs the
    # original head doubts are not answered early because the specialized head is sure
    strategy: str = "anchored"
    # anchored only: weight of the specialized head in the mixture, in (0, 1)
    anchor_weight: float = 0.5
    # pseudo-label kind: "hard" (argmax of the selected exit) or "soft" (its softened softmax)
    target: str = "hard"
    # softening temperature of "soft" targets; the student is softened alike and the loss
    # scaled by temperature**2 (Hinton distillation); ignored for "hard"
    temperature: float = 2.0
    # samples whose selected exit's confidence is below this floor do not teach (None: all do)
    min_confidence: float | None = None
    # run one update round every this many samples that reach the trainer (valid rows of
    # observe() calls; in async mode, batches dropped from a full queue do not count)
    update_every: int = 32
    # mini-batch size drawn from each exit's replay buffer per step
    batch_size: int = 128
    # optimizer steps per update round
    steps_per_update: int = 1
    # "adam" or "sgd" (the first recipe: sgd, lr 0.01, batch_size 32; see the README's table)
    optimizer: str = "adam"
    # learning rate
    lr: float = 0.001
    # SGD momentum (ignored by adam)
    momentum: float = 0.9
    # L2 weight decay
    weight_decay: float = 0.0
    # cap on all replay buffers together, in MiB (2**20 bytes)
    buffer_mb: float = 16.0
    # max gradient L2 norm per head (None: no clipping)
    grad_clip: float | None = 1.0
    # seed of the mini-batch sampling generator
    seed: int = 0
    # async only: observation batches queued for the thread; more are dropped (and counted)
    queue_size: int = 64
    # health: audited early answers that form the pre-specialization disagreement baseline
    audit_baseline: int = 256
    # health: audited early answers per window (the windowed disagreement rate)
    audit_window: int = 256
    # health: a window degrades when its rate exceeds the baseline rate by more than this
    audit_margin: float = 0.05
    # health: roll the heads back when a window degrades (False: only count it)
    rollback: bool = True
    # False: observe() is a no-op and the heads never change (a baseline run)
    enabled: bool = True

    def __post_init__(self) -> None:
        check_fields(self)  # types: ints are ints, bools are bools, numbers become floats
        check_choice("mode", self.mode, ("sync", "async"))
        check_choice("strategy", self.strategy, STRATEGIES)
        check_number("anchor_weight", self.anchor_weight, gt=0, lt=1)
        check_choice("target", self.target, ("hard", "soft"))
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        check_number("temperature", self.temperature, gt=0)
        check_number("min_confidence", self.min_confidence, optional=True)
        for name in ("update_every", "batch_size", "steps_per_update", "queue_size",
                     "audit_baseline", "audit_window"):
            check_int(name, getattr(self, name), ge=1)
        check_number("lr", self.lr, gt=0)
        check_number("buffer_mb", self.buffer_mb, gt=0)
        check_number("momentum", self.momentum, ge=0, lt=1)
        check_number("weight_decay", self.weight_decay, ge=0)
        check_number("audit_margin", self.audit_margin, ge=0)
        check_number("grad_clip", self.grad_clip, gt=0, optional=True)


# --------------------------------------------------------------------------------------------
# tent-style model preparation


def configure_model(model: nn.Module) -> nn.Module:
    """Prepare a multi-exit model for head specialization (in place).

    Puts the model in evaluation mode (the frozen backbone's BatchNorm statistics must not
    move during inference) and turns ``requires_grad`` off everywhere except in the heads of
    exits ``0..K-2``. The backbone, its gates and the final head stay frozen.

    Args:
        model: A ``MultiExitNet`` (anything with a ``heads`` ``nn.ModuleList``).

    Returns:
        The same model.
    """
    model.eval()
    model.requires_grad_(False)
    for head in model.heads[:-1]:
        _trainable(head).requires_grad_(True)
    return model


def _trainable(head: nn.Module) -> nn.Module:
    """The part of an exit head that specializes: an anchored head's ``spec``, else all."""
    return head.spec if isinstance(head, AnchoredHead) else head


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The parameters the updater trains: those of heads ``0..K-2`` that require grad.

    Args:
        model: A model prepared with :func:`configure_model`.

    Returns:
        ``(params, names)`` with names as in ``model.named_parameters()`` (``heads.0.2.weight``,
        ``heads.0.spec.2.weight`` when anchored).
    """
    params, names = [], []
    for index, head in enumerate(model.heads[:-1]):
        prefix = f"heads.{index}.spec." if isinstance(head, AnchoredHead) else f"heads.{index}."
        for name, param in _trainable(head).named_parameters():
            if param.requires_grad:
                params.append(param)
                names.append(prefix + name)
    return params, names


def check_model(model: nn.Module) -> None:
    """Assert that ``model`` can be specialized safely; each message says how to fix it.

    Args:
        model: The model given to :class:`HeadUpdater`.

    Raises:
        AssertionError: The model has no early heads, is in training mode, or has trainable
            parameters outside the early heads (backbone, gates or final head).
    """
    heads = getattr(model, "heads", None)
    _require(isinstance(heads, nn.ModuleList),
             "the updater needs a multi-exit model with a `heads` nn.ModuleList; build one "
             "with backbones.create_backbone(...)")
    _require(len(heads) >= 2,
             f"the model has {len(heads)} exit; specialization needs at least 2 so that an "
             "early head can learn from a later exit (check exit_stages)")
    _require(not model.training,
             "the model is in training mode, so inference would update the frozen backbone's "
             "BatchNorm statistics; call model.eval() (configure_model(model) does)")
    early = {id(p) for head in heads[:-1] for p in _trainable(head).parameters()}
    leaking = [name for name, p in model.named_parameters()
               if p.requires_grad and id(p) not in early]
    _require(not leaking,
             f"{len(leaking)} parameter(s) outside the early heads require grad (e.g. "
             f"{leaking[0] if leaking else ''}); the backbone, its gates and the final head "
             "must stay frozen: call specialize.updater.configure_model(model)")
    _require(bool(collect_params(model)[0]),
             "no parameter of the early heads requires grad, so there is nothing to "
             "specialize: call specialize.updater.configure_model(model)")


def _require(condition: bool, message: str) -> None:
    # An explicit raise rather than `assert`, so the checks survive `python -O`.
    if not condition:
        raise AssertionError(message)


# --------------------------------------------------------------------------------------------
# replay buffer


class ReplayBuffer:
    """Bounded, class-balanced store of one exit's training entries; preallocated tensors.

    An entry is (head input after the precomputed layers, hard pseudo-label, soft target,
    selected exit). Inserts are vectorised. When an insert overflows the capacity, the
    buffer keeps what remains after adding all new entries and then repeatedly removing the
    oldest entry of the most frequent pseudo-class (ties: the lowest class index) until the
    entries fit; new entries may thus replace old ones of crowded classes, never those of a
    rarer class. Slots are unordered; ages are insertion sequence numbers.

    Args:
        capacity: Maximum number of entries.
        feature_shape: Shape of one stored head input.
        num_classes: Number of classes (pseudo-labels lie in ``[0, num_classes)``).
        soft_dim: Width of a stored soft target (``num_classes``, or 0 for hard targets).
        dtype: Feature dtype.
        device: Where the tensors live.
    """

    def __init__(self, capacity: int, feature_shape: Sequence[int], num_classes: int,
                 soft_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.num_classes = num_classes
        self.features = torch.zeros((capacity, *feature_shape), dtype=dtype, device=device)
        self.labels = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.soft_targets = torch.zeros((capacity, soft_dim), dtype=dtype, device=device)
        self.source_exit = torch.zeros(capacity, dtype=torch.int8, device=device)
        self.seq = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.fill = 0
        self.next_seq = 0

    @staticmethod
    def entry_bytes(feature_shape: Sequence[int], soft_dim: int, itemsize: int = 4) -> int:
        """Bytes one entry occupies (feature, label, soft target, selected exit, age)."""
        return (math.prod(feature_shape) + soft_dim) * itemsize + 8 + 1 + 8

    @property
    def nbytes(self) -> int:
        """Bytes held by the preallocated tensors."""
        return sum(t.nbytes for t in self._tensors())

    def _tensors(self) -> tuple[Tensor, ...]:
        return self.features, self.labels, self.soft_targets, self.source_exit, self.seq

    def __len__(self) -> int:
        return self.fill

    def class_counts(self) -> Tensor:
        """Entries per pseudo-class, ``(num_classes,)`` int64."""
        return torch.bincount(self.labels[: self.fill], minlength=self.num_classes)

    def clear(self) -> None:
        """Forget every entry (the tensors stay allocated)."""
        self.fill = 0

    def add(self, features: Tensor, labels: Tensor, soft_targets: Tensor,
            source_exit: Tensor) -> None:
        """Insert ``n`` entries, evicting class-balanced when full (see the class docstring).

        Args:
            features: ``(n, *feature_shape)``.
            labels: ``(n,)`` int64 hard pseudo-labels.
            soft_targets: ``(n, soft_dim)``.
            source_exit: ``(n,)`` the exit that answered each sample.
        """
        count = labels.shape[0]
        if count == 0:
            return
        seq = torch.arange(self.next_seq, self.next_seq + count, device=self.seq.device)
        self.next_seq += count
        new = (features, labels, soft_targets, source_exit, seq)
        if self.fill + count <= self.capacity:
            for dst, src in zip(self._tensors(), new):
                dst[self.fill: self.fill + count] = src
            self.fill += count
            return
        keep = _balanced_keep(torch.cat([self.labels[: self.fill], labels]),
                              torch.cat([self.seq[: self.fill], seq]),
                              self.capacity, self.num_classes)
        keep_old, keep_new = keep[: self.fill], keep[self.fill:]
        slots = torch.cat([torch.nonzero(~keep_old).squeeze(1),
                           torch.arange(self.fill, self.capacity, device=keep.device)])
        for dst, src in zip(self._tensors(), new):
            dst.index_copy_(0, slots, src[keep_new].to(dst.dtype))
        self.fill = self.capacity

    def sample(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``min(size, len(self))`` distinct entries uniformly.

        Args:
            size: Mini-batch size.
            generator: CPU generator (the only source of randomness).

        Returns:
            ``(features, labels, soft_targets)`` of the drawn entries.
        """
        index = torch.randperm(self.fill, generator=generator)[:size]
        index = index.to(self.labels.device)
        return self.features[index], self.labels[index], self.soft_targets[index]

    def state_dict(self) -> dict[str, Any]:
        """The filled part of the buffer (tensors and ints only)."""
        names = ("features", "labels", "soft_targets", "source_exit", "seq")
        state: dict[str, Any] = {n: t[: self.fill].clone() for n, t in zip(names, self._tensors())}
        state.update(fill=self.fill, next_seq=self.next_seq)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same capacity and shapes)."""
        fill = int(state["fill"])
        names = ("features", "labels", "soft_targets", "source_exit", "seq")
        for name, dst in zip(names, self._tensors()):
            src = state[name]
            if fill > self.capacity or tuple(src.shape[1:]) != tuple(dst.shape[1:]):
                raise ValueError(
                    f"replay buffer state does not fit: {name} has shape {tuple(src.shape)} for "
                    f"capacity {self.capacity} and entry shape {tuple(dst.shape[1:])}; load it "
                    "with the same model, target and buffer_mb it was saved with"
                )
            dst[:fill] = src
        self.fill = fill
        self.next_seq = int(state["next_seq"])


def _balanced_keep(labels: Tensor, seq: Tensor, capacity: int, num_classes: int) -> Tensor:
    """Mask of the entries kept when trimming to ``capacity`` (oldest of the largest class)."""
    counts = torch.bincount(labels, minlength=num_classes)
    removals = _water_fill(counts, labels.shape[0] - capacity)
    by_age = torch.argsort(seq)
    order = by_age[torch.argsort(labels[by_age], stable=True)]  # by class, then by age
    starts = torch.cumsum(counts, 0) - counts
    sorted_labels = labels[order]
    rank = torch.arange(order.shape[0], device=labels.device) - starts[sorted_labels]
    keep = torch.ones_like(labels, dtype=torch.bool)
    keep[order[rank < removals[sorted_labels]]] = False
    return keep


def _water_fill(counts: Tensor, excess: int) -> Tensor:
    """Per-class removals of ``excess`` items taken one by one from the largest class.

    Ties go to the lowest class index. Closed form: lower every count to a level ``L`` and
    take the remainder one each from the first classes sitting at ``L``.
    """
    sorted_counts, _ = torch.sort(counts, descending=True)
    ranks = torch.arange(1, counts.shape[0] + 1, device=counts.device)
    removed_to_level = torch.cumsum(sorted_counts, 0) - ranks * sorted_counts  # nondecreasing
    top = int((removed_to_level <= excess).sum()) - 1
    level = int(sorted_counts[top]) - (excess - int(removed_to_level[top])) // (top + 1)
    removals = (counts - level).clamp(min=0)
    remainder = excess - int(removals.sum())
    if remainder:
        at_level = torch.nonzero(counts >= level).squeeze(1)[:remainder]
        removals[at_level] += 1
    return removals


# --------------------------------------------------------------------------------------------
# training of the early heads (owned by one thread: the caller in sync, the worker in async)


@dataclass
class _Observation:
    """One observe() call, prepared: per early exit ``(features, labels, soft, source)``."""

    num_samples: int
    entries: list[tuple[Tensor, Tensor, Tensor, Tensor] | None]


class _HeadTrainer:
    """Trains the trainable part of heads ``0..K-2`` from their replay buffers."""

    def __init__(self, heads: nn.ModuleList, splits: Sequence[int],
                 buffers: list[ReplayBuffer], config: UpdaterConfig) -> None:
        self.heads = heads
        self.bodies = [nn.Sequential(*list(head)[split:]) if split else head
                       for head, split in zip(heads, splits)]
        self.params = [[p for p in body.parameters() if p.requires_grad] for body in self.bodies]
        self.buffers = buffers
        self.config = config
        self.optimizer = self._build_optimizer()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.counters = {"samples": 0, "updates": 0, "steps": 0, "skipped_losses": 0,
                         "nonfinite_params": 0}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for group in self.params for p in group]
        cfg = self.config
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    def add(self, observation: _Observation) -> tuple[int, bool]:
        """Buffer an observation and run the update rounds it completes.

        Returns:
            ``(rounds run, whether the head parameters are still all finite)``.
        """
        for buffer, entry in zip(self.buffers, observation.entries):
            if entry is not None:
                buffer.add(*entry)
        before = self.counters["samples"]
        self.counters["samples"] += observation.num_samples
        rounds = self.counters["samples"] // self.config.update_every
        rounds -= before // self.config.update_every
        for _ in range(rounds):
            for _ in range(self.config.steps_per_update):
                self._step()
            self.counters["updates"] += 1
        finite = rounds == 0 or all(torch.isfinite(p).all() for g in self.params for p in g)
        return rounds, bool(finite)

    def _step(self) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            losses, trained = [], []
            for index, (body, buffer) in enumerate(zip(self.bodies, self.buffers)):
                if not buffer.fill:
                    continue
                loss = self._loss(body, *buffer.sample(self.config.batch_size, self.generator))
                if not torch.isfinite(loss):
                    self.counters["skipped_losses"] += 1
                    continue
                losses.append(loss)
                trained.append(index)
            if not losses:
                return
            torch.stack(losses).sum().backward()
            for index in trained:
                self._clip(self.params[index])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # free the gradients between rounds
            self.counters["steps"] += 1

    def _loss(self, body: nn.Module, features: Tensor, labels: Tensor, soft: Tensor) -> Tensor:
        logits = body(features)
        if self.config.target == "hard":
            return F.cross_entropy(logits, labels)
        temperature = self.config.temperature
        log_probs = F.log_softmax(logits / temperature, dim=1)
        return -(soft * log_probs).sum(1).mean() * temperature**2

    def _clip(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(norm):  # skip this head's step
            self.counters["skipped_losses"] += 1
            for p in params:
                p.grad = None
        elif self.config.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.grad_clip, norm)

    def restore(self, heads_state: list[dict[str, Tensor]]) -> None:
        """Load head weights, forget the optimizer state and empty the buffers."""
        _load_heads(self.heads, heads_state)
        self.optimizer = self._build_optimizer()
        for buffer in self.buffers:
            buffer.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "heads": _snapshot(self.heads),
            "optimizer": self.optimizer.state_dict(),
            "buffers": [buffer.state_dict() for buffer in self.buffers],
            "rng": self.generator.get_state(),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_heads(self.heads, state["heads"])
        self.optimizer = self._build_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the current config's hyperparameters win
            group.update(lr=self.config.lr, weight_decay=self.config.weight_decay)
            if "momentum" in group:
                group["momentum"] = self.config.momentum
        for buffer, buffer_state in zip(self.buffers, state["buffers"]):
            buffer.load_state_dict(buffer_state)
        self.generator.set_state(state["rng"])
        self.counters.update({k: int(v) for k, v in state["counters"].items()})


def _snapshot(heads: nn.ModuleList) -> list[dict[str, Tensor]]:
    return [{k: v.detach().clone() for k, v in head.state_dict().items()} for head in heads]


def _load_heads(heads: nn.ModuleList, state: list[dict[str, Tensor]]) -> None:
    for head, head_state in zip(heads, state, strict=True):
        head.load_state_dict(head_state)


def _head_tensors(heads: nn.ModuleList) -> list[Tensor]:
    return [t for head in heads for t in head.state_dict(keep_vars=True).values()]


def _precomputed_prefix(head: nn.Module) -> int:
    """How many leading layers of ``head`` are parameter-free and may run at observe time."""
    if not isinstance(head, nn.Sequential):
        return 0
    count = 0
    for layer in head:
        if not isinstance(layer, _PRECOMPUTABLE) or any(True for _ in layer.parameters()):
            break
        count += 1
    return count if count < len(head) else 0


# --------------------------------------------------------------------------------------------
# the updater


class HeadUpdater:
    """Specializes the early exit heads of a multi-exit model online (see the module doc).

    Construction calls :func:`configure_model` and :func:`check_model`, anchors the early heads
    when ``config.strategy == "anchored"`` (:func:`specialize.anchoring.anchor_heads`: the
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

    def __init__(self, model: nn.Module, config: UpdaterConfig | None = None) -> None:
        self.config = config or UpdaterConfig()
        self.model = configure_model(model)
        check_model(model)
        self.num_exits = len(model.heads)
        self.num_classes = int(model.num_classes)
        self.error: BaseException | None = None
        self._serving_heads = self._early_heads(model)
        self._splits = [_precomputed_prefix(head) for head in self._serving_heads]
        self._prefixes = [head[:split] if split else None
                          for head, split in zip(self._serving_heads, self._splits)]
        self._buffers = self._build_buffers()  # may raise: anchor only after it succeeded
        if self.config.strategy == "anchored" and self.config.enabled:
            anchor_heads(model, self.config.anchor_weight)  # wraps the same head modules
        early = {id(p) for p in self._serving_heads.parameters()}
        self._frozen = [p for p in model.parameters() if id(p) not in early]
        self._base = _snapshot(self._serving_heads)
        self._last_good = self._base
        train_heads = (self._serving_heads if self.config.mode == "sync"
                       else copy.deepcopy(self._serving_heads))
        self._trainer = _HeadTrainer(train_heads, self._splits, self._buffers, self.config)
        self._serving_tensors = _head_tensors(self._serving_heads)
        self._train_tensors = _head_tensors(train_heads)
        self._lock = threading.RLock()  # serving() vs publishing and restores
        self._train_lock = threading.Lock()  # held by whoever touches the trainer
        self._epoch = 0  # bumped by every restore; stale shadow weights are never published
        self._trainer_epoch = 0
        self._pending: list[dict[str, Tensor]] | None = None
        self._counters = {"observed": 0, "accepted": 0, "low_confidence": 0,
                          "nonfinite_samples": 0, "dropped": 0, "published": 0,
                          "rollbacks": 0, "degraded_windows": 0, "healthy_windows": 0,
                          "resets": 0}
        self._audit = {"baseline_n": 0, "baseline_disagree": 0, "window_n": 0,
                       "window_disagree": 0, "audited": 0, "rolled_back_last": 0,
                       "last_window_rate": math.nan}
        self._worker_dropped = 0  # written by the worker only
        self._closed = False
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        if self.config.mode == "async" and self.config.enabled:
            self._start_thread()

    # ---- construction helpers

    def _early_heads(self, model: nn.Module) -> nn.ModuleList:
        """The early heads that train (an anchored model's ``spec`` parts)."""
        if self.config.strategy == "plain" and is_anchored(model):
            raise ValueError(
                "the model's heads are anchored (by an earlier anchored HeadUpdater) but this "
                "updater's strategy is 'plain'; use strategy='anchored' or first call "
                "specialize.anchoring.unanchor_heads(model)")
        return nn.ModuleList(_trainable(head) for head in list(model.heads)[:-1])

    def _build_buffers(self) -> list[ReplayBuffer]:
        param = next(self._serving_heads[0].parameters())
        with torch.no_grad():
            probe = torch.zeros((1, *self.model.input_size), dtype=param.dtype,
                                device=param.device)
            features = self.model.forward_exits(probe, self.num_exits - 2).features
        shapes = [tuple((f if prefix is None else prefix(f)).shape[1:])
                  for prefix, f in zip(self._prefixes, features)]
        soft_dim = self.num_classes if self.config.target == "soft" else 0
        itemsize = param.element_size()
        per_sample = sum(ReplayBuffer.entry_bytes(s, soft_dim, itemsize) for s in shapes)
        capacity = int(self.config.buffer_mb * _MIB) // per_sample
        if capacity < 1:
            raise ValueError(
                f"buffer_mb={self.config.buffer_mb} holds no sample: one entry in every early "
                f"exit's buffer takes {per_sample} bytes; raise buffer_mb to at least "
                f"{per_sample * 64 / _MIB:.4f} (64 samples)"
            )
        return [ReplayBuffer(capacity, shape, self.num_classes, soft_dim, param.dtype,
                             param.device) for shape in shapes]

    def _start_thread(self) -> None:
        self._queue = queue.Queue(maxsize=self.config.queue_size)
        self._thread = threading.Thread(target=self._worker, name="HeadUpdater", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            updater = ref()
            if updater is not None:
                updater.close()

        self._atexit_hook = close_at_exit
        atexit.register(close_at_exit)

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
        observation = self._prepare(features, exit_index, selected_logits, confidence, valid)
        if self.config.mode == "sync":
            self._train(observation)
            return
        if self.error is not None:
            self._counters["dropped"] += observation.num_samples
            return
        try:
            self._queue.put_nowait(observation)
        except queue.Full:
            self._counters["dropped"] += observation.num_samples

    def on_step(self, output: Any) -> None:
        """Engine hook: ``observe`` one ``specialize.engine.StepOutput``."""
        self.observe(output.features, output.exit_index, output.selected_logits,
                     output.confidence, output.valid)

    def _prepare(self, features: Sequence[ExitFeatures], exit_index: Tensor,
                 selected_logits: Tensor, confidence: Tensor,
                 valid: Tensor | None) -> _Observation:
        with torch.inference_mode(False), torch.no_grad():
            exit_index, logits, confidence, valid = self._check_batch(
                exit_index, selected_logits, confidence, valid)
            labels = logits.argmax(1)
            if self.config.target == "soft":
                soft = F.softmax(logits.float() / self.config.temperature, dim=1)
                finite = torch.isfinite(soft).all(1)
            else:
                soft = logits.new_zeros((logits.shape[0], 0))
                finite = torch.ones_like(valid)
            finite &= torch.isfinite(logits).all(1) & torch.isfinite(confidence)
            bad = valid & ~finite
            teach = valid & finite & (exit_index > 0)
            if self.config.min_confidence is not None:
                confident = confidence >= self.config.min_confidence
                self._counters["low_confidence"] += int((teach & ~confident).sum())
                teach &= confident
            pooled = self._pool_needed(features, exit_index, teach, bad)
            teach &= ~bad
            entries = []
            for rows, values in pooled:
                if rows is None:
                    entries.append(None)
                    continue
                keep = ~bad[rows]
                rows, values = rows[keep], values[keep]
                entries.append((values, labels[rows], soft[rows].to(values.dtype),
                                exit_index[rows].to(torch.int8)) if rows.numel() else None)
            num_valid = int(valid.sum())
            self._counters["observed"] += num_valid
            self._counters["accepted"] += int(teach.sum())
            self._counters["nonfinite_samples"] += int(bad.sum())
            return _Observation(num_valid, entries)

    def _check_batch(self, exit_index: Tensor, logits: Tensor, confidence: Tensor,
                     valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        size = exit_index.shape[0] if exit_index.dim() == 1 else -1
        if size < 0 or logits.shape != (size, self.num_classes) or confidence.shape != (size,):
            raise ValueError(
                "observe() expects exit_index (B,), selected_logits (B, "
                f"{self.num_classes}) and confidence (B,); got {tuple(exit_index.shape)}, "
                f"{tuple(logits.shape)} and {tuple(confidence.shape)}"
            )
        if exit_index.dtype.is_floating_point or exit_index.dtype == torch.bool:
            raise ValueError(f"exit_index must hold integers, got dtype {exit_index.dtype}")
        if valid is None:
            valid = torch.ones(size, dtype=torch.bool, device=exit_index.device)
        elif valid.shape != (size,) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape ({size},), got "
                             f"{valid.dtype} {tuple(valid.shape)}")
        exit_index = torch.where(valid, exit_index.long(), 0)  # invalid rows may hold -1
        if size and (int(exit_index.min()) < 0 or int(exit_index.max()) >= self.num_exits):
            raise ValueError(f"exit_index of valid rows must lie in [0, {self.num_exits - 1}]")
        return exit_index, logits.detach(), confidence.detach(), valid

    def _pool_needed(self, features: Sequence[ExitFeatures], exit_index: Tensor, teach: Tensor,
                     bad: Tensor) -> list[tuple[Tensor | None, Tensor | None]]:
        """Per early exit: the batch rows it learns from and their precomputed head inputs.

        Marks in ``bad`` (in place) the samples with a non-finite needed feature.
        """
        out: list[tuple[Tensor | None, Tensor | None]] = []
        for k in range(self.num_exits - 1):
            rows = torch.nonzero(teach & (exit_index > k)).squeeze(1)
            if rows.numel() == 0:
                out.append((None, None))
                continue
            values = self._rows_of(features, k, rows, exit_index.shape[0]).detach()
            if self._prefixes[k] is not None:
                values = self._prefixes[k](values)
            values = values.to(self._buffers[k].features.dtype)
            if tuple(values.shape[1:]) != tuple(self._buffers[k].features.shape[1:]):
                raise ValueError(
                    f"head {k} input has entry shape {tuple(values.shape[1:])} after the "
                    f"precomputed layers, the buffer expects "
                    f"{tuple(self._buffers[k].features.shape[1:])} (from model.input_size)"
                )
            bad[rows[~torch.isfinite(values).flatten(1).all(1)]] = True
            out.append((rows, values))
        return out

    def _rows_of(self, features: Sequence[ExitFeatures], k: int, rows: Tensor,
                 size: int) -> Tensor:
        if k >= len(features):
            raise ValueError(
                f"features has {len(features)} entries, but samples answered at exit "
                f"{k + 1} or later need the input of head {k}; pass features[0..j-1] for "
                "every sample answered at exit j"
            )
        entry = features[k]
        if isinstance(entry, Tensor):
            if entry.shape[0] != size:
                raise ValueError(f"features[{k}] has {entry.shape[0]} rows, the batch has {size}; "
                                 "pass (features_k, rows_k) for a subset of the batch")
            return entry.index_select(0, rows.to(entry.device))
        tensor, held = entry
        position = torch.full((size,), -1, dtype=torch.int64, device=rows.device)
        position[held.to(rows.device).long()] = torch.arange(held.shape[0], device=rows.device)
        needed = position[rows]
        if bool((needed < 0).any()):
            raise ValueError(f"features[{k}] lacks rows of samples answered after exit {k}: "
                             f"{rows[needed < 0][:5].tolist()}")
        return tensor.index_select(0, needed.to(tensor.device))

    # ---- training (the caller's thread in sync mode, the worker's in async mode)

    def _train(self, observation: _Observation) -> None:
        with self._train_lock:
            self._sync_epoch()
            epoch = self._trainer_epoch
            sync = self.config.mode == "sync"
            if sync and (self.model.training or any(p.requires_grad for p in self._frozen)):
                check_model(self.model)  # raises, saying what changed since construction
            with self._lock if sync else nullcontext():  # sync trains the serving heads
                rounds, finite = self._trainer.add(observation)
                if not finite:  # a step overflowed: back to the last good heads
                    self._trainer.counters["nonfinite_params"] += 1
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
            return True

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self.error is None:
                    self._train(item)
                else:  # after a failure the shadow state is suspect: drain only
                    self._worker_dropped += item.num_samples
            except BaseException as err:  # noqa: BLE001 - reported, serving continues
                self._report(err)
            finally:
                self._queue.task_done()

    def _report(self, err: BaseException) -> None:
        self.error = err
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        _LOG.error("HeadUpdater background thread failed; serving continues with the last "
                   "published heads", exc_info=err)
        warnings.warn(
            "HeadUpdater background thread failed; serving continues with the last published "
            f"heads and further observations are dropped (see updater.error):\n{text}",
            RuntimeWarning, stacklevel=2,
        )

    # ---- control

    def flush(self) -> None:
        """Wait until every queued observation has been trained on (async; no-op in sync)."""
        if self._queue is not None:
            self._queue.join()

    def close(self) -> None:
        """Finish queued work and stop the background thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            atexit.unregister(self._atexit_hook)

    def __enter__(self) -> HeadUpdater:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reset(self) -> None:
        """Return exactly to the heads saved at construction; empty buffers and optimizer.

        Counters, the sampling generator and the audit baseline carry on.
        """
        self.flush()
        with self._train_lock:
            self._restore(self._base)
            self._sync_epoch()
        self._last_good = self._base
        self._audit.update(window_n=0, window_disagree=0, rolled_back_last=0)
        self._counters["resets"] += 1

    def _restore(self, heads_state: list[dict[str, Tensor]]) -> None:
        """Serve ``heads_state`` now; the trainer follows (inline in sync, next item in async)."""
        with self._lock:
            _load_heads(self._serving_heads, heads_state)
            self._epoch += 1
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
        disagree = torch.cumsum((answered_pred != final_pred)[early].long(), 0)
        total = disagree.shape[0]
        state, cfg, done, rolled = self._audit, self.config, 0, False
        state["audited"] += total
        while done < total:  # one pass per baseline/window boundary inside the batch
            phase = "baseline" if state["baseline_n"] < cfg.audit_baseline else "window"
            room = (cfg.audit_baseline if phase == "baseline" else cfg.audit_window)
            take = min(room - state[f"{phase}_n"], total - done)
            state[f"{phase}_n"] += take
            state[f"{phase}_disagree"] += int(disagree[done + take - 1]) - (
                int(disagree[done - 1]) if done else 0)
            done += take
            if phase == "window" and state["window_n"] == cfg.audit_window:
                rolled |= self._close_window()
        return rolled

    def _close_window(self) -> bool:
        state, cfg = self._audit, self.config
        baseline = state["baseline_disagree"] / state["baseline_n"]
        rate = state["window_disagree"] / state["window_n"]
        state.update(window_n=0, window_disagree=0, last_window_rate=rate)
        if rate <= baseline + cfg.audit_margin:
            with self._lock:
                self._last_good = _snapshot(self._serving_heads)
            self._counters["healthy_windows"] += 1
            state["rolled_back_last"] = 0
            return False
        self._counters["degraded_windows"] += 1
        if not cfg.rollback:
            return False
        if state["rolled_back_last"]:
            self._last_good = self._base
        self._restore(self._last_good)
        if self.config.mode == "sync":
            with self._train_lock:
                self._sync_epoch()
        self._counters["rollbacks"] += 1
        state["rolled_back_last"] = 1
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
            ``baseline_disagreement``, ``last_window_disagreement`` and ``error``.
        """
        trainer = self._trainer.counters
        audit = self._audit
        baseline = (audit["baseline_disagree"] / audit["baseline_n"]
                    if audit["baseline_n"] == self.config.audit_baseline else None)
        rate = audit["last_window_rate"]
        return {
            "mode": self.config.mode,
            "enabled": self.config.enabled,
            **self._counters,
            "dropped": self._counters["dropped"] + self._worker_dropped,
            "samples_trained": trainer["samples"],
            "updates": trainer["updates"],
            "steps": trainer["steps"],
            "skipped_losses": trainer["skipped_losses"],
            "nonfinite_params": trainer["nonfinite_params"],
            "buffer_fill": [buffer.fill for buffer in self._buffers],
            "buffer_capacity": [buffer.capacity for buffer in self._buffers],
            "buffer_bytes": sum(buffer.nbytes for buffer in self._buffers),
            "audited": audit["audited"],
            "baseline_disagreement": baseline,
            "last_window_disagreement": None if math.isnan(rate) else rate,
            "error": None if self.error is None else repr(self.error),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: heads, optimizer, buffers, RNG, counters.

        Tensors and plain Python values only (``torch.load(weights_only=True)`` reads it). In
        ``async`` mode queued work is flushed first. The backbone is not included: save the
        model's own checkpoint alongside.
        """
        self.flush()
        with self._train_lock:
            self._sync_epoch()
            audit = dict(self._audit)
            if math.isnan(audit["last_window_rate"]):
                audit["last_window_rate"] = None
            return {
                "version": _STATE_VERSION,
                "config": dataclasses.asdict(self.config),
                "num_exits": self.num_exits,
                "trainer": self._trainer.state_dict(),
                "serving_heads": _snapshot(self._serving_heads),
                "base_heads": [dict(s) for s in self._base],
                "last_good_heads": [dict(s) for s in self._last_good],
                "counters": dict(self._counters),
                "audit": audit,
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
                _load_heads(self._serving_heads, state["serving_heads"])
                self._pending = None
                self._trainer_epoch = self._epoch
            self._base = state["base_heads"]
            self._last_good = state["last_good_heads"]
            self._counters.update({k: int(v) for k, v in state["counters"].items()})
            audit = dict(state["audit"])
            if audit["last_window_rate"] is None:
                audit["last_window_rate"] = math.nan
            self._audit.update(audit)
