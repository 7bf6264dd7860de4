"""YAML configs as dataclasses, with dotted ``key=value`` overrides from the command line.

Every config in this project is a dataclass with a comment per field. This module holds the
generic plumbing: reading YAML safely, applying overrides such as ``updater.lr=0.01`` or
``classes=[2,4,6]``, and building dataclasses from dicts while rejecting unknown keys with a
message that lists the allowed ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from streams.scenarios import ConfigError as StreamsConfigError

T = TypeVar("T")


class ConfigError(StreamsConfigError):
    """A config file or override is invalid; the message names the field and what is allowed.

    Subclasses the streams package's error so one ``except ConfigError`` catches both.
    """


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``.

    Args:
        path: File to read.

    Returns:
        The mapping (an empty file gives ``{}``).

    Raises:
        FileNotFoundError: The file does not exist.
        ConfigError: The file is not valid YAML or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into ``(["a", "b"], value)``; the value is parsed as YAML.

    Args:
        text: One override, e.g. ``updater.lr=0.01`` or ``classes=[2,4,6]``.

    Returns:
        The key path and the parsed value.

    Raises:
        ConfigError: The text has no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. seed=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return [part for part in key.strip().split(".")], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (nested dicts created as needed).

    Args:
        data: The config mapping.
        overrides: Strings of the form ``key=value`` or ``a.b.c=value``.

    Returns:
        A new mapping; ``data`` is not modified.
    """
    result = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _deep_copy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_deep_copy(value) for value in data]
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Unknown keys are rejected with the list of allowed ones. Values are not coerced beyond
    int -> float and list -> tuple; each dataclass validates itself in ``__post_init__``.

    Args:
        cls: The dataclass type.
        data: The mapping (``None`` means all defaults).
        where: Dotted prefix used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: An unknown key, or a section that is not a mapping.
    """
    data = {} if data is None else data
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def _coerce(hint: Any, value: Any, where: str) -> Any:
    for candidate in _union_members(hint):
        if dataclasses.is_dataclass(candidate) and isinstance(value, dict):
            return from_dict(candidate, value, where=where)
    if float in _union_members(hint) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def to_dict(config: Any) -> dict[str, Any]:
    """Turn a (nested) config dataclass into plain YAML-able data."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
