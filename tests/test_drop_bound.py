import numpy as np
import pytest
import torch

from backbones.exit_rule import normalize_thresholds, select_exits
from specialize.evaluation.curves import drop_standard_error, sweep
from specialize.policy import calibrate_thresholds


def _data(n=400, k=3, seed=0):
    rng = np.random.default_rng(seed)
    confidence = rng.random((n, k)).astype(np.float32)
    expected = rng.random((n, k))  # expected correctness (a probability)
    expected[:, -1] = np.maximum(expected[:, -1], 0.5)
    flops = np.cumsum(rng.integers(1, 10, (n, k)), axis=1)
    return confidence, expected, flops


def _brute(confidence, correct, flops, threshold):
    exits = select_exits(torch.from_numpy(confidence),
                         normalize_thresholds(threshold, confidence.shape[1])).numpy()
    served = correct[np.arange(len(exits)), exits]
    drop = correct[:, -1] - served
    return 100 * served.mean(), 100 * drop.std() / np.sqrt(len(drop))


def test_expected_correctness_sweeps_like_labels():
    confidence, expected, flops = _data()
    curve = sweep(confidence, expected, flops)
    errors = drop_standard_error(confidence, expected, flops)
    for index in range(0, len(curve), 37):
        accuracy, error = _brute(confidence, expected, flops, curve.thresholds[index])
        assert curve.accuracy[index] == pytest.approx(accuracy)
        assert errors[index] == pytest.approx(error)


def test_standard_error_of_labels_on_a_threshold_grid():
    confidence, expected, flops = _data(seed=1)
    labels = expected > 0.5
    grid = np.array([0.2, 0.5, 0.8])
    errors = drop_standard_error(confidence, labels, flops, grid)
    for threshold, error in zip(grid, errors):
        assert error == pytest.approx(_brute(confidence, labels.astype(float), flops, threshold)[1])


def test_a_bound_keeps_the_upper_drop_within_budget_and_costs_more():
    confidence, expected, flops = _data(n=300, seed=2)
    plain = calibrate_thresholds(confidence, expected, flops, max_drop=5.0)
    bounded = calibrate_thresholds(confidence, expected, flops, max_drop=5.0, bound=1.645)
    final = 100 * expected[:, -1].mean()
    accuracy, error = _brute(confidence, expected, flops, bounded.thresholds[0])
    assert final - accuracy + 1.645 * error <= 5.0 + 1e-9
    assert final - plain.accuracy <= 5.0 + 1e-9
    assert bounded.mean_flops >= plain.mean_flops
    assert bounded.thresholds[0] >= plain.thresholds[0]


def test_probabilities_outside_zero_one_are_refused():
    confidence, expected, flops = _data(n=10)
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        sweep(confidence, expected * 2, flops)
