"""Checks of a run config that need its data or its checkpoint, run before any model loads.

:func:`specialize.run.load_run_config` checks every field's type and range from the config
alone. What needs files is checked here, first thing in a run (:func:`check_run_inputs`),
so that a bad value fails in seconds, not after a model was loaded or trained:

* the scenario's data set loads (files, ``split``, ``root``, ``dataset_options``), every class
  id is in range for it, every target class has samples in the pool, and something of the
  stream's classes is held out (the curves are measured there);
* ``model.checkpoint`` exists, or ``model.train_config`` (which prepares the default model)
  exists and is valid;
* the model fits the run (:func:`check_model_fits`): the thresholds fit its number of exits,
  and it predicts the data set's classes. Read from the checkpoint's header, so before the
  model is built; when the default model is not prepared yet (its first use) this one check
  runs right after it is;
* with ``policy.budget``, the checkpoint (or the recipe of the default model) holds
  validation data out of training: the budget controller's evidence.

Every failure is one :class:`configkit.ConfigError` naming the field; a missing data set stays
a ``FileNotFoundError`` whose message says how to get it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from backbones.checkpoint import read_checkpoint
from backbones.contract import MultiExitModel
from configkit import ConfigError, check_choice, from_dict
from specialize.models.zoo import (
    default_checkpoint,
    default_model_config,
    load_train_config,
    load_train_config_dict,
)
from streams.datasets import DataFormatError, list_datasets
from streams.replay import Stream, build_stream
from streams.scenarios import ScenarioConfig

if TYPE_CHECKING:
    from specialize.run.config import RunConfig

__all__ = ["ModelShape", "check_model_fits", "check_run_inputs"]

ModelShape = tuple[int, int | None]  # (number of exits, number of classes or None: unknown)


def check_run_inputs(config: RunConfig) -> Stream:
    """Check what a run reads (data set, checkpoint) against its config, before the model loads.

    Args:
        config: A run config (already type- and range-checked).

    Returns:
        The run's stream, its inputs as the data set comes (adapt them to the model with
        :func:`specialize.run.fit_inputs`).

    Raises:
        ConfigError: A value that does not fit the data or the model; the message names it.
        FileNotFoundError: The data set's files are missing (the message says how to get them).
        backbones.checkpoint.CheckpointError: The checkpoint file is corrupt.
    """
    stream = _build_stream(config)
    shape = _checkpoint_shape(config)
    if shape is not None:
        check_model_fits(config, shape, stream)
    if config.policy.budget is not None:
        _check_validation_data(config)
    return stream


def _check_validation_data(config: RunConfig) -> None:
    """A budget needs the model's validation data: a ``val_size`` or a ``val_split``."""
    if config.model.checkpoint is not None:
        recipe, source = read_checkpoint(config.model.checkpoint).get("train_config"), \
            f"model.checkpoint {config.model.checkpoint!r}"
        recipe = load_train_config_dict(recipe) if recipe else None
    else:
        path = config.model.train_config or default_model_config(config.dataset)
        recipe, source = load_train_config(path), f"model.train_config {str(path)!r}"
    if recipe is None or not getattr(recipe, "val_size", getattr(recipe, "val_split", 0)):
        raise ConfigError(
            f"policy.budget: {source} holds no validation data out of training, which the "
            "budget controller needs; train the model with some held out (specialize train "
            "CONFIG val_size=5000), or set policy.budget=null for fixed thresholds")


def check_model_fits(config: RunConfig, model: MultiExitModel | ModelShape,
                     stream: Stream) -> None:
    """Check that the thresholds fit the model's exits and the model the data set's classes.

    Args:
        config: The run config.
        model: The model, or its ``(num_exits, num_classes)`` read from a checkpoint.
        stream: The run's stream.

    Raises:
        ConfigError: ``policy.thresholds`` or the model does not fit.
    """
    num_exits, num_classes = (model if isinstance(model, tuple)
                              else (model.num_exits, model.num_classes))
    thresholds = config.policy.thresholds
    try:
        config.policy.thresholds_tensor(num_exits)
    except ValueError:
        raise ConfigError(
            f"policy.thresholds: the model has {num_exits} exits, so give one number, "
            f"{num_exits - 1} (one per early exit) or {num_exits} (the last is ignored); got "
            f"{list(thresholds) if isinstance(thresholds, tuple) else thresholds}") from None
    if num_classes is not None and num_classes != stream.num_classes:
        field = "model.checkpoint" if config.model.checkpoint else "model.train_config"
        raise ConfigError(
            f"{field}: the model predicts {num_classes} classes, but the scenario's data set "
            f"{config.dataset} has {stream.num_classes}; use a model trained on {config.dataset}")


def _build_stream(config: RunConfig) -> Stream:
    scenario = from_dict(ScenarioConfig, config.scenario, where="scenario")
    try:
        stream = build_stream(scenario)
    except ConfigError as err:  # a class id out of range, other_rate with no other class
        raise ConfigError(f"scenario.{err}") from None
    except DataFormatError:
        raise
    except (ValueError, TypeError) as err:  # the reader rejected split, root or an option
        raise ConfigError(f"scenario: {err}") from err
    if stream.eval_in is None:
        raise ConfigError(
            f"scenario.holdout_fraction: {scenario.holdout_fraction:g} holds out no sample of "
            f"the stream's classes {list(stream.classes)}; raise it (the curves before and "
            "after are measured on held-out samples)")
    return stream


def _checkpoint_shape(config: RunConfig) -> ModelShape | None:
    """``(num_exits, num_classes)`` from the checkpoint's header; ``None`` if not there yet."""
    path = config.model.checkpoint
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"model.checkpoint: no such file {path!r}; give a checkpoint written "
                          "by `specialize train`, or null for the data set's default model")
    if path is None:
        path = _default_checkpoint(config)
        if path is None:
            return None
    ckpt = read_checkpoint(path)
    heads = {key.split(".")[1] for key in ckpt["state_dict"] if key.startswith("heads.")}
    num_classes = ckpt["build_args"].get("num_classes")
    return len(heads), None if num_classes is None else int(num_classes)


def _default_checkpoint(config: RunConfig) -> Path | None:
    """The cached default model's checkpoint; ``None`` when it is not prepared yet."""
    train_config = config.model.train_config or default_model_config(config.dataset)
    if not Path(train_config).is_file():
        raise ConfigError(f"model.train_config: no such file {str(train_config)!r}; give a "
                          "model config such as configs/backbones/fashion_mnist_tiny.yaml")
    try:
        recipe = load_train_config(train_config)
        check_choice("dataset", recipe.dataset, list_datasets())
        return default_checkpoint(train_config, train_if_missing=False, progress=False)
    except ConfigError as err:
        raise ConfigError(f"model.train_config: {err}") from None
    except FileNotFoundError:
        return None
