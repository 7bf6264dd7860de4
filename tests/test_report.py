"""Tests of specialize.report: the run folder (summary.json, report.md, PNG plots)."""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from specialize.drift import ClassCostTracker
from specialize.report import (
    NO_EVAL_OUT,
    PLOT_FILES,
    format_headline,
    plot_drift,
    render_markdown,
    to_jsonable,
    write_report,
)
from streams.datasets import FASHION_MNIST_CLASSES

CLASS_NAMES = list(FASHION_MNIST_CLASSES)
STREAM_CLASSES = [5, 7, 9]
EXIT_FLOPS = [2_400_000, 9_800_000, 21_500_000, 37_200_000]


def curve(peak: float, cheapest: float, full: float, points: int = 8) -> list[dict]:
    """A monotone Pareto front from ``cheapest`` to ``full`` FLOPs per sample."""
    flops = np.linspace(cheapest, full, points)
    accuracy = peak - 25.0 * np.exp(-4.0 * (flops - cheapest) / (full - cheapest))
    thresholds = np.linspace(0.3, 1.0, points)
    return [
        {"threshold": float(t), "accuracy": float(a), "flops": float(f)}
        for t, a, f in zip(thresholds, accuracy, flops, strict=True)
    ]


def point(accuracy: float, flops: float) -> dict:
    return {"accuracy": accuracy, "flops": flops}


def drift_history(window: int = 250, length: int = 2000) -> list[dict]:
    """A real tracker's history: stream classes get cheaper over time, others stay put."""
    rng = np.random.default_rng(0)
    pred = rng.choice(STREAM_CLASSES + [0, 8], length, p=[0.3, 0.3, 0.3, 0.05, 0.05])
    progress = np.arange(length) / length
    in_stream = np.isin(pred, STREAM_CLASSES)
    exits = np.where(in_stream & (rng.random(length) < 0.2 + 0.6 * progress), 0, 3)
    exits = np.where((exits == 3) & (rng.random(length) < 0.3), 1, exits)
    flops = np.asarray(EXIT_FLOPS)[exits] * rng.uniform(0.8, 1.0, length)
    tracker = ClassCostTracker(10, 4, window=window)
    tracker.update(pred, exits, flops.round().astype(np.int64))
    return tracker.history()


def example_summary() -> dict:
    """A summary as the engine writes it (schema of the README), with a NaN to be nulled."""
    per_class = []
    for c, name in enumerate(CLASS_NAMES):
        in_stream = c in STREAM_CLASSES
        before = 22e6 + 1e6 * c
        per_class.append(
            {
                "class": c,
                "name": name,
                "in_stream": in_stream,
                "flops_before": before,
                "flops_after": before * (0.55 if in_stream else 1.08),
                "accuracy_before": 85.0 + c,
                "accuracy_after": 85.0 + c + (0.4 if in_stream else -1.1),
                "stream_flops_first_window": 30e6 if in_stream else None,
                "stream_flops_last_window": 14e6 if in_stream else None,
            }
        )
    per_class[0]["stream_flops_first_window"] = float("nan")
    return {
        "scenario": {
            "name": "footwear",
            "scenario": "subset",
            "classes": STREAM_CLASSES,
            "length": 2000,
            "seed": 1234,
            "fingerprint": "3f9a0c1d2b7e",
            "dataset": "fashion_mnist",
        },
        "model": {
            "name": "resnet18_exits",
            "num_exits": 4,
            "exit_flops": EXIT_FLOPS,
            "gating": True,
            "checkpoint": "checkpoints/fmnist_resnet18.pt",
            "exit_accuracy": [78.1, 86.4, 90.2, 92.3],
        },
        "class_names": CLASS_NAMES,
        "thresholds": [0.9, 0.85, 0.8, None],
        "curves": {
            "before": {"in": curve(95.0, 2.4e6, 37.2e6), "out": curve(91.0, 2.4e6, 37.2e6)},
            "after": {"in": curve(95.2, 2.0e6, 30.0e6), "out": curve(90.0, 2.6e6, 37.2e6)},
        },
        "operating_points": {
            "before": {
                "in": {"accuracy": 93.1, "flops": 18.7e6},
                "out": {"accuracy": 89.0, "flops": 17.9e6},
            },
            "after": {
                "in": {"accuracy": 93.4, "flops": 11.2e6},
                "out": {"accuracy": 87.8, "flops": 19.5e6},
            },
        },
        "oracle": {"in": curve(97.0, 1.5e6, 20.0e6), "out": curve(94.0, 1.5e6, 22.0e6)},
        "iso_accuracy": {
            "target_accuracy": 94.5,
            "flops_before": 19_345_678.0,
            "flops_after": 12_123_456.0,
            "flops_ratio": 0.6267,
            "flops_oracle": 6_500_000.0,
            "gap_closed": 0.5621,
        },
        "eval_out_accuracy_change": -1.23,
        "per_class": per_class,
        "stream": {
            "frozen": {
                "accuracy": 93.8,
                "mean_flops": 24.1e6,
                "exit_histogram": [400, 300, 500, 800],
                "samples_per_second": 812.4,
            },
            "specializing": {
                "accuracy": 94.0,
                "mean_flops": 15.3e6,
                "exit_histogram": [1100, 250, 250, 400],
                "samples_per_second": 640.9,
                "updates": 187,
            },
        },
        "drift": {"window": 250, "history": drift_history()},
        "timings": {"load": 0.41, "curves_before": 2.3, "stream": 6.8, "curves_after": 2.2},
        "versions": {"specialize": "0.1.0", "torch": "2.14.1", "timm": "1.0.31", "python": "3.11"},
    }


