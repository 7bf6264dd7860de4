"""Tests of specialize.drift: the per-class cost tracker and the drift detectors."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from specialize.drift import ClassCostTracker, ClassMixDriftDetector, PageHinkley

C, K = 7, 4


def random_stream(n: int, seed: int = 0, integer_flops: bool = True):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, C, n)
    exits = rng.integers(0, K, n)
    flops = rng.integers(1_000, 5_000_000, n) if integer_flops else rng.uniform(0, 1e6, n)
    true = rng.integers(0, C, n)
    return pred, exits, flops, true


def feed_in_batches(tracker, arrays, seed: int = 1, max_batch: int = 37) -> None:
    rng = np.random.default_rng(seed)
    n, start = len(arrays[0]), 0
    while start < n:
        stop = min(n, start + int(rng.integers(0, max_batch + 1)))  # empty batches included
        tracker.update(*(a[start:stop] for a in arrays))
        start = stop


def brute_force(classes, exits, flops):
    """Per-class count, mean FLOPs (NaN if unseen) and exit histogram, with Python loops."""
    counts, sums, hist = [0] * C, [0.0] * C, [[0] * K for _ in range(C)]
    for c, k, f in zip(classes, exits, flops, strict=True):
        counts[c] += 1
        sums[c] += float(f)
        hist[c][k] += 1
    means = [s / n if n else math.nan for s, n in zip(sums, counts, strict=True)]
    return counts, means, hist


def assert_means_equal(actual, expected) -> None:
    np.testing.assert_allclose(np.array(actual, float), np.array(expected, float), rtol=1e-12)


# ------------------------------------------------------------------------------ tracker
def test_cumulative_statistics_match_brute_force():
    pred, exits, flops, _ = random_stream(1000)
    tracker = ClassCostTracker(C, K, window=64)
    feed_in_batches(tracker, (pred, exits, flops))
    counts, means, hist = brute_force(pred, exits, flops)
    got = tracker.get()
    assert got["samples"] == 1000
    assert got["pred"]["counts"] == counts
    assert got["pred"]["exit_histogram"] == hist
    assert_means_equal(got["pred"]["mean_flops"], means)
    assert got["exit_histogram"] == np.bincount(exits, minlength=K).tolist()
    assert got["mean_flops_all"] == pytest.approx(flops.mean(), rel=1e-12)
    assert got["true"] is None


def test_scalar_and_batch_updates_agree_exactly():
    pred, exits, flops, true = random_stream(500, seed=3)
    one, many = ClassCostTracker(C, K, window=50), ClassCostTracker(C, K, window=50)
    for p, k, f, t in zip(pred, exits, flops, true, strict=True):
        one.update(int(p), int(k), int(f), true_class=int(t))
    feed_in_batches(many, (pred, exits, flops, true))
    assert _nan_equal(one.get(), many.get())
    assert one.history() == many.history()


def test_float_flops_scalar_and_batch_agree_closely():
    pred, exits, flops, _ = random_stream(400, seed=4, integer_flops=False)
    one, many = ClassCostTracker(C, K, window=30), ClassCostTracker(C, K, window=30)
    for p, k, f in zip(pred, exits, flops, strict=True):
        one.update(p, k, f)
    many.update(pred, exits, flops)
    assert_means_equal(one.get()["pred"]["mean_flops"], many.get()["pred"]["mean_flops"])
    for a, b in zip(one.history(), many.history(), strict=True):
        assert a["counts"] == b["counts"]
        assert_means_equal(list(a["mean_flops"].values()), list(b["mean_flops"].values()))


def _nan_equal(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_windows_close_at_the_right_positions_and_match_brute_force():
    pred, exits, flops, _ = random_stream(333, seed=5)
    tracker = ClassCostTracker(C, K, window=50)
    tracker.update(pred[:120], exits[:120], flops[:120])  # one batch across two boundaries
    assert [w["end"] for w in tracker.history()] == [50, 100]
    window = tracker.get()["window"]
    assert (window["start"], window["size"], sum(window["pred"]["counts"])) == (100, 20, 20)
    feed_in_batches(tracker, (pred[120:], exits[120:], flops[120:]))
    history = tracker.history()
    assert [(w["start"], w["end"]) for w in history] == [(s, s + 50) for s in range(0, 300, 50)]
    for w in history:
        part = slice(w["start"], w["end"])
        counts, means, _ = brute_force(pred[part], exits[part], flops[part])
        assert w["counts"] == {c: n for c, n in enumerate(counts) if n}
        assert w["mean_flops"] == pytest.approx({c: m for c, m in enumerate(means) if counts[c]})
        assert w["exit_histogram"] == np.bincount(exits[part], minlength=K).tolist()
        assert w["mean_flops_all"] == pytest.approx(flops[part].mean())
        assert "mean_flops_true" not in w
    tracker.close_window()  # the tail of the stream becomes a (shorter) window
    assert (tracker.history()[-1]["start"], tracker.history()[-1]["end"]) == (300, 333)
    tracker.close_window()  # nothing open: no empty window
    assert len(tracker.history()) == 7
    tracker.update(pred[:50], exits[:50], flops[:50])
    assert tracker.history()[-1]["end"] == 383


def test_true_class_tracked_only_when_labels_are_given():
    pred, exits, flops, true = random_stream(300, seed=6)
    tracker = ClassCostTracker(C, K, window=100)
    tracker.update(pred[:150], exits[:150], flops[:150])  # the engine: no labels
    assert tracker.get()["true"] is None
    tracker.update(pred[150:], exits[150:], flops[150:], true_class=true[150:])  # an evaluator
    counts, means, hist = brute_force(true[150:], exits[150:], flops[150:])
    got = tracker.get()["true"]
    assert got["counts"] == counts and got["exit_histogram"] == hist
    assert_means_equal(got["mean_flops"], means)
    assert tracker.get()["pred"]["counts"] == brute_force(pred, exits, flops)[0]
    first, second, third = tracker.history()
    assert "counts_true" not in first
    assert sum(second["counts_true"].values()) == 50 and sum(third["counts_true"].values()) == 100


def test_state_dict_round_trip_through_json_resumes_identically():
    pred, exits, flops, true = random_stream(700, seed=7)
    tracker = ClassCostTracker(C, K, window=64)
    feed_in_batches(tracker, (pred[:300], exits[:300], flops[:300], true[:300]))
    tracker.freeze_baseline()
    feed_in_batches(tracker, (pred[300:410], exits[300:410], flops[300:410]))
    state = json.loads(json.dumps(tracker.state_dict(), allow_nan=False))
    resumed = ClassCostTracker.from_state_dict(state)
    assert resumed.state_dict() == tracker.state_dict()
    for t in (tracker, resumed):
        feed_in_batches(t, (pred[410:], exits[410:], flops[410:], true[410:]), seed=9)
    assert _nan_equal(resumed.get(), tracker.get())
    assert resumed.history() == tracker.history()
    assert _nan_equal(resumed.change(), tracker.change())
    assert resumed.state_dict() == tracker.state_dict()


def test_load_state_dict_rejects_another_configuration():
    state = ClassCostTracker(C, K, window=10).state_dict()
    with pytest.raises(ValueError, match="num_classes, num_exits, window"):
        ClassCostTracker(C, K, window=20).load_state_dict(state)


def test_baseline_change_compares_samples_seen_since_the_baseline():
    tracker = ClassCostTracker(3, 2, window=10)
    tracker.update([0, 0, 1, 2], [1, 1, 1, 1], [100, 300, 400, 50])
    tracker.freeze_baseline()
    tracker.update([0, 0, 1], [0, 0, 0], [50, 70, 100])
    change = tracker.change()
    assert change["before"] == [200.0, 400.0, 50.0]
    assert change["after"][:2] == [60.0, 100.0] and math.isnan(change["after"][2])
    assert change["delta"][:2] == [-140.0, -300.0]
    assert change["ratio"][:2] == [0.3, 0.25] and math.isnan(change["ratio"][2])
    assert change["count_before"] == [2, 1, 1] and change["count_after"] == [2, 1, 0]


def test_set_baseline_from_another_tracker():
    frozen, specializing = ClassCostTracker(2, 2), ClassCostTracker(2, 2)
    frozen.update([0, 1], [1, 1], [100, 100])
    specializing.set_baseline(json.loads(json.dumps(to_strict(frozen.get()))))
    specializing.update([0, 1], [0, 1], [20, 100])
    assert specializing.change()["ratio"] == [0.2, 1.0]
    assert specializing.baseline["position"] == 0
    with pytest.raises(ValueError, match="no 'true' statistics"):
        specializing.change(by="true")


def to_strict(value):
    if isinstance(value, dict):
        return {k: to_strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_strict(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def test_change_without_baseline_says_what_to_do():
    with pytest.raises(RuntimeError, match="freeze_baseline"):
        ClassCostTracker(2, 2).change()


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    tracker = ClassCostTracker(C, K, window=4)
    tracker.update(torch.tensor([1, 2, 1]), torch.tensor([0, 3, 0]), torch.tensor([10, 20, 30]))
    tracker.update(torch.tensor(4), torch.tensor(1), torch.tensor(5.0))
    assert tracker.get()["pred"]["counts"] == [0, 2, 1, 0, 1, 0, 0]
    assert tracker.history()[0]["mean_flops"] == {1: 20.0, 2: 20.0, 4: 5.0}


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (([0, 1], [0], [1.0, 2.0]), ValueError, "one value per sample"),
        (([0, C], [0, 0], [1.0, 2.0]), ValueError, r"pred_class must lie in \[0, 7\)"),
        (([0], [K], [1.0]), ValueError, "exit_index must lie"),
        (([0.0], [0], [1.0]), TypeError, "pred_class must hold integers"),
        (([[0]], [[0]], [[1.0]]), ValueError, "scalar or 1-D"),
        (([0], [0], [math.nan]), ValueError, "finite and >= 0"),
        (([0], [0], [-1.0]), ValueError, "finite and >= 0"),
    ],
)
def test_update_rejects_bad_input(args, error, match):
    tracker = ClassCostTracker(C, K)
    with pytest.raises(error, match=match):
        tracker.update(*args)
    assert tracker.samples == 0


def test_constructor_validates():
    with pytest.raises(ValueError, match="window"):
        ClassCostTracker(3, 2, window=0)
    with pytest.raises(ValueError, match="num_exits"):
        ClassCostTracker(3, 0)


# --------------------------------------------------------------------------- PageHinkley
def test_page_hinkley_matches_rivers_documented_example():
    rng = random.Random(12345)
    stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    detector = PageHinkley()
    hits = [i for i, x in enumerate(stream) if detector.update(x)]
    assert hits[0] == 1006


def shifted(seed: int, before: float, after: float, n: int = 1000, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(before, scale, n), rng.normal(after, scale, n)])


def test_page_hinkley_detects_a_mean_shift_soon_after_it():
    detector = PageHinkley()
    hits = [i for i, x in enumerate(shifted(0, 0.3, 1.3)) if detector.update(x)]
    assert hits and 1000 <= hits[0] < 1100
    assert detector.detections == len(hits)


def test_page_hinkley_is_quiet_on_a_stationary_signal():
    detector = PageHinkley()
    assert not detector.update_many(np.random.default_rng(1).normal(0.5, 0.1, 5000))
    assert detector.detections == 0


@pytest.mark.parametrize(("mode", "fires_up", "fires_down"), [("up", 1, 0), ("down", 0, 1)])
def test_page_hinkley_modes(mode, fires_up, fires_down):
    assert PageHinkley(mode=mode).update_many(shifted(2, 0.3, 1.3)) == bool(fires_up)
    assert PageHinkley(mode=mode).update_many(shifted(2, 1.3, 0.3)) == bool(fires_down)
    assert PageHinkley(mode="both").update_many(shifted(2, 1.3, 0.3))


def test_page_hinkley_restarts_after_a_detection_and_reset_clears_everything():
    detector = PageHinkley(threshold=5.0, min_instances=5)
    values = shifted(3, 0.0, 2.0)
    i = next(i for i, x in enumerate(values) if detector.update(x))
    assert detector.drift_detected
    detector.update(values[i + 1])
    assert not detector.drift_detected and detector.state_dict()["count"] == 1
    detector.reset()
    assert detector.state_dict() == PageHinkley(threshold=5.0, min_instances=5).state_dict()


def test_page_hinkley_state_dict_round_trip_resumes_identically():
    values = shifted(4, 0.2, 0.9)
    detector = PageHinkley(mode="up")
    detector.update_many(values[:700])
    state = json.loads(json.dumps(detector.state_dict(), allow_nan=False))
    resumed = PageHinkley(mode="up")
    resumed.load_state_dict(state)
    a = [detector.update(x) for x in values[700:]]
    b = [resumed.update(x) for x in values[700:]]
    assert a == b and any(a)
    assert resumed.state_dict() == detector.state_dict()
    with pytest.raises(ValueError, match="configuration"):
        PageHinkley(mode="down").load_state_dict(state)


def test_page_hinkley_validates():
    with pytest.raises(ValueError, match="mode"):
        PageHinkley(mode="sideways")
    with pytest.raises(ValueError, match="finite"):
        PageHinkley().update(math.inf)


# ------------------------------------------------------------------ ClassMixDriftDetector
def class_stream(seed: int, n: int, probabilities) -> np.ndarray:
    return np.random.default_rng(seed).choice(len(probabilities), n, p=probabilities)


UNIFORM = [0.1] * 10
FOOTWEAR = [0.0] * 5 + [0.3, 0.0, 0.4, 0.0, 0.3]


def test_class_mix_fires_soon_after_a_switch():
    stream = np.concatenate([class_stream(0, 1000, UNIFORM), class_stream(1, 1000, FOOTWEAR)])
    detector = ClassMixDriftDetector(10, window=200, threshold=0.3)
    hits = [i for i, c in enumerate(stream) if detector.update(c)]
    assert hits and 1000 <= hits[0] < 1150


def test_class_mix_is_quiet_on_a_stationary_mix_and_reports_distance():
    detector = ClassMixDriftDetector(10, window=200, threshold=0.3)
    assert math.isnan(detector.distance)
    assert not detector.update_many(class_stream(2, 3000, UNIFORM))
    assert 0.0 < detector.distance < 0.3


def test_class_mix_distance_equals_brute_force_total_variation():
    stream = class_stream(3, 700, UNIFORM)
    detector = ClassMixDriftDetector(10, window=100, threshold=0.99)
    detector.update_many(stream)
    reference = np.bincount(stream[:100], minlength=10) / 100
    recent = np.bincount(stream[-100:], minlength=10) / 100
    assert detector.distance == pytest.approx(0.5 * np.abs(reference - recent).sum())


def test_class_mix_state_dict_round_trip_and_restart():
    stream = np.concatenate([class_stream(4, 600, UNIFORM), class_stream(5, 600, FOOTWEAR)])
    detector = ClassMixDriftDetector(10, window=100, threshold=0.3)
    detector.update_many(stream[:450])
    state = json.loads(json.dumps(detector.state_dict()))
    resumed = ClassMixDriftDetector(10, window=100, threshold=0.3)
    resumed.load_state_dict(state)
    a = [detector.update(c) for c in stream[450:]]
    b = [resumed.update(c) for c in stream[450:]]
    assert a == b and any(a)
    assert resumed.state_dict() == detector.state_dict()
    with pytest.raises(ValueError, match="configuration"):
        ClassMixDriftDetector(10, window=50).load_state_dict(state)


def test_class_mix_validates():
    with pytest.raises(ValueError, match="total variation"):
        ClassMixDriftDetector(10, threshold=1.5)
    with pytest.raises(ValueError, match=r"pred_class must lie in \[0, 10\)"):
        ClassMixDriftDetector(10).update(10)


def _scattered_stream(classes, length, seed, num_classes=200, right=0.56):
    """Predictions of a weak 200-class model on a stream of ``classes``: errors scatter."""
    import random

    rng = random.Random(seed)
    return [rng.choice(classes) if rng.random() < right else rng.randrange(num_classes)
            for _ in range(length)]


def test_class_mix_alarm_is_calibrated_to_the_chance_distance():
    # On a 200-class model whose errors scatter, two windows of the same mix differ by ~0.4
    # in total variation: a fixed 0.3 threshold alarmed every ~200 samples on Tiny-ImageNet.
    dogs, insects = list(range(24, 30)), list(range(36, 46))
    for seed in range(3):
        detector = ClassMixDriftDetector(num_classes=200, window=100, threshold=0.3)
        alarms = [i for i, p in enumerate(_scattered_stream(dogs, 3000, seed))
                  if detector.update(p)]
        assert alarms == []
        assert 0.3 < detector.chance < 0.6
        stream = _scattered_stream(dogs, 1000, seed) + _scattered_stream(insects, 500, seed + 9)
        detector = ClassMixDriftDetector(num_classes=200, window=100, threshold=0.3)
        alarms = [i for i, p in enumerate(stream) if detector.update(p)]
        assert alarms and 1000 < alarms[0] < 1100
