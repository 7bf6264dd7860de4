"""Bad inputs to the engine and the executor: a clear error or a counted skip, never learned.

Every case runs under both ``engine.on_bad_input`` settings and both step routines (the
reference lazy forward and the dynamic executor), with a head updater attached whose counters
must show that nothing was observed or learned from a bad row.
"""

from __future__ import annotations

import copy

import pytest
import torch

from backbones.executor import DynamicExecutor
from backbones.inputs import prepare_inputs
from specialize.engine import Engine, ExecutorStep, reference_step
from specialize.policy import ExitPolicy
from specialize.updater import HeadUpdater, UpdaterConfig
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

POLICY = ExitPolicy(thresholds=0.0)  # every sample answers at exit 0 ...
LEARN = UpdaterConfig(strategy="plain", update_every=2, batch_size=4)  # ... so exits > 0 teach


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engine_with_updater(model, on_bad_input: str, step: str, thresholds: float = 1.0):
    """An engine over a copy of ``model`` whose sync updater learns from every valid row."""
    model = copy.deepcopy(model)
    updater = HeadUpdater(model, LEARN)
    step_fn = ExecutorStep(model) if step == "executor" else reference_step
    engine = Engine(model, ExitPolicy(thresholds=thresholds), hooks=[updater], step_fn=step_fn,
                    on_bad_input=on_bad_input)
    return engine, updater


def heads_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.heads.state_dict().items()}


def nan_rows(model, rows: list[int], batch: int = 4, value: float = float("nan")):
    x = torch.randn(batch, *model.input_size)
    x[rows, 0, 0, 0] = value
    return x


STEPS = ["reference", "executor"]
ACTIONS = ["error", "skip"]


# ------------------------------------------------------------------- NaN and inf: per row


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_raise_with_error_and_nothing_is_learned(model, step, value):
    engine, updater = engine_with_updater(model, "error", step)
    before = heads_state(engine.model)
    with pytest.raises(ValueError, match="input row 1 has NaN/inf values; fix the data or set "
                                         "engine.on_bad_input=skip"):
        engine.step(nan_rows(model, [1, 3], value=value))
    assert updater.stats()["observed"] == 0
    assert all(torch.equal(v, before[k]) for k, v in heads_state(engine.model).items())


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_rows_are_counted_skips_never_observed(model, step, value):
    engine, updater = engine_with_updater(model, "skip", step)
    out = engine.step(nan_rows(model, [1, 3], value=value))
    assert out.valid.tolist() == [True, False, True, False]
    assert out.pred[[1, 3]].tolist() == [-1, -1] and out.exit_index[[1, 3]].tolist() == [-1, -1]
    assert out.flops[[1, 3]].tolist() == [0, 0]
    stats = updater.stats()
    assert stats["observed"] == 2 and stats["nonfinite_samples"] == 0  # the valid rows only
    assert stats["accepted"] == 2  # ... and they do teach (exits > 0 answered them)


@pytest.mark.parametrize("step", STEPS)
def test_a_batch_of_only_bad_rows_teaches_nothing(model, step):
    engine, updater = engine_with_updater(model, "skip", step)
    before = heads_state(engine.model)
    for _ in range(4):  # more than update_every rows, had they counted
        out = engine.step(nan_rows(model, [0, 1, 2, 3]))
        assert not out.valid.any() and (out.exit_index == -1).all()
    stats = updater.stats()
    assert stats["observed"] == 0 and stats["samples_trained"] == 0 and stats["updates"] == 0
    assert all(torch.equal(v, before[k]) for k, v in heads_state(engine.model).items())


# ------------------------------------------------------------------ floating dtypes: cast


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_floating_dtypes_are_cast_to_float32(model, step, action, dtype):
    x = torch.randn(3, *model.input_size).to(dtype)
    cast, _ = engine_with_updater(model, action, step, thresholds=0.3)
    plain, _ = engine_with_updater(model, action, step, thresholds=0.3)
    out = cast.step(x)
    expected = plain.step(x.float())  # what the float32 values give
    assert out.valid.all()
    for name in ("pred", "exit_index", "confidence", "flops"):
        assert torch.equal(getattr(out, name), getattr(expected, name)), name


