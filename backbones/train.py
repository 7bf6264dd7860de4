"""Joint training of every exit and every LC-Net gate of a ``MultiExitNet``.

The loss of one batch (LC-Net sections 4.2 and 4.3)::

    loss = sum_k w_k * CE(logits_k, y)                             every exit, label smoothing
         + distill_weight * mean_{k<K-1} T^2 * KL(p_K^T || p_k^T)  early exits learn from the last
         + l1_weight * mean(|S_L|, |S_C|)                          sparser gates, fewer FLOPs

The L1 term is the mean over all gate values of the batch (one ``S_L`` and ``C_mid`` values of
``S_C`` per gated block and sample), so ``l1_weight`` does not depend on the model's size.
Optimisation: SGD with Nesterov momentum and weight decay, a separate learning rate for the
gates (``model.gate_parameters()``), a per-step cosine / step / constant schedule with
optional linear warm-up. Augmentation runs as tensor operations on the uint8 batch (random
crop with zero padding, horizontal flip).

Every random choice comes from ``torch.Generator`` objects derived from ``config.seed`` and
the epoch, so a run resumed from its checkpoint continues exactly as if never interrupted.
Under ``torch.distributed`` (``torchrun --nproc_per_node=N``, gloo on CPU) the model is wrapped
in DDP, each process trains on its share of the same per-epoch permutation (what
``DistributedSampler`` does), evaluation is sharded and summed, and only rank 0 writes
checkpoints and progress.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from backbones.checkpoint import load_weights, read_checkpoint, save_checkpoint
from backbones.gates import GateDecision
from backbones.multi_exit import MultiExitNet
from backbones.train_config import SCHEDULES, TrainConfig, config_fingerprint  # noqa: F401 (re-export)
from backbones.train_metrics import (
    evaluate,
    format_metrics,
    normalize_transform,
    rank_and_world,
    to_input,
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    """What ``train`` did.

    Attributes:
        metrics: Evaluation after the last completed epoch (see ``evaluate``), plus the
            epoch's ``train_loss``, ``train_accuracy`` and timings.
        history: One such dict per completed epoch (including epochs before a resume).
        epochs_completed: Epochs done in total.
        checkpoint_path: Where the last checkpoint was written (``None``: not saved).
        wall_time_s: Seconds spent in this call (training and evaluation).
    """

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    epochs_completed: int
    checkpoint_path: Path | None
    wall_time_s: float


# ------------------------------------------------------------------------------ batch pieces


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``keys`` (e.g. epoch, rank) by hashing."""
    text = "/".join(str(int(k)) for k in (seed, *keys))
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(value)


