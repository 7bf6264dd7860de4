"""`specialize streams describe`, called in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specialize.cli import main

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FOOTWEAR = Path(__file__).resolve().parents[1] / "configs" / "scenarios" / "footwear.yaml"

SCENARIO = """\
scenario: subset
dataset: synthetic
dataset_options: {num_classes: 5, samples_per_class: 40, image_size: 8}
classes: [1, 3]
length: 400
"""


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(SCENARIO)
    return path


def test_describe_json(scenario_file: Path, capsys) -> None:
    assert main(["streams", "describe", str(scenario_file), "length=500", "seed=3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    required = {"length", "class_counts", "eval_in_size", "eval_out_size", "fingerprint"}
    assert required <= set(summary)
    assert summary["length"] == 500 and summary["seed"] == 3 and summary["name"] == "two"
    assert {k for k, v in summary["class_counts"].items() if v} == {"1", "3"}
    assert (summary["eval_in_size"], summary["eval_out_size"]) == (40, 60)


def test_describe_text(scenario_file: Path, capsys) -> None:
    assert main(["streams", "describe", str(scenario_file), "--windows", "5"]) == 0
    text = capsys.readouterr().out
    assert "window" in text and "320-400" in text and "total" in text
    assert "eval_in 40 samples, eval_out 60 samples" in text


def test_describe_reports_bad_input(scenario_file: Path, capsys) -> None:
    assert main(["streams", "describe", str(scenario_file), "classes=[]"]) == 2
    assert "classes: empty list" in capsys.readouterr().err
    assert main(["streams", "describe", str(scenario_file), "colour=red"]) == 2
    assert "colour: unknown key; allowed keys:" in capsys.readouterr().err


@pytest.mark.fmnist
@pytest.mark.skipif(
    not FMNIST.is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_describe_footwear_on_fashion_mnist(capsys) -> None:
    assert main(["streams", "describe", str(FOOTWEAR), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["length"] == 3000
    assert {k for k, v in summary["class_counts"].items() if v} == {"5", "7", "9"}
    assert (summary["eval_in_size"], summary["eval_out_size"]) == (1500, 3500)
