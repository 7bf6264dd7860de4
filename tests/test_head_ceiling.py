"""benchmarks/head_ceiling.py: supervised head training, features, figures and a tiny run.

Tiny models and synthetic data only; no Fashion-MNIST.
"""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from backbones.checkpoint import save_checkpoint
from specialize.evaluation.passes import ExitPass, exit_pass
from tests.conftest import tiny_model

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "head_ceiling.py"
SYNTHETIC = {"num_classes": 10, "samples_per_class": 40, "image_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_head_ceiling", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def learnable_set(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images whose class shows in their mean brightness, and the classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = torch.randn(n, 1, 16, 16, generator=generator) * 0.3 + labels[:, None, None, None]
    return images / 5.0, labels


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- features ------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["pool_fc", "pool_mlp"])
def test_head_inputs_are_the_prefix_outputs(bench, head):
    model = tiny_model(head=head, head_pool=2)
    images, _ = learnable_set(40)
    inputs = bench.early_head_inputs(model, images, identity, batch_size=16)
    assert bench.head_splits(model) == [2] * (model.num_exits - 1)
    assert len(inputs) == model.num_exits - 1
    with torch.no_grad():
        logits = model(images)
        for k, x in enumerate(inputs):
            assert x.shape[0] == 40 and x.dim() == 2  # pooled and flattened
            torch.testing.assert_close(model.heads[k][2:](x), logits[k])


# -- supervised head training --------------------------------------------------------------

@pytest.mark.parametrize("head", ["pool_fc", "pool_mlp"])
def test_training_lowers_the_loss_and_changes_only_the_copys_early_heads(bench, head):
    model = tiny_model(head=head, head_pool=2)
    original = states(model)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    images, labels = learnable_set()
    inputs = bench.early_head_inputs(model, images, identity)
    trained, losses = bench.train_early_heads(model, inputs, labels, epochs=8, lr=5e-2,
                                              batch_size=64, seed=0)
    assert trained is not model
    assert len(losses) == model.num_exits - 1 and all(len(h) == 8 for h in losses)
    for history in losses:
        assert history[-1] < 0.9 * history[0]
    # the original model is untouched
    for key, value in states(model).items():
        assert torch.equal(value, original[key]), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    # in the copy, every early head's trained part moved; nothing else did
    after = states(trained)
    assert after.keys() == original.keys()
    early = tuple(f"heads.{k}." for k in range(model.num_exits - 1))
    for key, value in after.items():
        if key.startswith(early):
            assert not torch.equal(value, original[key]), key
        else:
            assert torch.equal(value, original[key]), key  # backbone, gates, final head
    final = f"heads.{model.num_exits - 1}."
    assert any(key.startswith(final) for key in after)
    assert not trained.training
    assert not any(p.requires_grad for p in trained.parameters())
    assert all(p.grad is None for p in trained.parameters())


def test_training_is_seeded(bench):
    model = tiny_model(head_pool=2)
    images, labels = learnable_set(128)
    inputs = bench.early_head_inputs(model, images, identity)
    runs = [bench.train_early_heads(model, inputs, labels, epochs=2, seed=seed)[0]
            for seed in (0, 0, 1)]
    same, other = states(runs[1]), states(runs[2])
    for key, value in states(runs[0]).items():
        assert torch.equal(value, same[key]), key
    assert any(not torch.equal(value, other[key]) for key, value in states(runs[0]).items())


def test_training_checks_its_inputs(bench):
    model = tiny_model(head_pool=2)
    images, labels = learnable_set(32)
    inputs = bench.early_head_inputs(model, images, identity)
    with pytest.raises(ValueError, match="input tensors"):
        bench.train_early_heads(model, inputs[:-1], labels)
    with pytest.raises(ValueError, match="input tensors"):
        bench.train_early_heads(model, inputs, labels[:-1])


# -- figures and table ---------------------------------------------------------------------

def exit_pass_of(correct: list[list[bool]], confidence: list[list[float]]) -> ExitPass:
    correct_t = torch.tensor(correct)
    labels = torch.zeros(len(correct), dtype=torch.long)
    flops = torch.tensor([[10, 20, 30]] * len(correct))
    return ExitPass(torch.tensor(confidence), (~correct_t).long(), flops, labels)


def test_ceiling_figures(bench):
    before = exit_pass_of([[False, True, True], [True, True, True], [False, False, True],
                           [True, True, True]],
                          [[0.95, 0.6, 1.0], [0.6, 0.95, 1.0], [0.5, 0.5, 1.0],
                           [0.97, 0.9, 1.0]])
    same = bench.ceiling_figures(before, before, drop=0.5)
    assert same["acc_before"] == same["acc_after"] == [50.0, 75.0, 100.0]
    assert same["flops_ratio"] == pytest.approx(1.0)
    assert same["gap_closed"] == pytest.approx(0.0)
    assert same["gap_mflops"] > 0
    # perfect, confident early heads: the cheapest exit answers everything right
    perfect = exit_pass_of([[True, True, True]] * 4, [[0.99, 0.99, 1.0]] * 4)
    better = bench.ceiling_figures(before, perfect, drop=0.5)
    assert better["acc_after"] == [100.0, 100.0, 100.0]
    assert better["flops_ratio"] < 1 and better["gap_closed"] > 1  # beats the original oracle
    assert better["flops_after"] == better["flops_floor"] == 10 and better["at_floor"]
    assert not same["at_floor"]


def test_table_aggregates_over_seeds(bench):
    def record(scenario, samples, seed, gap):
        return {"scenario": scenario, "samples": samples, "seed": seed,
                "acc_before": [80.0, 85.0, 90.0], "acc_after": [82.0 + seed, 86.0, 90.0],
                "gap_closed": gap, "flops_ratio": 0.9, "gap_mflops": 2.0,
                "checkpoint": "m.pt", "measure": "max_softmax", "iso_drop": 0.5,
                "at_floor": seed == 1}

    records = [record("tops", n, s, g) for n in (100, 200) for s, g in ((0, 0.5), (1, None))]
    rows = bench.table_rows(records)
    assert [(r["scenario"], r["samples"]) for r in rows] == [("tops", 100), ("tops", 200)]
    assert rows[0]["metrics"]["gap_closed"] == {"mean": 0.5, "std": None, "n": 1, "total": 2}
    assert rows[0]["accuracy"]["after"][0]["mean"] == pytest.approx(82.5)
    text = bench.format_table(rows)
    assert text.splitlines()[0].split()[:6] == ["scenario", "labelled", "exit", "0", "acc",
                                                "exit"]
    assert "80.0 → 82.5" in text and "0.50 (1/2)" in text and "exit 2 acc" not in text
    assert rows[0]["at_floor"] == 1 and text.splitlines()[1].endswith("1/2")


def test_argument_errors(bench):
    assert bench.parse_args([]).samples == [3000, 8000]
    assert bench.parse_args(["--seeds", "0,1,1"]).seeds == [0, 1]
    for argv in (["--samples", "0"], ["--seeds", "a"], ["--epochs", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    with pytest.raises(argparse.ArgumentTypeError, match="integers >= 1"):
        bench._ints("--samples", 1, "3000")("-3")


# -- a whole tiny run ----------------------------------------------------------------------

@pytest.fixture()
def tiny_setup(tmp_path):
    model = tiny_model(head_pool=2)
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model)
    scenario = tmp_path / "shapes.yaml"
    scenario.write_text(yaml.safe_dump({
        "scenario": "subset", "dataset": "synthetic", "dataset_options": SYNTHETIC,
        "classes": [1, 3, 8], "length": 60, "seed": 0, "holdout_fraction": 0.5}))
    return model, checkpoint, scenario


def test_labelled_samples_come_from_the_train_split(bench, tiny_setup):
    from streams.datasets import load_dataset
    from streams.replay import build_stream

    _, _, scenario = tiny_setup
    stream = build_stream(bench.run_config(str(scenario), 0).scenario)
    train = load_dataset("synthetic", split="train", **SYNTHETIC)
    picked = [bench.labelled_training_set(stream, 50, seed) for seed in (0, 0, 1)]
    assert torch.equal(picked[0].images, picked[1].images)
    assert not torch.equal(picked[0].images, picked[2].images)
    assert set(picked[0].labels.tolist()) <= {1, 3, 8}
    train_keys = {image.numpy().tobytes() for image in train.images}
    assert all(image.numpy().tobytes() in train_keys for image in picked[0].images)
    with pytest.raises(ValueError, match="fewer than --samples 121"):
        bench.labelled_training_set(stream, 121, 0)  # 3 classes x 40 train samples


def test_a_tiny_run_prints_one_json_object(bench, tiny_setup, capsys):
    model, checkpoint, scenario = tiny_setup
    argv = ["--scenarios", str(scenario), "--samples", "30,90", "--seeds", "0,1",
            "--checkpoint", str(checkpoint), "--epochs", "3", "--json", "--no-progress"]
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"].startswith("python benchmarks/head_ceiling.py --scenarios")
    assert [(r["samples"], r["seeds"]) for r in report["table"]] == [(30, [0, 1]), (90, [0, 1])]
    assert len(report["runs"]) == 4
    run = report["runs"][0]
    assert run["scenario"] == "shapes" and run["classes"] == [1, 3, 8]
    assert sum(run["train_class_counts"]) == 30 and run["eval_in"] == 60
    # the before accuracies are the original model's exit pass on eval_in
    from streams.replay import build_stream

    stream = build_stream(bench.run_config(str(scenario), 0).scenario)
    ev = stream.eval_in
    before = exit_pass(model, ev.images, ev.labels, stream.transform)
    assert run["acc_before"] == pytest.approx((100 * before.correct.double().mean(0)).tolist())
    assert run["acc_after"][-1] == pytest.approx(run["acc_before"][-1])  # final head unchanged
    gap = run["gap_closed"]
    assert gap is None or math.isfinite(gap)
    bench.main([a for a in argv if a != "--json"])
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "command: " + report["command"].replace(" --json", "")
    assert "before-oracle MFLOPs" in text
