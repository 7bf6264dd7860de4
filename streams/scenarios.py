"""Class-skew scenarios: a validated config and the seeded label sequence each kind draws.

A scenario decides *which class* comes at each position of a stream; :mod:`streams.replay`
then picks a sample of that class from the pool. Kinds:

* ``iid``: uniform over the classes (all classes unless ``classes`` is set).
* ``subset``: uniform over ``classes``; a fraction ``other_rate`` comes from the other classes.
* ``zipf``: i.i.d. from a long-tailed prior ``p(rank r) ~ r ** -a``; ``class_order`` ranks the
  classes (default: a seeded shuffle).
* ``dirichlet``: temporally correlated label shift as in NOTE / RoTTA. Each class's samples
  are spread over ``num_slots`` consecutive time slots with proportions drawn from
  ``Dirichlet(beta)``; samples within a slot are shuffled. Small ``beta`` gives long runs of
  one class.
* ``dominant``: consecutive segments of ``segment_length`` samples, each with one dominant
  class drawn ``ir`` times as often as each other class (as in SAR); dominant classes take
  turns in seeded order.
* ``phases``: a sequence of sub-scenarios of the kinds above, played one after the other.

All randomness comes from ``numpy.random.Generator(PCG64)`` seeded from ``seed`` and a fixed
purpose key, so the same config gives the same stream on every machine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configkit import (
    ConfigError,
    apply_overrides,
    check_choice,
    check_int,
    check_number,
    check_type,
    from_dict,
    is_integer,
    load_yaml,
)
from streams.datasets import list_datasets

__all__ = [
    "ConfigError",
    "ScenarioConfig",
    "SCENARIO_KINDS",
    "SCENARIO_DIR",
    "DEFAULT_LENGTH",
    "load_scenario",
    "list_scenarios",
    "target_classes",
    "generate_labels",
    "seeded_rng",
]

SCENARIO_KINDS = ("iid", "subset", "zipf", "dirichlet", "dominant", "phases")
SCENARIO_DIR = Path(__file__).resolve().parents[1] / "configs" / "scenarios"
DEFAULT_LENGTH = 3000

# Fields only some kinds use, and their defaults when that kind leaves them unset.
_KIND_FIELDS = {
    "iid": ("classes",),
    "subset": ("classes", "other_rate"),
    "zipf": ("classes", "a", "class_order"),
    "dirichlet": ("classes", "beta", "num_slots"),
    "dominant": ("classes", "ir", "segment_length"),
    "phases": ("phases",),
}
_KIND_DEFAULTS = {"other_rate": 0.0, "a": 1.0, "beta": 0.1, "ir": 10.0, "segment_length": 500}
# Fields every phase inherits from its parent: all phases draw from one pool.
_SHARED_FIELDS = ("dataset", "root", "split", "dataset_options", "seed", "holdout_fraction",
                  "eval_in_per_class", "eval_out_per_class")
_FLOAT_FIELDS = ("holdout_fraction", "other_rate", "a", "beta", "ir")
_TUPLE_FIELDS = ("classes", "class_order")

# Purpose keys of the seeded generators (``SeedSequence(seed, spawn_key=(key, ...))``).
RNG_HOLDOUT, RNG_LABELS, RNG_DRAW = 0, 1, 2


def seeded_rng(seed: int, *purpose: int) -> np.random.Generator:
    """A PCG64 generator for one purpose of one seed, independent of every other purpose.

    Args:
        seed: The config's seed (>= 0).
        *purpose: Integers naming the purpose, e.g. ``(RNG_LABELS, phase_index)``.

    Returns:
        A fresh generator; the same arguments give the same numbers on every machine.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=purpose)))


