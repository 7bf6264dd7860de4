"""Replayable streams: seeded sample sequences whose labels only the evaluator sees.

:func:`build_stream` turns a :class:`~streams.scenarios.ScenarioConfig` into a
:class:`Stream`:

1. load the ``split`` of the data set;
2. hold out, per class, ``holdout_fraction`` of its samples (seeded); the rest is the pool;
3. draw the class of every position (:func:`streams.scenarios.generate_labels`);
4. give each position a pool sample of its class. Each class's pool is walked in a seeded
   random order; a stream that needs more samples of a class than its pool holds starts a
   fresh random order, i.e. samples are reused (drawn with replacement across passes) only
   after every sample of the class was used once.

The engine reads :meth:`Stream.inputs` (normalised float32 batches, no labels); scoring code
reads :meth:`Stream.evaluator`, the only public way to the labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streams.datasets import ArrayDataset, load_dataset
from streams.scenarios import (
    RNG_DRAW,
    RNG_HOLDOUT,
    ScenarioConfig,
    generate_labels,
    seeded_rng,
    target_classes,
)
from streams.transforms import InputTransform

__all__ = ["Stream", "StreamEvaluator", "build_stream", "format_description"]


@dataclass(frozen=True, eq=False, repr=False)
class StreamEvaluator:
    """The evaluator-side view of a stream: the true label of every position.

    Attributes:
        labels: int64 ``(len(stream),)``, the class of each position.
        indices: int64 ``(len(stream),)``, each position's sample index in the data set
            split the stream draws from.
        classes: Sorted class ids the stream targets.
        class_names: Names of all classes of the data set.
        phase_boundaries: Start position of each phase (``(0,)`` for one phase).
    """

    labels: torch.Tensor
    indices: torch.Tensor
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    phase_boundaries: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"StreamEvaluator(length={len(self)}, classes={list(self.classes)})"

    def correct(self, predictions: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Whether each prediction matches the label of its position.

        Args:
            predictions: Predicted class ids for positions ``start .. start + len - 1``.
            start: Stream position of the first prediction.

        Returns:
            Bool tensor shaped like ``predictions``.
        """
        stop = start + predictions.shape[0]
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"positions {start}..{stop} lie outside the stream (0..{len(self)})")
        return predictions.to(torch.int64).cpu() == self.labels[start:stop]


