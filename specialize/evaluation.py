"""One pass of every exit over a labelled set, and the curves and tables built from it.

Curves never re-run the network per threshold: :func:`exit_pass` evaluates every head once
(with the gates' real decisions, so FLOPs are per sample), then sweeps work offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from backbones import MultiExitModel
from backbones.cost import flops_at_exits
from backbones.exit_rule import confidence as exit_confidence
from backbones.exit_rule import select_exits
from specialize import curves


@dataclass
class ExitPass:
    """Every exit's answer for every sample of a set.

    Attributes:
        confidence: ``(N, K)`` float32 confidence of each exit.
        pred: ``(N, K)`` int64 prediction of each exit.
        flops: ``(N, K)`` int64 cost of answering at each exit (gates applied).
        labels: ``(N,)`` int64 true classes.
    """

    confidence: Tensor
    pred: Tensor
    flops: Tensor
    labels: Tensor

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
    desc: str = "exits",
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

    Returns:
        The per-exit confidences, predictions and FLOPs.
    """
    model.eval()
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in tqdm(range(0, len(labels), batch_size), desc=desc, disable=not progress,
                      unit="batch", leave=False):
        x = transform(images[start:start + batch_size])
        out = model.forward_exits(x)
        conf = torch.stack([exit_confidence(z, measure) for z in out.logits], dim=1)
        pred = torch.stack([z.argmax(dim=1) for z in out.logits], dim=1)
        flops = flops_at_exits(model.cost_profile, out.gates, model.gate_mode, x.shape[0])
        parts.append((conf.float(), pred, flops))
    conf, pred, flops = (torch.cat(column) for column in zip(*parts))
    return ExitPass(conf, pred, flops, labels.long())


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
