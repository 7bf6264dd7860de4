"""Property-based tests: any override or YAML document gives a valid config or one ConfigError.

Overrides use the real configs' field paths (and junk keys) with YAML-ish values of every
kind; documents are mutated real configs and random text. The only exception ever allowed
is :class:`configkit.ConfigError`; whatever loads must be a valid config (it re-validates
after a round trip through plain data, and the run checks that need the data either pass or
raise ``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from backbones.checkpoint import save_checkpoint
from backbones.head_fit import FrozenBackboneConfig
from backbones.train_config import TrainConfig
from configkit import ConfigError, from_dict, load_yaml, to_dict
from specialize.models.zoo import load_train_config
from specialize.policy import ExitPolicy
from specialize.run import RunConfig, load_run_config
from specialize.run.checks import check_run_inputs
from streams.scenarios import ScenarioConfig, load_scenario
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
RUN_BASES = ["configs/runs/demo.yaml", "configs/scenarios/tops.yaml",
             "configs/scenarios/switch.yaml", "configs/scenarios/zipf.yaml",
             "configs/scenarios/dirichlet.yaml", "configs/scenarios/tiny-imagenet/dogs.yaml"]
SCENARIO_BASES = [p for p in RUN_BASES if "scenarios" in p]
# FUZZ_EXAMPLES=N searches longer, with N random examples per test instead of a fixed few.
DEEP = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    """A few examples from a fixed seed in the suite (fast); more, random, with FUZZ_EXAMPLES."""
    return settings(max_examples=DEEP or examples, derandomize=not DEEP, deadline=None,
                    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                          HealthCheck.too_slow])


FAST = fuzz(150)


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of every field of a config dataclass, sections expanded."""
    paths = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        path = f"{prefix}{item.name}"
        paths.append(path)
        if dataclasses.is_dataclass(hints[item.name]):
            paths += _field_paths(hints[item.name], f"{path}.")
    return paths


SCENARIO_FIELDS = [f.name for f in dataclasses.fields(ScenarioConfig)]
RUN_PATHS = (
    _field_paths(RunConfig)
    + [f"scenario.{name}" for name in SCENARIO_FIELDS]
    + [f"scenario.phases.{i}.{name}" for i in range(3) for name in SCENARIO_FIELDS]
    + [f"scenario.phases.{i}" for i in range(3)]
    + [f"scenario.classes.{i}" for i in range(5)]
    + [f"policy.thresholds.{i}" for i in range(4)]
    + SCENARIO_FIELDS  # plain names go to the scenario
)
WORDS = ["sync", "async", "anchored", "plain", "hard", "soft", "max_softmax", "margin",
         "neg_entropy", "subset", "phases", "zipf", "iid", "dirichlet", "dominant",
         "fashion_mnist", "synthetic", "test", "train", "error", "skip", "class_mix", "none",
         "adam", "sgd", "", "0.9", "[1, 2]", "{}"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.integers(),
    st.integers(min_value=2**62, max_value=2**80), st.integers(max_value=-(2**62)),
    st.floats(), st.sampled_from([0.0, -0.0, 0.5, 0.9, 1.0, 1e-300, 1e308, -1.0]),
    st.sampled_from(WORDS), st.text(max_size=6),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(SCENARIO_FIELDS + ["length", "x"]),
                                  st.integers(-2, 2), st.text(max_size=4)),
                        inner, max_size=3),
    ),
    max_leaves=6,
)
junk_keys = st.text(alphabet="abcz._019-", min_size=0, max_size=12)
TAGS = ["!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!str", "!!null", "!!set",
        "!!omap", "!!pairs", "!!seq", "!!map", "!!python/tuple", "&a", "*a", "<<:", "? "]
yaml_text = st.one_of(
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=1000)),
    st.text(max_size=12),
    st.tuples(st.sampled_from(TAGS), st.sampled_from(["", " "]),
              st.one_of(st.text(max_size=6), st.sampled_from(["0x", "08", "1", "x", "[1]", "{}",
                                                              "2020-01-01", "''", ".nan"]))
              ).map("".join),
    st.sampled_from(["[1,", "!!int 0x", "2020-13-45", "!!bool x", "&a [*a]", "{a: &b [*b]}",
                     ".nan", "-.inf", "1e400", "9" * 40, "'\\0'", '"a\\0b"', "!!set {1}",
                     "!!binary aGk=", "2001-12-14", "[" * 40 + "]" * 40]),
)

def _leaf_hints() -> dict[str, object]:
    """Field name -> type hint, over the run config's sections and the scenario."""
    hints: dict[str, object] = {}
    for cls in [ScenarioConfig, RunConfig, *(
            h for h in typing.get_type_hints(RunConfig).values() if dataclasses.is_dataclass(h))]:
        hints.update(typing.get_type_hints(cls))
    return hints