class Stream:
    """A seeded, replayable sequence of images drawn from a data set split.

    Build one with :func:`build_stream`. Iterating :meth:`inputs` twice gives identical
    batches. Labels are not reachable from :meth:`inputs`; use :meth:`evaluator` to score.

    Attributes:
        config: The scenario that built the stream.
        name: The scenario's name.
        transform: Turns uint8 pool images into the model's float32 inputs.
        classes: Sorted class ids the stream targets (for phases: of all phases).
        phase_boundaries: Start position of each phase (``[0]`` for one phase).
        num_classes: Number of classes of the data set.
        class_names: Names of all classes of the data set.
        eval_in: Held-out samples of ``classes`` (``None`` when nothing is held out).
        eval_out: Held-out samples of the other classes (``None`` when there are none).
        fingerprint: SHA-256 hex of the data set name, split and sample index sequence.
    """

    def __init__(
        self,
        *,
        config: ScenarioConfig,
        data: ArrayDataset,
        indices: np.ndarray,
        classes: tuple[int, ...],
        phase_boundaries: list[int],
        eval_in: ArrayDataset | None,
        eval_out: ArrayDataset | None,
        transform: InputTransform,
    ) -> None:
        self.config = config
        self.name = config.name
        self.transform = transform
        self.classes = tuple(classes)
        self.phase_boundaries = list(phase_boundaries)
        self.num_classes = data.num_classes
        self.class_names = data.class_names
        self.eval_in = eval_in
        self.eval_out = eval_out
        self._images = data.images
        self._labels = data.labels
        self._indices = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        self.fingerprint = _fingerprint(config.dataset, config.split, indices)

    def __len__(self) -> int:
        return int(self._indices.shape[0])

    def __repr__(self) -> str:
        return (
            f"Stream(name={self.name!r}, scenario={self.config.scenario!r}, length={len(self)}, "
            f"classes={list(self.classes)}, fingerprint={self.fingerprint[:12]})"
        )

    def _check_range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise ValueError(
                f"stream range {start}..{stop} is invalid; need 0 <= start <= stop <= {len(self)}"
            )
        return start, stop

    def raw_images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The untransformed uint8 pool images of positions ``start .. stop - 1``.

        Args:
            start: First position.
            stop: One past the last position (``None``: the end of the stream).

        Returns:
            uint8 tensor ``(stop - start, C, H, W)``.
        """
        start, stop = self._check_range(start, stop)
        return self._images[self._indices[start:stop]]

    def inputs(
        self, batch_size: int = 1, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield the stream's model inputs in order, transforming one batch at a time.

        Args:
            batch_size: Samples per batch (the last batch may be smaller).
            start: First position (to resume a stream).
            stop: One past the last position (``None``: the end of the stream).

        Returns:
            An iterator of float32 tensors ``(batch, C', H', W')``.

        Raises:
            ValueError: ``batch_size < 1`` or an invalid range (checked at the call).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        start, stop = self._check_range(start, stop)
        return self._batches(batch_size, start, stop)

    def _batches(self, batch_size: int, start: int, stop: int) -> Iterator[torch.Tensor]:
        for first in range(start, stop, batch_size):
            yield self.transform(self.raw_images(first, min(first + batch_size, stop)))

    def evaluator(self) -> StreamEvaluator:
        """The labels (and data set indices) of every position, for scoring only."""
        return StreamEvaluator(
            labels=self._labels[self._indices],
            indices=self._indices.clone(),
            classes=self.classes,
            class_names=self.class_names,
            phase_boundaries=tuple(self.phase_boundaries),
        )

    def describe(self, windows: int = 10) -> dict[str, Any]:
        """Summarise the stream as JSON-ready data.

        Args:
            windows: Number of equal time windows of the class histogram (>= 1).

        Returns:
            A dict with ``name``, ``scenario``, ``dataset``, ``split``, ``seed``, ``length``,
            ``num_classes``, ``classes``, ``class_names``, ``class_counts`` (class id as str ->
            count, every class), ``windows`` (list of ``{start, stop, class_counts}``),
            ``phase_boundaries``, ``eval_in_size``, ``eval_out_size`` and ``fingerprint``.
        """
        if not isinstance(windows, int) or windows < 1:
            raise ValueError(f"windows must be an integer >= 1, got {windows!r}")
        labels = self._labels[self._indices].numpy()
        edges = np.linspace(0, len(self), min(windows, max(len(self), 1)) + 1).round()
        edges = edges.astype(np.int64).tolist()
        return {
            "name": self.name,
            "scenario": self.config.scenario,
            "dataset": self.config.dataset,
            "split": self.config.split,
            "seed": self.config.seed,
            "length": len(self),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "class_names": list(self.class_names),
            "class_counts": self._counts(labels),
            "windows": [
                {"start": a, "stop": b, "class_counts": self._counts(labels[a:b])}
                for a, b in zip(edges[:-1], edges[1:], strict=True)
            ],
            "phase_boundaries": list(self.phase_boundaries),
            "eval_in_size": 0 if self.eval_in is None else len(self.eval_in),
            "eval_out_size": 0 if self.eval_out is None else len(self.eval_out),
            "fingerprint": self.fingerprint,
        }

    def _counts(self, labels: np.ndarray) -> dict[str, int]:
        counts = np.bincount(labels, minlength=self.num_classes)
        return {str(k): int(c) for k, c in enumerate(counts)}


def _fingerprint(dataset: str, split: str, indices: np.ndarray) -> str:
    digest = hashlib.sha256(f"{dataset}\0{split}\0".encode())
    digest.update(np.ascontiguousarray(indices, dtype="<i8").tobytes())
    return digest.hexdigest()


def _holdout_split(
    labels: np.ndarray, num_classes: int, fraction: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per class, hold out ``round(fraction * n)`` samples (at most ``n - 1``).

    Returns:
        The pool indices and the held-out indices of each class, both in seeded random order.
    """
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(num_classes + 1))
    pools, held = [], []
    for k in range(num_classes):
        members = rng.permutation(order[starts[k] : starts[k + 1]])
        count = min(int(round(fraction * len(members))), max(len(members) - 1, 0))
        held.append(members[:count])
        pools.append(members[count:])
    return pools, held


