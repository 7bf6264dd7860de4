"""The head trainer: update rounds on the early heads from their replay buffers.

One thread owns a trainer at a time: the caller's in ``sync`` mode, the background worker's in
``async`` mode (the updater's train lock says who).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specialize.updater.buffer import ReplayBuffer
from specialize.updater.config import UpdaterConfig
from specialize.updater.heads import HeadsState, load_heads, snapshot_heads
from specialize.updater.observation import Observation


class HeadTrainer:
    """Trains the trainable part of heads ``0..K-2`` from their replay buffers.

    Each step draws one mini-batch from every non-empty buffer, sums the heads' losses, clips
    each head's gradient on its own and takes one optimizer step; a head whose loss or
    gradient is not finite sits the step out (counted in ``skipped_losses``).

    Args:
        heads: The heads it trains (the serving ones in sync mode, a shadow copy in async).
        splits: Per head, the leading parameter-free layers already applied at observe time.
        buffers: One replay buffer per head.
        config: The updater configuration (read live: target, lr, batch size...).

    Attributes:
        bodies: Per head, the layers that train (after its precomputed prefix).
        optimizer: Adam or SGD over the trainable parameters of every body.
        generator: The mini-batch sampling generator (seeded with ``config.seed``).
        counters: ``samples``, ``updates``, ``steps``, ``skipped_losses``, ``nonfinite_params``.
    """

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

    def add(self, observation: Observation) -> tuple[int, bool]:
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

    def restore(self, heads_state: HeadsState) -> None:
        """Load head weights, forget the optimizer state and empty the buffers."""
        load_heads(self.heads, heads_state)
        self.optimizer = self._build_optimizer()
        for buffer in self.buffers:
            buffer.clear()

    def state_dict(self) -> dict[str, Any]:
        """Heads, optimizer, buffers, sampling RNG and counters (tensors and plain values)."""
        return {
            "heads": snapshot_heads(self.heads),
            "optimizer": self.optimizer.state_dict(),
            "buffers": [buffer.state_dict() for buffer in self.buffers],
            "rng": self.generator.get_state(),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the current config's hyperparameters win."""
        load_heads(self.heads, state["heads"])
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

