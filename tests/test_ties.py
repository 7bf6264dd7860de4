"""Exact ties: a confidence equal to a threshold exits on every path, one float32 ulp below not.

Confidences are built to equal ``float32(t)`` exactly, and the float32 values just below and
above, for thresholds 0.9, 0.7 and 1.0 (shared) and per-exit thresholds. The expected exit is
computed with numpy float32 comparisons (the rule of ``backbones.exit_rule``); every path must
agree with it: ``select_exits``, ``ExitPolicy.select``, the executor (batch 1 and batched), the
engine's reference step and executor step, the masked reference result, and the curves
(``evaluate_thresholds``, grid and exact shared sweeps, operating points, per-class tables,
calibration). Model paths use the nearest confidences a float32 softmax reaches instead of
the next float32 values, which it does not always reach.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from backbones.executor import DynamicExecutor
from backbones.executor.runner import reference_result
from backbones.exit_rule import confidence, exit_thresholds, rule_values, select_exits
from specialize.engine import Engine, ExecutorStep, reference_step
from specialize.evaluation import curves
from specialize.evaluation.passes import ExitPass, operating_point, per_class_at
from specialize.policy import ExitPolicy, calibrate_thresholds
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 10
F32 = np.float32
THRESHOLDS = (0.9, 0.7, 1.0)


def ulp_below(t: float) -> np.float32:
    return np.nextafter(F32(t), F32(-np.inf))


def ulp_above(t: float) -> np.float32:
    return np.nextafter(F32(t), F32(np.inf))


@functools.cache
def reachable(t: float) -> tuple[np.ndarray, torch.Tensor]:
    """Confidences max_softmax reaches near ``t`` (sorted), and logits giving each exactly.

    Softmax in float32 does not reach every float32 value (nothing between 0.99999988 and 1,
    and with ten live classes not float32(0.9)), so the logits have two live classes
    ``[a, 0, -1e4, ...]`` and ``a`` runs over consecutive float32 values.
    """
    if t < 1:  # consecutive float32 values of a around the exact solution
        bits = F32(math.log(t / (1 - t))).view(np.int32) + np.arange(-20000, 20001)
        a = np.sort(bits.astype(np.int32).view(np.float32))
    else:  # where softmax reaches 1 and its largest value below
        a = np.linspace(10, 30, 40001, dtype=np.float32)
    logits = torch.full((len(a), NUM_CLASSES), -1e4)
    logits[:, 0] = torch.from_numpy(a)
    logits[:, 1] = 0.0
    values, first = np.unique(confidence(logits).numpy(), return_index=True)
    return values, logits[first]


def value(t: float, side: str, model: bool) -> np.float32:
    """``float32(t)`` (``eq``), or the float32 just below (``lo``) or above (``hi``) it: the
    next float32 for the rule, the next confidence a model reaches for model paths."""
    if side == "eq":
        return F32(t)
    if not model:
        return ulp_below(t) if side == "lo" else ulp_above(t)
    values, _ = reachable(t)
    return values[values < F32(t)][-1] if side == "lo" else values[values > F32(t)][0]


def logits_for(target: np.float32) -> torch.Tensor:
    """Logits whose max_softmax is exactly ``target``, alone or in a batch."""
    for t in THRESHOLDS:
        values, logits = reachable(t)
        found = np.flatnonzero(values == target)
        if len(found):
            row = logits[found[0]]
            assert (confidence(row.expand(3, -1)) == torch.tensor(target)).all()
            return row.clone()
    raise AssertionError(f"no logits give confidence {target!r} exactly")


def expected_exit(confs: list[np.float32], thresholds: list[float]) -> int:
    """The rule, spelled out in numpy float32: the first exit with c >= t, else the last."""
    for k, (c, t) in enumerate(zip(confs, thresholds)):
        if F32(c) >= F32(t):
            return k
    return len(confs)


# (thresholds of the three early exits, which side of its threshold each confidence is on)
SIDES = []
for t in THRESHOLDS:
    SIDES += [([t] * 3, sides) for sides in (("eq", "lo", "lo"), ("lo", "eq", "lo"),
                                             ("lo", "lo", "eq"), ("lo", "lo", "lo"))]
    if t < 1:
        SIDES.append(([t] * 3, ("lo", "hi", "eq")))
PER_EXIT = [0.9, 0.7, 1.0]
SIDES += [(PER_EXIT, sides) for sides in (("eq", "lo", "lo"), ("lo", "eq", "eq"),
                                          ("lo", "lo", "eq"), ("lo", "lo", "lo"))]
IDS = [f"t={t}-{'-'.join(sides)}" for t, sides in SIDES]


def confidences(thresholds: list[float], sides: tuple[str, ...], model: bool) -> list:
    return [value(t, side, model) for t, side in zip(thresholds, sides)]


def model_answering(confs: list[np.float32]) -> torch.nn.Module:
    """A tiny model whose early exit ``k`` gives every input confidence ``confs[k]``."""
    model = tiny_model()
    with torch.no_grad():
        for k, c in enumerate(confs):
            linear = model.heads[k][2]
            linear.weight.zero_()
            linear.bias.copy_(logits_for(c))
    return model


@pytest.mark.parametrize(("thresholds", "sides"), SIDES, ids=IDS)
def test_every_model_path_exits_where_the_rule_says(thresholds, sides):
    confs = confidences(thresholds, sides, model=True)
    expected = expected_exit(confs, thresholds)
    model = model_answering(confs)
    policy = ExitPolicy(thresholds=tuple(thresholds))
    executor = DynamicExecutor(model)
    x1, x3 = torch.randn(1, *model.input_size), torch.randn(3, *model.input_size)
    with torch.no_grad():
        exits = {
            "executor batch 1": executor.run(x1, thresholds).exit_index,
            "executor batched": executor.run(x3, thresholds).exit_index,
            "executor batched, one row": executor.run(x1, thresholds, path="batched").exit_index,
            "reference step": reference_step(model, x3, policy).exit_index,
            "reference result": reference_result(model, x3, thresholds).exit_index,
            "engine, executor step": Engine(model, policy, step_fn=ExecutorStep(model))
            .step(x1).exit_index,
            "engine, reference step": Engine(model, policy).step(x3).exit_index,
        }
    for path, exit_index in exits.items():
        assert (exit_index == expected).all(), f"{path}: {exit_index.tolist()} != {expected}"
    if expected < len(confs):  # the answering exit reports the tie value itself
        answered = executor.run(x1, thresholds).confidence
        assert answered.item() == float(confs[expected])

def exit_arrays(confs: list[np.float32]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample: confidence (1, 4), all exits right, FLOPs k + 1 (so flops = exit + 1)."""
    confidence_ = np.array([[*confs, F32(0.5)]], dtype=np.float32)
    return confidence_, np.ones((1, 4), dtype=bool), np.array([[1, 2, 3, 4]])


