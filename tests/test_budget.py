"""The label-free operating point: audits, the budget controller, and their run wiring."""

from __future__ import annotations

import copy

import pytest
import torch

from backbones.checkpoint import load_checkpoint
from backbones.cost import flops_per_sample
from configkit import ConfigError
from specialize.drift import ClassMixDriftDetector
from specialize.engine import ExecutorStep, reference_step
from specialize.evaluation.passes import exit_pass, operating_point
from specialize.models.zoo import input_transform
from specialize.operating_point.controller import BudgetController
from specialize.policy import ExitPolicy
from specialize.report import format_headline
from specialize.report.markdown import render_markdown
from specialize.run.summarize import OnlineScore
from specialize.specializer import Specializer
from specialize.updater import HeadUpdater, UpdaterConfig
from specialize.updater.faults import bad_heads
from specialize.updater.heads import load_heads, snapshot_heads
from streams.datasets.synthetic import make_synthetic
from tests.conftest import randomize_batchnorm, randomize_gates, tiny_model
from tests.runs import DATASET_OPTIONS, RUN_OVERRIDES, synthetic_scenario, trained_tiny_checkpoint

THRESHOLD = 0.4  # the tiny trained model answers at every exit at this threshold
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained tiny model, and synthetic train (validation) and test inputs."""
    path = trained_tiny_checkpoint(tmp_path_factory.mktemp("budget") / "m.pt", val_size=100)
    model, _ = load_checkpoint(path)
    train = make_synthetic(split="train", **DATASET_OPTIONS)
    test = make_synthetic(split="test", **DATASET_OPTIONS)
    transform = input_transform(model, train)
    return path, model.eval(), train, test, transform


def gated_model():
    model = tiny_model("tiny_resnet", gating=True)
    randomize_gates(model)
    randomize_batchnorm(model)
    return model


# ------------------------------------------------------------------------------- audits
@pytest.mark.parametrize("route", ["executor batch 1", "executor batched", "reference"])
def test_audited_rows_answer_as_before_and_run_on_to_the_final_exit(route):
    model = gated_model()
    x = torch.randn(12, *model.input_size)
    audit = torch.zeros(12, dtype=torch.bool)
    audit[[1, 4, 5, 11]] = True
    policy = ExitPolicy(thresholds=0.15)
    step = reference_step if route == "reference" else ExecutorStep(model)
    batches = ([(x[i:i + 1], audit[i:i + 1]) for i in range(12)] if route.endswith("1")
               else [(x, audit)])
    plain = [step(model, xb, policy) for xb, _ in batches]
    audited = [step(model, xb, policy, audit=ab) if ab.any() else step(model, xb, policy)
               for xb, ab in batches]
    everything = model.forward_exits(x)
    final_path = flops_per_sample(model, everything.gates, torch.full((12,), 3))
    offset = 0
    for before, after, (xb, ab) in zip(plain, audited, batches):
        for name in ("pred", "exit_index", "confidence", "flops"):
            assert torch.equal(getattr(before, name), getattr(after, name)), name
        rows = ab.nonzero().view(-1)
        assert (after.audit is None) == (rows.numel() == 0)
        if after.audit is not None:
            trace = after.audit
            assert torch.equal(trace.rows, rows)
            truth = torch.stack([z[offset + rows].argmax(1) for z in everything.logits], 1)
            assert torch.equal(trace.pred, truth)
            assert torch.equal(trace.extra_flops,
                               final_path[offset + rows] - after.flops[rows])
        offset += xb.shape[0]
    assert sum(o.audit.rows.numel() for o in audited if o.audit is not None) == 4


def test_audit_flops_count_in_the_stream_and_apart(trained):
    _, model, _, test, transform = trained
    inputs = transform(test.images[:40])
    other = copy.deepcopy(model)
    plain = Specializer(other, ExitPolicy(thresholds=THRESHOLD), step_fn=ExecutorStep(other))
    served = plain.engine.run(inputs.split(1), progress=False)
    audited = Specializer(model, ExitPolicy(thresholds=THRESHOLD), audit_rate=1.0,
                          step_fn=ExecutorStep(model))
    result = audited.engine.run(inputs.split(1), progress=False)
    with torch.no_grad():
        gates = model.forward_exits(inputs).gates
    full_paths = flops_per_sample(model, gates, torch.full((40,), model.num_exits - 1))
    assert result.audits == 40 and served.audits == 0
    assert result.flops_sum == served.flops_sum + result.audit_flops_sum
    assert result.audit_flops_sum > 0
    assert result.flops_sum == int(full_paths.sum())  # every sample audited: every path full
    assert audited.audit_log.count == 40


def test_audits_never_read_labels(trained):
    _, model, _, test, transform = trained
    inputs = transform(test.images[:60])
    logs = []
    for labels in (test.labels[:60], test.labels[:60].flip(0)):  # scrambled labels
        specializer = Specializer(copy.deepcopy(model), ExitPolicy(thresholds=THRESHOLD),
                                  audit_rate=0.5, audit_seed=3, hooks=[OnlineScore(labels)])
        specializer.engine.run(inputs.split(4), progress=False)
        logs.append(specializer.audit_log.state_dict())
    assert logs[0]["count"] > 10
    assert str(logs[0]) == str(logs[1])


def test_rollback_fires_through_audits_and_restores_the_last_good_heads(trained):
    """Deterministic by construction, whatever the trained model answers.

    The baseline and the healthy window audit the same samples with the same heads, so their
    disagreement rates are equal; the bad head then disagrees on every one of them, because
    only samples that answer early and whose final answer is not the bad head's class are
    used. (It used to audit 80 different samples at a 5-point margin: windows of 20 answers
    differ by more than that by chance, so whether it passed depended on the model, which
    depends on the thread count that trains it.)
    """
    _, model, _, test, transform = trained
    model = copy.deepcopy(model)
    policy = ExitPolicy(thresholds=THRESHOLD)
    inputs = transform(test.images[:200])
    with torch.no_grad():
        served = reference_step(model, inputs, policy)
        final = model.forward_exits(inputs).logits[-1].argmax(1)
    usable = (served.exit_index < model.num_exits - 1) & (final != 9)
    rows = inputs[usable.nonzero().view(-1)[:20]]
    assert len(rows) == 20, "the tiny model should answer early on most test samples"
    config = UpdaterConfig(strategy="plain", update_every=10_000, audit_baseline=len(rows),
                           audit_window=len(rows), audit_margin=0.05)
    with HeadUpdater(model, config) as updater:
        specializer = Specializer(model, policy, updater, audit_rate=1.0)
        good = copy.deepcopy(model.heads[0].state_dict())
        for _ in range(2):  # the baseline, then a window of the same answers: healthy
            specializer.engine.run(rows.split(1), progress=False)
        stats = updater.stats()
        assert stats["baseline_disagreement"] == stats["last_window_disagreement"] < 0.9
        assert stats["healthy_windows"] == 1 and updater.rollback_count == 0
        linear = model.heads[0][-1]
        with torch.no_grad():  # a bad head: sure of class 9 for every input
            linear.weight.zero_()
            linear.bias.fill_(-50.0)
            linear.bias[9] = 50.0
        specializer.engine.run(rows.split(1), progress=False)
        assert updater.stats()["last_window_disagreement"] == 1.0
        assert updater.rollback_count == 1 and specializer.audit_log.rollbacks == 1
        for name, value in model.heads[0].state_dict().items():
            assert torch.equal(value, good[name]), name


def _rows_the_bad_head_gets_wrong(model, inputs, policy, count: int) -> torch.Tensor:
    """``count`` inputs answered early as the final exit answers them; by the bad heads, not."""
    bad_model = copy.deepcopy(model)
    load_heads(bad_model.heads[:-1], bad_heads(snapshot_heads(bad_model.heads[:-1])))
    with torch.no_grad():
        served = reference_step(model, inputs, policy)
        bad = reference_step(bad_model, inputs, policy)
        final = model.forward_exits(inputs).logits[-1].argmax(1)
    last = model.num_exits - 1
    usable = ((served.exit_index < last) & (served.pred == final) & (bad.exit_index < last)
              & (bad.pred != final))
    rows = inputs[usable.nonzero().view(-1)[:count]]
    assert len(rows) == count, "the tiny model should answer early on most test samples"
    return rows


def test_an_injected_bad_head_rolls_back_at_the_default_windows(trained):
    """At the default audit_baseline/window/margin, a few dozen audits catch a bad head.

    The baseline and the first window audit the same answers (all agree with the final exit);
    after them the bad heads are injected and disagree on every answer they give, so the next
    window must roll back to the heads of the healthy window. The old defaults (256 audited
    answers each) never closed a window in a 3,000-sample stream at 2 % audits.
    """
    _, model, _, test, transform = trained
    model, defaults = copy.deepcopy(model), UpdaterConfig()
    policy = ExitPolicy(thresholds=THRESHOLD)
    size = defaults.audit_baseline
    assert defaults.audit_window == size <= 32, "windows fit ~50 audited answers"
    rows = _rows_the_bad_head_gets_wrong(model, transform(test.images), policy, size)
    config = UpdaterConfig(strategy="plain", update_every=10_000, inject_bad_head_at=2 * size)
    with HeadUpdater(model, config) as updater:
        specializer = Specializer(model, policy, updater, audit_rate=1.0)
        good = copy.deepcopy(model.heads[0].state_dict())
        for _ in range(3):  # baseline, a healthy window, then the injected heads' window
            specializer.engine.run(rows.split(1), progress=False)
        stats = updater.stats()
    assert stats["bad_heads_injected"] == 1 and stats["healthy_windows"] == 1
    bad_share = (size - 1) / size  # the first sample after the injection point was served good
    assert stats["rollbacks"] == 1 and stats["last_window_disagreement"] == bad_share
    assert stats["rollback_events"] == [{
        "observed": 3 * size, "audited": 3 * size, "to": "last_good",
        "window_disagreement": bad_share, "baseline_disagreement": 0.0}]
    for name, value in model.heads[0].state_dict().items():
        assert torch.equal(value, good[name]), name
    text = render_markdown({"updater": stats, "stream": {"specializing": {"accuracy": 50.0}}})
    assert f"rollbacks: after sample {3 * size} (audited early answer {3 * size};" in text


# --------------------------------------------------------------------------- controller
def test_controller_holds_a_budget_on_held_out_data(trained):
    _, model, train, test, transform = trained
    evidence = exit_pass(model, train.images, train.labels, transform, keep_head_inputs=True)
    held_out = exit_pass(model, test.images, test.labels, transform)
    final = 100.0 * float(held_out.correct[:, -1].double().mean())
    for budget in (2.0, 5.0):
        controller = BudgetController(evidence, budget, retune_every=50)
        specializer = Specializer(copy.deepcopy(model), ExitPolicy(), controller=controller)
        chosen = specializer.engine.policy.thresholds_tensor(model.num_exits)
        drop = final - operating_point(held_out, chosen)["accuracy"]
        assert controller.history[0]["trigger"] == "start"
        assert controller.history[0]["bound"] <= budget + 1e-9
        assert drop <= budget + 1.0  # 400 held-out samples: within a standard error or so
    assert torch.isfinite(chosen[0])  # a loose budget lets the early exits answer


def test_controller_retunes_on_its_beat_and_on_drift(trained):
    _, model, train, test, transform = trained
    evidence = exit_pass(model, train.images, train.labels, transform, keep_head_inputs=True)
    controller = BudgetController(evidence, 3.0, retune_every=25)
    specializer = Specializer(copy.deepcopy(model), ExitPolicy(), controller=controller)
    specializer.engine.run(transform(test.images[:100]).split(5), progress=False)
    history = list(controller.history)
    assert [h["position"] for h in history] == [0, 25, 50, 75, 100]
    assert {h["trigger"] for h in history[1:]} == {"periodic"}
    assert history[1]["rows"] != history[0]["rows"]  # the stream's mix, not all rows


def test_a_drift_alarm_retunes_at_once_on_the_validation_mix(trained):
    _, model, train, test, transform = trained
    evidence = exit_pass(model, train.images, train.labels, transform, keep_head_inputs=True)
    low, high = (torch.isin(test.labels, torch.tensor(c)) for c in ([0, 1], [7, 8]))
    inputs = transform(torch.cat([test.images[low], test.images[high]]))
    controller = BudgetController(evidence, 3.0, retune_every=1000)
    specializer = Specializer(copy.deepcopy(model), ExitPolicy(), controller=controller,
                              alarm=ClassMixDriftDetector(10, 20, 0.3))
    specializer.engine.run(inputs.split(1), progress=False)
    drifts = [h for h in controller.history if h["trigger"] == "drift"]
    assert specializer.alarm_hook.count >= 1 and len(drifts) == specializer.alarm_hook.count
    assert drifts[0]["position"] == specializer.alarm_hook.alarms[0] >= int(low.sum())
    assert drifts[0]["rows"] == len(evidence)


def test_budget_and_audit_state_round_trip_resumes_exactly(trained, tmp_path):
    _, model, train, test, transform = trained
    evidence = exit_pass(model, train.images, train.labels, transform, keep_head_inputs=True)
    inputs = transform(test.images[:120])

    def fresh():
        copied = copy.deepcopy(model)
        updater = HeadUpdater(copied, UpdaterConfig(update_every=8, batch_size=16))
        return Specializer(copied, ExitPolicy(), updater, audit_rate=0.3, audit_seed=1,
                           controller=BudgetController(evidence, 3.0, retune_every=20))

    whole = fresh()
    whole.engine.run(inputs.split(2), progress=False)
    first = fresh()
    first.engine.run(inputs[:60].split(2), progress=False)
    state = first.state_dict()
    resumed = fresh()
    resumed.load_state_dict(state)
    resumed.engine.run(inputs[60:].split(2), progress=False)
    for a, b in ((whole, resumed),):
        assert a.controller.state_dict()["history"] == b.controller.state_dict()["history"]
        assert a.controller.thresholds == b.controller.thresholds
        assert str(a.audit_log.state_dict()) == str(b.audit_log.state_dict())
        assert a.audit_log.count > 0


# ---------------------------------------------------------------------------- the run
def test_a_budget_without_validation_data_fails_up_front_naming_the_fix(tmp_path):
    from specialize.run import load_run_config
    from specialize.run.checks import check_run_inputs

    checkpoint = trained_tiny_checkpoint(tmp_path / "m.pt", steps=1)
    scenario = synthetic_scenario(tmp_path / "s.yaml")
    config = load_run_config(scenario, [*RUN_OVERRIDES, f"model.checkpoint={checkpoint}",
                                        "policy.budget=0.5"])
    with pytest.raises(ConfigError, match=r"^policy.budget: .*val_size=5000"):
        check_run_inputs(config)


def test_a_run_with_a_budget_reports_estimates_beside_the_truth(trained, tmp_path):
    from specialize.run import load_run_config, run_experiment

    path = trained[0]
    scenario = synthetic_scenario(tmp_path / "s.yaml")
    config = load_run_config(scenario, [*RUN_OVERRIDES, f"model.checkpoint={path}",
                                        "policy.budget=2.0", "policy.retune_every=50",
                                        "engine.audit_rate=0.2", f"out={tmp_path / 'run'}"])
    summary, _ = run_experiment(config)
    section = summary.to_json_dict()["budget"]
    assert section["budget"] == 2.0 and section["validation_samples"] == 100
    for replay in ("frozen", "specializing"):
        entry = section[replay]
        assert entry["retunes"] >= 2 and entry["history"][0]["trigger"] == "start"
        assert 0 < entry["audits"] < 300 and 0 < entry["audit_flops_share"] < 1
        assert entry["true_drop_stream"] is not None and entry["true_drop_eval_in"] is not None
    hindsight = section["hindsight"]
    for key in ("budget", "budget_per_exit", "specialized", "specialized_per_exit",
                "specialized_eval_in", "specialized_eval_in_per_exit"):
        assert hindsight[key]["drop"] <= 2.0 + 1e-9, key
    for heads in ("budget", "specialized"):  # per exit refines the shared optimum
        assert hindsight[f"{heads}_per_exit"]["mean_flops"] <= hindsight[heads]["mean_flops"]
        assert len(hindsight[f"{heads}_per_exit"]["threshold"]) == 3  # tiny_resnet: 4 exits
    assert (tmp_path / "run" / "thresholds.png").is_file()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Operating point: budget and audits" in report and "thresholds.png" in report
    assert "label-free" in format_headline(summary)


def test_the_validation_pass_is_cached_per_model_and_read_back_equal(trained, _pass_cache):
    from specialize.run import RunConfig
    from specialize.run.budget import cached_validation_pass

    _, model, train, _, transform = trained
    config = RunConfig(progress=False)
    before = set(_pass_cache.glob("passes/*.pt"))
    first = cached_validation_pass(model, train, transform, config)
    files = set(_pass_cache.glob("passes/*.pt")) - before
    assert len(files) == 1
    again = cached_validation_pass(model, train, transform, config)  # read from the file
    for name in ("confidence", "pred", "flops", "labels"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    for a, b in zip(first.head_inputs.inputs, again.head_inputs.inputs):
        assert torch.equal(a, b)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.heads[-1][-1].bias.add_(1.0)  # other weights: another file, not a stale read
    cached_validation_pass(other, train, transform, config)
    assert len(set(_pass_cache.glob("passes/*.pt")) - before) == 2
    next(iter(files)).write_bytes(b"broken")  # unreadable: recomputed, not an error
    assert torch.equal(cached_validation_pass(model, train, transform, config).pred, first.pred)


def test_async_serving_with_audits_and_a_budget_runs_through(trained):
    _, model, train, test, transform = trained
    model = copy.deepcopy(model)
    evidence = exit_pass(model, train.images, train.labels, transform, keep_head_inputs=True)
    config = UpdaterConfig(mode="async", update_every=8, batch_size=16, audit_baseline=10,
                           audit_window=10)
    with HeadUpdater(model, config) as updater:
        specializer = Specializer(model, ExitPolicy(), updater, audit_rate=0.5,
                                  controller=BudgetController(evidence, 3.0, retune_every=30))
        specializer.run(_Inputs(transform(test.images[:150])), progress=False)
        assert updater.error is None and updater.stats()["published"] >= 1
    assert specializer.audit_log.count > 30 and specializer.controller.retunes >= 5


class _Inputs:
    """The least a Specializer needs of a stream: inputs by position, a length."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def inputs(self, batch_size: int, start: int, stop: int):
        return self.x[start:stop].split(batch_size)
