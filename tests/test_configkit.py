"""configkit: YAML, overrides with list indices, type checks from hints, every section's ranges."""

from __future__ import annotations

import dataclasses
import doctest
import math

import pytest

import configkit
import configkit.checks
import configkit.sources
from backbones.train import TrainConfig
from configkit import (
    ConfigError,
    apply_overrides,
    check_int,
    check_number,
    from_dict,
    load_yaml,
    to_dict,
)
from specialize.cli import main
from specialize.policy import ExitPolicy
from specialize.run import RunConfig, build_policy, load_run_config
from specialize.updater import UpdaterConfig


def run_config(*overrides: str) -> RunConfig:
    """A run config built from a default scenario and ``overrides``, as the CLI would."""
    return from_dict(RunConfig, apply_overrides({"scenario": {}}, list(overrides)))


@pytest.mark.parametrize("module", [configkit.checks, configkit.sources])
def test_doctest_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_one_error_type():
    import streams
    import streams.scenarios

    assert issubclass(ConfigError, ValueError)
    assert streams.scenarios.ConfigError is ConfigError is streams.ConfigError


# ------------------------------------------------------------------------------- overrides


def test_overrides_descend_into_sections_and_list_elements():
    data = {"scenario": {"phases": [{"length": 2000}, {"length": 2000, "classes": [1, 2]}]}}
    result = apply_overrides(data, ["scenario.phases.1.length=500", "scenario.phases.0={}",
                                    "scenario.phases.1.classes.0=7", "updater.lr=0.01",
                                    "out="])
    assert result == {"scenario": {"phases": [{}, {"length": 500, "classes": [7, 2]}]},
                      "updater": {"lr": 0.01}, "out": None}
    assert data["scenario"]["phases"][1] == {"length": 2000, "classes": [1, 2]}  # a copy


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("scenario.phases.2.length=5", r"scenario\.phases has 2 items; use an index in 0\.\.1, "
                                       "got 2"),
        ("scenario.phases.-1.length=5", r"use an index in 0\.\.1, got -1"),
        ("scenario.phases.last.length=5", r"use an index in 0\.\.1, got last"),
        ("scenario.empty.0=5", r"scenario\.empty is an empty list; no index is allowed"),
        ("scenario.name.first=x", r"scenario\.name is a value, not a section or a list"),
        ("seed", "is not of the form key=value"),
        ("=3", "is not of the form key=value"),
        ("classes=[1,", "value is not valid YAML"),
    ],
)
def test_bad_overrides_name_the_key_and_what_is_allowed(override, match):
    data = {"scenario": {"name": "s", "empty": [], "phases": [{}, {}]}}
    with pytest.raises(ConfigError, match=match):
        apply_overrides(data, [override])


def test_load_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_yaml(path) == {}
    path.write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_yaml(path)
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path / "absent.yaml")


def test_switch_phases_via_list_index_overrides():
    config = load_run_config("switch", ["scenario.phases.1.length=500"])
    assert [phase["length"] for phase in config.scenario["phases"]] == [2000, 500]


# ------------------------------------------------------------------------------ type checks


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["engine.batch_size='8'"], "engine.batch_size: must be an integer, got '8'"),
        (["engine.batch_size=2.5"], "engine.batch_size: must be an integer, got 2.5"),
        (["engine.executor=yes please"], "engine.executor: must be true or false"),
        (["model.checkpoint=5"], "model.checkpoint: must be a string or null, got 5"),
        (["policy.thresholds=[0.9, high]"], "policy.thresholds.1: must be a number, got 'high'"),
        (["policy.thresholds=high"],
         "policy.thresholds: must be a number or a list of numbers, got 'high'"),
        (["updater.seed=1.5"], "updater.seed: must be an integer, got 1.5"),
        (["updater.rollback=1"], "updater.rollback: must be true or false, got 1"),
        (["progress=maybe"], "progress: must be true or false, got 'maybe'"),
        (["out=3"], "out: must be a string or null, got 3"),
        (["scenario=tops"], "scenario: must be a mapping, got 'tops'"),
    ],
)
def test_type_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        run_config(*overrides)