@dataclass(frozen=True)
class ScenarioConfig:
    """How to build one stream: the pool it draws from and the class skew over time.

    Kind-specific fields stay ``None`` for kinds that do not use them (setting one for another
    kind is an error); for the kinds that use them, ``None`` means the default in brackets.
    Build it with :meth:`from_dict` or :func:`load_scenario`; it validates itself.
    """

    scenario: str = "iid"  # kind: iid | subset | zipf | dirichlet | dominant | phases
    name: str = ""  # display name; "" -> the kind (load_scenario uses the file name)
    dataset: str = "fashion_mnist"  # streams.datasets.load_dataset name
    root: str | None = None  # data folder; None -> the reader's default
    split: str = "test"  # pool split; "test" because the model trains on "train"
    dataset_options: dict[str, Any] = field(default_factory=dict)  # extra reader options
    classes: tuple[int, ...] | None = None  # class ids the stream targets; None -> all
    length: int | None = None  # stream samples; None -> 3000 (phases: sum of phase lengths)
    seed: int = 0  # seeds the held-out split, the label sequence and the sample draw
    holdout_fraction: float = 0.5  # per class, fraction of the split held out for evaluation
    eval_in_per_class: int | None = None  # at most this many held-out samples per stream class
    eval_out_per_class: int | None = None  # ... per other class (None: all; large data sets)
    other_rate: float | None = None  # subset: rate of samples from the other classes [0.0]
    a: float | None = None  # zipf: exponent of the prior p(rank r) ~ r ** -a [1.0]
    class_order: tuple[int, ...] | None = None  # zipf: classes, most frequent first [shuffle]
    beta: float | None = None  # dirichlet: concentration; smaller -> longer runs [0.1]
    num_slots: int | None = None  # dirichlet: time slots [number of target classes]
    ir: float | None = None  # dominant: dominant : each-other-class ratio, >= 1 or .inf [10]
    segment_length: int | None = None  # dominant: samples per dominant segment [500]
    phases: tuple[ScenarioConfig, ...] | None = None  # phases: sub-scenarios played in order

    def __post_init__(self) -> None:
        check_choice("scenario", self.scenario, SCENARIO_KINDS)
        _check_kind_fields(self)
        for name, default in _KIND_DEFAULTS.items():
            if name in _KIND_FIELDS[self.scenario] and getattr(self, name) is None:
                object.__setattr__(self, name, default)
        _check_pool_fields(self)
        _check_class_fields(self)
        _check_kind_values(self)
        if self.scenario == "phases":
            object.__setattr__(self, "phases", _build_phases(self))
        object.__setattr__(self, "length", _resolve_length(self))
        if not self.name:
            object.__setattr__(self, "name", self.scenario)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ScenarioConfig:
        """Build a config from a mapping (e.g. parsed YAML), rejecting unknown keys.

        Args:
            data: Field names to values; ``None`` means all defaults.

        Returns:
            The validated config.

        Raises:
            ConfigError: An unknown key or an invalid value; the message names the field.
        """
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data that :meth:`from_dict` turns back into an equal config."""
        data: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None:
                continue
            if item.name == "phases":
                value = [_phase_dict(phase) for phase in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            data[item.name] = value
        return data


# ------------------------------------------------------------------------------- validation


def _fail(name: str, message: str) -> ConfigError:
    return ConfigError(f"{name}: {message}")


def _check_kind_fields(config: ScenarioConfig) -> None:
    used = _KIND_FIELDS[config.scenario]
    for name in sorted({f for fields in _KIND_FIELDS.values() for f in fields} - set(used)):
        if getattr(config, name) is not None:
            users = [kind for kind, fields in _KIND_FIELDS.items() if name in fields]
            raise _fail(
                name,
                f"only used by scenario {' / '.join(users)}, not by {config.scenario!r}; "
                "remove it or change scenario",
            )


def _set_checked(config: ScenarioConfig, name: str, check: Callable, **bounds: Any) -> None:
    """Store ``check(name, value, **bounds)`` in field ``name`` unless it is ``None`` (unset)."""
    value = getattr(config, name)
    if value is not None:
        object.__setattr__(config, name, check(name, value, **bounds))


def _check_pool_fields(config: ScenarioConfig) -> None:
    if not isinstance(config.name, str) or "/" in config.name:
        raise _fail("name", f"must be a string without '/' (it names the run folder), got "
                            f"{config.name!r}")
    check_type("name", config.name, str)
    check_choice("dataset", config.dataset, list_datasets())
    if config.root is not None:
        if not isinstance(config.root, (str, Path)):
            raise _fail("root", f"must be a folder path or null, got {config.root!r}")
        object.__setattr__(config, "root", check_type("root", config.root, str))
    if not isinstance(config.split, str) or not config.split:
        raise _fail("split", f"must be a split name such as 'test', got {config.split!r}")
    check_type("split", config.split, str)
    if not isinstance(config.dataset_options, Mapping):
        raise _fail("dataset_options", f"must be a mapping, got {config.dataset_options!r}")
    options = check_type("dataset_options", config.dataset_options, dict[str, Any])
    object.__setattr__(config, "dataset_options", dict(options))
    object.__setattr__(config, "seed", check_int("seed", config.seed, ge=0))
    holdout = check_number("holdout_fraction", config.holdout_fraction, ge=0, lt=1)
    object.__setattr__(config, "holdout_fraction", holdout)
    for name in ("eval_in_per_class", "eval_out_per_class"):
        check_int(name, getattr(config, name), ge=1, optional=True)


def _class_tuple(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _fail(name, f"must be a list of class ids such as [5, 7, 9], got {value!r}")
    if not value:
        raise _fail(name, "empty list; give at least one class id, or leave it unset for all")
    bad = [item for item in value if not is_integer(item) or item < 0]
    if bad:
        raise _fail(name, f"class ids must be integers >= 0, got {bad[0]!r}")
    if len(set(value)) != len(value):
        raise _fail(name, f"class ids must be distinct, got {list(value)}")
    return tuple(int(item) for item in value)


def _check_class_fields(config: ScenarioConfig) -> None:
    for name in _TUPLE_FIELDS:
        object.__setattr__(config, name, _class_tuple(name, getattr(config, name)))
    if config.scenario == "subset" and config.classes is None:
        raise _fail("classes", "scenario 'subset' needs a list of class ids, e.g. [5, 7, 9]")
    if config.class_order is not None and config.classes is not None:
        if sorted(config.class_order) != sorted(config.classes):
            raise _fail(
                "class_order",
                f"must be an ordering of classes {sorted(config.classes)}, "
                f"got {list(config.class_order)}",
            )


def _check_kind_values(config: ScenarioConfig) -> None:
    _set_checked(config, "other_rate", check_number, ge=0, lt=1)
    _set_checked(config, "a", check_number, gt=0)
    _set_checked(config, "beta", check_number, gt=0)
    _set_checked(config, "ir", check_number, ge=1, allow_inf=True)
    for name in ("num_slots", "segment_length", "length"):
        _set_checked(config, name, check_int, ge=1)


def _build_phases(config: ScenarioConfig) -> tuple[ScenarioConfig, ...]:
    phases = config.phases
    if isinstance(phases, (str, bytes, Mapping)) or not isinstance(phases, Sequence) or not phases:
        raise _fail("phases", "must be a non-empty list of sub-scenario mappings")
    shared = {name: getattr(config, name) for name in _SHARED_FIELDS}
    return tuple(_build_phase(index, phase, shared) for index, phase in enumerate(phases))


def _build_phase(index: int, phase: Any, shared: dict[str, Any]) -> ScenarioConfig:
    where = f"phases[{index}]"
    if isinstance(phase, ScenarioConfig):
        phase = _phase_dict(phase)
    if not isinstance(phase, Mapping):
        raise ConfigError(f"{where}: must be a mapping such as {{scenario: subset, ...}}")
    for name in _SHARED_FIELDS:
        if name in phase:
            raise _fail(
                f"{where}.{name}",
                "phases share the parent's pool and seed; set it at the top level",
            )
    if phase.get("scenario") == "phases":
        raise _fail(f"{where}.scenario", "phases cannot nest; list the sub-scenarios flat")
    return from_dict(ScenarioConfig, {**phase, **shared}, where=where)


def _phase_dict(phase: ScenarioConfig) -> dict[str, Any]:
    data = phase.to_dict()
    return {key: value for key, value in data.items() if key not in _SHARED_FIELDS}


def _resolve_length(config: ScenarioConfig) -> int:
    if config.scenario != "phases":
        return DEFAULT_LENGTH if config.length is None else config.length
    total = sum(phase.length for phase in config.phases)
    if config.length is not None and config.length != total:
        raise _fail(
            "length",
            f"{config.length} conflicts with the phases' total {total}; set each "
            "phases[i].length instead, or leave length unset",
        )
    return total


# ------------------------------------------------------------------------- label sequences


def _all_or(classes: tuple[int, ...] | None, num_classes: int) -> np.ndarray:
    return np.arange(num_classes) if classes is None else np.asarray(sorted(classes))


def _check_range(config: ScenarioConfig, num_classes: int, where: str) -> None:
    for name in _TUPLE_FIELDS:
        values = getattr(config, name) or ()
        bad = [k for k in values if k >= num_classes]
        if bad:
            raise _fail(
                f"{where}{name}",
                f"class id {bad[0]} out of range for {config.dataset} "
                f"({num_classes} classes: 0..{num_classes - 1})",
            )
    if config.class_order is not None and config.classes is None:
        if sorted(config.class_order) != list(range(num_classes)):
            raise _fail(
                f"{where}class_order",
                f"must be an ordering of all {num_classes} class ids when classes is unset",
            )


def target_classes(config: ScenarioConfig, num_classes: int) -> tuple[int, ...]:
    """Sorted ids of the classes a scenario targets (for phases: of all its phases).

    ``subset`` targets ``classes`` only; samples drawn at ``other_rate`` are not targets.

    Args:
        config: The scenario.
        num_classes: Number of classes of the data set; class ids are checked against it.

    Returns:
        The sorted class ids.

    Raises:
        ConfigError: A class id is out of range; the message names the field.
    """
    phases = config.phases if config.scenario == "phases" else (config,)
    found: set[int] = set()
    for index, phase in enumerate(phases):
        _check_range(phase, num_classes, f"phases[{index}]." if phase is not config else "")
        found.update(_all_or(phase.classes, num_classes).tolist())
    return tuple(sorted(found))


def generate_labels(config: ScenarioConfig, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """Draw the class of every stream position.

    Args:
        config: The scenario.
        num_classes: Number of classes of the data set.

    Returns:
        ``(labels, phase_boundaries)``: int64 ``(config.length,)`` and the start position of
        each phase (``[0]`` for a single-phase scenario).

    Raises:
        ConfigError: A class id is out of range, or ``other_rate > 0`` with no other class.
    """
    target_classes(config, num_classes)
    phases = config.phases if config.scenario == "phases" else (config,)
    parts = []
    for index, phase in enumerate(phases):
        rng = seeded_rng(config.seed, RNG_LABELS, index)
        classes = _all_or(phase.classes, num_classes)
        parts.append(_GENERATORS[phase.scenario](phase, classes, num_classes, rng))
    boundaries = np.cumsum([0] + [len(part) for part in parts[:-1]]).tolist()
    return np.concatenate(parts).astype(np.int64), boundaries


def _iid(
    config: ScenarioConfig, classes: np.ndarray, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    return classes[rng.integers(len(classes), size=config.length)]


def _subset(
    config: ScenarioConfig, classes: np.ndarray, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    labels = _iid(config, classes, num_classes, rng)
    if config.other_rate == 0:
        return labels
    others = np.setdiff1d(np.arange(num_classes), classes)
    if not len(others):
        raise _fail("other_rate", "is > 0 but classes already cover every class; set it to 0")
    from_others = rng.random(config.length) < config.other_rate
    labels[from_others] = others[rng.integers(len(others), size=int(from_others.sum()))]
    return labels


def _zipf(
    config: ScenarioConfig, classes: np.ndarray, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    if config.class_order is not None:
        order = np.asarray(config.class_order)
    else:
        order = rng.permutation(classes)
    prior = np.arange(1, len(order) + 1, dtype=np.float64) ** -config.a
    return order[rng.choice(len(order), size=config.length, p=prior / prior.sum())]


def _dirichlet(
    config: ScenarioConfig, classes: np.ndarray, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    num_slots = config.num_slots or len(classes)
    per_class = np.full(len(classes), config.length // len(classes))
    per_class[rng.permutation(len(classes))[: config.length % len(classes)]] += 1
    per_slot = np.stack(
        [
            rng.multinomial(count, rng.dirichlet(np.full(num_slots, config.beta)))
            for count in per_class
        ]
    )  # (classes, slots): how many samples of each class go to each slot
    labels = np.repeat(np.repeat(classes, num_slots), per_slot.ravel())
    slots = np.repeat(np.tile(np.arange(num_slots), len(classes)), per_slot.ravel())
    return labels[np.lexsort((rng.random(config.length), slots))]


def _dominant(
    config: ScenarioConfig, classes: np.ndarray, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    segments = -(-config.length // config.segment_length)
    rounds = -(-segments // len(classes))
    order = np.concatenate([rng.permutation(len(classes)) for _ in range(rounds)])[:segments]
    dominant = np.repeat(order, config.segment_length)[: config.length]  # index into classes
    others = len(classes) - 1
    p_dominant = 1.0 if others == 0 or math.isinf(config.ir) else config.ir / (config.ir + others)
    picks = dominant.copy()
    minor = rng.random(config.length) >= p_dominant
    other = rng.integers(max(others, 1), size=int(minor.sum()))
    picks[minor] = other + (other >= dominant[minor])  # skip the dominant class
    return classes[picks]


_GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "iid": _iid,
    "subset": _subset,
    "zipf": _zipf,
    "dirichlet": _dirichlet,
    "dominant": _dominant,
}


# ------------------------------------------------------------------------------ YAML files


def list_scenarios() -> list[str]:
    """Names of the scenario files shipped in ``configs/scenarios`` (usable in load_scenario)."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.yaml"))


def _resolve_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = SCENARIO_DIR / f"{path}.yaml"
    if candidate.suffix == "" and len(candidate.parts) == 1 and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"scenario config not found: {path}; pass a YAML file or one of the shipped names: "
        f"{', '.join(list_scenarios()) or 'none'}"
    )


def load_scenario(path: str | Path, overrides: Sequence[str] = ()) -> ScenarioConfig:
    """Read a scenario YAML file and apply command-line overrides.

    Args:
        path: A YAML file, or the name of a shipped scenario (``footwear``, ``tops``, ...).
        overrides: ``key=value`` strings using the config's field names, e.g.
            ``["classes=[2,4,6]", "seed=1234", "length=2500"]``.

    Returns:
        The validated config; ``name`` defaults to the file name without ``.yaml``.

    Raises:
        FileNotFoundError: The file does not exist; the message lists the shipped names.
        ConfigError: Invalid YAML, override, key or value; the message names file and field.
    """
    resolved = _resolve_path(path)
    data = apply_overrides(load_yaml(resolved), overrides)
    data.setdefault("name", resolved.stem)
    try:
        return ScenarioConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{resolved}: {err}") from None