@pytest.mark.parametrize("step", STEPS)
def test_float64_beyond_float32_range_is_a_non_finite_row(model, step):
    x = torch.randn(2, *model.input_size, dtype=torch.float64)
    x[1, 0, 0, 0] = 1e300  # finite in float64, inf in float32
    error, _ = engine_with_updater(model, "error", step)
    with pytest.raises(ValueError, match="input row 1 has NaN/inf values"):
        error.step(x)
    skip, updater = engine_with_updater(model, "skip", step)
    assert skip.step(x).valid.tolist() == [True, False]
    assert updater.stats()["observed"] == 1


# ------------------------------------------------- integer dtypes and shapes: always errors


BAD_BATCHES = {
    "uint8": (lambda m: torch.zeros(2, *m.input_size, dtype=torch.uint8), "not floating point"),
    "int64": (lambda m: torch.zeros(2, *m.input_size, dtype=torch.long), "not floating point"),
    "bool": (lambda m: torch.zeros(2, *m.input_size, dtype=torch.bool), "not floating point"),
    "channels": (lambda m: torch.randn(2, 3, *m.input_size[1:]), "does not fit the model"),
    "size": (lambda m: torch.randn(2, m.input_size[0], 8, 8), "does not fit the model"),
    "no batch dim": (lambda m: torch.randn(*m.input_size), "does not fit the model"),
    "5-D": (lambda m: torch.randn(1, 1, *m.input_size), "does not fit the model"),
    "list": (lambda m: [torch.randn(*m.input_size)], "must be a torch.Tensor"),
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_wrong_dtype_kind_or_shape_is_an_error_under_both_settings(model, step, action, case):
    make, message = BAD_BATCHES[case]
    engine, updater = engine_with_updater(model, action, step)
    with pytest.raises(ValueError, match=message) as err:
        engine.step(make(model))
    assert "InputTransform" in str(err.value) or "torch.stack" in str(err.value)  # the fix
    assert updater.stats()["observed"] == 0


# --------------------------------------------------------------------- empty batch: no-op


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("action", ACTIONS)
def test_an_empty_batch_is_an_empty_output_and_calls_no_hook(model, step, action):
    engine, updater = engine_with_updater(model, action, step)
    calls = []
    engine.hooks.append(type("Spy", (), {"on_step": lambda self, out: calls.append(out)})())
    out = engine.step(torch.zeros(0, *model.input_size))
    assert out.pred.shape == out.exit_index.shape == out.flops.shape == out.valid.shape == (0,)
    assert out.selected_logits.shape == (0, model.num_classes)
    assert calls == [] and updater.stats()["observed"] == 0


def test_reference_step_runs_an_empty_batch(model):
    out = reference_step(model, torch.zeros(0, *model.input_size), POLICY)
    assert out.exit_index.shape == (0,) and out.valid.shape == (0,)


# -------------------------------------------------------------- the executor on its own


def test_executor_rejects_bad_inputs_and_casts_floats(model):
    executor = DynamicExecutor(model)
    x = torch.randn(3, *model.input_size)
    with pytest.raises(ValueError, match="input row 2 has NaN/inf values; fix the data"):
        executor.run(nan_rows(model, [2], batch=3), 0.5)
    with pytest.raises(ValueError, match="not floating point"):
        executor.run(torch.zeros(1, *model.input_size, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError, match="does not fit the model"):
        executor.run(torch.randn(1, 2, 16, 16), 0.5)
    for batch in (x, x[:1]):  # batched and batch-1 paths
        cast, plain = executor.run(batch.double(), 0.5), executor.run(batch, 0.5)
        assert torch.equal(cast.exit_index, plain.exit_index)
        assert torch.equal(cast.confidence, plain.confidence)
    empty = executor.run(x[:0], 0.5)
    assert empty.pred.shape == empty.exit_index.shape == (0,)


def test_prepare_inputs_keeps_float32_inputs_as_they_are(model):
    x = torch.randn(2, *model.input_size)
    assert prepare_inputs(x, model.input_size) is x  # no copy on the hot path
