"""Trained backbones on disk: train one from a config, and the cached default model.

``default_checkpoint()`` returns the checkpoint of ``configs/backbones/fashion_mnist_tiny.yaml``,
training it once (about 10 minutes on 2 CPU cores) if the cache does not hold it yet. Cache
entries are keyed by a hash of the resolved training config (``TrainConfig.fingerprint``), so
changing any field that changes the trained model trains a new entry; the cache folder is
``$SPECIALIZE_CACHE`` or ``~/.cache/specialize``. An interrupted training resumes from its
last completed epoch on the next call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from backbones import create_backbone
from backbones.checkpoint import CheckpointError, read_checkpoint
from backbones.head_fit import FrozenBackboneConfig
from backbones.multi_exit import MultiExitNet
from backbones.train import TrainConfig, TrainResult, config_fingerprint, train
from configkit import ConfigError, apply_overrides, check_choice, from_dict, load_yaml
from specialize.models.pretrained import load_split, prepare_pretrained_exits
from specialize.models.runtime import input_transform
from streams.datasets import ArrayDataset, load_dataset

CACHE_ENV = "SPECIALIZE_CACHE"
DEFAULT_CONFIG = (
    Path(__file__).resolve().parents[2] / "configs" / "backbones" / "fashion_mnist_tiny.yaml"
)

CheckpointStatus = Literal["complete", "partial", "missing", "corrupt", "other"]


def cache_dir() -> Path:
    """The cache folder: ``$SPECIALIZE_CACHE`` or ``~/.cache/specialize``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "specialize"


ModelRecipe = TrainConfig | FrozenBackboneConfig
RECIPES: dict[str, type] = {"joint": TrainConfig, "frozen_backbone": FrozenBackboneConfig}
# The model a run uses when it names none: the cached default of its data set.
DEFAULT_MODEL_CONFIGS = {
    "fashion_mnist": DEFAULT_CONFIG,
    "tiny_imagenet": DEFAULT_CONFIG.with_name("tiny_imagenet_lite0.yaml"),
}


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelRecipe:
    """Read a model config (YAML) and apply ``key=value`` overrides.

    ``recipe: joint`` (the default; ``backbones.train.TrainConfig``) trains exits and gates
    jointly; ``recipe: frozen_backbone`` (``backbones.head_fit.FrozenBackboneConfig``) fits
    exit heads on a frozen pretrained backbone.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: Invalid YAML, unknown recipe, key or value.
    """
    data = apply_overrides(load_yaml(path), list(overrides))
    try:
        check_choice("recipe", data.get("recipe", "joint"), tuple(RECIPES))
        return load_train_config_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def default_model_config(dataset: str) -> Path:
    """The model config a run on ``dataset`` uses by default (prepared once, then cached).

    Data sets without a model of their own get the Fashion-MNIST one, their images adapted
    to its channels and size (``streams.transforms.InputTransform``).
    """
    return DEFAULT_MODEL_CONFIGS.get(dataset, DEFAULT_CONFIG)


def cache_path(config: ModelRecipe, name: str = "backbone") -> Path:
    """The cache file of ``config``: ``<cache>/backbones/<name>-<config hash>.pt``."""
    return cache_dir() / "backbones" / f"{name}-{config.fingerprint()}.pt"


