"""The replay buffer of one early exit: bounded, class-balanced, preallocated tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backbones.contract import MultiExitModel
from specialize.updater.config import UpdaterConfig

__all__ = ["ReplayBuffer", "build_buffers"]

_MIB = 2**20


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


def build_buffers(model: MultiExitModel, heads: nn.ModuleList,
                  prefixes: Sequence[nn.Module | None],
                  config: UpdaterConfig) -> list[ReplayBuffer]:
    """One buffer per early head of ``model``, all together within ``config.buffer_mb``.

    Args:
        model: The multi-exit model; one probe input of ``model.input_size`` gives the shapes.
        heads: The trainable early heads (their first parameter gives the dtype and device).
        prefixes: Per early head, its precomputed leading layers (``None``: none); the
            buffers store what they output.
        config: The updater configuration (``target``, ``buffer_mb``).

    Raises:
        ValueError: ``buffer_mb`` is too small to hold one sample.
    """
    num_classes = int(model.num_classes)
    param = next(heads[0].parameters())
    with torch.no_grad():
        probe = torch.zeros((1, *model.input_size), dtype=param.dtype, device=param.device)
        features = model.forward_exits(probe, len(model.heads) - 2).features
    shapes = [tuple((f if prefix is None else prefix(f)).shape[1:])
              for prefix, f in zip(prefixes, features)]
    soft_dim = num_classes if config.target == "soft" else 0
    itemsize = param.element_size()
    per_sample = sum(ReplayBuffer.entry_bytes(s, soft_dim, itemsize) for s in shapes)
    capacity = int(config.buffer_mb * _MIB) // per_sample
    if capacity < 1:
        raise ValueError(
            f"buffer_mb={config.buffer_mb} holds no sample: one entry in every early "
            f"exit's buffer takes {per_sample} bytes; raise buffer_mb to at least "
            f"{per_sample * 64 / _MIB:.4f} (64 samples)"
        )
    return [ReplayBuffer(capacity, shape, num_classes, soft_dim, param.dtype, param.device)
            for shape in shapes]


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
