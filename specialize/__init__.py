"""Online test-time specialization of early-exit networks: the engine and its tools.

The public API, importable from the package itself::

    from specialize import ExitPolicy, HeadUpdater, Specializer, UpdaterConfig

Names are imported on first use (PEP 562), so ``import specialize`` stays light and the
command line starts fast. Each name lives in one module, listed in the ``_EXPORTS`` table.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "ExitPolicy": "specialize.policy",
    "CalibrationResult": "specialize.policy",
    "calibrate_thresholds": "specialize.policy",
    "Engine": "specialize.engine",
    "EngineResult": "specialize.engine",
    "StepOutput": "specialize.engine",
    "HeadUpdater": "specialize.updater",
    "UpdaterConfig": "specialize.updater",
    "Specializer": "specialize.specializer",
    "BudgetController": "specialize.operating_point.controller",
    "AuditLog": "specialize.operating_point.audits",
    "AuditSampler": "specialize.operating_point.audits",
    "ClassCostTracker": "specialize.drift",
    "ClassMixDriftDetector": "specialize.drift",
    "PageHinkley": "specialize.drift",
    "RunConfig": "specialize.run.config",
    "load_run_config": "specialize.run.config",
    "run_experiment": "specialize.run.experiment",
    "RunSummary": "specialize.summary",
    "write_report": "specialize.report",
    "default_checkpoint": "specialize.models.zoo",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'specialize' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