def _draw_indices(
    sequence: np.ndarray, pools: list[np.ndarray], rng: np.random.Generator, data: ArrayDataset
) -> np.ndarray:
    """Give each position a pool sample of its class (fresh random pass when a pool runs out)."""
    indices = np.empty(len(sequence), dtype=np.int64)
    for k in np.unique(sequence).tolist():
        where = np.flatnonzero(sequence == k)
        pool = pools[k]
        if not len(pool):
            raise ValueError(
                f"class {k} ({data.class_names[k]}) has no samples in the pool of {data.name}; "
                "remove it from classes or lower holdout_fraction"
            )
        passes = -(-len(where) // len(pool))
        drawn = np.concatenate([rng.permutation(pool) for _ in range(passes)])
        indices[where] = drawn[: len(where)]
    return indices


def _held_out_sets(
    data: ArrayDataset, held: list[np.ndarray], config: ScenarioConfig, classes: tuple[int, ...]
) -> tuple[ArrayDataset | None, ArrayDataset | None]:
    """eval_in (held-out samples of the stream's classes) and eval_out (of the others).

    ``eval_in_per_class`` / ``eval_out_per_class`` keep the first samples of each class's
    seeded random held-out order; both sets are sorted by sample index.
    """
    inside = set(classes)
    limits = (config.eval_in_per_class, config.eval_out_per_class)
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for k, members in enumerate(held):
        which = 0 if k in inside else 1
        parts[which].append(members[: limits[which]])
    sets = []
    for which, label in ((0, "eval_in"), (1, "eval_out")):
        indices = np.sort(np.concatenate(parts[which] or [np.zeros(0, np.int64)]))
        indices = indices.astype(np.int64)
        sets.append(data.subset(indices, name=f"{data.name}:{label}") if len(indices) else None)
    return sets[0], sets[1]


def build_stream(
    config: ScenarioConfig | Mapping[str, Any],
    *,
    in_chans: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bilinear",
) -> Stream:
    """Build the stream a scenario describes.

    Args:
        config: A :class:`ScenarioConfig` or a mapping for :meth:`ScenarioConfig.from_dict`.
        in_chans: Channels the model expects (``None``: the data set's); see InputTransform.
        input_size: Input size the model expects (``None``: the data set's).
        mean: Per-channel normalisation mean the model expects (``None``: the data set's).
        std: Per-channel normalisation std the model expects (``None``: the data set's).
        interpolation: How images are resized to ``input_size``.

    Returns:
        The stream; building it again from the same config gives the same samples.

    Raises:
        ConfigError: Invalid config, or a class id out of range for the data set.
        FileNotFoundError: The data set files are missing.
        ValueError: A target class has no samples in the pool.
    """
    if not isinstance(config, ScenarioConfig):
        config = ScenarioConfig.from_dict(config)
    data = load_dataset(
        config.dataset, split=config.split, root=config.root, **config.dataset_options
    )
    classes = target_classes(config, data.num_classes)
    holdout_rng = seeded_rng(config.seed, RNG_HOLDOUT)
    pools, held = _holdout_split(
        data.labels.numpy(), data.num_classes, config.holdout_fraction, holdout_rng
    )
    sequence, boundaries = generate_labels(config, data.num_classes)
    indices = _draw_indices(sequence, pools, seeded_rng(config.seed, RNG_DRAW), data)
    eval_in, eval_out = _held_out_sets(data, held, config, classes)
    return Stream(
        config=config,
        data=data,
        indices=indices,
        classes=classes,
        phase_boundaries=boundaries,
        eval_in=eval_in,
        eval_out=eval_out,
        transform=InputTransform(data.mean if mean is None else mean,
                                 data.std if std is None else std, in_chans=in_chans,
                                 size=input_size, interpolation=interpolation),
    )


def format_description(summary: Mapping[str, Any]) -> str:
    """Render :meth:`Stream.describe` output as a text report with a class-by-window table.

    Args:
        summary: The dict :meth:`Stream.describe` returns.

    Returns:
        Multi-line text (no trailing newline).
    """
    names = summary["class_names"]
    shown = [
        k for k, count in summary["class_counts"].items() if count or int(k) in summary["classes"]
    ]
    targets = ", ".join(f"{k} {names[k]}" for k in summary["classes"])
    lines = [
        f"stream {summary['name']!r} ({summary['scenario']}) on "
        f"{summary['dataset']}/{summary['split']}: {summary['length']} samples, "
        f"seed {summary['seed']}",
        f"fingerprint  {summary['fingerprint']}",
        f"classes      {targets}",
        f"held out     eval_in {summary['eval_in_size']} samples, "
        f"eval_out {summary['eval_out_size']} samples",
    ]
    if len(summary["phase_boundaries"]) > 1:
        lines.append(f"phases start {', '.join(map(str, summary['phase_boundaries']))}")
    width = max(6, len(str(summary["length"])) + 1)
    lines += ["", "window".ljust(13) + "".join(k.rjust(width) for k in shown)]
    for window in summary["windows"]:
        label = f"{window['start']}-{window['stop']}".ljust(13)
        lines.append(label + "".join(str(window["class_counts"][k]).rjust(width) for k in shown))
    lines.append(
        "total".ljust(13) + "".join(str(summary["class_counts"][k]).rjust(width) for k in shown)
    )
    return "\n".join(lines)
