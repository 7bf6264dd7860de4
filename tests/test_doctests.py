"""The ``>>>`` examples in the docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import configkit
import specialize.drift
import specialize.updater
import streams.datasets

# Packages whose every module is run through doctest, and single modules.
PACKAGES = (configkit, specialize.drift, specialize.updater, streams.datasets)
SINGLE_MODULES = ["backbones.contract", "backbones.pretrained", "specialize.operating_point.audits",
                  "specialize.operating_point.calibration", "specialize.operating_point.search",
                  "streams.transforms"]
# Modules that must hold at least one example (deleting one fails the test, too).
MUST_HAVE_EXAMPLES = {
    "specialize.drift.base",
    "specialize.drift.class_mix",
    "specialize.drift.page_hinkley",
    "specialize.drift.tracker",
    "specialize.updater.health",
    "specialize.updater.prior",
    "backbones.pretrained",
    "specialize.operating_point.audits",
    "specialize.operating_point.calibration",
    "streams.datasets.base",
    "streams.datasets.registry",
    "streams.datasets.synthetic",
}


def _modules(package: ModuleType) -> list[str]:
    prefix = package.__name__ + "."
    return [package.__name__] + [
        info.name for info in pkgutil.walk_packages(package.__path__, prefix)
    ]


MODULES = [name for package in PACKAGES for name in _modules(package)] + SINGLE_MODULES


def test_every_module_that_must_have_examples_exists() -> None:
    assert MUST_HAVE_EXAMPLES <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name} (see above)"
    if name in MUST_HAVE_EXAMPLES:
        assert result.attempted > 0, f"{name} lost its docstring examples"