def checkpoint_status(path: str | Path, config: ModelRecipe) -> CheckpointStatus:
    """What ``path`` holds for ``config``.

    Returns:
        ``complete`` (finished training of this config), ``partial`` (interrupted: resume
        it), ``missing`` (no file), ``corrupt`` (unreadable) or ``other`` (another config).
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError:
        return "corrupt"
    stored = ckpt.get("train_config") or {}
    if config_fingerprint(stored, type(config).RUNTIME_FIELDS) != config.fingerprint():
        return "other"
    return "complete" if int(ckpt.get("epoch", 0)) >= config.epochs else "partial"


def load_data(config: TrainConfig) -> tuple[Any, Any]:
    """The training split and the evaluation split a config names (with its limits)."""
    train_data = load_dataset(config.dataset, split="train", root=config.data_root,
                              **config.dataset_args)
    eval_data = load_dataset(config.dataset, split=config.eval_split, root=config.data_root,
                             **config.dataset_args)
    if config.val_size:
        train_data = train_data.subset(range(len(train_data) - _checked_val_size(config,
                                                                                 train_data)))
    if config.train_limit is not None:
        train_data = train_data.subset(range(min(config.train_limit, len(train_data))))
    if config.eval_limit is not None:
        eval_data = eval_data.subset(range(min(config.eval_limit, len(eval_data))))
    return train_data, eval_data


def _checked_val_size(config: TrainConfig, train_data: ArrayDataset) -> int:
    if config.val_size >= len(train_data):
        raise ConfigError(f"val_size: must be smaller than the train split ({len(train_data)} "
                          f"images), got {config.val_size}")
    return config.val_size


def validation_data(train_config: dict[str, Any]) -> ArrayDataset:
    """The validation images of a checkpoint's model (never seen while training it).

    Args:
        train_config: The config the checkpoint stores (``meta["train_config"]``).

    Returns:
        ``frozen_backbone``: its ``val_split``; ``joint``: the last ``val_size`` images of the
        train split.

    Raises:
        ValueError: The model was trained on every image it has (``val_size: 0``).
    """
    config = load_train_config_dict(train_config)
    if isinstance(config, FrozenBackboneConfig):

        return load_split(config, config.val_split)
    if not config.val_size:
        raise ValueError(
            "this checkpoint has no validation data: it was trained on its whole train split; "
            "train it with val_size=N (e.g. specialize train CONFIG val_size=5000)")
    data = load_dataset(config.dataset, split="train", root=config.data_root,
                        **config.dataset_args)
    size = _checked_val_size(config, data)
    return data.subset(range(len(data) - size, len(data)), name=f"{data.name}:validation")


def training_data(meta: dict[str, Any]) -> list[str]:
    """The ``dataset/split`` names whose images taught a checkpoint's model.

    Args:
        meta: A checkpoint without its tensors (``load_checkpoint``'s second value).

    Returns:
        The training data, plus a ``frozen_backbone`` recipe's validation split (it chooses
        the heads); empty when the checkpoint does not say.
    """
    name = (meta.get("data") or {}).get("name")
    names = [name] if name else []
    config = meta.get("train_config") or {}
    if name and config.get("recipe") == "frozen_backbone" and config.get("val_split"):
        names.append(f"{name.split('/')[0]}/{config['val_split']}")
    return names


def load_train_config_dict(data: dict[str, Any]) -> ModelRecipe:
    """A model config from the plain dict a checkpoint stores."""
    data = dict(data)
    recipe = data.pop("recipe", "joint")
    if recipe == "frozen_backbone":
        data["recipe"] = recipe
    return from_dict(RECIPES[recipe], data)


def build_model(config: TrainConfig, data: Any) -> MultiExitNet:
    """Seed the global RNG with ``config.seed`` and build the model the config names for data."""
    _, channels, height, width = data.images.shape
    kwargs = {"num_classes": len(data.class_names), "in_chans": int(channels),
              "input_size": (int(channels), int(height), int(width))}
    kwargs.update(config.model_args)
    if "in_chans" in config.model_args and "input_size" not in config.model_args:
        kwargs["input_size"] = (int(kwargs["in_chans"]), int(height), int(width))
    torch.manual_seed(config.seed)
    return create_backbone(config.arch, gating=config.gating, gate_mode=config.gate_mode,
                           **kwargs)


def train_from_config(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Load the data, build the model and train it, writing ``out`` after every epoch.

    Works alone or under ``torchrun --nproc_per_node=N`` (gloo process group, created here
    when ``WORLD_SIZE > 1``).

    Args:
        config: The training config.
        out: Checkpoint path.
        resume: Checkpoint of an interrupted run of the same config to continue from.
        progress: Progress bars and per-epoch summaries (rank 0 only).

    Returns:
        What ``backbones.train.train`` returns.
    """
    with _process_group() as world:
        if config.num_threads:
            torch.set_num_threads(max(1, config.num_threads // world))
        train_data, eval_data = load_data(config)
        model = build_model(config, train_data)
        transform = input_transform(model, train_data)
        return train(model, train_data, eval_data, config, transform=transform,
                     checkpoint_path=out, resume_from=resume, progress=progress)


@contextlib.contextmanager
def _process_group() -> Iterator[int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        yield world
    finally:
        if created:
            dist.destroy_process_group()


def default_checkpoint(
    config_path: str | Path = DEFAULT_CONFIG,
    *,
    overrides: Sequence[str] = (),
    train_if_missing: bool = True,
    progress: bool = True,
) -> Path:
    """The checkpoint of a backbone config from the cache, trained first if needed.

    Args:
        config_path: Training config; default ``configs/backbones/fashion_mnist_tiny.yaml``.
        overrides: ``key=value`` overrides of the config (part of the cache key).
        train_if_missing: Train (or finish an interrupted training) when the cache lacks it.
        progress: Show training progress.

    Returns:
        Path of the finished checkpoint (load it with ``backbones.checkpoint.load_checkpoint``).

    Raises:
        FileNotFoundError: Not cached and ``train_if_missing`` is False.
    """
    config = load_train_config(config_path, overrides)
    path = cache_path(config, Path(config_path).stem)
    if checkpoint_status(path, config) == "complete":
        return path
    if not train_if_missing:
        raise FileNotFoundError(
            f"no trained checkpoint of {config_path} in the cache ({path}); run `specialize "
            f"train {config_path}` or call default_checkpoint(train_if_missing=True)"
        )
    with _file_lock(path.with_name(path.name + ".lock")):
        status = checkpoint_status(path, config)  # another process may have trained it
        if status == "complete":
            return path
        if status in ("corrupt", "other"):
            print(f"specialize: {path} is {'corrupt' if status == 'corrupt' else 'stale'}; "
                  "training it again", file=sys.stderr)
            path.unlink()
        if progress:
            print(f"specialize: preparing {Path(config_path).name} once (about 10 minutes on "
                  f"2 CPU cores); it is cached at {path}", file=sys.stderr)
        prepare_model(config, path, resume=path if status == "partial" else None,
                      progress=progress)
    return path


def prepare_model(config: ModelRecipe, out: str | Path, *, resume: str | Path | None = None,
                  progress: bool = True) -> None:
    """Train (``joint``) or fit (``frozen_backbone``) the model a config describes into ``out``."""
    if isinstance(config, FrozenBackboneConfig):

        prepare_pretrained_exits(config, out, progress=progress)
        return
    train_from_config(config, out, resume=resume, progress=progress)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