@pytest.mark.parametrize(("thresholds", "sides"), SIDES, ids=IDS)
def test_every_offline_path_exits_where_the_rule_says(thresholds, sides):
    confs = confidences(thresholds, sides, model=False)
    expected = expected_exit(confs, thresholds)
    conf, correct, flops = exit_arrays(confs)
    assert select_exits(torch.from_numpy(conf), exit_thresholds(thresholds, 4)).item() == expected
    assert ExitPolicy(thresholds=tuple(thresholds)).select(torch.from_numpy(conf)).item() \
        == expected
    assert curves.evaluate_thresholds(conf, correct, flops, thresholds)[1] == expected + 1
    assert curves.sweep(conf, correct, flops, np.array([thresholds])).flops[0] == expected + 1
    conf64 = conf.astype(np.float64)  # float64 confidences are compared as float32 too
    assert curves.evaluate_thresholds(conf64, correct, flops, thresholds)[1] == expected + 1
    exit_pass = ExitPass(torch.from_numpy(conf), torch.zeros(1, 4, dtype=torch.long),
                         torch.from_numpy(flops), torch.zeros(1, dtype=torch.long))
    per_exit = ExitPolicy(thresholds=tuple(thresholds)).thresholds_tensor(4)
    assert operating_point(exit_pass, per_exit)["flops"] == expected + 1
    assert per_class_at(exit_pass, per_exit, 1)["flops"][0] == expected + 1


@pytest.mark.parametrize("t", [0.9, 0.7, 1.0])
def test_the_exact_shared_sweep_places_ties_as_the_rule(t):
    # one sample per case; the point of the exact sweep at threshold t must match the rule
    cases = [confidences(thresholds, sides, model=False) for thresholds, sides in SIDES
             if thresholds == [t, t, t]]
    conf = np.array([[*confs, F32(0.5)] for confs in cases], dtype=np.float32)
    correct, flops = np.ones(conf.shape, dtype=bool), np.tile([1, 2, 3, 4], (len(cases), 1))
    curve = curves.sweep(conf, correct, flops)  # exact: one point per distinct confidence
    # the state at threshold t is the curve's point at the smallest threshold >= float32(t)
    at = curve.thresholds >= float(rule_values(t))
    point = np.flatnonzero(at)[np.argmin(curve.thresholds[at])]
    expected = np.mean([expected_exit(confs, [t] * 3) + 1 for confs in cases])
    assert curve.flops[point] == expected
    assert curves.evaluate_thresholds(conf, correct, flops, t)[1] == expected
    assert curves.grid_sweep(conf, correct, flops, [t]).flops[0] == expected


def test_calibration_reports_what_its_thresholds_give_at_ties():
    # confidences on float32(0.9) / float32(0.7) exactly: calibration picks such values as
    # thresholds, and what it reports must be what the rule gives at them
    rng = np.random.default_rng(0)
    conf = rng.choice([F32(0.9), ulp_below(0.9), F32(0.7), ulp_below(0.7), F32(1.0)],
                      size=(64, 4))
    conf = conf.astype(np.float32)
    correct = rng.random((64, 4)) < np.array([0.6, 0.7, 0.8, 0.9])
    flops = np.tile([1, 2, 3, 4], (64, 1))
    for shared in (True, False):
        result = calibrate_thresholds(conf, correct, flops, max_drop=5.0, shared=shared)
        accuracy, mean_flops = curves.evaluate_thresholds(conf, correct, flops, result.thresholds)
        assert (accuracy, mean_flops) == (result.accuracy, result.mean_flops)
        assert all(t == math.inf or F32(t) in conf for t in result.thresholds)


def test_rule_values_round_to_the_nearest_float32():
    assert rule_values(0.9).dtype == torch.float32
    assert rule_values(0.9).item() == float(F32(0.9)) < 0.9  # float32(0.9) is below 0.9 ...
    assert bool(select_exits(torch.tensor([[F32(0.9), 0.0]]), torch.tensor([0.9, -math.inf]))
                == 0)  # ... and still clears a threshold of 0.9
    thresholds = torch.tensor([0.9, 0.7], dtype=torch.float64)
    assert rule_values(thresholds).tolist() == [float(F32(0.9)), float(F32(0.7))]
