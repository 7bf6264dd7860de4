"""``TrainConfig``: how to train a multi-exit backbone, validated through :mod:`configkit`.

Loaded from YAML (``configs/backbones/*.yaml``, see ``specialize.models.zoo.load_train_config``);
``TrainConfig.fingerprint`` keys the cache of trained models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backbones.cost import GATE_MODES
from configkit import (
    ConfigError,
    check_choice,
    check_fields,
    check_int,
    check_number,
    check_threads,
    to_dict,
    to_plain,
)

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """How to train a multi-exit backbone; loaded from YAML (``configs/backbones/*.yaml``).

    The ``dataset``/``data_root``/``dataset_args``/``eval_split`` fields are read by the glue
    in ``specialize`` (``backbones`` never loads data itself); the model fields by whoever
    builds the model. ``train()`` uses the rest.
    """

    # --- model
    arch: str = "tiny_resnet"  # registered backbone name (backbones.list_backbones())
    gating: bool = True  # LC-Net gates in every residual block; False: the ungated baseline
    gate_mode: str = "parallel"  # parallel | sequential LC-Net configuration (cost accounting)
    model_args: dict[str, Any] = field(default_factory=dict)  # more create_backbone kwargs
    init_checkpoint: str | None = None  # start from these weights (pretrained backbone); gates
    # missing from it keep their initialisation (all open)
    # --- data (used by the specialize glue)
    dataset: str = "fashion_mnist"  # streams.datasets.load_dataset name
    data_root: str | None = None  # data folder; None: the reader's default
    dataset_args: dict[str, Any] = field(default_factory=dict)  # more load_dataset kwargs
    eval_split: str = "test"  # split evaluated at the end of every epoch
    train_limit: int | None = None  # use only the first N training images (quick runs)
    val_size: int = 0  # hold the last N images of the train split out of training: the
    # checkpoint's validation data (threshold calibration; never seen by training)
    eval_limit: int | None = None  # evaluate only the first N images of eval_split
    # --- optimisation
    epochs: int = 5  # passes over the training data
    batch_size: int = 128  # global batch (split across processes under DDP)
    lr: float = 0.1  # peak learning rate of everything but the gates
    gate_lr: float = 0.01  # peak learning rate of the L-Net/C-Net gates (paper: lower)
    momentum: float = 0.9  # SGD momentum (Nesterov, no dampening)
    nesterov: bool = True  # Nesterov momentum (LC-Net 4.2)
    weight_decay: float = 5e-4  # L2 penalty of the backbone and heads (LC-Net 4.2)
    gate_weight_decay: float | None = None  # L2 penalty of the gates; None: weight_decay
    schedule: str = "cosine"  # cosine | step | constant, stepped every batch
    warmup_epochs: float = 0.0  # linear warm-up from lr / steps to lr over this many epochs
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training
    # after which the learning rate is multiplied by step_gamma
    step_gamma: float = 0.1  # step schedule decay factor
    # --- loss
    exit_weights: tuple[float, ...] | None = None  # CE weight of each exit; None: all 1.0
    label_smoothing: float = 0.0  # label smoothing of every exit's cross-entropy
    distill_weight: float = 0.0  # weight of distilling the final exit into the earlier ones
    distill_temperature: float = 3.0  # softmax temperature of that distillation
    l1_weight: float = 0.0  # weight of the L1 penalty on S_L and S_C (LC-Net 4.3); larger:
    # more gates at zero, fewer FLOPs, eventually lower accuracy
    # --- augmentation (tensor ops on the batch)
    crop_padding: int = 2  # random crop after zero padding by this many pixels; 0: off
    hflip: bool = True  # random horizontal flip with probability 0.5
    # --- run
    seed: int = 0  # seeds model init (torch.manual_seed), data order and augmentation
    eval_batch_size: int = 500  # batch size of the per-epoch evaluation
    channels_last: bool = False  # channels_last memory format (faster for ungated models)
    num_threads: int | None = None  # CPU threads in total (split across DDP processes)

    # Fields that do not change what is trained (left out of cache keys).
    RUNTIME_FIELDS = ("data_root", "eval_batch_size", "num_threads")
    # Fields added after models were cached: at these values they are left out of cache keys,
    # so older checkpoints keep their keys.
    LATER_FIELDS = {"val_size": 0}

    def __post_init__(self) -> None:
        check_fields(self)  # every field's type; lists become tuples, ints become floats
        check_choice("gate_mode", self.gate_mode, GATE_MODES)
        check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_int(name, getattr(self, name), ge=1)
        check_int("val_size", self.val_size, ge=0)
        for name in ("train_limit", "eval_limit"):
            check_int(name, getattr(self, name), ge=1, optional=True)
        check_threads("num_threads", self.num_threads)
        check_int("seed", self.seed, ge=0)
        check_int("crop_padding", self.crop_padding, ge=0)
        check_number("lr", self.lr, gt=0)
        for name in ("gate_lr", "momentum", "weight_decay", "warmup_epochs", "distill_weight",
                     "l1_weight"):
            check_number(name, getattr(self, name), ge=0)
        check_number("gate_weight_decay", self.gate_weight_decay, ge=0, optional=True)
        check_number("label_smoothing", self.label_smoothing, ge=0, lt=1)
        check_number("distill_temperature", self.distill_temperature, gt=0)
        check_number("step_gamma", self.step_gamma, gt=0, le=1)
        for i, milestone in enumerate(self.step_milestones):
            check_number(f"step_milestones.{i}", milestone, ge=0)
        weights = self.exit_weights
        for i, weight in enumerate(weights or ()):
            check_number(f"exit_weights.{i}", weight, ge=0)
        if weights is not None and (not weights or sum(weights) <= 0):
            raise ConfigError(
                f"exit_weights: must be >= 0 with a positive sum, got {list(weights)}")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what checkpoints store)."""
        return to_dict(self)

    def fingerprint(self) -> str:
        """A short hash of everything that changes the trained model (cache keys)."""
        return config_fingerprint(self.to_dict())


def config_fingerprint(config: Mapping[str, Any],
                       runtime_fields: tuple[str, ...] = TrainConfig.RUNTIME_FIELDS) -> str:
    """The ``fingerprint`` of a config stored as a plain dict (e.g. in a checkpoint).

    Args:
        config: The config's ``to_dict()``.
        runtime_fields: Fields left out (they do not change what is trained).
    """
    later = TrainConfig.LATER_FIELDS
    data = {k: v for k, v in to_plain(dict(config)).items()
            if k not in runtime_fields and not (k in later and v == later[k])}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
