import itertools
import json
import math

import numpy as np
import pytest
import torch

from backbones.exit_rule import normalize_thresholds, select_exits
from specialize.evaluation.curves import (
    CurvePoints,
    accuracy_at_flops,
    evaluate_thresholds,
    flops_at_accuracy,
    grid_sweep,
    iso_accuracy,
    oracle_curve,
    oracle_point,
    pareto_front,
    sweep,
)


def make_pass(seed, n=120, k=3, levels=6, float_flops=False):
    """Random one-pass arrays with many ties (confidences on a coarse grid)."""
    rng = np.random.default_rng(seed)
    confidence = rng.integers(0, levels, (n, k)) / (levels - 1)
    correct = rng.random((n, k)) < np.linspace(0.4, 0.9, k)
    flops = np.cumsum(rng.integers(1, 50, (n, k)), axis=1)
    if float_flops:
        flops = flops * 1.37
    return confidence, correct, flops


def brute_force(confidence, correct, flops, threshold):
    thresholds = normalize_thresholds(threshold, confidence.shape[1])
    exits = select_exits(torch.from_numpy(confidence), thresholds).numpy()
    rows = np.arange(len(exits))
    n = len(exits)
    return 100.0 * correct[rows, exits].sum() / n, flops[rows, exits].sum() / n


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_sweep_equals_brute_force(k, seed, dtype):
    confidence, correct, flops = make_pass(seed, k=k)
    confidence = confidence.astype(dtype)
    curve = sweep(confidence, correct, flops)
    assert np.all(np.diff(curve.thresholds) > 0) and curve.thresholds[-1] == np.inf
    for t, acc, fl in zip(curve.thresholds, curve.accuracy, curve.flops, strict=True):
        assert (acc, fl) == brute_force(confidence, correct, flops, t)
    if k == 1:
        assert len(curve) == 1
        return
    # Thresholds between (and beyond) breakpoints behave like the next breakpoint above.
    probes = np.concatenate((curve.thresholds[:-1] - 1e-3, [curve.thresholds[-2] + 1e-3]))
    for probe in probes:
        j = np.searchsorted(curve.thresholds, probe)
        assert (curve.accuracy[j], curve.flops[j]) == brute_force(confidence, correct, flops, probe)


def test_exact_sweep_endpoints_and_float_flops():
    confidence, correct, flops = make_pass(3, k=4, float_flops=True)
    curve = sweep(confidence, correct, flops)
    assert curve.accuracy[0] == pytest.approx(100 * correct[:, 0].mean())
    assert curve.flops[0] == pytest.approx(flops[:, 0].mean())
    assert curve.accuracy[-1] == pytest.approx(100 * correct[:, -1].mean())
    assert curve.flops[-1] == pytest.approx(flops[:, -1].mean())
    grid = sweep(confidence, correct, flops, curve.thresholds)
    np.testing.assert_array_equal(grid.accuracy, curve.accuracy)
    np.testing.assert_allclose(grid.flops, curve.flops, rtol=1e-12)


def test_sweep_accepts_tensors():
    confidence, correct, flops = make_pass(4)
    from_numpy = sweep(confidence, correct, flops)
    from_torch = sweep(
        torch.from_numpy(confidence).float(), torch.from_numpy(correct), torch.from_numpy(flops)
    )
    np.testing.assert_array_equal(from_numpy.accuracy, from_torch.accuracy)
    np.testing.assert_array_equal(from_numpy.flops, from_torch.flops)


def test_float32_confidence_matches_engine_precision():
    # 0.7 is not a float32 number: the grid threshold 0.7 must accept a float32 confidence
    # of 0.7 exactly as select_exits does on the engine's float32 tensors.
    confidence = torch.tensor([[0.7, 0.1], [0.6, 0.2]])
    correct = torch.tensor([[True, False], [False, True]])
    flops = torch.tensor([[1, 3], [1, 3]])
    exits = select_exits(confidence, normalize_thresholds(0.7, 2))
    assert exits.tolist() == [0, 1]
    curve = sweep(confidence, correct, flops, [0.7])
    assert (curve.accuracy[0], curve.flops[0]) == (100.0, 2.0)


