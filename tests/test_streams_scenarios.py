"""ScenarioConfig validation, YAML loading and the statistics of each label generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streams.scenarios import (
    ConfigError,
    ScenarioConfig,
    generate_labels,
    list_scenarios,
    load_scenario,
    target_classes,
)


def labels_of(num_classes: int = 10, **fields) -> np.ndarray:
    labels, _ = generate_labels(ScenarioConfig.from_dict(fields), num_classes)
    return labels


def mean_run_length(labels: np.ndarray) -> float:
    changes = np.count_nonzero(labels[1:] != labels[:-1])
    return len(labels) / (changes + 1)


# -------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"colour": 1}, "colour: unknown key; allowed keys: scenario, name, dataset"),
        ({"scenario": "shuffle"}, "scenario: unknown value 'shuffle'; allowed: iid, subset, zipf"),
        ({"scenario": "subset", "classes": []}, "classes: empty list"),
        ({"scenario": "subset"}, "classes: scenario 'subset' needs a list of class ids"),
        ({"classes": [1, -2]}, "classes: class ids must be integers >= 0, got -2"),
        ({"classes": [1, 1]}, "classes: class ids must be distinct"),
        ({"classes": "0,1"}, "classes: must be a list of class ids"),
        ({"length": 0}, "length: must be an integer >= 1, got 0"),
        ({"length": 2.5}, "length: must be an integer >= 1"),
        ({"seed": -1}, "seed: must be an integer >= 0"),
        ({"holdout_fraction": 1.0}, r"holdout_fraction: must be a number in \[0, 1\)"),
        ({"scenario": "dirichlet", "beta": 0}, "beta: must be a number > 0, got 0"),
        ({"scenario": "dirichlet", "beta": -1.5}, "beta: must be a number > 0"),
        ({"scenario": "dirichlet", "num_slots": 0}, "num_slots: must be an integer >= 1"),
        ({"scenario": "zipf", "a": 0}, "a: must be a number > 0"),
        (
            {"scenario": "zipf", "classes": [1, 2], "class_order": [1, 3]},
            r"class_order: must be an ordering of classes \[1, 2\]",
        ),
        ({"scenario": "dominant", "ir": 0.5}, "ir: must be a number >= 1 or .inf"),
        ({"scenario": "dominant", "segment_length": 0}, "segment_length: must be an integer >= 1"),
        ({"scenario": "subset", "classes": [1], "other_rate": 1.0}, "other_rate: must be a number"),
        ({"scenario": "zipf", "beta": 0.1}, "beta: only used by scenario dirichlet, not by 'zipf'"),
        ({"scenario": "iid", "phases": [{}]}, "phases: only used by scenario phases"),
        ({"dataset": "mnist"}, "dataset: unknown value 'mnist'; allowed: cifar10, fashion_mnist"),
        ({"split": ""}, "split: must be a split name"),
        ({"scenario": "phases"}, "phases: must be a non-empty list"),
        ({"scenario": "phases", "phases": []}, "phases: must be a non-empty list"),
        (
            {
                "scenario": "phases",
                "phases": [{"scenario": "iid"}, {"scenario": "dirichlet", "beta": 0}],
            },
            r"phases\[1\]\.beta: must be a number > 0",
        ),
        ({"scenario": "phases", "phases": [{"seed": 3}]}, r"phases\[0\]\.seed: phases share"),
        ({"scenario": "phases", "phases": [{"colour": 3}]}, r"phases\[0\]\.colour: unknown key"),
        ({"scenario": "phases", "phases": [{"scenario": "phases"}]}, "phases cannot nest"),
        (
            {"scenario": "phases", "phases": [{"length": 5}], "length": 6},
            "length: 6 conflicts with the phases' total 5",
        ),
    ],
)
def test_invalid_configs_name_the_field(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ScenarioConfig.from_dict(fields)


def test_class_ids_out_of_range_are_named() -> None:
    config = ScenarioConfig.from_dict({"scenario": "subset", "classes": [3, 10]})
    with pytest.raises(
        ConfigError,
        match=r"classes: class id 10 out of range for fashion_mnist "
        r"\(10 classes: 0..9\)",
    ):
        target_classes(config, 10)
    phases = ScenarioConfig.from_dict(
        {"scenario": "phases", "phases": [{"classes": [1]}, {"classes": [12]}]}
    )
    with pytest.raises(ConfigError, match=r"phases\[1\]\.classes: class id 12 out of range"):
        generate_labels(phases, 10)


def test_other_rate_needs_other_classes() -> None:
    config = ScenarioConfig.from_dict({"scenario": "subset", "classes": [0, 1], "other_rate": 0.1})
    with pytest.raises(ConfigError, match="other_rate: is > 0 but classes already cover"):
        generate_labels(config, 2)


def test_defaults_and_round_trip() -> None:
    config = ScenarioConfig.from_dict({"scenario": "dirichlet"})
    assert (config.beta, config.length, config.split, config.holdout_fraction) == (
        0.1,
        3000,
        "test",
        0.5,
    )
    assert config.name == "dirichlet" and config.a is None and config.ir is None
    phases = ScenarioConfig.from_dict(
        {
            "scenario": "phases",
            "seed": 4,
            "phases": [{"scenario": "zipf", "length": 10}, {"scenario": "dominant", "length": 7}],
        }
    )
    assert phases.length == 17 and phases.phases[1].seed == 4 and phases.phases[1].ir == 10.0
    for original in (config, phases):
        assert ScenarioConfig.from_dict(original.to_dict()) == original


# -------------------------------------------------------------------------------- YAML


def test_shipped_scenarios_load() -> None:
    expected = {
        "tops": [0, 2, 4, 6],
        "footwear": [5, 7, 9],
        "tshirt-vs-shirt": [0, 6],
        "dirichlet": list(range(10)),
        "zipf": list(range(10)),
        "iid": list(range(10)),
        "switch": [0, 2, 4, 5, 6, 7, 9],
    }
    assert set(expected) <= set(list_scenarios())
    for name, classes in expected.items():
        config = load_scenario(name)
        assert config.name == name and config.dataset == "fashion_mnist"
        assert list(target_classes(config, 10)) == classes
    assert load_scenario("dirichlet").beta == 0.1
    assert load_scenario("switch").length == 4000
    assert load_scenario("tops").length == 3000


def test_load_scenario_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("scenario: subset\nclasses: [1]\n")
    config = load_scenario(
        path, ["classes=[2,4,6]", "seed=1234", "length=2500", "dataset_options.download=true"]
    )
    assert (config.classes, config.seed, config.length) == ((2, 4, 6), 1234, 2500)
    assert config.name == "mine" and config.dataset_options == {"download": True}
    with pytest.raises(ConfigError, match="override 'seed' is not of the form key=value"):
        load_scenario(path, ["seed"])
    with pytest.raises(ConfigError, match=f"{path}: beta: only used by scenario dirichlet"):
        load_scenario(path, ["beta=0.5"])
    with pytest.raises(FileNotFoundError, match="shipped names: .*footwear"):
        load_scenario(tmp_path / "absent.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_scenario(path)


# -------------------------------------------------------------------------- statistics


def test_generation_is_deterministic() -> None:
    for fields in ({"scenario": "zipf"}, {"scenario": "dirichlet"}, {"scenario": "dominant"}):
        first, second = labels_of(**fields, seed=7), labels_of(**fields, seed=7)
        assert np.array_equal(first, second)
        assert not np.array_equal(first, labels_of(**fields, seed=8))
        assert first.dtype == np.int64 and len(first) == 3000


def test_iid_is_uniform() -> None:
    counts = np.bincount(labels_of(scenario="iid", length=20_000), minlength=10)
    assert np.all(np.abs(counts / 20_000 - 0.1) < 0.015)


def test_subset_holds_its_classes_and_other_rate() -> None:
    labels = labels_of(scenario="subset", classes=[5, 7, 9], length=5000)
    assert set(np.unique(labels)) == {5, 7, 9}
    labels = labels_of(scenario="subset", classes=[5, 7, 9], other_rate=0.1, length=20_000)
    others = ~np.isin(labels, [5, 7, 9])
    assert abs(others.mean() - 0.1) < 0.01
    assert set(np.unique(labels[others])) == {0, 1, 2, 3, 4, 6, 8}


@pytest.mark.parametrize("a", [0.7, 1.5])
def test_zipf_frequencies_follow_the_exponent(a: float) -> None:
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    labels = labels_of(scenario="zipf", a=a, class_order=order, length=60_000)
    freq = np.bincount(labels, minlength=10)[order] / len(labels)
    slope = np.polyfit(np.log(np.arange(1, 11)), np.log(freq), 1)[0]
    assert abs(slope + a) < 0.1
    assert freq[0] == freq.max()


def test_zipf_order_is_seeded_when_unset() -> None:
    top = {int(np.bincount(labels_of(scenario="zipf", a=2.0, seed=s)).argmax()) for s in range(8)}
    assert len(top) > 1


def test_dirichlet_runs_grow_as_beta_shrinks() -> None:
    runs = {
        beta: np.mean(
            [mean_run_length(labels_of(scenario="dirichlet", beta=beta, seed=s)) for s in range(3)]
        )
        for beta in (10.0, 0.1, 0.01)
    }
    assert runs[10.0] < runs[0.1] < runs[0.01]
    assert runs[10.0] < 1.5  # near i.i.d. over ten classes
    counts = np.bincount(labels_of(scenario="dirichlet", length=3005), minlength=10)
    assert counts.min() == 300 and counts.max() == 301  # classes stay balanced overall


def test_dominant_segments_have_the_asked_ratio() -> None:
    labels = labels_of(scenario="dominant", ir=10.0, segment_length=500, length=40_000)
    segments = labels.reshape(-1, 500)
    ratios = []
    for segment in segments:
        counts = np.bincount(segment, minlength=10)
        dominant = counts.argmax()
        ratios.append(counts[dominant] / np.delete(counts, dominant).mean())
    assert abs(np.mean(ratios) - 10.0) < 1.0
    firsts = [np.bincount(segment, minlength=10).argmax() for segment in segments[:10]]
    assert sorted(firsts) == list(range(10))  # every class dominates once per round
    pure = labels_of(scenario="dominant", ir=float("inf"), segment_length=100, length=1000)
    assert all(len(np.unique(segment)) == 1 for segment in pure.reshape(-1, 100))


def test_phases_concatenate() -> None:
    fields = {
        "scenario": "phases",
        "seed": 3,
        "phases": [
            {"scenario": "subset", "classes": [5, 7, 9], "length": 200},
            {"scenario": "subset", "classes": [0, 2, 4, 6], "length": 300},
        ],
    }
    config = ScenarioConfig.from_dict(fields)
    labels, boundaries = generate_labels(config, 10)
    assert boundaries == [0, 200] and len(labels) == 500
    assert set(np.unique(labels[:200])) == {5, 7, 9}
    assert set(np.unique(labels[200:])) == {0, 2, 4, 6}
    assert target_classes(config, 10) == (0, 2, 4, 5, 6, 7, 9)
    alone = labels_of(scenario="subset", classes=[5, 7, 9], length=200, seed=3)
    assert np.array_equal(labels[:200], alone)  # phase 0 is the scenario on its own
