"""Input preparation: one ``observe()`` batch checked, filtered and pooled into an observation.

This runs in the caller's thread in both modes, so the queued :class:`Observation` holds only
detached copies of what the trainer needs and none of the caller's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specialize.updater.buffer import ReplayBuffer
from specialize.updater.config import UpdaterConfig
from specialize.updater.prior import ClassPrior

# One entry of ``observe(features=...)``: a tensor with one row per sample of the batch, or
# ``(features_k, rows_k)`` holding only the rows ``rows_k`` (batch indices) that ran exit k.
ExitFeatures = Tensor | tuple[Tensor, Tensor]


@dataclass
class Observation:
    """One observe() call, prepared: per early exit ``(features, labels, soft, source)``."""

    num_samples: int
    entries: list[tuple[Tensor, Tensor, Tensor, Tensor] | None]


class ObservationPreparer:
    """Turns the arguments of ``HeadUpdater.observe`` into an :class:`Observation`.

    Args:
        config: The updater configuration (``target``, ``temperature``, ``min_confidence``).
        num_classes: Width of the selected logits.
        num_exits: Exits of the model (the early heads are ``0..num_exits-2``).
        prefixes: Per early head, its parameter-free leading layers (``None``: none), applied
            here so that the buffers keep the pooled vectors.
        buffers: Per early head, its replay buffer (gives the entry dtype and shape).
        counters: The updater's counters; ``observed``, ``accepted``, ``low_confidence`` and
            ``nonfinite_samples`` are counted into it.
    """

    def __init__(self, config: UpdaterConfig, num_classes: int, num_exits: int,
                 prefixes: Sequence[nn.Module | None], buffers: Sequence[ReplayBuffer],
                 counters: dict[str, int]) -> None:
        self.config = config
        self.num_classes = num_classes
        self.num_exits = num_exits
        self.prefixes = prefixes
        self.buffers = buffers
        self.counters = counters
        self.prior = (ClassPrior(num_classes, config.prior_window)
                      if config.pseudo_label == "prior" else None)

    def prepare(self, features: Sequence[ExitFeatures], exit_index: Tensor,
                selected_logits: Tensor, confidence: Tensor,
                valid: Tensor | None) -> Observation:
        """Check one batch, drop what must not teach and pool what does (see ``observe``).

        Raises:
            ValueError: Shapes disagree or needed features are missing.
        """
        with torch.inference_mode(False), torch.no_grad():
            exit_index, logits, confidence, valid = self._check_batch(
                exit_index, selected_logits, confidence, valid)
            teacher = logits
            if self.prior is not None:  # the stream's prior before this batch is counted
                teacher = self.prior.correct(logits)
                self.prior.update(logits.argmax(1)[valid & torch.isfinite(logits).all(1)])
            labels = teacher.argmax(1)
            if self.config.target == "soft":
                soft = F.softmax(teacher.float() / self.config.temperature, dim=1)
                finite = torch.isfinite(soft).all(1)
            else:
                soft = logits.new_zeros((logits.shape[0], 0))
                finite = torch.ones_like(valid)
            finite &= torch.isfinite(logits).all(1) & torch.isfinite(confidence)
            bad = valid & ~finite
            teach = valid & finite & (exit_index > 0)
            if self.config.min_confidence is not None:
                confident = confidence >= self.config.min_confidence
                self.counters["low_confidence"] += int((teach & ~confident).sum())
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
            self.counters["observed"] += num_valid
            self.counters["accepted"] += int(teach.sum())
            self.counters["nonfinite_samples"] += int(bad.sum())
            return Observation(num_valid, entries)

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
            values = _rows_of(features, k, rows, exit_index.shape[0]).detach()
            if self.prefixes[k] is not None:
                values = self.prefixes[k](values)
            values = values.to(self.buffers[k].features.dtype)
            if tuple(values.shape[1:]) != tuple(self.buffers[k].features.shape[1:]):
                raise ValueError(
                    f"head {k} input has entry shape {tuple(values.shape[1:])} after the "
                    f"precomputed layers, the buffer expects "
                    f"{tuple(self.buffers[k].features.shape[1:])} (from model.input_size)"
                )
            bad[rows[~torch.isfinite(values).flatten(1).all(1)]] = True
            out.append((rows, values))
        return out


def _rows_of(features: Sequence[ExitFeatures], k: int, rows: Tensor, size: int) -> Tensor:
    """The ``rows`` (batch indices) of ``features[k]``, given whole or as ``(tensor, rows)``."""
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