@pytest.mark.parametrize("section", ["model", "policy", "updater", "engine", "drift", "evaluation"])
@pytest.mark.parametrize("value", ["5", "fast", "[1, 2]"])
def test_a_section_given_as_a_scalar_or_list_is_an_error(section, value):
    with pytest.raises(ConfigError, match=f"^{section}: must be a mapping of key: value, got "):
        run_config(f"{section}={value}")


def test_unknown_keys_list_the_allowed_ones():
    with pytest.raises(ConfigError, match="^engine.threads: unknown key; allowed keys: "
                                          "batch_size, executor, num_threads, on_bad_input, "
                                          "audit_rate$"):
        run_config("engine.threads=2")
    with pytest.raises(ConfigError, match="^colour: unknown key; allowed keys: scenario, model, "
                                          "policy, updater"):
        from_dict(RunConfig, {"colour": 1})
    with pytest.raises(ConfigError, match=r"^bogus: unknown key; allowed keys: the run's \("):
        load_run_config("tops", ["bogus=1"])
    with pytest.raises(ConfigError, match="^schedules: unknown key; allowed keys: arch, gating"):
        from_dict(TrainConfig, {"schedules": "cosine"})


def test_values_are_normalised_and_round_trip():
    config = run_config("policy.thresholds=[0.9, 1]", "updater.lr=1", "drift.alarm_threshold=1")
    assert config.policy == ExitPolicy("max_softmax", (0.9, 1.0))
    assert build_policy(config) is config.policy
    assert config.updater.lr == 1.0 and isinstance(config.updater.lr, float)
    assert isinstance(config.drift.alarm_threshold, float)
    assert from_dict(RunConfig, to_dict(config)) == config
    assert to_dict(config)["policy"] == {"measure": "max_softmax", "thresholds": [0.9, 1.0],
                                         "budget": None, "budget_confidence": 0.95,
                                         "budget_thresholds": "per_exit",
                                         "retune_every": 500, "history_size": 200}
    train = from_dict(TrainConfig, {"step_milestones": [1, 2], "exit_weights": [0, 1]})
    assert train.step_milestones == (1.0, 2.0) and train.exit_weights == (0.0, 1.0)


def test_sections_may_be_given_as_instances():
    config = RunConfig(scenario={"length": 5}, updater=UpdaterConfig(lr=0.5),
                       policy={"thresholds": 0.5})
    assert config.updater.lr == 0.5 and config.policy.thresholds == 0.5


