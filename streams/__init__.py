"""Data for test-time specialization: data sets, input transforms and class-skewed streams.

This package holds data only: it imports neither ``backbones`` nor ``specialize``.

Example:
    >>> from streams import build_stream, load_scenario
    >>> stream = build_stream(load_scenario("footwear", ["length=600"]))
    >>> for batch in stream.inputs(batch_size=64):
    ...     ...  # float32 (B, 1, 28, 28); labels only via stream.evaluator().labels
"""

from streams.datasets import (
    ArrayDataset,
    DataFormatError,
    list_datasets,
    load_dataset,
    make_synthetic,
)
from streams.replay import Stream, StreamEvaluator, build_stream, format_description
from streams.scenarios import (
    SCENARIO_KINDS,
    ConfigError,
    ScenarioConfig,
    list_scenarios,
    load_scenario,
)
from streams.transforms import InputTransform

__all__ = [
    "ArrayDataset",
    "ConfigError",
    "DataFormatError",
    "InputTransform",
    "SCENARIO_KINDS",
    "ScenarioConfig",
    "Stream",
    "StreamEvaluator",
    "build_stream",
    "format_description",
    "list_datasets",
    "list_scenarios",
    "load_dataset",
    "load_scenario",
    "make_synthetic",
]
