"""Where config data comes from: YAML files and ``key=value`` overrides from the command line."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from configkit.checks import ConfigError


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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8: {err})") from err
    data = parse_yaml(text, f"{path}: not valid YAML")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_yaml(text: str, problem: str) -> Any:
    """``yaml.safe_load(text)``; anything it rejects becomes one :class:`ConfigError`.

    PyYAML raises more than ``YAMLError``: ``ValueError`` for impossible dates
    (``2020-13-45``) or ``!!int 0x``, ``IndexError`` for ``!!int``, ``KeyError`` for
    ``!!bool x``, ``AttributeError`` for ``!!timestamp``, ``RecursionError`` for deeply
    nested brackets; so any exception of the parser means the text is not valid YAML.

    Args:
        text: The YAML text.
        problem: Start of the message, naming the file or override.

    Raises:
        ConfigError: ``problem``, then what the parser said.
    """
    try:
        data = yaml.safe_load(text)
    except Exception as err:  # any of them: see above
        raise ConfigError(f"{problem}: {type(err).__name__}: {err}") from err
    if _expanded_size(data, {}, set()) > MAX_EXPANDED_NODES:
        raise ConfigError(f"{problem}: nested deeper than {MAX_DEPTH} levels, or its aliases "
                          f"expand to more than {MAX_EXPANDED_NODES} values; write it out flat")
    return data


# What a YAML config may hold once its aliases (``*name``) are expanded: configs are copied,
# checked and written back expanded (recursively), so ``a: &a [*a]``, nested aliases or
# hundreds of nested brackets must fail here.
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 32


def _expanded_size(value: Any, sizes: dict[int, int], path: set[int]) -> int:
    """Number of values in ``value`` with aliases expanded; a cycle counts as unbounded."""
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key in path or len(path) >= MAX_DEPTH:
        return MAX_EXPANDED_NODES + 1  # an alias inside itself, or too deep
    if key not in sizes:
        path.add(key)
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[key] = 1 + sum(_expanded_size(item, sizes, path) for item in items)
        path.discard(key)
    return sizes[key]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into ``(["a", "b"], value)``; the value is parsed as YAML.

    Example:
        >>> parse_override("scenario.classes=[2, 4, 6]")
        (['scenario', 'classes'], [2, 4, 6])

    Args:
        text: One override, e.g. ``updater.lr=0.01`` or ``classes=[2,4,6]``.

    Returns:
        The key path and the parsed value (an empty value is ``None``).

    Raises:
        ConfigError: The text has no ``=``, an empty key, or a value that is not YAML.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. seed=3)")
    if key.count(".") >= MAX_DEPTH:
        raise ConfigError(f"override {text!r}: a key of at most {MAX_DEPTH} dotted parts")
    value = parse_yaml(raw, f"override {text!r}: value is not valid YAML") if raw.strip() \
        else None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied.

    A key part descends into a mapping (missing or null sections are created) or, given as
    an index, into a list element.

    Example:
        >>> data = {"scenario": {"phases": [{"length": 2000}, {"length": 2000}]}}
        >>> apply_overrides(data, ["scenario.phases.1.length=500", "updater.lr=0.01"])
        {'scenario': {'phases': [{'length': 2000}, {'length': 500}]}, 'updater': {'lr': 0.01}}
        >>> apply_overrides(data, ["scenario.phases.2.length=500"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        configkit.checks.ConfigError: ...: scenario.phases has 2 items; use an index in 0..1, got 2

    Args:
        data: The config mapping (not modified).
        overrides: Strings of the form ``key=value`` or ``a.b.0.c=value``.

    Returns:
        The new mapping.

    Raises:
        ConfigError: A malformed override, a key part below a plain value, or a list index
            that is not an integer in range.
    """
    result = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: depth + 1]), text)
        _set(node, keys[-1], value, ".".join(keys), text)
    return result


def _child(node: dict | list, key: str, path: str, text: str) -> dict | list:
    """The section or list below ``node[key]`` (a missing or null section becomes ``{}``)."""
    if isinstance(node, list):
        child = node[_index(node, key, path, text)]
    else:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"override {text!r}: {path} is a value, not a section or a list")
    return child


def _set(node: dict | list, key: str, value: Any, path: str, text: str) -> None:
    if isinstance(node, list):
        node[_index(node, key, path, text)] = value
    else:
        node[key] = value


def _index(items: list, key: str, path: str, text: str) -> int:
    parent = path.rpartition(".")[0]
    if not items:
        raise ConfigError(f"override {text!r}: {parent} is an empty list; no index is allowed")
    if not (key.isascii() and key.isdigit() and int(key) < len(items)):
        raise ConfigError(f"override {text!r}: {parent} has {len(items)} items; use an index in "
                          f"0..{len(items) - 1}, got {key}")
    return int(key)