def test_grid_and_per_exit_schedules():
    confidence, correct, flops = make_pass(5, k=3)
    table = grid_sweep(confidence, correct, flops)
    assert len(table) == 21 and table.thresholds.shape == (21,)
    schedules = [[0.2, 0.8], [1.0, 0.4], [math.inf, math.inf]]
    curve = grid_sweep(confidence, correct, flops, schedules)
    assert curve.thresholds.shape == (3, 3) and np.all(curve.thresholds[:, -1] == -np.inf)
    for row, acc, fl in zip(schedules, curve.accuracy, curve.flops, strict=True):
        assert (acc, fl) == brute_force(confidence, correct, flops, row)
        assert (acc, fl) == evaluate_thresholds(confidence, correct, flops, row)
    shared = sweep(confidence, correct, flops, [0.6])
    per_exit = sweep(confidence, correct, flops, [[0.6, 0.6]])
    assert (shared.accuracy[0], shared.flops[0]) == (per_exit.accuracy[0], per_exit.flops[0])


def test_input_validation():
    confidence, correct, flops = make_pass(6)
    with pytest.raises(ValueError, match="shape"):
        sweep(confidence[:, :2], correct, flops)
    with pytest.raises(ValueError, match="NaN or inf"):
        sweep(np.where(confidence > 0.5, np.nan, confidence), correct, flops)
    with pytest.raises(ValueError, match="bool"):
        sweep(confidence, correct * 2, flops)
    with pytest.raises(ValueError, match=r"\(P,\)"):
        sweep(confidence, correct, flops, np.zeros((2, 2, 2)))


def test_pareto_front_property():
    confidence, correct, flops = make_pass(7, k=4)
    curve = sweep(confidence, correct, flops, np.random.default_rng(0).random((40, 4)))
    front = pareto_front(curve)
    assert np.all(np.diff(front.flops) > 0) and np.all(np.diff(front.accuracy) > 0)
    for acc, fl in zip(front.accuracy, front.flops, strict=True):
        dominated = (curve.flops <= fl) & (curve.accuracy >= acc)
        dominated &= (curve.flops < fl) | (curve.accuracy > acc)
        assert not dominated.any()
    for acc, fl in zip(curve.accuracy, curve.flops, strict=True):
        assert ((front.flops <= fl) & (front.accuracy >= acc)).any()


def test_oracle_point_and_unsolvable_samples():
    correct = np.array([[False, True, True], [True, True, True], [False, False, False]])
    flops = np.array([[1, 2, 4], [1, 3, 5], [2, 3, 6]])
    accuracy, mean_flops = oracle_point(correct, flops)
    assert accuracy == pytest.approx(200 / 3) and mean_flops == pytest.approx((2 + 1 + 2) / 3)
    curve = oracle_curve(correct, flops)
    assert curve.accuracy.tolist() == pytest.approx([100 / 3, 200 / 3])
    assert curve.flops.tolist() == pytest.approx([4 / 3, 5 / 3])
    assert np.isnan(curve.thresholds).all()
    with pytest.raises(ValueError, match="must not decrease"):
        oracle_point(correct, flops[:, ::-1])