# ----------------------------------------------------------------------------- range checks


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("engine.batch_size=0", "engine.batch_size: must be an integer >= 1, got 0"),
        ("engine.num_threads=0",
         r"engine.num_threads: must be an integer in \[1, 1024\] or null, got 0"),
        ("engine.on_bad_input=drop",
         "engine.on_bad_input: unknown value 'drop'; allowed: error, skip"),
        ("drift.window=0", "drift.window: must be an integer >= 1, got 0"),
        ("drift.alarm=page", "drift.alarm: unknown value 'page'; allowed: none, class_mix"),
        ("drift.alarm_window=0", "drift.alarm_window: must be an integer >= 1, got 0"),
        ("drift.alarm_threshold=0", r"drift.alarm_threshold: must be a number in \(0, 1\]"),
        ("drift.alarm_threshold=1.5", r"drift.alarm_threshold: must be a number in \(0, 1\]"),
        ("evaluation.batch_size=0", "evaluation.batch_size: must be an integer >= 1, got 0"),
        ("evaluation.iso_drop=-1", "evaluation.iso_drop: must be a number >= 0, got -1"),
        ("evaluation.iso_drop=.inf", "evaluation.iso_drop: must be a number >= 0, got inf"),
        ("updater.queue_size=0", "updater.queue_size: must be an integer >= 1, got 0"),
        ("updater.anchor_weight=1", r"updater.anchor_weight: must be a number in \(0, 1\)"),
        ("updater.min_confidence=.nan",
         "updater.min_confidence: must be a finite number or null, got nan"),
        ("updater.momentum=1", r"updater.momentum: must be a number in \[0, 1\)"),
        ("policy.measure=entropy", "policy.measure: unknown value 'entropy'; allowed: max_soft"),
        ("policy.thresholds=1.5", "policy.thresholds: .* use \\+inf to disable an exit"),
        ("policy.thresholds=[0.5, .nan]", "policy.thresholds: must not be NaN"),
        ("scenario.length=0", "scenario.length: must be an integer >= 1, got 0"),
        ("scenario.phases=[{seed: 3}]", "scenario.phases: only used by scenario phases"),
        ("scenario.holdout_fraction=1", r"scenario.holdout_fraction: must be a number in \[0, 1\)"),
        ("scenario.holdout_fraction=0", "scenario.holdout_fraction: must be > 0 for a run"),
    ],
)
def test_every_run_section_checks_its_ranges(override, match):
    with pytest.raises(ConfigError, match=match):
        run_config(override)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"epochs": 0}, "epochs: must be an integer >= 1, got 0"),
        ({"lr": 0}, "lr: must be a number > 0, got 0"),
        ({"gate_lr": -0.1}, "gate_lr: must be a number >= 0"),
        ({"gate_weight_decay": -1}, "gate_weight_decay: must be a number >= 0 or null"),
        ({"label_smoothing": 1}, r"label_smoothing: must be a number in \[0, 1\)"),
        ({"step_gamma": 0}, r"step_gamma: must be a number in \(0, 1\]"),
        ({"distill_temperature": 0}, "distill_temperature: must be a number > 0"),
        ({"crop_padding": -1}, "crop_padding: must be an integer >= 0"),
        ({"num_threads": 0}, "num_threads: must be an integer in \\[1, 1024\\] or null"),
        ({"train_limit": 0}, "train_limit: must be an integer >= 1 or null"),
        ({"schedule": "linear"}, "schedule: unknown value 'linear'; allowed: cosine, step"),
        ({"gate_mode": "serial"}, "gate_mode: unknown value 'serial'; allowed: parallel"),
        ({"exit_weights": [0, 0]}, "exit_weights: must be >= 0 with a positive sum"),
        ({"step_milestones": ["half"]}, "step_milestones.0: must be a number, got 'half'"),
        ({"model_args": 4}, "model_args: must be a mapping, got 4"),
    ],
)
def test_train_config_checks_its_ranges(fields, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, fields)


def test_check_functions_describe_the_allowed_values():
    assert check_int("n", None, ge=1, optional=True) is None
    assert check_int("n", 3, ge=1, le=3) == 3
    with pytest.raises(ConfigError, match=r"^n: must be an integer in \[1, 3\], got 4$"):
        check_int("n", 4, ge=1, le=3)
    with pytest.raises(ConfigError, match="^n: must be an integer, got True$"):
        check_int("n", True)
    assert check_number("ir", math.inf, ge=1, allow_inf=True) == math.inf
    with pytest.raises(ConfigError, match=r"^ir: must be a number >= 1 or \.inf, got 0\.5$"):
        check_number("ir", 0.5, ge=1, allow_inf=True)
    with pytest.raises(ConfigError, match="^x: must be a number <= 2, got 3$"):
        check_number("x", 3, le=2)
    with pytest.raises(ConfigError, match="^x: must be a finite number, got inf$"):
        check_number("x", math.inf)


def test_dataclass_errors_become_config_errors():
    @dataclasses.dataclass
    class Needs:
        size: int

    with pytest.raises(ConfigError, match="^section: .*size"):
        from_dict(Needs, {}, where="section")


# ---------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine.num_threads=0", "length=10"],
         "engine.num_threads: must be an integer in [1, 1024] or null, got 0"),
        (["updater=5"], "updater: must be a mapping of key: value, got 5"),
        (["engine=fast"], "engine: must be a mapping of key: value, got 'fast'"),
    ],
)
def test_cli_fails_fast_with_one_line(overrides, message, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for an invalid config")

    monkeypatch.setattr("specialize.run.experiment.load_model", no_model)
    assert main(["run", "configs/scenarios/tops.yaml", *overrides]) == 2
    err = capsys.readouterr().err
    assert err == f"specialize: error: ConfigError: {message}\n"