def without_eval_out(summary: dict) -> dict:
    summary = copy.deepcopy(summary)
    summary["scenario"]["classes"] = list(range(10))
    for phase in ("before", "after"):
        summary["curves"][phase]["out"] = None
        summary["operating_points"][phase]["out"] = None
    summary["oracle"]["out"] = None
    summary["eval_out_accuracy_change"] = None
    return summary


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The example summary's run folder, written once for the module (plots take ~1 s)."""
    out = tmp_path_factory.mktemp("run")
    return out, write_report(example_summary(), out)


@pytest.fixture(scope="module")
def report_dir(written) -> Path:
    return written[0]


def test_write_report_writes_every_file_and_no_temp_file(written):
    out, paths = written
    assert set(paths) == {"summary", "report", *PLOT_FILES}
    for path in paths.values():
        assert path.parent == out and path.is_file() and path.stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json", "report.md", *PLOT_FILES.values()]
    )


def test_pngs_are_valid_and_readable_size(report_dir):
    for filename in PLOT_FILES.values():
        width, height = png_size(report_dir / filename)
        assert width >= 600 and height >= 400, filename
        assert (report_dir / filename).stat().st_size > 10_000, filename


def test_summary_json_round_trips_with_nan_as_null(report_dir):
    text = (report_dir / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["per_class"][0]["stream_flops_first_window"] is None
    expected = example_summary()
    expected["per_class"][0]["stream_flops_first_window"] = None
    assert loaded == json.loads(json.dumps(expected))  # int class keys become strings
    assert text.startswith('{\n  "scenario"'), "indent 2"


def test_report_md_mentions_headline_numbers_and_embeds_plots(report_dir):
    text = (report_dir / "report.md").read_text()
    for needle in ("footwear", "94.50%", "19.35", "12.12", "6.5", "0.627", "0.56", "-1.23 pt"):
        assert needle in text, needle
    for needle in ("Sandal", "Ankle boot", "resnet18_exits", "187", "1100 / 250 / 250 / 400"):
        assert needle in text, needle
    for filename in PLOT_FILES.values():
        assert f"]({filename})" in text
    assert "MFLOPs" in text and "MAC" not in text
    assert "2.14.1" in text and "curves_before" in text


def test_eval_out_none_is_reported_not_failed(tmp_path):
    summary = without_eval_out(example_summary())
    paths = write_report(summary, tmp_path)
    for name in PLOT_FILES:
        png_size(paths[name])
    text = paths["report"].read_text()
    assert NO_EVAL_OUT in text and "n/a pt" not in text
    assert NO_EVAL_OUT in format_headline(summary)


def test_missing_sections_still_give_a_full_run_folder_and_rewrites_replace(tmp_path):
    run = tmp_path / "nested" / "run"
    summary = {"scenario": {"name": "bare"}, "drift": {"window": 500, "history": []}}
    paths = write_report(summary, run)
    for name in PLOT_FILES:
        png_size(paths[name])
    text = paths["report"].read_text()
    assert "bare" in text and "not computed" in text and "not recorded" in text
    write_report({}, run)  # nothing at all, into the same folder
    assert json.loads(paths["summary"].read_text()) == {}
    assert "unnamed run" in paths["report"].read_text()
    assert len(list(run.iterdir())) == 2 + len(PLOT_FILES)


def test_a_summary_reloaded_from_json_renders_the_same(report_dir):
    loaded = json.loads((report_dir / "summary.json").read_text())  # str class keys in history
    assert render_markdown(loaded) == (report_dir / "report.md").read_text()
    figure = plot_drift(loaded)
    assert len(figure.axes[0].get_lines()) == 5 + 1  # five predicted classes + all samples


def test_format_headline(report_dir):
    lines = format_headline(example_summary(), report_dir).splitlines()
    assert lines[0] == f"report: {report_dir / 'report.md'}"
    assert "flops_ratio 0.627" in lines[1] and "gap_closed 0.56" in lines[1]
    assert "19.35 -> 12.12 MFLOPs per sample" in lines[1]
    assert lines[2].endswith("-1.23 pt")
    assert not format_headline(example_summary()).startswith("report:")


def test_to_jsonable_converts_numpy_torch_paths_and_non_finite():
    torch = pytest.importorskip("torch")
    value = {
        "a": np.float32(1.5),
        "b": np.array([1, 2]),
        "c": torch.tensor([0.5, float("nan")]),
        "d": (Path("x"), float("inf"), -math.inf),
        np.int64(3): np.bool_(True),
    }
    assert to_jsonable(value) == {
        "a": 1.5,
        "b": [1, 2],
        "c": [0.5, None],
        "d": ["x", None, None],
        3: True,
    }
    with pytest.raises(TypeError, match=r"summary\['bad'\]: object"):
        to_jsonable({"bad": object()})
    with pytest.raises(TypeError, match="mapping"):
        write_report([1, 2], Path("unused"))


def test_render_markdown_says_flops_not_macs():
    text = render_markdown(example_summary())
    assert "multiply-add as 2" in text and "MACs" not in text


def test_one_flops_formatter_for_report_and_backbones():
    from backbones.cost import flops_unit, format_flops

    assert flops_unit(EXIT_FLOPS).name == "MFLOPs"
    assert flops_unit([None, float("nan"), 3e9]).name == "GFLOPs"
    assert flops_unit([]).name == "FLOPs" and flops_unit([512]).name == "FLOPs"
    assert format_flops(12_345_678) == "12.35 MFLOPs" and format_flops(2_500) == "2.50 kFLOPs"
    assert format_flops(None) == format_flops(float("inf")) == "n/a"
    unit = flops_unit(EXIT_FLOPS)
    assert format_flops(2_500, unit) == "0.00 MFLOPs" and unit.format(19_345_678.0) == "19.35"


def test_per_class_plots_of_many_classes_keep_the_stream_and_the_largest_changes():
    from specialize.report.plots import MAX_CLASSES_SHOWN, plot_per_class_flops

    summary = example_summary()
    template = summary["per_class"][0]
    summary["per_class"] = [
        {**template, "class": c, "name": f"c{c}", "in_stream": c in (50, 51),
         "flops_before": 100.0, "flops_after": 100.0 + (c if c < 150 else 0)}
        for c in range(200)]
    (ax,) = plot_per_class_flops(summary).axes
    names = [label.get_text() for label in ax.get_xticklabels()]
    assert len(names) == MAX_CLASSES_SHOWN
    assert {"c50", "c51", "c149", "c148"} <= set(names) and "c0" not in names
    assert "176 other classes" in ax.get_title()
