"""Fault injection into the async updater: served heads, reporting, no hang, exit code 3."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from specialize.cli import EXIT_UPDATER_FAILED, main
from specialize.updater import HeadUpdater
from specialize.updater.trainer import HeadTrainer
from specialize.updater.worker import TrainingWorker
from tests.runs import RUN_OVERRIDES, synthetic_scenario, trained_tiny_checkpoint
from tests.test_updater import batches, early_values, fast_config

pytestmark = pytest.mark.usefixtures("one_thread")


def fail_at_step(monkeypatch, step: int, message: str = "injected failure") -> None:
    """Make the trainer's ``step``-th optimizer step (1-based) and all later ones raise."""
    original = HeadTrainer._step
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] >= step:
            raise RuntimeError(message)
        original(self)

    monkeypatch.setattr(HeadTrainer, "_step", failing)


def returns_within(fn, seconds: float = 20.0) -> bool:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def record_publications(updater: HeadUpdater) -> list[torch.Tensor]:
    """Snapshots of the served early heads after each publication."""
    published, original = [], updater._publish

    def publish(epoch):
        done = original(epoch)
        with updater.serving():
            published.append(early_values(updater.model).clone())
        return done

    updater._publish = publish
    return published


def test_failure_mid_observation_keeps_the_last_published_heads(base, shapes, monkeypatch):
    model = copy.deepcopy(base)
    updater = HeadUpdater(model, fast_config(mode="async", update_every=16))
    published = record_publications(updater)
    fail_at_step(monkeypatch, 6)  # observation 3 (32 samples, 2 rounds): step 5 ok, 6 fails
    stream = batches(shapes, 4)
    with pytest.warns(RuntimeWarning, match="injected failure"):
        for batch in stream[:3]:
            updater.observe(*batch)
            updater.flush()
    assert "injected failure" in updater.stats()["error"]
    assert len(published) == 2  # observations 1 and 2
    shadow = torch.cat([t.flatten() for t in updater._train_tensors])
    assert not torch.equal(shadow, torch.cat([t.flatten() for t in updater._serving_tensors]))
    updater.observe(*stream[3])  # dropped
    updater.flush()
    with updater.serving():
        assert torch.equal(early_values(model), published[-1])
    assert updater.stats()["dropped"] == 32 and updater.stats()["published"] == 2
    updater.close()


def test_a_failing_report_neither_hangs_nor_hides_the_error(base, shapes, monkeypatch):
    def broken_report(self, err):
        raise RuntimeError("the report itself failed")

    monkeypatch.setattr(TrainingWorker, "_report", broken_report)
    fail_at_step(monkeypatch, 1)
    updater = HeadUpdater(copy.deepcopy(base), fast_config(mode="async"))
    for batch in batches(shapes, 3):
        updater.observe(*batch)
    assert returns_within(updater.flush)
    worker = updater._worker
    assert str(worker.error) == "injected failure"
    assert str(worker.report_error) == "the report itself failed"
    assert updater.stats()["dropped"] == 64  # the two later observations
    assert returns_within(updater.close)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_flush_and_close_return_even_if_the_thread_died(base, shapes, monkeypatch):
    def fatal(self, err):
        raise SystemExit("worker gone")  # escapes the loop: the thread ends

    monkeypatch.setattr(TrainingWorker, "_fail", fatal)
    fail_at_step(monkeypatch, 1)
    updater = HeadUpdater(copy.deepcopy(base), fast_config(mode="async", queue_size=1))
    stream = batches(shapes, 3)
    updater.observe(*stream[0])
    updater._worker._thread.join(20)
    assert not updater._worker._thread.is_alive()
    updater.observe(*stream[1])  # queued, never handled
    updater.observe(*stream[2])  # the queue is full: dropped
    assert returns_within(updater.flush)
    assert returns_within(updater.close)


@pytest.fixture(scope="module")
def run_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("failing_run")
    checkpoint = trained_tiny_checkpoint(root / "tiny.pt")
    scenario = synthetic_scenario(root / "scenario.yaml")
    return ["run", str(scenario), f"model.checkpoint={checkpoint}", *RUN_OVERRIDES,
            "updater.mode=async", "evaluation.frozen_replay=false", "drift.alarm=none"]


def test_a_run_whose_updater_failed_says_so_and_exits_3(run_args, tmp_path, monkeypatch,
                                                        capsys):
    fail_at_step(monkeypatch, 4, "injected trainer failure")
    with pytest.warns(RuntimeWarning, match="injected trainer failure"):
        code = main([*run_args, f"out={tmp_path}"])
    assert code == EXIT_UPDATER_FAILED == 3
    captured = capsys.readouterr()
    assert "UPDATER FAILED" in captured.out and "injected trainer failure" in captured.out
    assert "background updater failed" in captured.err
    report = (tmp_path / "report.md").read_text()
    assert "Warning: the run's updater failed" in report.split("## Scenario")[0]
    assert "injected trainer failure" in report


def test_a_run_without_failure_exits_0_and_warns_of_nothing(run_args, tmp_path, capsys):
    assert main([*run_args, f"out={tmp_path}"]) == 0
    assert "UPDATER FAILED" not in capsys.readouterr().out
    assert "updater failed" not in (tmp_path / "report.md").read_text()

