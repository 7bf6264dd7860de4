import copy
import types

import numpy as np
import pytest
import torch

from backbones.cost import flops_per_sample
from backbones.exit_rule import confidence, select_exits
from specialize.engine import Engine, reference_step
from specialize.policy import ExitPolicy
from specialize.specializer import Specializer
from specialize.updater import HeadUpdater, UpdaterConfig
from streams.replay import build_stream
from tests.conftest import randomize_gates, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_stream(length: int = 64, seed: int = 0, classes=(0, 1, 2)):
    return build_stream({
        "scenario": "subset", "dataset": "synthetic", "split": "test", "classes": list(classes),
        "length": length, "seed": seed,
        "dataset_options": {"num_classes": 10, "samples_per_class": 40, "image_size": 16},
    })


def test_reference_step_matches_full_forward_and_select_exits():
    model = tiny_model()
    randomize_gates(model, seed=2)
    x = torch.randn(16, *model.input_size)
    policy = ExitPolicy(thresholds=0.2)
    with torch.no_grad():
        step = reference_step(model, x, policy)
        out = model.forward_exits(x)
    conf = torch.stack([confidence(z) for z in out.logits], 1)
    exits = select_exits(conf, policy.thresholds_tensor(model.num_exits))
    assert torch.equal(step.exit_index, exits)
    preds = torch.stack([z.argmax(1) for z in out.logits], 1)
    assert torch.equal(step.pred, preds.gather(1, exits[:, None]).squeeze(1))
    assert torch.equal(step.flops, flops_per_sample(model, out.gates, exits))


def test_engine_skips_bad_inputs_when_asked_and_counts_them():
    model = tiny_model()
    engine = Engine(model, ExitPolicy(), on_bad_input="skip")
    x = torch.randn(4, *model.input_size)
    x[1, 0, 0, 0] = float("nan")
    out = engine.step(x)
    assert out.valid.tolist() == [True, False, True, True]
    assert out.exit_index[1] == -1 and out.pred[1] == -1 and out.flops[1] == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.randn(2, 3, 16, 16), "does not fit the model"),
        (torch.randn(1, 16, 16), "does not fit the model"),
        (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), "not floating point"),
        (torch.full((2, 1, 16, 16), float("inf")), "NaN/inf"),
    ],
)
def test_engine_rejects_bad_inputs_with_a_clear_error(bad, message):
    engine = Engine(tiny_model(), ExitPolicy())
    with pytest.raises(ValueError, match=message):
        engine.step(bad)


# the plain heads keep model.state_dict() keys as they are (anchoring wraps them)
PLAIN_SGD = {"strategy": "plain", "optimizer": "sgd"}


def test_nan_inputs_do_not_poison_the_heads():
    model = tiny_model()
    updater = HeadUpdater(model, UpdaterConfig(update_every=2, batch_size=4, strategy="plain"))
    engine = Engine(model, ExitPolicy(thresholds=0.0), hooks=[updater], on_bad_input="skip")
    for _ in range(6):
        x = torch.randn(2, *model.input_size)
        x[0] = float("nan")
        engine.step(x)
    for p in model.heads.parameters():
        assert torch.isfinite(p).all()


def _run_specializer(stream, model, stop=None, state=None, save_to=None, config=None):
    config = config or UpdaterConfig(update_every=8, batch_size=8, lr=0.05, **PLAIN_SGD)
    updater = HeadUpdater(model, config)
    specializer = Specializer(model, ExitPolicy(thresholds=0.5), updater)
    if state is not None:
        specializer.load(state, stream)
    result = specializer.run(stream, stop=stop, progress=False)
    if save_to is not None:
        specializer.save(save_to, stream)
    specializer.close()
    return result, specializer


def test_specializer_changes_only_early_heads():
    stream = synthetic_stream()
    model = tiny_model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    _run_specializer(stream, model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, reference[k])}
    last = model.num_exits - 1
    assert changed, "the early heads should have learned something"
    assert all(k.startswith("heads.") and not k.startswith(f"heads.{last}.") for k in changed)


def test_sync_runs_are_deterministic():
    stream = synthetic_stream()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = tiny_model()
        result, _ = _run_specializer(stream, model)
        results.append((result, model.heads.state_dict()))
    (a, heads_a), (b, heads_b) = results
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.pred, b.pred)
    assert all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    stream = synthetic_stream(length=48)
    torch.manual_seed(0)
    whole_model = tiny_model()
    whole, whole_spec = _run_specializer(stream, whole_model)

    torch.manual_seed(0)
    first_model = tiny_model()
    first, _ = _run_specializer(stream, first_model, stop=20, save_to=tmp_path / "state.pt")
    torch.manual_seed(1)  # a fresh process: different init, everything comes from the state
    resumed_model = tiny_model()
    resumed_model.load_state_dict(first_model.state_dict())
    second, spec = _run_specializer(stream, resumed_model, state=tmp_path / "state.pt")
    assert spec.position == len(stream)
    assert torch.equal(torch.cat([first.pred, second.pred]), whole.pred)
    assert torch.equal(torch.cat([first.exit_index, second.exit_index]), whole.exit_index)
    for key, value in whole_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert spec.tracker.get()["samples"] == whole_spec.tracker.get()["samples"]