LEAF_HINTS = _leaf_hints()
_PLAUSIBLE = {int: st.integers(0, 12), float: st.floats(0.01, 1), bool: st.booleans(),
              str: st.sampled_from(WORDS), type(None): st.none()}


def plausible(path: str) -> st.SearchStrategy:
    """A value of the field's type, often in range, so that many overridden configs load."""
    leaf = [part for part in path.split(".") if not part.isdigit()][-1]
    if path.split(".")[-1].isdigit():  # an element of classes or thresholds
        return st.integers(0, 9) if "classes" in path else st.floats(0.01, 1)
    return of_type(LEAF_HINTS[leaf], leaf)


def of_type(hint: object, name: str) -> st.SearchStrategy:
    """Values of type ``hint`` (a field named ``name``), small and mostly in range."""
    members = typing.get_args(hint) if typing.get_origin(hint) is not dict else (hint,)
    options = [_PLAUSIBLE[m] for m in members or (hint,) if m in _PLAUSIBLE]
    if any(typing.get_origin(m) is tuple for m in members):
        options.append(st.lists(st.integers(0, 9) if "class" in name else st.floats(0.01, 1),
                                min_size=1, max_size=4, unique=True))
    return st.one_of(options or [st.none()])


def _override(path: str) -> st.SearchStrategy:
    value = yaml_text
    if path in RUN_PATHS:
        typed = plausible(path).map(lambda v: yaml.safe_dump(v, default_flow_style=True))
        value = st.one_of(typed, typed, yaml_text)
    return value.map(lambda text: f"{path}={text}")


# keys: real field paths two times in three, else junk
overrides = st.lists(
    st.one_of(st.sampled_from(RUN_PATHS), st.sampled_from(RUN_PATHS), junk_keys)
    .flatmap(_override), max_size=3)
# real field paths with values of the field's type: more of these load
typed_overrides = st.lists(st.sampled_from(RUN_PATHS).flatmap(
    lambda path: plausible(path).map(
        lambda v: f"{path}={yaml.safe_dump(v, default_flow_style=True)}")), max_size=3)


def assert_valid_run_config(config: RunConfig) -> None:
    """A loaded config re-validates from plain data and can be written as YAML."""
    assert isinstance(config, RunConfig)
    plain = to_dict(config)
    yaml.safe_dump(plain)  # run_experiment writes config.yaml so
    assert from_dict(RunConfig, plain) == config
    scenario = from_dict(ScenarioConfig, config.scenario, where="scenario")
    assert_valid_scenario(scenario)
    thresholds = config.policy.thresholds
    values_ = thresholds if isinstance(thresholds, tuple) else (thresholds,)
    assert values_ and all(isinstance(t, float) and not math.isnan(t) for t in values_)
    policy_fields = {f.name: getattr(config.policy, f.name)
                     for f in dataclasses.fields(ExitPolicy)}
    assert ExitPolicy(**policy_fields) == config.policy  # re-validates


def assert_valid_scenario(scenario: ScenarioConfig) -> None:
    assert isinstance(scenario.length, int) and scenario.length >= 1
    assert 0 <= scenario.holdout_fraction < 1
    assert ScenarioConfig.from_dict(scenario.to_dict()) == scenario


def loaded(load, *args):
    """``load(*args)``, or ``None`` when it raises ``ConfigError`` (the one exception allowed)."""
    try:
        result = load(*args)
    except ConfigError:
        event("ConfigError")
        return None
    event("valid")
    return result


@FAST
@given(base=st.sampled_from(RUN_BASES), texts=st.one_of(overrides, typed_overrides))
def test_run_overrides_give_a_valid_config_or_one_config_error(base, texts):
    config = loaded(load_run_config, ROOT / base, texts)
    if config is not None:
        assert_valid_run_config(config)


@FAST
@given(base=st.sampled_from(SCENARIO_BASES), texts=st.one_of(overrides, typed_overrides))
def test_scenario_overrides_give_a_valid_scenario_or_one_config_error(base, texts):
    texts = [text.removeprefix("scenario.") for text in texts]
    scenario = loaded(load_scenario, ROOT / base, texts)
    if scenario is not None:
        assert_valid_scenario(scenario)


