"""End to end: `specialize run` on a real Fashion-MNIST subset writes every documented output."""

import json
from pathlib import Path

import pytest
import torch

from backbones import create_backbone
from backbones.checkpoint import save_checkpoint
from specialize.cli import main
from specialize.report import write_report
from specialize.summary import RunSummary, to_jsonable

FMNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [
    pytest.mark.fmnist,
    pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").exists(),
                       reason="Debian's dataset-fashion-mnist is not installed"),
]

SUMMARY_KEYS = {
    "scenario", "model", "class_names", "thresholds", "measure", "curves", "operating_points",
    "oracle", "iso_accuracy", "eval_out_accuracy_change", "eval_in_peak_accuracy", "per_class",
    "stream", "drift", "updater", "timings", "versions",
}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    model = create_backbone("tiny_resnet", num_classes=10, in_chans=1,
                            input_size=(1, 28, 28), head_pool=2).eval()
    checkpoint = save_checkpoint(root / "tiny.pt", model)
    code = main([
        "run", "configs/scenarios/footwear.yaml", f"model.checkpoint={checkpoint}",
        "length=120", "holdout_fraction=0.02", "policy.thresholds=0.15",
        "updater.update_every=8", "drift.window=40", f"out={root / 'out'}", "progress=false",
    ])
    assert code == 0
    return root / "out"


def test_run_writes_every_output(run_folder):
    for name in ("summary.json", "report.md", "config.yaml", "specialized_heads.pt",
                 "curves.png", "exit_histogram.png", "per_class_flops.png", "drift.png"):
        assert (run_folder / name).stat().st_size > 0, name


def test_summary_follows_the_documented_schema(run_folder):
    summary = json.loads((run_folder / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    for phase in ("before", "after"):
        for split in ("in", "out"):
            points = summary["curves"][phase][split]
            assert points and set(points[0]) == {"threshold", "accuracy", "flops"}
            assert all(0 <= p["accuracy"] <= 100 for p in points)
    assert set(summary["iso_accuracy"]) >= {"target_accuracy", "flops_before", "flops_after",
                                            "flops_ratio", "flops_oracle", "gap_closed"}
    assert set(summary["stream"]) == {"frozen", "specializing"}
    assert sum(summary["stream"]["specializing"]["exit_histogram"]) == 120
    assert summary["scenario"]["classes"] == [5, 7, 9]
    assert len(summary["per_class"]) == 10
    assert summary["model"]["exit_flops"] == sorted(summary["model"]["exit_flops"])


def test_specialized_heads_load_into_a_fresh_model(run_folder):
    from backbones.checkpoint import load_checkpoint

    saved = torch.load(run_folder / "specialized_heads.pt", weights_only=True)
    summary = json.loads((run_folder / "summary.json").read_text())
    model, _ = load_checkpoint(run_folder.parent / "tiny.pt")
    original = {k: v.clone() for k, v in model.heads.state_dict().items()}
    model.heads.load_state_dict(saved["heads"])  # strict: the plain heads' keys
    assert saved["anchor_weights"] == {0: 0.5, 1: 0.5, 2: 0.5}  # the default strategy
    assert summary["updater"]["updates"] > 0
    changed = {k for k, v in saved["heads"].items() if not torch.equal(v, original[k])}
    assert changed and not any(k.startswith(f"{model.num_exits - 1}.") for k in changed)


def test_summary_json_round_trips_through_the_types(run_folder):
    text = (run_folder / "summary.json").read_text()
    summary = RunSummary.from_json_dict(json.loads(text))
    assert summary.scenario.classes == [5, 7, 9] and summary.stream.frozen is not None
    assert summary.updater.updates == summary.stream.specializing.updates > 0
    assert json.dumps(to_jsonable(summary), indent=2) + "\n" == text  # keys, order, values


def test_report_renders_from_the_summary_json_read_back(run_folder, tmp_path):
    loaded = json.loads((run_folder / "summary.json").read_text())
    paths = write_report(loaded, tmp_path)
    for name, path in paths.items():
        assert path.read_bytes() == (run_folder / path.name).read_bytes(), name
