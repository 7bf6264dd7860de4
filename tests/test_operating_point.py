"""The label-free operating point's building blocks: the bound holds at its nominal rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specialize.evaluation.passes import ExitPass
from specialize.operating_point.search import choose_thresholds, normal_quantile, stream_mix_rows

BUDGET = 1.0  # points


def synthetic(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two exits: the early one is right with probability equal to its confidence; the final
    one is right 97 % of the time where the early one is, 75 % where it is not."""
    rng = np.random.default_rng(seed)
    early_confidence = rng.uniform(0.2, 1.0, size)
    early_right = rng.uniform(size=size) < early_confidence
    final_right = rng.uniform(size=size) < np.where(early_right, 0.97, 0.75)
    confidence = np.stack([early_confidence, np.ones(size)], 1).astype(np.float32)
    return confidence, np.stack([early_right, final_right], 1), np.tile([10, 30], (size, 1))


def as_pass(confidence, correct, flops) -> ExitPass:
    labels = torch.zeros(len(confidence), dtype=torch.long)
    return ExitPass(torch.tensor(confidence), torch.tensor(np.where(correct, 0, 1)),
                    torch.tensor(flops), labels)


@pytest.fixture(scope="module")
def true_drop():
    """The drop of a threshold on a 400,000-sample population: the known truth."""
    confidence, correct, _ = synthetic(400_000, seed=0)

    def drop(threshold: float) -> float:
        served = np.where(confidence[:, 0] >= np.float32(threshold), correct[:, 0], correct[:, 1])
        return 100.0 * (correct[:, 1].mean() - served.mean())

    return drop


def exceedances(true_drop, z: float, draws: int = 60) -> int:
    """How many of ``draws`` 3,000-sample evaluations chose thresholds beyond the budget."""
    count = 0
    for draw in range(draws):
        evidence = as_pass(*synthetic(3000, seed=100 + draw))
        choice = choose_thresholds(evidence, torch.arange(3000), BUDGET, z)
        count += true_drop(choice.thresholds[0]) > BUDGET
    return count


def test_the_upper_bound_holds_the_budget_at_about_its_nominal_rate(true_drop):
    # a one-sided 95 % bound: about 3 of 60 draws may exceed (measured: 4); without the
    # bound about half do (measured: 34)
    assert exceedances(true_drop, normal_quantile(0.95)) <= 8
    assert exceedances(true_drop, 0.0) >= 20


def test_choice_reports_its_estimate_and_bound():
    evidence = as_pass(*synthetic(3000, seed=1))
    choice = choose_thresholds(evidence, torch.arange(3000), BUDGET, 1.645)
    assert choice.bound <= BUDGET + 1e-9
    assert choice.bound > choice.drop >= -1.0
    assert choice.samples == 3000 and 10 <= choice.mean_flops <= 30


def test_no_rows_means_the_final_exit_answers():
    evidence = as_pass(*synthetic(10, seed=2))
    choice = choose_thresholds(evidence, torch.zeros(0, dtype=torch.long), BUDGET, 1.645)
    assert choice.thresholds == (float("inf"),) and choice.samples == 0


def test_stream_mix_rows_follow_the_prior_without_repeats_where_possible():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rows = stream_mix_rows(labels, torch.tensor([0.6, 0.4, 0.0]))
    counts = torch.bincount(labels[rows], minlength=3).tolist()
    assert counts == [45, 30, 0]  # class 1's 30 images carry 40 %: 75 rows in all
    assert len(set(rows.tolist())) == len(rows)


@pytest.mark.parametrize("confidence", [0.4, 1.0])
def test_normal_quantile_rejects_levels_outside_its_range(confidence):
    with pytest.raises(ValueError, match="confidence"):
        normal_quantile(confidence)