def test_oracle_curve_is_exact_on_small_problems():
    rng = np.random.default_rng(8)
    n, k = 5, 3
    correct = rng.random((n, k)) < 0.5
    flops = np.cumsum(rng.integers(1, 9, (n, k)), axis=1)
    assignments = np.array(list(itertools.product(range(k), repeat=n)))
    acc = 100.0 * correct[np.arange(n), assignments].sum(1) / n
    cost = flops[np.arange(n), assignments].sum(1) / n
    curve = oracle_curve(correct, flops)
    for a, f in zip(curve.accuracy, curve.flops, strict=True):
        assert acc[cost <= f + 1e-12].max() == pytest.approx(a)
        assert cost[acc >= a - 1e-9].min() == pytest.approx(f)
    assert (curve.accuracy[-1], curve.flops[-1]) == oracle_point(correct, flops)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_curve_dominates_threshold_curves(seed):
    confidence, correct, flops = make_pass(seed, n=200, k=4)
    oracle = oracle_curve(correct, flops)
    curves = [
        sweep(confidence, correct, flops),
        sweep(confidence, correct, flops, np.random.default_rng(seed).random((30, 4))),
    ]
    for curve in curves:
        for acc, fl in zip(curve.accuracy, curve.flops, strict=True):
            assert accuracy_at_flops(oracle, fl) >= acc - 1e-9
            assert flops_at_accuracy(oracle, acc) <= fl + 1e-9


def hand_curve(flops, accuracy):
    return CurvePoints(
        np.arange(len(flops), dtype=float), np.array(accuracy, float), np.array(flops, float)
    )


def test_iso_accuracy_interpolation():
    # A dominated point (3, 60) must be ignored.
    curve = hand_curve([1, 2, 3, 4], [50, 70, 60, 80])
    assert flops_at_accuracy(curve, 60) == pytest.approx(1.5)
    assert flops_at_accuracy(curve, 75) == pytest.approx(3.0)
    assert flops_at_accuracy(curve, 40) == pytest.approx(1.0)
    assert flops_at_accuracy(curve, 80) == pytest.approx(4.0)
    assert math.isnan(flops_at_accuracy(curve, 85))
    assert accuracy_at_flops(curve, 3) == pytest.approx(75.0)
    assert accuracy_at_flops(curve, 10) == pytest.approx(80.0)
    assert math.isnan(accuracy_at_flops(curve, 0.5))


def test_iso_accuracy_gap_closed_arithmetic():
    before = hand_curve([1, 4], [50, 80])
    after = hand_curve([1, 2], [50, 80])
    oracle = hand_curve([1, 1.5], [50, 80])
    result = iso_accuracy(before, after, oracle, target=65)
    assert result["target_accuracy"] == 65
    assert result["flops_before"] == pytest.approx(2.5)
    assert result["flops_after"] == pytest.approx(1.5)
    assert result["flops_oracle"] == pytest.approx(1.25)
    assert result["flops_ratio"] == pytest.approx(0.6)
    assert result["gap_closed"] == pytest.approx(1.0 / 1.25)

    default = iso_accuracy(before, after, oracle, drop=2.0)
    assert default["target_accuracy"] == pytest.approx(78.0)
    assert default["flops_before"] == pytest.approx(1 + 3 * 28 / 30)


def test_iso_accuracy_nan_rules():
    before = hand_curve([1, 4], [50, 80])
    worse = hand_curve([1, 4], [50, 70])
    no_gap = iso_accuracy(before, before, before, target=65)
    assert no_gap["flops_ratio"] == 1.0 and math.isnan(no_gap["gap_closed"])
    unreachable = iso_accuracy(before, worse, None, target=75)
    assert math.isnan(unreachable["flops_after"]) and math.isnan(unreachable["flops_ratio"])
    assert math.isnan(unreachable["flops_oracle"]) and math.isnan(unreachable["gap_closed"])


def test_to_list_is_strict_json():
    confidence, correct, flops = make_pass(9)
    points = sweep(confidence, correct, flops).to_list()
    assert set(points[0]) == {"threshold", "accuracy", "flops"}
    assert points[-1]["threshold"] is None  # +inf: no early exit
    schedule = sweep(confidence, correct, flops, [[0.5, 0.7]]).to_list()
    assert schedule[0]["threshold"] == [0.5, 0.7, None]
    assert oracle_curve(correct, flops).to_list()[0]["threshold"] is None
    json.dumps(points + schedule, allow_nan=False)
