"""Configs as dataclasses: YAML, ``key=value`` overrides, type and range checks, one error type.

The lowest-level package of the project: ``backbones``, ``streams`` and ``specialize`` may all
import it; it imports none of them. :mod:`configkit.sources` reads YAML files and applies
dotted overrides (``updater.lr=0.01``, ``scenario.phases.1.length=500``);
:mod:`configkit.checks` holds :class:`ConfigError`, the value checks that each config's
``__post_init__`` uses for ranges, :func:`check_fields` (every field against its type hint),
and :func:`from_dict` / :func:`to_dict`.

Why not OmegaConf: its structured configs give dotted overrides with list indices and type
checks from dataclass hints, but the released 2.3 (2022) rejects the unions this project uses
(``thresholds: float | tuple[float, ...]``; only unions of primitive types), and 2.4 (2026),
which adds container unions, turns tuples into its own ``TupleConfig`` type. Either way its
type checks would stand beside our range checks (it has none), its errors are several lines of
``full_key``/``object_type`` where ours are one line naming the field and the allowed values
(tests and the CLI rely on that), it parses override values with its own grammar rather than
YAML, and ``ScenarioConfig``'s phases, which inherit their parent's pool fields, would still
need code of ours. That is a dependency (with a vendored ANTLR parser) to replace about 250
lines of code that read top to bottom, so this package is plain Python on ``yaml.safe_load``.
"""

from configkit.checks import (
    ConfigError,
    check_bool,
    check_choice,
    check_fields,
    check_int,
    check_keys,
    check_number,
    check_threads,
    check_type,
    from_dict,
    is_integer,
    to_dict,
    to_plain,
)
from configkit.sources import apply_overrides, load_yaml, parse_override, parse_yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_bool",
    "check_choice",
    "check_fields",
    "check_int",
    "check_keys",
    "check_number",
    "check_threads",
    "check_type",
    "from_dict",
    "is_integer",
    "load_yaml",
    "parse_override",
    "parse_yaml",
    "to_dict",
    "to_plain",
]
