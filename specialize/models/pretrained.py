"""Prepare a pretrained exits model: the ``frozen_backbone`` recipe, from config to checkpoint.

The glue between data (``streams``) and the fitting itself (``backbones.head_fit``): load the
fit and validation splits, build the timm exits model, load its pretrained backbone and
classifier (``backbones.pretrained``; nothing is downloaded), cache every head's input in one
backbone pass, fit the heads, and write a checkpoint whose metrics say what each exit
reaches. ``specialize.models.zoo.default_checkpoint`` calls it once per config and caches
the result.

Example: ``specialize train configs/backbones/tiny_imagenet_lite0.yaml`` (about 10 minutes on
2 CPU cores), or any ``specialize run`` on a Tiny-ImageNet scenario, which prepares it on
first use.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from backbones import create_backbone
from backbones.checkpoint import save_checkpoint
from backbones.contract import MultiExitModel
from backbones.head_fit import (
    FrozenBackboneConfig,
    fit_exit_heads,
    head_inputs,
    imagenet_rows,
    load_pretrained_backbone,
)
from specialize.models.runtime import input_transform, threads
from streams.datasets import ArrayDataset, load_dataset


def load_split(config: FrozenBackboneConfig, split: str) -> ArrayDataset:
    """A split of the config's data set, cut to ``per_class_limit`` images of each class."""
    data = load_dataset(config.dataset, split=split, root=config.data_root)
    if config.per_class_limit is None:
        return data
    labels = data.labels
    rank = torch.zeros_like(labels)
    for label in labels.unique():  # position of each image among its class, in file order
        members = (labels == label).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    return data.subset((rank < config.per_class_limit).nonzero().squeeze(1))


def build_pretrained_model(config: FrozenBackboneConfig,
                           data: ArrayDataset) -> tuple[MultiExitModel, Any]:
    """The exits model with its pretrained backbone, and the classifier for ``data``'s classes.

    Returns:
        ``(model, (weight, bias) or None)``: the pretrained classifier's rows of ``data``'s
        classes when their ids are ImageNet classes.
    """
    torch.manual_seed(config.seed)
    model = create_backbone(config.arch, num_classes=data.num_classes, **config.model_args)
    weight, bias = load_pretrained_backbone(model, config.weights)
    model.eval()
    if data.class_ids is None:
        return model, None
    try:
        rows = imagenet_rows(data.class_ids)
    except ValueError:
        return model, None
    return model, (weight[rows], bias[rows])


def prepare_pretrained_exits(config: FrozenBackboneConfig, out: str | Path, *,
                             progress: bool = True) -> Path:
    """Fit the exit heads of a pretrained backbone and write the checkpoint atomically.

    Args:
        config: The recipe.
        out: Checkpoint path.
        progress: Progress bars and per-exit results on stderr.

    Returns:
        ``out``.
    """
    start = time.perf_counter()
    with threads(config.num_threads):
        fit_data = load_split(config, config.fit_split)
        val_data = load_split(config, config.val_split)
        model, pretrained_head = build_pretrained_model(config, fit_data)
        transform = input_transform(model, fit_data)
        cached = {}
        for name, data in (("fit", fit_data), ("val", val_data)):
            inputs = head_inputs(model, data.images, transform,
                                 batch_size=config.feature_batch_size, progress=progress,
                                 desc=f"head inputs ({data.name})")
            cached[name] = (inputs, data.labels)
        features_seconds = time.perf_counter() - start
        metrics = fit_exit_heads(model, cached["fit"], cached["val"], config, pretrained_head,
                                 log=_logger(progress))
    metrics.update(
        exit_flops=[int(info["flops"]) for info in model.exit_info],
        fit_images=len(fit_data), val_images=len(val_data),
        seconds={"head_inputs": round(features_seconds, 1),
                 "total": round(time.perf_counter() - start, 1)},
    )
    data_info = {"name": fit_data.name, "mean": list(fit_data.mean), "std": list(fit_data.std),
                 "class_names": list(fit_data.class_names), "size": len(fit_data)}
    return save_checkpoint(out, model, train_config=config.to_dict(), metrics=metrics,
                           epoch=config.epochs, data=data_info)


def _logger(progress: bool):
    def log(line: str) -> None:
        if progress:
            print(f"specialize: {line}", file=sys.stderr)
    return log