def augment_batch(
    images: Tensor, *, crop_padding: int, hflip: bool, generator: torch.Generator
) -> Tensor:
    """Random crop (after zero padding) and horizontal flip of a batch, per sample.

    Args:
        images: ``(B, C, H, W)`` batch (uint8 or float).
        crop_padding: Zero padding on each side before cropping back to ``H x W``; 0: no crop.
        hflip: Flip each image left-right with probability 0.5.
        generator: Source of randomness.

    Returns:
        The augmented batch, same shape and dtype.
    """
    batch, channels, height, width = images.shape
    if crop_padding > 0:
        pad = crop_padding
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
        images = padded[torch.arange(batch)[:, None, None, None],
                        torch.arange(channels)[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


def gate_l1(gates: list[GateDecision]) -> Tensor:
    """Mean of ``|S_L|`` and ``|S_C|`` over every gate value of the batch (0 if no gates)."""
    if not gates:
        return torch.zeros(())
    total = sum(g.block_salience.abs().sum() + g.channel_salience.abs().sum() for g in gates)
    count = sum(g.block_salience.numel() + g.channel_salience.numel() for g in gates)
    return total / count


def training_loss(
    logits: list[Tensor], gates: list[GateDecision], labels: Tensor, config: TrainConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of one batch (see the module docstring) and its parts.

    Args:
        logits: One ``(B, num_classes)`` tensor per exit.
        gates: Gate decisions of the forward pass.
        labels: ``(B,)`` class indices.
        config: Loss weights.

    Returns:
        ``(loss, parts)`` with parts ``ce`` (weighted exit cross-entropy), ``distill`` and
        ``l1`` (unweighted), all detached.
    """
    weights = config.exit_weights or (1.0,) * len(logits)
    if len(weights) != len(logits):
        raise ValueError(f"exit_weights has {len(weights)} values, the model has {len(logits)} "
                         "exits")
    ce = sum(w * F.cross_entropy(z, labels, label_smoothing=config.label_smoothing)
             for w, z in zip(weights, logits) if w > 0)
    loss = ce
    parts = {"ce": ce.detach()}
    if config.distill_weight > 0 and len(logits) > 1:
        temp = config.distill_temperature
        teacher = F.log_softmax(logits[-1].detach() / temp, dim=1)
        distill = sum(
            F.kl_div(F.log_softmax(z / temp, dim=1), teacher, log_target=True,
                     reduction="batchmean") for z in logits[:-1]
        ) * temp**2 / (len(logits) - 1)
        loss = loss + config.distill_weight * distill
        parts["distill"] = distill.detach()
    if gates:
        l1 = gate_l1(gates)
        if config.l1_weight > 0:
            loss = loss + config.l1_weight * l1
        parts["l1"] = l1.detach()
    return loss, parts


# ------------------------------------------------------------------------ optimiser, schedule


def build_optimizer(model: MultiExitNet, config: TrainConfig) -> torch.optim.SGD:
    """SGD (Nesterov) with one parameter group for the network and one for the gates."""
    gate_ids = {id(p) for p in model.gate_parameters()}
    backbone = [p for p in model.parameters() if id(p) not in gate_ids]
    gates = [p for p in model.parameters() if id(p) in gate_ids]
    groups = [{"params": backbone, "lr": config.lr, "weight_decay": config.weight_decay}]
    if gates:
        decay = config.weight_decay if config.gate_weight_decay is None else \
            config.gate_weight_decay
        groups.append({"params": gates, "lr": config.gate_lr, "weight_decay": decay})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0, dampening=0.0)


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rates at optimisation step ``step`` (0-based)."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "step":
        done = step / max(1, total_steps)
        return config.step_gamma ** sum(done >= m for m in config.step_milestones)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule of ``config`` (stepped after every batch)."""
    total = steps_per_epoch * config.epochs

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total, steps_per_epoch=steps_per_epoch, config=config)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------- training


class _ExitsForward(nn.Module):
    """``forward_exits`` as a plain ``forward`` returning tensors (what DDP can wrap)."""

    def __init__(self, model: MultiExitNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        out = self.model.forward_exits(x)
        return (out.logits, [g.block_salience for g in out.gates],
                [g.channel_salience for g in out.gates])


@dataclass
class _State:
    """Bookkeeping shared by the epoch loop."""

    model: MultiExitNet
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoint_path: Path | None
    data_info: dict[str, Any]
    rank: int
    world: int
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_saved: int | None = None


def train(
    model: MultiExitNet,
    train_data: Any,
    eval_data: Any | None,
    config: TrainConfig,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    checkpoint_path: str | Path | None = None,
    resume_from: str | Path | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train every exit and gate of ``model`` jointly.

    Call ``torch.manual_seed(config.seed)`` before building the model for a reproducible
    initialisation; nothing here reads the global random state.

    Args:
        model: The network (modified in place). Under ``torch.distributed`` every process
            passes its copy; rank 0's weights are broadcast.
        train_data: Anything with ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64
            ``(N,)``, ``mean`` and ``std`` (e.g. ``streams.datasets.ArrayDataset``).
        eval_data: The same kind of object, evaluated after every epoch; ``None``: skip.
        config: Hyper-parameters.
        transform: uint8 batch -> model input (e.g. ``streams.transforms.InputTransform``);
            default: per-channel normalisation with ``train_data.mean/std``.
        checkpoint_path: Written atomically after every epoch (rank 0 only).
        resume_from: A checkpoint of an interrupted run of the same config to continue.
        progress: Show a tqdm bar per epoch and a summary line after each evaluation.
        stop_after_epoch: Stop after this many epochs in total, as if interrupted (the
            schedule still spans ``config.epochs``).

    Returns:
        The final metrics, the per-epoch history and where the checkpoint is.

    Raises:
        NonFiniteLossError: The loss became NaN/inf; the weights of the last good step are
            kept and the checkpoint of the last completed epoch is not overwritten.
        ValueError: Data and model do not fit, or ``resume_from`` is of another config.
    """
    start = time.perf_counter()
    _check_data(model, train_data, config)
    transform = transform or normalize_transform(train_data.mean, train_data.std)
    rank, world = rank_and_world()
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    steps_per_epoch = len(train_data.labels) // config.batch_size
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.init_checkpoint and resume_from is None:
        load_weights(model, config.init_checkpoint, allow_missing_gates=True)
    optimizer = build_optimizer(model, config)
    state = _State(
        model=model, config=config, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config, steps_per_epoch),
        checkpoint_path=None if checkpoint_path is None else Path(checkpoint_path),
        data_info=_data_info(train_data), rank=rank, world=world,
    )
    if resume_from is not None:
        _resume(state, resume_from)
    runner: nn.Module = _ExitsForward(model)
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(runner)  # broadcasts rank 0 buffers
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs,
                                                                    stop_after_epoch)
    while state.epoch < last_epoch:
        epoch_stats = _train_epoch(state, runner, train_data, transform, progress)
        metrics = dict(epoch_stats)
        if world > 1:
            _broadcast_buffers(model)
        if eval_data is not None:
            metrics.update(evaluate(model, eval_data, transform=transform,
                                    batch_size=config.eval_batch_size,
                                    channels_last=config.channels_last))
        state.epoch += 1
        metrics["epoch"] = state.epoch
        state.history.append(metrics)
        _save(state)
        if progress and rank == 0 and eval_data is not None:
            tqdm.write(f"epoch {state.epoch}/{config.epochs}: {format_metrics(metrics)}",
                       file=sys.stderr)
    model.eval()
    return TrainResult(
        metrics=state.history[-1] if state.history else {},
        history=state.history,
        epochs_completed=state.epoch,
        checkpoint_path=state.checkpoint_path if state.last_saved is not None else None,
        wall_time_s=time.perf_counter() - start,
    )


def _check_data(model: MultiExitNet, data: Any, config: TrainConfig) -> None:
    images, labels = data.images, data.labels
    if images.dtype != torch.uint8 or images.ndim != 4 or len(labels) != len(images):
        raise ValueError(f"train_data must hold uint8 images (N, C, H, W) and N labels, got "
                         f"{images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}")
    if len(labels) < config.batch_size:
        raise ValueError(f"train_data has {len(labels)} samples, fewer than batch_size="
                         f"{config.batch_size}; lower batch_size")
    if len(labels) and int(labels.max()) >= model.num_classes:
        raise ValueError(f"labels reach {int(labels.max())} but the model has "
                         f"{model.num_classes} classes; build it with num_classes="
                         f"{int(labels.max()) + 1} or more")


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics (what gets saved and evaluated)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _data_info(data: Any) -> dict[str, Any]:
    names = getattr(data, "class_names", None)
    return {
        "name": getattr(data, "name", None),
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
        "class_names": None if names is None else list(names),
        "size": len(data.labels),
    }


def _resume(state: _State, source: str | Path) -> None:
    ckpt = read_checkpoint(source)
    stored = dict(ckpt.get("train_config") or {})
    current = state.config.to_dict()
    differ = sorted(k for k in set(stored) | set(current)
                    if k not in TrainConfig.RUNTIME_FIELDS and stored.get(k) != current.get(k))
    if differ:
        raise ValueError(f"{source}: cannot resume, its train config differs in "
                         f"{', '.join(differ)}; resume with the config it was trained with")
    if ckpt.get("optimizer") is None or ckpt.get("scheduler") is None:
        raise ValueError(f"{source}: the checkpoint has no optimizer/scheduler state to resume")
    load_weights(state.model, source)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.epoch = int(ckpt["epoch"])
    state.history = [dict(h) for h in ckpt.get("history") or []]
    state.last_saved = state.epoch


def _train_epoch(
    state: _State, runner: nn.Module, data: Any, transform: Callable, progress: bool,
) -> dict[str, float]:
    config, model = state.config, state.model
    start = time.perf_counter()
    steps = len(data.labels) // config.batch_size
    order = torch.randperm(len(data.labels), generator=seeded_generator(config.seed, state.epoch))
    augment_rng = seeded_generator(config.seed, state.epoch, 1 + state.rank)
    model.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples (this process)
    bar = tqdm(range(steps), desc=f"epoch {state.epoch + 1}/{config.epochs}", leave=False,
               disable=not progress or state.rank != 0, dynamic_ncols=True)
    for step in bar:
        index = order[step * config.batch_size:(step + 1) * config.batch_size][state.rank::
                                                                                state.world]
        images = augment_batch(data.images[index], crop_padding=config.crop_padding,
                               hflip=config.hflip, generator=augment_rng)
        labels = data.labels[index]
        logits, block_sal, channel_sal = runner(to_input(transform(images), config.channels_last))
        gates = [GateDecision(b, c) for b, c in zip(block_sal, channel_sal)]
        loss, parts = training_loss(logits, gates, labels, config)
        _check_finite(state, loss, step, steps)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        totals += torch.tensor([loss.item() * len(index),
                                float((logits[-1].argmax(1) == labels).sum()), len(index)],
                               dtype=torch.float64)
        if step % 10 == 0 or step == steps - 1:
            postfix = {"loss": f"{totals[0] / totals[2]:.3f}",
                       "acc": f"{totals[1] / totals[2] * 100:.1f}"}
            if "l1" in parts:
                postfix["gates"] = f"{float(parts['l1']):.3f}"
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    if state.world > 1:
        dist.all_reduce(totals)
    return {"train_loss": float(totals[0] / totals[2]),
            "train_accuracy": float(totals[1] / totals[2]),
            "lr": state.optimizer.param_groups[0]["lr"],
            "train_time_s": time.perf_counter() - start}


def _check_finite(state: _State, loss: Tensor, step: int, steps: int) -> None:
    value = loss.detach().clone().reshape(1).double()
    if state.world > 1:
        dist.all_reduce(value)  # every process sees a NaN anywhere, so all stop together
    if torch.isfinite(value).all():
        return
    if state.last_saved is not None and state.checkpoint_path is not None:
        kept = (f"the last good checkpoint is {state.checkpoint_path} (epoch {state.last_saved}),"
                " left untouched")
    else:
        kept = "no checkpoint was written before (none requested or no epoch completed)"
    raise NonFiniteLossError(
        f"training loss is {loss.item()} at epoch {state.epoch + 1}, step {step + 1}/{steps} "
        f"(lr {state.optimizer.param_groups[0]['lr']:.3g}); stopped before updating the "
        f"weights; {kept}. Lower lr / gate_lr / l1_weight or check the data for NaN/inf."
    )


def _save(state: _State) -> None:
    if state.checkpoint_path is None or state.rank != 0:
        state.last_saved = state.epoch if state.checkpoint_path is not None else None
        return
    save_checkpoint(
        state.checkpoint_path, state.model, train_config=state.config.to_dict(),
        metrics=state.history[-1], history=state.history, epoch=state.epoch,
        optimizer=state.optimizer, scheduler=state.scheduler, data=state.data_info,
    )
    state.last_saved = state.epoch
