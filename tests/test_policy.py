import dataclasses
import math

import numpy as np
import pytest
import torch

from backbones import exit_rule
from specialize import policy
from specialize.evaluation.curves import evaluate_thresholds, sweep
from specialize.policy import CalibrationResult, ExitPolicy, calibrate_thresholds


def synthetic_pass(seed=0, n=400, k=4):
    """Exits that get better with depth; confidence tracks how easy a sample is."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)[:, None]
    ability = np.linspace(0.45, 0.9, k)[None]
    margin = ability - difficulty
    correct = margin + rng.normal(0, 0.1, (n, k)) > 0
    confidence = np.clip(0.5 + margin + rng.normal(0, 0.1, (n, k)), 0, 1)
    flops = np.cumsum(rng.integers(80, 120, (n, k)), axis=1)
    return confidence, correct, flops


def test_measures_are_re_exported():
    assert policy.CONFIDENCE_MEASURES is exit_rule.CONFIDENCE_MEASURES
    assert policy.confidence is exit_rule.confidence
    assert policy.select_exits is exit_rule.select_exits


def test_exit_policy_select_and_tensor():
    rule = ExitPolicy("max_softmax", [0.9, 0.8])
    assert rule.thresholds == (0.9, 0.8)
    assert rule.thresholds_tensor(3).tolist() == [0.9, 0.8, -math.inf]
    confidences = torch.tensor([[0.95, 0.1, 0.2], [0.5, 0.8, 0.1], [0.5, 0.7, 0.1]])
    assert rule.select(confidences).tolist() == [0, 1, 2]
    assert ExitPolicy(thresholds=0.5).select(confidences).tolist() == [0, 0, 0]
    logits = torch.tensor([[0.0, 0.0]])
    assert rule.confidence(logits).tolist() == [0.5]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.thresholds = 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"measure": "entropy"}, "max_softmax, margin, neg_entropy"),
        ({"thresholds": (0.5, math.nan)}, "NaN"),
        ({"measure": "neg_entropy", "thresholds": 0.9}, "largest neg_entropy"),
        ({"thresholds": 1.5}, "use \\+inf"),
    ],
)
def test_exit_policy_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExitPolicy(**kwargs)


def test_exit_policy_allows_disabled_exits():
    assert ExitPolicy("neg_entropy", (-0.1, math.inf)).thresholds == (-0.1, math.inf)


@pytest.mark.parametrize("max_drop", [0.0, 0.5, 2.0, 10.0])
def test_calibration_accuracy_target_is_cheapest_shared(max_drop):
    confidence, correct, flops = synthetic_pass()
    result = calibrate_thresholds(confidence, correct, flops, max_drop=max_drop)
    final_accuracy = 100 * correct[:, -1].mean()
    assert isinstance(result, CalibrationResult)
    assert len(result.thresholds) == 3 and len(set(result.thresholds)) == 1
    assert result.accuracy >= final_accuracy - max_drop - 1e-9
    reproduced = evaluate_thresholds(confidence, correct, flops, result.thresholds)
    assert reproduced == (result.accuracy, result.mean_flops)
    grid = sweep(confidence, correct, flops, np.unique(confidence))
    feasible = grid.accuracy >= final_accuracy - max_drop - 1e-9
    assert result.mean_flops <= grid.flops[feasible].min()


def test_calibration_saves_compute_on_easy_data():
    confidence, correct, flops = synthetic_pass(1)
    result = calibrate_thresholds(confidence, correct, flops, max_drop=1.0)
    assert result.mean_flops < 0.9 * flops[:, -1].mean()


def test_calibration_flops_target():
    confidence, correct, flops = synthetic_pass(2)
    budget = float(np.median(flops[:, 1]))
    result = calibrate_thresholds(confidence, correct, flops, target="flops", flops_budget=budget)
    assert result.mean_flops <= budget
    curve = sweep(confidence, correct, flops)
    assert result.accuracy == curve.accuracy[curve.flops <= budget].max()
    with pytest.raises(ValueError, match="below the cheapest operating point"):
        calibrate_thresholds(
            confidence, correct, flops, target="flops", flops_budget=flops[:, 0].mean() - 1
        )


@pytest.mark.parametrize("target", ["accuracy", "flops"])
def test_calibration_per_exit_is_no_worse_than_shared(target):
    confidence, correct, flops = synthetic_pass(3)
    kwargs = {"flops_budget": 250.0} if target == "flops" else {"max_drop": 1.0}
    shared = calibrate_thresholds(confidence, correct, flops, target=target, **kwargs)
    per_exit = calibrate_thresholds(
        confidence, correct, flops, target=target, shared=False, num_candidates=16, **kwargs
    )
    assert len(per_exit.thresholds) == 3
    reproduced = evaluate_thresholds(confidence, correct, flops, per_exit.thresholds)
    assert reproduced == (per_exit.accuracy, per_exit.mean_flops)
    if target == "accuracy":
        assert per_exit.accuracy >= 100 * correct[:, -1].mean() - 1.0 - 1e-9
        assert per_exit.mean_flops <= shared.mean_flops
    else:
        assert per_exit.mean_flops <= 250.0
        assert per_exit.accuracy >= shared.accuracy


def test_calibrated_policy_reproduces_result_through_torch():
    confidence, correct, flops = synthetic_pass(4)
    result = calibrate_thresholds(confidence, correct, flops, max_drop=1.0, shared=False)
    exits = result.policy("max_softmax").select(torch.from_numpy(confidence)).numpy()
    assert 100 * correct[np.arange(len(exits)), exits].mean() == pytest.approx(result.accuracy)


def test_calibration_single_exit():
    confidence, correct, flops = synthetic_pass(5, k=1)
    result = calibrate_thresholds(confidence, correct, flops)
    assert result.thresholds == ()
    assert result.mean_flops == flops[:, 0].mean()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "latency"}, "accuracy, flops"),
        ({"target": "flops"}, "needs flops_budget"),
        ({"flops_budget": 100.0}, "only used with target='flops'"),
        ({"max_drop": -1.0}, "max_drop"),
    ],
)
def test_calibration_argument_errors(kwargs, match):
    confidence, correct, flops = synthetic_pass(6, n=20)
    with pytest.raises(ValueError, match=match):
        calibrate_thresholds(confidence, correct, flops, **kwargs)


def test_exit_policy_normalises_threshold_types():
    assert type(ExitPolicy(thresholds=np.float32(0.5)).thresholds) is float
    assert ExitPolicy(thresholds=torch.tensor([0.5, 0.25])).thresholds == (0.5, 0.25)
    assert ExitPolicy(thresholds=np.array([0.5, math.inf])).thresholds == (0.5, math.inf)
