"""What training measures and prints: every exit's accuracy and FLOPs, gates shut.

:func:`evaluate` runs on the evaluation split after each epoch (sharded and summed under
``torch.distributed``); :func:`format_metrics` is the one line a progress bar prints. The
helpers here (:func:`normalize_transform`, :func:`rank_and_world`, :func:`to_input`) are shared
with :mod:`backbones.train`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from backbones.cost import flops_at_exits, format_flops
from backbones.multi_exit import MultiExitNet

__all__ = ["evaluate", "format_metrics", "normalize_transform", "rank_and_world", "to_input"]


def normalize_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """uint8 ``(B, C, H, W)`` -> float32 ``(x / 255 - mean) / std`` (per channel)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def transform(images: Tensor) -> Tensor:
        return (images.to(torch.float32) / 255.0 - mean_t) / std_t

    return transform


def to_input(x: Tensor, channels_last: bool) -> Tensor:
    """``x`` in channels_last memory format when asked."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` under ``torch.distributed``, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(
    model: MultiExitNet,
    data: Any,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 500,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Accuracy and mean FLOPs of every exit, and how many gates are shut.

    Runs in eval mode (hard ReLU-1). Under ``torch.distributed`` each process evaluates its
    share and the sums are all-reduced, so every process returns the same figures.

    Args:
        model: The network.
        data: Anything with ``images`` uint8 ``(N, C, H, W)``, ``labels`` ``(N,)``, ``mean``,
            ``std``.
        transform: uint8 batch -> model input; default: normalise with ``data.mean/std``.
        batch_size: Evaluation batch size.
        channels_last: Feed channels_last inputs.

    Returns:
        ``exit_accuracy`` (list, one per exit), ``exit_flops`` (mean FLOPs per sample of
        answering at each exit with the gates' decisions), ``exit_flops_open`` (the same with
        every gate open: the ungated cost), ``skipped_blocks`` (fraction of ``S_L == 0``),
        ``skipped_channels`` (fraction of ``S_C == 0``), ``eval_size``, ``eval_time_s``.
    """
    start = time.perf_counter()
    transform = transform or normalize_transform(data.mean, data.std)
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    num_exits = model.num_exits
    # correct per exit, FLOPs per exit, blocks off, blocks, channels off, channels, samples
    sums = torch.zeros(2 * num_exits + 5, dtype=torch.float64)
    indices = torch.arange(len(data.labels))[rank::world]
    for chunk in indices.split(batch_size):
        x = to_input(transform(data.images[chunk]), channels_last)
        labels = data.labels[chunk]
        out = model.forward_exits(x)
        for k, logits in enumerate(out.logits):
            sums[k] += (logits.argmax(dim=1) == labels).sum()
        flops = flops_at_exits(model.cost_profile, out.gates, model.gate_mode, len(chunk))
        sums[num_exits:2 * num_exits] += flops.sum(dim=0).double()
        for g in out.gates:
            sums[-5] += (g.block_salience <= 0).sum()
            sums[-4] += g.block_salience.numel()
            sums[-3] += (g.channel_salience <= 0).sum()
            sums[-2] += g.channel_salience.numel()
        sums[-1] += len(chunk)
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    count = max(1.0, float(sums[-1]))
    return {
        "exit_accuracy": [float(sums[k]) / count for k in range(num_exits)],
        "exit_flops": [float(sums[num_exits + k]) / count for k in range(num_exits)],
        "exit_flops_open": [int(info["flops"]) for info in model.exit_info],
        "skipped_blocks": float(sums[-5] / sums[-4]) if sums[-4] > 0 else 0.0,
        "skipped_channels": float(sums[-3] / sums[-2]) if sums[-2] > 0 else 0.0,
        "eval_size": int(sums[-1]),
        "eval_time_s": time.perf_counter() - start,
    }


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """One line: per-exit accuracy and FLOPs, and skipped gates (or the final head's choice)."""
    acc = " ".join(f"{a * 100:.2f}" for a in metrics["exit_accuracy"])
    flops = " ".join(format_flops(f) for f in metrics["exit_flops"])
    if "final_head" in metrics:  # heads fitted on a frozen backbone (backbones.head_fit)
        choice = metrics["final_head_accuracy"]
        pretrained = choice["pretrained"]
        pretrained = "n/a" if pretrained is None else f"{pretrained:.2f} %"
        return (f"exit accuracy % [{acc}] on validation | FLOPs/sample [{flops}] | final "
                f"head: {metrics['final_head']} (fitted {choice['fitted']:.2f} %, pretrained "
                f"{pretrained})")
    ratio = metrics["exit_flops_open"][-1] / max(1.0, metrics["exit_flops"][-1])
    return (f"exit accuracy % [{acc}] | FLOPs/sample [{flops}] (final exit {ratio:.2f}x fewer "
            f"than all gates open) | skipped blocks {metrics['skipped_blocks'] * 100:.1f}% "
            f"channels {metrics['skipped_channels'] * 100:.1f}%")
