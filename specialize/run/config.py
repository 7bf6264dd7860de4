"""The run's configuration: every section of a ``specialize run`` config and how it is read.

A run config is YAML with the sections below (or a bare scenario file, whose defaults fill in
the rest); ``key=value`` overrides reach any field. Each section validates itself on
construction, so a bad value fails before anything loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbones.inputs import BAD_INPUT_ACTIONS
from configkit import (
    ConfigError,
    apply_overrides,
    check_choice,
    check_fields,
    check_int,
    check_number,
    check_threads,
    from_dict,
    load_yaml,
)
from specialize.drift.tracker import DEFAULT_MAX_WINDOWS
from specialize.policy import MEASURE_MAX, ExitPolicy
from specialize.updater import UpdaterConfig
from streams.scenarios import ScenarioConfig

__all__ = ["DriftConfig", "EngineConfig", "EvaluationConfig", "ModelConfig", "RunConfig",
           "load_run_config"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class ModelConfig:
    """Which model to specialize."""

    # checkpoint file; None -> the cached default, trained on first use from train_config
    checkpoint: str | None = None
    # config of the model when checkpoint is None (configs/backbones/...); None -> the
    # default of the scenario's data set (fashion_mnist_tiny.yaml, tiny_imagenet_lite0.yaml)
    train_config: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class EngineConfig:
    """How the stream is served."""

    # samples per engine step (1 = the on-device case)
    batch_size: int = 1
    # real skipping with backbones.executor.DynamicExecutor (false: the reference forward)
    executor: bool = True
    # torch CPU threads while serving the stream; 1 is fastest at batch 1 (3 ms vs 69 ms per
    # sample with 2 threads on a busy 2-core machine); None keeps torch's default
    num_threads: int | None = 1
    # malformed or non-finite inputs: error | skip (skipped samples are counted)
    on_bad_input: str = "error"
    # share of samples audited: run on to the final exit after answering (label-free
    # checks: the updater's health, the summary's estimates); None: 0.02 with policy.budget,
    # else 0 (no audit)
    audit_rate: float | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        check_int("batch_size", self.batch_size, ge=1)
        check_number("audit_rate", self.audit_rate, ge=0, le=1, optional=True)
        check_threads("num_threads", self.num_threads)
        check_choice("on_bad_input", self.on_bad_input, BAD_INPUT_ACTIONS)


@dataclass
class DriftConfig:
    """Per-class compute tracking and the drift alarm."""

    # samples per tracker window (drift plot resolution)
    window: int = 250
    # alarm on the predicted-class mix: none | class_mix
    alarm: str = "class_mix"
    # class-mix alarm: reference/recent window size and total-variation threshold (100
    # samples: the switch scenario alarms 31-32 samples after its switch, no alarm before)
    alarm_window: int = 100
    alarm_threshold: float = 0.3
    # reset the heads to the base heads when the alarm fires, so heads specialized for the
    # past stop holding back the new classes (anchored heads need both heads to agree)
    reset_on_alarm: bool = True
    # tracker history entries kept; beyond, the oldest windows merge in pairs (the default
    # keeps 125,000 samples at full resolution with window 250)
    max_windows: int = DEFAULT_MAX_WINDOWS
    # alarm positions kept (the last ones; summary.json's drift.alarm_count counts them all)
    max_alarms: int = 1000

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("window", "alarm_window", "max_alarms"):
            check_int(name, getattr(self, name), ge=1)
        check_int("max_windows", self.max_windows, ge=2)
        check_choice("alarm", self.alarm, ("none", "class_mix"))
        check_number("alarm_threshold", self.alarm_threshold, gt=0, le=1)


@dataclass
class EvaluationConfig:
    """How the held-out curves are measured."""

    # evaluation batch size (one pass of every exit)
    batch_size: int = 256
    # iso-accuracy target: the before curve's peak accuracy minus this many points
    iso_drop: float = 0.5
    # also replay the stream with the model frozen (the side-by-side baseline)
    frozen_replay: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        check_int("batch_size", self.batch_size, ge=1)
        check_number("iso_drop", self.iso_drop, ge=0)


@dataclass
class RunConfig:
    """A whole experiment; every field can be overridden as ``section.key=value``."""

    scenario: dict[str, Any] = field(default_factory=dict)  # a streams ScenarioConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    # how exits answer: measure (max_softmax | margin | neg_entropy) and thresholds (one for
    # all early exits, or one per early exit)
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    updater: UpdaterConfig = field(default_factory=UpdaterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    out: str | None = None  # run folder; None -> runs/<scenario>-<UTC time>
    progress: bool = True  # progress bars
    # folder of the run's saved state (crash-safe runs): the same command resumes from it;
    # None: nothing is saved
    state: str | None = None
    # with state: save every this many samples of a replay, a multiple of engine.batch_size
    # (None: the multiple closest to 1000)
    save_every: int | None = None

    def __post_init__(self) -> None:
        check_fields(self)  # every section is built from its mapping and checks itself
        check_int("save_every", self.save_every, ge=1, optional=True)
        if self.save_every is not None and self.save_every % self.engine.batch_size:
            raise ConfigError(f"save_every: must be a multiple of engine.batch_size "
                              f"({self.engine.batch_size}) so that a resumed run sees the same "
                              f"batches, got {self.save_every}")
        scenario = from_dict(ScenarioConfig, self.scenario, where="scenario")  # validate early
        if scenario.holdout_fraction == 0:
            raise ConfigError(f"scenario.holdout_fraction: must be > 0 for a run (the curves "
                              f"are measured on held-out samples), got {scenario.holdout_fraction}")
        floor, measure = self.updater.min_confidence, self.policy.measure
        if floor is not None and floor > MEASURE_MAX[measure]:
            raise ConfigError(f"updater.min_confidence: must be <= {MEASURE_MAX[measure]} (the "
                              f"largest {measure}) or null, else no sample teaches; got {floor}")

    @property
    def save_interval(self) -> int:
        """Samples between saves of a replay: ``save_every``, or about 1000 samples."""
        if self.save_every is not None:
            return self.save_every
        batch = self.engine.batch_size
        return max(round(1000 / batch), 1) * batch

    @property
    def dataset(self) -> str:
        """The scenario's data set (it chooses the default model)."""
        return from_dict(ScenarioConfig, self.scenario, where="scenario").dataset


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run config, or a bare scenario file (defaults fill in the rest).

    Plain ``key=value`` overrides whose key is a scenario field (``classes``, ``seed``,
    ``length`` ...) apply to the scenario; dotted keys reach any section
    (``updater.mode=sync``); ``out=DIR`` chooses the run folder.

    Args:
        path: YAML file, or the name of a file in configs/scenarios or configs/runs.
        overrides: ``key=value`` strings.

    Returns:
        The validated run config.
    """
    data = load_yaml(_resolve(path))
    if "scenario" not in data or not isinstance(data["scenario"], dict):
        data = {"scenario": data}
        data["scenario"].setdefault("name", Path(path).stem)
    scenario_fields = {f.name for f in dataclasses.fields(ScenarioConfig)}
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    routed = []
    for text in overrides:
        key = text.partition("=")[0].strip()
        if "." not in key and key not in run_fields:
            if key not in scenario_fields:
                raise ConfigError(
                    f"{key}: unknown key; allowed keys: the run's ({', '.join(sorted(run_fields))})"
                    f" and the scenario's ({', '.join(sorted(scenario_fields))})")
            text = f"scenario.{text.strip()}"
        routed.append(text)
    return from_dict(RunConfig, apply_overrides(data, routed))


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        return path
    for folder in ("runs", "scenarios"):
        candidate = CONFIG_DIR / folder / f"{path.stem}.yaml"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"config {path} not found (also looked in {CONFIG_DIR}/runs and "
                            f"{CONFIG_DIR}/scenarios)")
