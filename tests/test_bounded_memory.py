"""Memory set by configuration: the engine keeps no step, the tracker and alarms are capped."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
import torch

from backbones.checkpoint import atomic_torch_save, atomic_write_bytes
from specialize.drift import ClassCostTracker, ClassMixDriftDetector
from specialize.engine import Engine, EngineResult, StepOutput
from specialize.policy import ExitPolicy
from specialize.specializer import Specializer
from tests.conftest import tiny_model
from tests.test_engine import synthetic_stream

pytestmark = pytest.mark.usefixtures("one_thread")


class KeepWeakly:
    """A hook that sees every step and remembers it only weakly."""

    def __init__(self) -> None:
        self.outputs: list[weakref.ref] = []

    def on_step(self, output) -> None:
        self.outputs.append(weakref.ref(output))


@pytest.mark.parametrize("keep_records", [True, False])
def test_no_step_output_outlives_its_hooks(keep_records):
    model = tiny_model()
    hook = KeepWeakly()
    engine = Engine(model, ExitPolicy(thresholds=0.11), hooks=[hook])
    batches = [torch.randn(3, *model.input_size) for _ in range(20)]
    result = engine.run(batches, progress=False, keep_records=keep_records)
    gc.collect()
    assert len(hook.outputs) == 20 and all(ref() is None for ref in hook.outputs)
    assert result.samples == 60 and result.keeps_records is keep_records


def test_aggregates_match_the_records_and_survive_a_state_round_trip():
    model = tiny_model()
    engine = Engine(model, ExitPolicy(thresholds=0.11), on_bad_input="skip")
    batches = [torch.randn(4, *model.input_size) for _ in range(30)]
    batches[3][1] = float("nan")
    result = engine.run(batches, progress=False)
    valid = result.valid
    assert result.samples == 120 and result.skipped == 1 == int((~valid).sum())
    assert result.flops_sum == int(result.flops[valid].sum())
    assert result.mean_flops == float(result.flops[valid].double().mean())
    expected = torch.bincount(result.exit_index[valid], minlength=model.num_exits).tolist()
    assert result.exit_histogram() == expected and len(set(expected)) > 1
    restored = EngineResult(model.num_exits, keep_records=False)
    restored.load_state_dict(result.state_dict())
    assert restored.state_dict() == result.state_dict()
    with pytest.raises(ValueError, match="keep_records=True"):
        restored.pred  # noqa: B018 - the property raises


def test_records_grow_in_place_a_few_bytes_per_sample():
    result = EngineResult(4)
    model = tiny_model()
    engine = Engine(model, ExitPolicy(thresholds=0.11))
    for _ in range(3):
        engine.run([torch.randn(700, *model.input_size)], progress=False, result=result)
    assert result.pred.shape == (2100,) and result.valid.all()
    assert result.seconds > 0


def regular_tracker(samples: int, max_windows: int, window: int = 10) -> ClassCostTracker:
    rng = np.random.default_rng(0)
    tracker = ClassCostTracker(5, 3, window=window, max_windows=max_windows)
    for _ in range(samples // 7):
        tracker.update(rng.integers(0, 5, 7), rng.integers(0, 3, 7), rng.uniform(1, 9, 7),
                       true_class=rng.integers(0, 5, 7))
    return tracker


def test_tracker_history_is_capped_and_still_covers_the_whole_stream():
    capped, full = regular_tracker(7000, max_windows=8), regular_tracker(7000, max_windows=10**6)
    history, fine = capped.history(), full.history()
    assert len(fine) == 700 and len(history) == 8
    assert history[0]["start"] == 0 and history[-1]["end"] == fine[-1]["end"]
    assert all(a["end"] == b["start"] for a, b in zip(history, history[1:]))
    spans = [entry["end"] - entry["start"] for entry in history]
    assert spans == sorted(spans, reverse=True) and spans[-1] <= 20  # older is coarser
    for entry in history:  # each entry is the merge of the fine windows it spans
        parts = [w for w in fine if entry["start"] <= w["start"] < entry["end"]]
        counts = {c: sum(w["counts"].get(c, 0) for w in parts) for c in range(5)}
        assert entry["counts"] == {c: n for c, n in counts.items() if n}
        assert entry["exit_histogram"] == np.sum([w["exit_histogram"] for w in parts], 0).tolist()
        for c, n in entry["counts"].items():
            total = sum(w["mean_flops"][c] * w["counts"][c] for w in parts if c in w["counts"])
            assert entry["mean_flops"][c] == pytest.approx(total / n, rel=1e-12)
        assert sum(entry["counts_true"].values()) == entry["end"] - entry["start"]


def test_tracker_history_cap_is_kept_across_a_state_round_trip():
    tracker = regular_tracker(700, max_windows=50)
    small = ClassCostTracker(5, 3, window=10, max_windows=6)
    small.load_state_dict(tracker.state_dict())
    assert len(tracker.history()) == 50 and len(small.history()) == 6
    assert small.history()[-1]["end"] == tracker.history()[-1]["end"] == 700
    assert (np.sum([w["exit_histogram"] for w in small.history()], 0).tolist()
            == tracker.get()["exit_histogram"])
    assert ClassCostTracker.from_state_dict(small.state_dict()).history() == small.history()
    with pytest.raises(ValueError, match="max_windows must be >= 2"):
        ClassCostTracker(5, 3, max_windows=1)


def blocks_of_classes(model, x, policy):
    """A step routine whose answers switch class every 20 samples (the alarm fires often)."""
    blocks_of_classes.position += x.shape[0]
    pred = torch.full((x.shape[0],), (blocks_of_classes.position // 20) % 2 * 5)
    last = torch.full_like(pred, model.num_exits - 1)
    return StepOutput(pred=pred, exit_index=last, confidence=torch.ones(len(pred)),
                      flops=torch.zeros(len(pred), dtype=torch.long),
                      selected_logits=torch.zeros(len(pred), model.num_classes), features=[],
                      valid=torch.ones(len(pred), dtype=torch.bool))


def test_alarm_positions_are_capped_the_count_is_not_and_both_resume(tmp_path):
    stream = synthetic_stream(length=240)
    model = tiny_model()

    def specializer():
        blocks_of_classes.position = 0
        detector = ClassMixDriftDetector(model.num_classes, window=5, threshold=0.3)
        return Specializer(model, ExitPolicy(), alarm=detector, max_alarms=3,
                           step_fn=blocks_of_classes)

    whole = specializer()
    whole.run(stream, progress=False, save_every=100, state_path=tmp_path / "state.pt")
    hook = whole.alarm_hook
    assert hook.count > 3 and len(hook.alarms) == 3 and hook.alarms[-1] <= 240
    resumed = specializer()
    resumed.load(tmp_path / "state.pt", stream)
    assert (resumed.alarm_hook.count, resumed.alarm_hook.alarms) == (hook.count, hook.alarms)
    assert resumed.alarm_hook.detector.state_dict() == hook.detector.state_dict()


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    atomic_torch_save({"x": torch.ones(2)}, tmp_path / "b.pt")
    assert synced == [False, True, False, True]  # file, then folder, for each write
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.pt"]


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = atomic_write_bytes(tmp_path / "a.bin", b"old")

    def broken(handle):
        handle.write(b"half")
        raise OSError("disk full")

    from backbones.checkpoint import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