def _mutate(data: object, path: list[object], value: object) -> object:
    """``data`` with the value at ``path`` replaced (a missing key is added)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(data, dict):
        return {**data, key: _mutate(data.get(key), rest, value)}
    if isinstance(data, list) and isinstance(key, int) and data:
        index = key % len(data)
        return [*data[:index], _mutate(data[index], rest, value), *data[index + 1:]]
    return _mutate({}, path, value)


mutation_path = st.lists(st.one_of(st.sampled_from(SCENARIO_FIELDS + [
    "scenario", "model", "policy", "updater", "engine", "drift", "evaluation", "out",
    "thresholds", "mode", "batch_size", "window", "checkpoint"]), st.integers(0, 3)),
    min_size=0, max_size=3)


@st.composite
def documents(draw, bases: list[str]) -> str:
    """A YAML document: a real config with a few values replaced, or random text."""
    if draw(st.booleans()):
        data = load_yaml(ROOT / draw(st.sampled_from(bases)))
        for _ in range(draw(st.integers(1, 3))):
            data = _mutate(data, draw(mutation_path), draw(values))
        return yaml.safe_dump(data, sort_keys=False)
    return draw(st.one_of(yaml_text, st.text(max_size=40)))


@pytest.fixture(scope="module")
def doc_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("docs")


DOCUMENTS = {"run": (RUN_BASES, load_run_config, assert_valid_run_config),
             "scenario": (SCENARIO_BASES, load_scenario, assert_valid_scenario)}


@fuzz(300)
@given(kind=st.sampled_from(sorted(DOCUMENTS)), data=st.data())
def test_documents_give_a_valid_config_or_one_config_error(doc_dir, kind, data):
    bases, load, assert_valid = DOCUMENTS[kind]
    path = doc_dir / f"{kind}.yaml"
    path.write_text(data.draw(documents(bases), label="document"))
    config = loaded(load, path)
    if config is not None:
        assert_valid(config)


TRAIN_BASES = ["configs/backbones/fashion_mnist_tiny.yaml",
               "configs/backbones/tiny_imagenet_lite0.yaml"]
TRAIN_HINTS = {**typing.get_type_hints(FrozenBackboneConfig), **typing.get_type_hints(TrainConfig)}
TRAIN_KEYS = sorted(name for name in TRAIN_HINTS if name != "RUNTIME_FIELDS")
train_changes = st.lists(st.sampled_from(TRAIN_KEYS).flatmap(lambda key: st.tuples(
    st.just(key), st.one_of(of_type(TRAIN_HINTS[key], key), of_type(TRAIN_HINTS[key], key),
                            values))), max_size=3)


@FAST
@given(base=st.sampled_from(TRAIN_BASES), changes=train_changes)
def test_model_configs_give_a_valid_config_or_one_config_error(doc_dir, base, changes):
    data = load_yaml(ROOT / base)
    data.update(changes)
    path = doc_dir / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    config = loaded(load_train_config, path)
    if config is not None:
        assert from_dict(type(config), config.to_dict()) == config
        assert len(config.fingerprint()) == 16


@fuzz(100)
@given(raw=st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                     documents(RUN_BASES).map(str.encode)))
def test_load_yaml_returns_a_mapping_or_raises_one_config_error(doc_dir, raw):
    path = doc_dir / "any.yaml"
    path.write_bytes(raw)
    data = loaded(load_yaml, path)
    if data is not None:
        assert isinstance(data, dict)


# ---------------------------------------------------------- checks that need data or a model

SYNTHETIC = {"scenario": "subset", "name": "s", "dataset": "synthetic", "classes": [0, 2, 4],
             "length": 64, "dataset_options": {"num_classes": 6, "samples_per_class": 10,
                                               "image_size": 16}}
small_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 12), st.integers(0, 5), st.integers(0, 5),
    st.sampled_from([0.0, 0.01, 0.5, 0.9, 1e-300, 2.5, math.inf, math.nan]),
    st.sampled_from(["iid", "subset", "zipf", "dirichlet", "dominant", "train", "test", "val",
                     "synthetic", "x"]),
    st.lists(st.integers(-1, 7), max_size=4),
    st.dictionaries(st.sampled_from(["num_classes", "samples_per_class", "image_size",
                                     "in_chans", "seed", "bogus"]), st.integers(-1, 12),
                    max_size=2),
)
data_keys = st.sampled_from(
    [f"scenario.{name}" for name in SCENARIO_FIELDS if name not in ("length", "phases")]
    + ["scenario.dataset_options", "policy.thresholds", "policy.thresholds.0"])


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A synthetic-data run config and a tiny 6-class checkpoint for it."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_model(num_classes=6))
    config = tmp_path_factory.getbasetemp() / "synthetic_run.yaml"
    config.write_text(yaml.safe_dump({"scenario": SYNTHETIC, "model": {"checkpoint": str(path)},
                                      "progress": False}))
    return config


@fuzz(60)
@given(changes=st.lists(st.tuples(data_keys, small_values), max_size=2))
def test_checks_that_need_the_data_raise_only_config_errors(synthetic_run, changes):
    texts = [f"{key}={yaml.safe_dump(value, default_flow_style=True)}" for key, value in changes]
    stream = loaded(lambda: check_run_inputs(load_run_config(synthetic_run, texts)))
    if stream is not None:
        assert stream.eval_in is not None and len(stream) == stream.config.length
        assert set(stream.classes) <= set(range(stream.num_classes))
