"""What a valid config is: one error type, value checks, and dataclasses typed by their hints.

A config is a dataclass with a default and a comment per field. Its ``__post_init__`` calls
:func:`check_fields` (every field against its type hint: nested sections built from mappings,
``int`` -> ``float``, lists -> tuples) and then the range checks below, which return the
normalised value::

    @dataclass
    class DriftConfig:
        window: int = 250
        alarm_threshold: float = 0.3

        def __post_init__(self) -> None:
            check_fields(self)
            check_int("window", self.window, ge=1)
            check_number("alarm_threshold", self.alarm_threshold, gt=0, le=1)

Every error is a :class:`ConfigError` whose message starts with the field's dotted name and
says what is allowed; :func:`from_dict` prefixes the section (``drift.window: ...``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names the field and what is allowed.

    Example:
        >>> check_int("engine.batch_size", 0, ge=1)
        Traceback (most recent call last):
        ...
        configkit.checks.ConfigError: engine.batch_size: must be an integer >= 1, got 0
    """


# ------------------------------------------------------------------------------ value checks


# Integers in a config are 64-bit: numpy and torch take them as they are (seeds, sizes).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Most CPU threads a config may ask for (torch.set_num_threads overflows past 2**31 - 1).
MAX_THREADS = 1024


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (numpy's too) and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_float(value: Any) -> float:
    """``float(value)`` for a number; an integer too large for a float becomes +-inf."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _check_int64(field: str, value: Any) -> None:
    if is_integer(value) and not INT64_MIN <= value <= INT64_MAX:
        raise ConfigError(f"{field}: must be an integer in [-2**63, 2**63 - 1] (64-bit), "
                          f"got {value}")


def _fail(field: str, allowed: str, value: Any, optional: bool) -> ConfigError:
    return ConfigError(f"{field}: must be {allowed}{' or null' if optional else ''}, got {value!r}")


def check_choice(field: str, value: Any, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``.

    Example:
        >>> check_choice("alarm", "class_mix", ("none", "class_mix"))
        'class_mix'
        >>> check_choice("alarm", "page", ("none", "class_mix"))
        Traceback (most recent call last):
        ...
        configkit.checks.ConfigError: alarm: unknown value 'page'; allowed: none, class_mix

    Raises:
        ConfigError: Any other value.
    """
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{field}: unknown value {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_int(field: str, value: Any, *, ge: int | None = None, le: int | None = None,
              optional: bool = False) -> int | None:
    """Return ``value`` as an ``int`` if it is an integer within ``[ge, le]``.

    Args:
        field: Dotted name used in the message.
        value: The value to check (bools are not integers).
        ge: Smallest allowed value (``None``: no bound).
        le: Largest allowed value (``None``: no bound).
        optional: ``None`` is allowed (and returned).

    Raises:
        ConfigError: Not an integer, or out of range.
    """
    if optional and value is None:
        return None
    _check_int64(field, value)
    if not is_integer(value) or (ge is not None and value < ge) or (le is not None and value > le):
        bounds = {(False, False): "", (True, False): f" >= {ge}", (False, True): f" <= {le}",
                  (True, True): f" in [{ge}, {le}]"}[ge is not None, le is not None]
        raise _fail(field, f"an integer{bounds}", value, optional)
    return int(value)


def check_threads(field: str, value: Any) -> int | None:
    """Return a number of CPU threads in ``[1, MAX_THREADS]``, or ``None`` (keep torch's).

    Raises:
        ConfigError: Anything else.
    """
    return check_int(field, value, ge=1, le=MAX_THREADS, optional=True)


def check_number(field: str, value: Any, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None, allow_inf: bool = False,
                 optional: bool = False) -> float | None:
    """Return ``value`` as a ``float`` if it is a finite number within the bounds.

    Example:
        >>> check_number("momentum", 0, ge=0, lt=1)
        0.0
        >>> check_number("alarm_threshold", 1.5, gt=0, le=1)
        Traceback (most recent call last):
        ...
        configkit.checks.ConfigError: alarm_threshold: must be a number in (0, 1], got 1.5

    Args:
        field: Dotted name used in the message.
        value: The value to check (ints are numbers; bools are not).
        gt: Exclusive lower bound.
        ge: Inclusive lower bound.
        lt: Exclusive upper bound.
        le: Inclusive upper bound.
        allow_inf: ``+inf`` is allowed too (YAML ``.inf``).
        optional: ``None`` is allowed (and returned).

    Raises:
        ConfigError: Not a number, NaN, infinite (unless allowed), or out of range.
    """
    if optional and value is None:
        return None
    number = _as_float(value) if _is_number(value) else math.nan
    inside = (math.isfinite(number) or (allow_inf and number == math.inf)) and (
        (gt is None or number > gt) and (ge is None or number >= ge)
        and (lt is None or number < lt) and (le is None or number <= le))
    if not inside:
        raise _fail(field, _describe_range(gt, ge, lt, le, allow_inf), value, optional)
    return number


def _describe_range(gt: float | None, ge: float | None, lt: float | None, le: float | None,
                    allow_inf: bool) -> str:
    low, high = (gt, ge) != (None, None), (lt, le) != (None, None)
    inf = " or .inf" if allow_inf else ""
    if low and high:
        return (f"a number in {'(' if gt is not None else '['}{_g(gt, ge)}, "
                f"{_g(lt, le)}{')' if lt is not None else ']'}")
    if low:
        return f"a number {'>' if gt is not None else '>='} {_g(gt, ge)}{inf}"
    if high:
        return f"a number {'<' if lt is not None else '<='} {_g(lt, le)}"
    return f"a finite number{inf}"


def _g(strict: float | None, loose: float | None) -> str:
    return f"{strict if strict is not None else loose:g}"


def check_bool(field: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not 0, 1 or "yes").

    Raises:
        ConfigError: Anything else.
    """
    if not isinstance(value, bool):
        raise _fail(field, "true or false", value, False)
    return value


# ------------------------------------------------------------------------------- type checks


def check_type(field: str, value: Any, hint: Any) -> Any:
    """Return ``value`` normalised to the type ``hint``, or raise naming ``field``.

    Understands ``int``, ``float`` (ints become floats), ``bool``, ``str`` (paths become
    strings), ``None``, unions, ``tuple[X, ...]`` and ``list[X]`` (any list or tuple, items
    checked as ``field.i``), ``dict``, ``Any`` and nested config dataclasses (built from a
    mapping with :func:`from_dict`).

    Example:
        >>> check_type("thresholds", [0.9, 1], float | tuple[float, ...])
        (0.9, 1.0)
        >>> check_type("thresholds", ["high"], float | tuple[float, ...])
        Traceback (most recent call last):
        ...
        configkit.checks.ConfigError: thresholds.0: must be a number, got 'high'

    Raises:
        ConfigError: ``value`` does not have that type.
    """
    for member in _union_members(hint):
        if _has_shape(value, member):
            return _convert(field, value, member)
    raise ConfigError(f"{field}: must be {_describe(hint)}, got {value!r}")


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _has_shape(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of ``hint``'s kind (items and fields are checked later)."""
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_integer(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if dataclasses.is_dataclass(hint) or origin in (dict, Mapping):
        return isinstance(value, Mapping) or isinstance(value, origin)
    return isinstance(value, origin)


def _convert(field: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if hint is int:
        _check_int64(field, value)
        return int(value)
    if hint is float:
        return _as_float(value)
    if hint is str:
        return _check_text(field, os.fspath(value))
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where=field)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{field}: must be a list of {len(args)} items, got {value!r}")
        return tuple(check_type(f"{field}.{i}", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (tuple, list):
        items = [check_type(f"{field}.{i}", v, args[0]) for i, v in enumerate(value)] if args \
            else list(value)
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) and len(args) == 2:
        bad = [key for key in value if not isinstance(key, args[0])]
        if bad:
            raise ConfigError(f"{field}: keys must be {_describe(args[0], plural=True)}, "
                              f"got {bad[0]!r}")
        if args[1] is not Any:
            return {k: check_type(f"{field}.{k}", v, args[1]) for k, v in value.items()}
        for key, item in value.items():
            _check_plain(f"{field}.{key}", item)
    return value


def _check_plain(field: str, value: Any) -> None:
    """Free-form values (``dict[str, Any]``) must be plain data that JSON and YAML both hold."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{field}: keys must be strings, got {key!r}")
            _check_plain(f"{field}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(f"{field}.{index}", item)
    elif not (value is None or isinstance(value, (bool, str)) or _is_number(value)):
        raise ConfigError(f"{field}: must be plain data (null, true/false, a number, a string, "
                          f"a list or a mapping), got {value!r}")


def _check_text(field: str, text: str) -> str:
    if "\0" in text:
        raise ConfigError(f"{field}: must be a string without NUL characters, got {text!r}")
    return text


def _describe(hint: Any, plural: bool = False) -> str:
    members = _union_members(hint)
    if len(members) > 1:
        return " or ".join(_describe(m, plural) for m in members)
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin in (tuple, list):
        item = f" of {_describe(args[0], plural=True)}" if args else ""
        return f"lists{item}" if plural else f"a list{item}"
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
             float: ("a number", "numbers"), str: ("a string", "strings"),
             type(None): ("null", "nulls"), dict: ("a mapping", "mappings"),
             Mapping: ("a mapping", "mappings")}
    if origin in names:
        return names[origin][plural]
    if dataclasses.is_dataclass(hint):
        return "a mapping of key: value"
    return getattr(hint, "__name__", str(hint))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(config: Any) -> None:
    """Check every field of dataclass ``config`` against its type hint; store normalised values.

    Call it first in ``__post_init__`` (it works on frozen dataclasses too).

    Raises:
        ConfigError: A field's value does not have the field's type.
    """
    hints = _hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        checked = check_type(item.name, value, hints[item.name])
        if checked is not value:
            object.__setattr__(config, item.name, checked)


# ------------------------------------------------------------------------ mappings <-> configs


def check_keys(cls: type, data: Mapping[str, Any], where: str = "") -> None:
    """Reject keys of ``data`` that are not fields of dataclass ``cls``, listing the allowed ones.

    Raises:
        ConfigError: An unknown key.
    """
    allowed = [item.name for item in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"{_within(where, str(unknown[0]))}: unknown key; allowed keys: "
                          f"{', '.join(allowed)}")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build config dataclass ``cls`` from a mapping (e.g. parsed YAML).

    Unknown keys are rejected; the dataclass checks its values itself (see the module
    docstring), and ``where`` is prefixed to the field named in any error.

    Example:
        >>> @dataclasses.dataclass
        ... class Engine:
        ...     batch_size: int = 1
        ...     def __post_init__(self) -> None:
        ...         check_fields(self)
        >>> from_dict(Engine, {"batch_size": 8})
        Engine(batch_size=8)
        >>> from_dict(Engine, {"batch": 8}, where="engine")
        Traceback (most recent call last):
        ...
        configkit.checks.ConfigError: engine.batch: unknown key; allowed keys: batch_size
        >>> from_dict(Engine, "fast", where="engine")
        Traceback (most recent call last):
        ...
        configkit.checks.ConfigError: engine: must be a mapping of key: value, got 'fast'

    Args:
        cls: The dataclass type.
        data: Field names to values; ``None`` means all defaults.
        where: Dotted name of the section, for messages (``""`` at the top level).

    Returns:
        The validated config.

    Raises:
        ConfigError: Not a mapping, an unknown key, or an invalid value.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: must be a mapping of key: value, got {data!r}")
    check_keys(cls, data, where)
    try:
        return cls(**data)
    except ConfigError as err:
        raise ConfigError(_within(where, str(err))) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def _within(where: str, message: str) -> str:
    return f"{where}.{message}" if where else message


def to_dict(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass as plain YAML/JSON data (see :func:`to_plain`)."""
    return to_plain(dataclasses.asdict(config))


def to_plain(value: Any) -> Any:
    """``value`` with tuples as lists, mapping keys as strings and paths as strings."""
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
