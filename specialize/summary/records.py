"""How the summary's records read and write JSON: one dataclass, one JSON object.

:class:`JsonRecord` is the base of every section in :mod:`specialize.summary.schema`; a field
made with :func:`json_field` says its JSON key, how its value is read back and whether
``None`` is left out. :class:`BeforeAfter` and :class:`EvalSplits` hold one value per phase
or held-out set; :func:`to_jsonable` turns anything a summary holds into plain JSON data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Self, TypeVar

import numpy as np

__all__ = ["BeforeAfter", "EvalSplits", "JsonRecord", "Reader", "Split", "as_is",
           "before_after", "class_keyed", "eval_splits", "json_field", "maybe", "record",
           "records", "to_jsonable"]

T = TypeVar("T")
Split = Literal["eval_in", "eval_out"]
Reader = Callable[[Any], Any]


# ------------------------------------------------------------------------- JSON records
def json_field(*, key: str | None = None, read: Reader | None = None, omit_if_none: bool = False,
           default: Any = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its JSON handling in ``metadata``.

    Args:
        key: The JSON key, when it differs from the field's name (``class``, ``in``).
        read: Turns the JSON value into the field's type (not called on ``null``).
        omit_if_none: Leave the key out of the JSON object when the value is ``None``.
        default: Default value.
        default_factory: Default factory (for lists and dicts).
    """
    metadata = {"key": key, "read": read, "omit_if_none": omit_if_none}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _key(item: dataclasses.Field) -> str:
    return item.metadata.get("key") or item.name


def _to_json(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_json_dict()
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


class JsonRecord:
    """Base of the summary's dataclasses: one JSON object, one key per field, in order."""

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object (plain Python values; NaN stays NaN, see :func:`to_jsonable`)."""
        out = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None and item.metadata.get("omit_if_none"):
                continue
            out[_key(item)] = _to_json(value)
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any] | None) -> Self:
        """Read a JSON object: matching keys only.

        A missing key, or ``null`` for a list or dict field, keeps the field's default.
        """
        data = data or {}
        values = {}
        for item in dataclasses.fields(cls):
            value = data.get(_key(item))
            if value is not None:
                read = item.metadata.get("read")
                values[item.name] = value if read is None else read(value)
            elif _key(item) in data and item.default_factory is dataclasses.MISSING:
                values[item.name] = None
        return cls(**values)


def record(cls: type[JsonRecord]) -> Reader:
    """Reader of one section: an empty or missing JSON object reads as ``None``."""
    return lambda data: cls.from_json_dict(data) if data else None


def records(cls: type[JsonRecord]) -> Reader:
    """Reader of a list of JSON objects."""
    return lambda items: [cls.from_json_dict(item) for item in items]


def class_keyed(mapping: Mapping[Any, Any]) -> dict[int, Any]:
    """``{class_id: value}`` with int keys (JSON turns them into strings)."""
    return {int(key): value for key, value in mapping.items()}


# ------------------------------------------------------------------ before/after, in/out
@dataclass
class BeforeAfter(JsonRecord, Generic[T]):
    """One value before specialization and one after."""

    before: T | None = None
    after: T | None = None

    @classmethod
    def read(cls, data: Mapping[str, Any] | None, read_value: Reader) -> BeforeAfter | None:
        """Read ``{"before": ..., "after": ...}`` with ``read_value`` (``None`` if empty)."""
        if not data:
            return None
        return cls(*(maybe(read_value, data.get(phase)) for phase in ("before", "after")))

    def items(self) -> tuple[tuple[str, T | None], tuple[str, T | None]]:
        """``(("before", before), ("after", after))``."""
        return ("before", self.before), ("after", self.after)


@dataclass
class EvalSplits(JsonRecord, Generic[T]):
    """One value per held-out set.

    Attributes:
        eval_in: On held-out samples of the stream's classes (JSON key ``in``).
        eval_out: On the other classes (JSON key ``out``); ``None`` when the stream holds
            every class.
    """

    eval_in: T | None = json_field(key="in")
    eval_out: T | None = json_field(key="out")

    @classmethod
    def read(cls, data: Mapping[str, Any] | None, read_value: Reader) -> EvalSplits | None:
        """Read ``{"in": ..., "out": ...}`` with ``read_value`` (``None`` if empty)."""
        if not data:
            return None
        return cls(*(maybe(read_value, data.get(split)) for split in ("in", "out")))

    def at(self, split: Split) -> T | None:
        """The value of one held-out set."""
        return self.eval_in if split == "eval_in" else self.eval_out

    def map(self, fn: Callable[[T], Any]) -> EvalSplits:
        """``fn`` applied to each set's value (``None`` stays ``None``)."""
        return EvalSplits(maybe(fn, self.eval_in), maybe(fn, self.eval_out))


def maybe(fn: Callable[[Any], Any], value: Any) -> Any:
    """``fn(value)``, or ``None`` for ``None``."""
    return None if value is None else fn(value)


def as_is(value: Any) -> Any:
    """Reader that keeps the JSON value as it is."""
    return value


def before_after(read_value: Reader) -> Reader:
    """Reader of a :class:`BeforeAfter` whose values ``read_value`` reads."""
    return lambda data: BeforeAfter.read(data, read_value)


def eval_splits(read_value: Reader) -> Reader:
    """Reader of an :class:`EvalSplits` whose values ``read_value`` reads."""
    return lambda data: EvalSplits.read(data, read_value)


# ------------------------------------------------------------------------------------ JSON
def to_jsonable(value: Any, where: str = "summary") -> Any:
    """Plain JSON data from a summary: NaN/inf -> ``None``, numpy/torch -> Python, Path -> str.

    Args:
        value: Nested mappings, sequences, numbers, strings, numpy or torch values,
            summary records (their :meth:`JsonRecord.to_json_dict`), dataclasses or paths.
        where: Name used in error messages (the path to the value).

    Returns:
        A structure ``json.dumps(..., allow_nan=False)`` accepts.

    Raises:
        TypeError: A value has no JSON representation.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_json_key(k, where): to_jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "tolist"):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, JsonRecord):
        return to_jsonable(value.to_json_dict(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), where)
    raise TypeError(f"{where}: {type(value).__name__} cannot be written to JSON")


def _json_key(key: Any, where: str) -> str | int | float | bool | None:
    if key is None or isinstance(key, (str, int, float, bool)):
        return key
    if isinstance(key, np.generic):
        return key.item()
    raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} cannot be a JSON key")
