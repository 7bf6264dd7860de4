"""One pass of every exit over a labelled set, and the curves and tables built from it.

Curves never re-run the network per threshold: :func:`exit_pass` evaluates every head once
(with the gates' real decisions, so FLOPs are per sample), then sweeps work offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from backbones import MultiExitModel
from backbones.cost import flops_at_exits
from backbones.exit_rule import confidence as exit_confidence
from backbones.exit_rule import select_exits
from backbones.gates import GateDecision
from backbones.heads import split_head
from specialize.evaluation import curves


@dataclass
class HeadInputs:
    """What the heads read for a set, after their parameter-free prefixes, and the gates.

    The backbone is frozen while a run specializes heads, so this is all a second pass over
    the same set needs (:func:`rerun_heads`): the pooled head inputs (tens of MB, not the
    feature maps) and every gated block's decisions (for the per-sample FLOPs).

    Attributes:
        prefixes: ``repr`` of each exit's prefix (a rerun checks that heads still split so).
        inputs: Per exit, the prefix output ``(N, ...)``.
        gates: The gate decisions of every gated block, over the whole set.
        batch_size: The batches the set was evaluated in (reruns use the same ones, so that
            they compute bit for bit what a full pass computes).
    """

    prefixes: list[str]
    inputs: list[Tensor]
    gates: list[GateDecision]
    batch_size: int


@dataclass
class ExitPass:
    """Every exit's answer for every sample of a set.

    Attributes:
        confidence: ``(N, K)`` float32 confidence of each exit.
        pred: ``(N, K)`` int64 prediction of each exit.
        flops: ``(N, K)`` int64 cost of answering at each exit (gates applied).
        labels: ``(N,)`` int64 true classes.
        head_inputs: Kept when asked (:func:`exit_pass` ``keep_head_inputs``), for reruns.
    """

    confidence: Tensor
    pred: Tensor
    flops: Tensor
    labels: Tensor
    head_inputs: HeadInputs | None = field(default=None, repr=False, compare=False)

    @property
    def correct(self) -> Tensor:
        """``(N, K)`` bool: whether each exit is right."""
        return self.pred == self.labels[:, None]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, mask: Tensor) -> ExitPass:
        """The rows selected by a bool mask or index tensor."""
        return ExitPass(self.confidence[mask], self.pred[mask], self.flops[mask],
                        self.labels[mask])


@torch.no_grad()
def exit_pass(
    model: MultiExitModel, images: Tensor, labels: Tensor, transform, *,
    measure: str = "max_softmax", batch_size: int = 256, progress: bool = False,
    desc: str = "exits", keep_head_inputs: bool = False,
) -> ExitPass:
    """Evaluate every exit of ``model`` once over a labelled set.

    Args:
        model: A multi-exit model (put in eval mode).
        images: uint8 images ``(N, C, H, W)``.
        labels: int64 classes ``(N,)``.
        transform: Callable turning a uint8 batch into model inputs.
        measure: Confidence measure.
        batch_size: Evaluation batch size.
        progress: Show a progress bar.
        desc: Progress bar label.
        keep_head_inputs: Keep the pooled head inputs and gates (:class:`HeadInputs`) so
            that :func:`rerun_heads` can evaluate new heads without the backbone.

    Returns:
        The per-exit confidences, predictions and FLOPs.
    """
    model.eval()
    splits = [split_head(head) for head in model.heads]
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    inputs: list[list[Tensor]] = [[] for _ in splits]
    gates: list[list[GateDecision]] = []
    for start in tqdm(range(0, len(labels), batch_size), desc=desc, disable=not progress,
                      unit="batch", leave=False):
        # channels_last: about 2x faster for depthwise timm models (Lite0), the same numbers
        x = transform(images[start:start + batch_size]).contiguous(
            memory_format=torch.channels_last)
        out = model.forward_exits(x)
        parts.append(_answers(out.logits, measure, model, out.gates, x.shape[0]))
        if keep_head_inputs:
            for kept, (prefix, _), feature in zip(inputs, splits, out.features):
                kept.append(prefix(feature))
            gates.append(out.gates)
    result = _exit_pass_of(parts, labels)
    if keep_head_inputs:
        result.head_inputs = HeadInputs([repr(prefix) for prefix, _ in splits],
                                        [torch.cat(kept) for kept in inputs],
                                        [_cat_gates(blocks) for blocks in zip(*gates)],
                                        batch_size)
    return result


@torch.no_grad()
def rerun_heads(model: MultiExitModel, previous: ExitPass, measure: str = "max_softmax",
                ) -> ExitPass | None:
    """Evaluate ``model``'s current heads on the set of ``previous`` without the backbone.

    Args:
        model: The model of ``previous``, its heads possibly changed (the backbone not).
        previous: An :func:`exit_pass` result with ``head_inputs``.
        measure: Confidence measure.

    Returns:
        What :func:`exit_pass` would return now, or ``None`` when ``previous`` kept no head
        inputs or a head no longer splits as it did (then run :func:`exit_pass` again).
    """
    cached = previous.head_inputs
    splits = [split_head(head) for head in model.heads]
    if cached is None or [repr(prefix) for prefix, _ in splits] != cached.prefixes:
        return None
    model.eval()
    size, parts = len(previous), []
    gates = cached.gates
    for start in range(0, size, cached.batch_size):
        rows = slice(start, start + cached.batch_size)
        logits = [body(kept[rows]) for (_, body), kept in zip(splits, cached.inputs)]
        batch_gates = [GateDecision(g.block_salience[rows], g.channel_salience[rows])
                       for g in gates]
        parts.append(_answers(logits, measure, model, batch_gates, len(logits[0])))
    result = _exit_pass_of(parts, previous.labels)
    result.head_inputs = cached
    return result


def _answers(logits: list[Tensor], measure: str, model: MultiExitModel,
             gates: list[GateDecision], batch: int) -> tuple[Tensor, Tensor, Tensor]:
    conf = torch.stack([exit_confidence(z, measure) for z in logits], dim=1)
    pred = torch.stack([z.argmax(dim=1) for z in logits], dim=1)
    flops = flops_at_exits(model.cost_profile, gates, model.gate_mode, batch)
    return conf.float(), pred, flops


def _exit_pass_of(parts: list[tuple[Tensor, Tensor, Tensor]], labels: Tensor) -> ExitPass:
    conf, pred, flops = (torch.cat(column) for column in zip(*parts))
    return ExitPass(conf, pred, flops, labels.long())


def _cat_gates(blocks: tuple[GateDecision, ...]) -> GateDecision:
    return GateDecision(torch.cat([g.block_salience for g in blocks]),
                        torch.cat([g.channel_salience for g in blocks]))


def curve_points(result: ExitPass) -> list[dict]:
    """The exact Pareto front of the shared-threshold sweep, as JSON points."""
    sweep = curves.sweep(result.confidence.numpy(), result.correct.numpy(), result.flops.numpy())
    return curves.pareto_front(sweep).to_list()


def oracle_points(result: ExitPass) -> list[dict]:
    """The oracle curve (cheapest correct exit per sample), as JSON points."""
    return curves.oracle_curve(result.correct.numpy(), result.flops.numpy()).to_list()


def operating_point(result: ExitPass, thresholds: Tensor) -> dict[str, float]:
    """Accuracy (%) and mean FLOPs at the given per-exit thresholds."""
    accuracy, flops = curves.evaluate_thresholds(
        result.confidence.numpy(), result.correct.numpy(), result.flops.numpy(),
        thresholds.numpy(),
    )
    return {"accuracy": float(accuracy), "flops": float(flops)}


def per_class_at(result: ExitPass, thresholds: Tensor, num_classes: int) -> dict[str, np.ndarray]:
    """Per true class: mean FLOPs and accuracy (%) at the given thresholds."""
    exits = select_exits(result.confidence, thresholds).long()
    rows = torch.arange(len(result))
    flops = result.flops[rows, exits].double().numpy()
    right = result.correct[rows, exits].double().numpy()
    labels = result.labels.numpy()
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_flops = np.bincount(labels, weights=flops, minlength=num_classes) / counts
        accuracy = 100.0 * np.bincount(labels, weights=right, minlength=num_classes) / counts
    return {"flops": mean_flops, "accuracy": accuracy, "count": counts}
