"""The updater's configuration: one field per knob, validated through ``configkit``."""

from __future__ import annotations

from dataclasses import dataclass

from configkit import check_choice, check_fields, check_int, check_number

__all__ = ["PSEUDO_LABELS", "STRATEGIES", "UpdaterConfig"]

STRATEGIES = ("plain", "anchored")
PSEUDO_LABELS = ("selected", "prior")


@dataclass
class UpdaterConfig:
    """How the early heads are specialized (one field per knob; validated on construction)."""

    # "sync": update inline every update_every samples (deterministic); "async": background
    # thread trains a shadow copy of the heads and publishes it atomically
    mode: str = "sync"
    # "plain": serve the specialized early heads as they are; "anchored": serve each as a
    # mixture with its frozen original head (specialize.updater.anchoring), so that inputs the
    # original head doubts are not answered early because the specialized head is sure
    strategy: str = "anchored"
    # anchored only: weight of the specialized head in the mixture, in (0, 1)
    anchor_weight: float = 0.5
    # pseudo-label kind: "hard" (argmax of the selected exit) or "soft" (its softened softmax)
    target: str = "hard"
    # pseudo-label source: "prior" (the answering exit's posterior times the stream's class
    # prior, estimated from the served predictions; the answers themselves do not change:
    # specialize.updater.prior) or "selected" (the answering exit's posterior alone, the
    # default before: 0.46 -> 0.84 of the supervised ceiling on Tiny-ImageNet, see README)
    pseudo_label: str = "prior"
    # "prior" only: the prior reflects about this many recent samples
    prior_window: int = 1000
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
    # health: audited early answers that form the baseline disagreement rate (the first ones
    # of the stream). Counted in audited answers, not samples: at engine.audit_rate 0.02 a
    # 3,000-sample stream audits about 60 samples, about 50 of them answered early, so 16 +
    # 16 closes its first window near sample 1,900 (256, the old default, never did)
    audit_baseline: int = 16
    # health: audited early answers per window (the windowed disagreement rate)
    audit_window: int = 16
    # health: a window degrades when its rate exceeds the baseline rate by more than this;
    # 0.25 (4 of 16 answers more than the baseline) keeps healthy heads from rolling back on
    # the noise of 16-answer windows (README: false rollbacks over seeds)
    audit_margin: float = 0.25
    # health: roll the heads back when a window degrades (False: only count it)
    rollback: bool = True
    # fault injection (testing the health check): once this many samples were observed, the
    # next observe() serves early heads that answer a wrong class confidently (from the
    # sample after it on; specialize.updater.faults); None: off
    inject_bad_head_at: int | None = None
    # False: observe() is a no-op and the heads never change (a baseline run)
    enabled: bool = True

    def __post_init__(self) -> None:
        check_fields(self)  # types: ints are ints, bools are bools, numbers become floats
        check_choice("mode", self.mode, ("sync", "async"))
        check_choice("strategy", self.strategy, STRATEGIES)
        check_number("anchor_weight", self.anchor_weight, gt=0, lt=1)
        check_choice("target", self.target, ("hard", "soft"))
        check_choice("pseudo_label", self.pseudo_label, PSEUDO_LABELS)
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        check_number("temperature", self.temperature, gt=0)
        check_number("min_confidence", self.min_confidence, optional=True)
        for name in ("update_every", "batch_size", "steps_per_update", "queue_size",
                     "audit_baseline", "audit_window", "prior_window"):
            check_int(name, getattr(self, name), ge=1)
        check_number("lr", self.lr, gt=0)
        check_number("buffer_mb", self.buffer_mb, gt=0)
        check_number("momentum", self.momentum, ge=0, lt=1)
        check_number("weight_decay", self.weight_decay, ge=0)
        check_number("audit_margin", self.audit_margin, ge=0)
        check_number("grad_clip", self.grad_clip, gt=0, optional=True)
        check_int("seed", self.seed, ge=0)
        check_int("inject_bad_head_at", self.inject_bad_head_at, ge=0, optional=True)