def test_anchored_run_resumes_into_a_fresh_model(tmp_path):
    """The default strategy: the state holds anchored heads; a fresh model is anchored first."""
    stream = synthetic_stream(length=48)
    torch.manual_seed(0)
    pristine = tiny_model()
    config = UpdaterConfig(update_every=8, batch_size=8, lr=0.01)
    assert config.strategy == "anchored"
    whole_model = copy.deepcopy(pristine)
    whole, _ = _run_specializer(stream, whole_model, config=config)
    first, _ = _run_specializer(stream, copy.deepcopy(pristine), stop=20,
                                save_to=tmp_path / "state.pt", config=config)
    resumed_model = copy.deepcopy(pristine)  # as loaded from the original checkpoint
    second, _ = _run_specializer(stream, resumed_model, state=tmp_path / "state.pt",
                                 config=config)
    assert torch.equal(torch.cat([first.pred, second.pred]), whole.pred)
    assert torch.equal(torch.cat([first.exit_index, second.exit_index]), whole.exit_index)
    whole_state = whole_model.state_dict()
    assert any(".spec." in key for key in whole_state)
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, whole_state[key]), key


def test_resume_refuses_a_state_of_another_stream(tmp_path):
    stream = synthetic_stream(length=16)
    _run_specializer(stream, tiny_model(), save_to=tmp_path / "state.pt")
    other = synthetic_stream(length=16, seed=5)
    with pytest.raises(ValueError, match="another stream"):
        _run_specializer(other, tiny_model(), state=tmp_path / "state.pt")


def test_engine_never_sees_labels():
    stream = synthetic_stream(length=8)
    batch = next(iter(stream.inputs(batch_size=8)))
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
    assert not hasattr(stream, "labels")
    assert np.array_equal(stream.evaluator().labels.shape, (8,))


@pytest.mark.parametrize("batch", [1, 5])
def test_executor_step_agrees_with_the_reference_step(batch):
    from specialize.engine import ExecutorStep

    model = tiny_model()
    randomize_gates(model, seed=4)
    policy = ExitPolicy(thresholds=0.3)
    step = ExecutorStep(model)
    for seed in range(3):
        x = torch.randn(batch, *model.input_size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = reference_step(model, x, policy)
            fast = step(model, x, policy)
        assert torch.equal(ref.exit_index, fast.exit_index)
        assert torch.equal(ref.pred, fast.pred)
        assert torch.equal(ref.flops, fast.flops)
        assert torch.allclose(ref.selected_logits, fast.selected_logits, atol=1e-4)


def test_executor_engine_feeds_the_updater():
    from specialize.engine import ExecutorStep

    stream = synthetic_stream(length=24)
    model = tiny_model()
    reference = {k: v.clone() for k, v in model.heads.state_dict().items()}
    updater = HeadUpdater(model, UpdaterConfig(update_every=4, batch_size=4, lr=0.05, **PLAIN_SGD))
    specializer = Specializer(model, ExitPolicy(thresholds=0.5), updater,
                              step_fn=ExecutorStep(model))
    specializer.run(stream, progress=False)
    specializer.close()
    assert any(not torch.equal(v, reference[k]) for k, v in model.heads.state_dict().items())


@pytest.mark.parametrize("count", [1, 2])
def test_specializer_run_serves_with_its_thread_count_and_restores_it(count):
    """engine.num_threads reaches the Python API: Specializer(num_threads=...).run applies it."""
    from configkit import from_dict
    from specialize.run import RunConfig, build_specializer

    before = torch.get_num_threads()
    other = 3 if before != 3 else 4  # a setting that differs from both counts tested
    torch.set_num_threads(other)
    try:
        seen = []
        model = tiny_model()
        config = from_dict(RunConfig, {"scenario": {"scenario": "iid", "dataset": "synthetic"},
                                       "engine": {"num_threads": count, "executor": False}})
        hook = types.SimpleNamespace(on_step=lambda out: seen.append(torch.get_num_threads()))
        specializer = build_specializer(model, config, None, hooks=[hook])
        specializer.run(synthetic_stream(length=8), progress=False)
        assert seen and set(seen) == {count}
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)
