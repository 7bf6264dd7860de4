import copy
import io
import threading
import time
import types

import pytest
import torch

from configkit import ConfigError, from_dict
from specialize.updater import (
    HeadUpdater,
    ReplayBuffer,
    UpdaterConfig,
    check_model,
    collect_params,
    configure_model,
)
from tests.conftest import TINY_INPUT, tiny_model

NUM_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(shapes, generator, batch=32, exit_index=None, labels=None):
    features = [torch.randn((batch, *s), generator=generator) for s in shapes]
    if exit_index is None:
        exit_index = torch.randint(0, len(shapes), (batch,), generator=generator)
    logits = torch.randn(batch, NUM_CLASSES, generator=generator) * 3
    if labels is not None:
        logits = torch.nn.functional.one_hot(labels, NUM_CLASSES).float() * 10
    confidence = logits.softmax(1).amax(1)
    return features, exit_index, logits, confidence


def batches(shapes, count, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return [make_batch(shapes, generator, **kwargs) for _ in range(count)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def head_of(key):
    return int(key.split(".")[1]) if key.startswith("heads.") else None


def assert_same(a, b, where="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def fast_config(**kwargs):
    # The mechanics of the plain strategy (tests/test_anchoring.py covers the anchored one).
    kwargs = {"update_every": 16, "batch_size": 16, "buffer_mb": 1.0, "strategy": "plain",
              "optimizer": "sgd", "lr": 0.01, **kwargs}
    return UpdaterConfig(**kwargs)


# ---- configuration and tent-style checks


def test_config_validates_with_clear_errors():
    for field, value, words in [
        ("mode", "threads", "mode: unknown value 'threads'; allowed: sync, async"),
        ("target", "logits", "target: unknown value"),
        ("temperature", 0.0, "temperature: must be a number > 0"),
        ("update_every", 0, "update_every: must be an integer >= 1"),
        ("batch_size", 2.5, "batch_size: must be an integer"),
        ("optimizer", "lbfgs", "optimizer: unknown value"),
        ("lr", -1.0, "lr: must be a number > 0"),
        ("momentum", 1.0, r"momentum: must be a number in \[0, 1\)"),
        ("buffer_mb", float("nan"), "buffer_mb: must be a number > 0, got nan"),
        ("grad_clip", 0.0, "grad_clip: must be a number > 0"),
        ("enabled", "yes", "enabled: must be true or false"),
    ]:
        with pytest.raises(ValueError, match=words):
            UpdaterConfig(**{field: value})
    config = from_dict(UpdaterConfig, {"lr": 1, "mode": "async", "min_confidence": 0.5})
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.mode == "async"
    with pytest.raises(ConfigError, match="allowed keys"):
        from_dict(UpdaterConfig, {"learning_rate": 0.1})


def test_configure_collect_and_check_model(base):
    model = configure_model(copy.deepcopy(base))
    params, names = collect_params(model)
    assert names and all(head_of(n) in (0, 1, 2) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names) and not model.training
    check_model(model)
    model.stages[0][0].gate.fc.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="configure_model"):
        check_model(model)
    configure_model(model)
    model.heads[3].requires_grad_(True)
    with pytest.raises(AssertionError, match="final head must stay frozen"):
        check_model(model)
    configure_model(model).train()
    with pytest.raises(AssertionError, match="model.eval()"):
        check_model(model)


# ---- what trains


def test_only_early_heads_change(base, shapes):
    model = copy.deepcopy(base)
    before = snapshot(model)
    updater = HeadUpdater(model, fast_config())
    for batch in batches(shapes, 4):
        updater.observe(*batch)
    diff = changed(before, snapshot(model))
    assert {head_of(k) for k in diff} == {0, 1, 2}  # backbone, gates, BN stats, final: same
    assert updater.stats()["updates"] == 8


@pytest.mark.parametrize("answered_at", [0, 1, 2, 3])
def test_samples_teach_only_heads_before_their_exit(base, shapes, answered_at):
    model = copy.deepcopy(base)
    before = snapshot(model)
    updater = HeadUpdater(model, fast_config())
    for batch in batches(shapes, 2, exit_index=torch.full((32,), answered_at)):
        updater.observe(*batch)
    changed_heads = {head_of(k) for k in changed(before, snapshot(model))}
    assert changed_heads == set(range(min(answered_at, 3)))
    assert updater.stats()["buffer_fill"] == [64 if k < answered_at else 0 for k in range(3)]


def test_sync_mode_is_deterministic(base, shapes):
    results = []
    for _ in range(2):
        model = copy.deepcopy(base)
        updater = HeadUpdater(model, fast_config(optimizer="adam", target="soft"))
        for batch in batches(shapes, 3):
            updater.observe(*batch)
        results.append((snapshot(model), updater.stats()))
    assert_same(results[0], results[1])


def test_features_as_rows_pairs_equal_aligned_rows(base, shapes):
    states = []
    for form in ("aligned", "pairs"):
        model = copy.deepcopy(base)
        updater = HeadUpdater(model, fast_config())
        for features, exit_index, logits, confidence in batches(shapes, 2):
            if form == "pairs":  # what the executor returns: rows that evaluated each exit
                rows = [torch.nonzero(exit_index >= k).squeeze(1) for k in range(4)]
                features = [(f[r], r) for f, r in zip(features, rows)]
            updater.observe(features, exit_index, logits, confidence)
        states.append(snapshot(model))
    assert_same(states[0], states[1])


def test_pooled_vectors_are_stored_and_conv_heads_train():
    model = tiny_model("tiny_resnet_bottleneck", head="conv_pool_fc", exit_stages=(1, 2, 3))
    model.heads[0] = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1),
                                         torch.nn.Linear(64, NUM_CLASSES))
    before = snapshot(model)
    updater = HeadUpdater(model, fast_config())
    buffers = updater._buffers
    with torch.no_grad():
        out = model.forward_exits(torch.randn(4, *TINY_INPUT))
    assert tuple(buffers[0].features.shape[1:]) == (64,)  # pooled vector, not the map
    assert buffers[1].features.shape[1:] == out.features[1].shape[1:]  # conv head: the map
    with torch.no_grad():
        pooled = model.heads[0][:2](out.features[0])
        assert torch.allclose(updater._trainer.bodies[0](pooled), out.logits[0])
    shapes = [f.shape[1:] for f in out.features]
    for batch in batches(shapes, 2):
        updater.observe(*batch)
    diff = changed(before, snapshot(model))
    assert {head_of(k) for k in diff} == {0, 1}
    assert not any("running" in k for k in diff)  # heads train in eval mode: BN stats fixed


def test_min_confidence_keeps_unconfident_answers_from_teaching(base, shapes):
    model = copy.deepcopy(base)
    before = snapshot(model)
    updater = HeadUpdater(model, fast_config(min_confidence=0.99))
    features, exit_index, logits, confidence = make_batch(shapes, torch.Generator(),
                                                          exit_index=torch.full((32,), 3))
    updater.observe(features, exit_index, logits * 0, confidence * 0 + 0.1)
    stats = updater.stats()
    assert stats["low_confidence"] == 32 and stats["accepted"] == 0
    assert stats["buffer_fill"] == [0, 0, 0] and not changed(before, snapshot(model))


def test_observe_contract_errors_and_engine_hook(base, shapes):
    updater = HeadUpdater(copy.deepcopy(base), fast_config())
    features, exit_index, logits, confidence = make_batch(shapes, torch.Generator())
    exit_index = torch.full((32,), 3)
    with pytest.raises(ValueError, match="need the input of head 2"):
        updater.observe(features[:2], exit_index, logits, confidence)
    rows = torch.arange(16)
    with pytest.raises(ValueError, match="lacks rows"):
        updater.observe([(f[rows], rows) for f in features], exit_index, logits, confidence)
    with pytest.raises(ValueError, match="selected_logits"):
        updater.observe(features, exit_index, logits[:, :5], confidence)
    # engine StepOutput: skipped inputs carry exit -1 and valid False
    valid = torch.ones(32, dtype=torch.bool)
    valid[:4] = False
    exit_index[:4] = -1
    updater.on_step(types.SimpleNamespace(features=features, exit_index=exit_index,
                                          selected_logits=logits, confidence=confidence,
                                          valid=valid))
    assert updater.stats()["observed"] == 28 and updater.stats()["buffer_fill"] == [28] * 3


# ---- guards


def test_nonfinite_inputs_never_poison_the_heads(base, shapes):
    model = copy.deepcopy(base)
    updater = HeadUpdater(model, fast_config(update_every=1000))
    features, _, logits, confidence = make_batch(shapes, torch.Generator())
    exit_index = torch.full((32,), 3)
    features[0][0] = float("nan")  # a NaN in the input of head 0
    logits[1, 3] = float("inf")  # a non-finite selected prediction
    features[2][2, 0, 0, 0] = float("inf")  # only head 2's input: dropped from all exits
    features[3][3] = float("nan")  # the final exit's input is never used
    updater.observe(features, exit_index, logits, confidence)
    stats = updater.stats()
    assert stats["nonfinite_samples"] == 3 and stats["accepted"] == 29
    assert stats["buffer_fill"] == [29, 29, 29]
    assert all(torch.isfinite(b.features[: b.fill]).all() for b in updater._buffers)
    # a non-finite loss (a poisoned buffer) is skipped, the other heads still learn
    buffer = updater._buffers[0]
    buffer.features[: buffer.fill] = float("nan")
    before = snapshot(model)
    updater.config.update_every = 1
    updater.observe(*make_batch(shapes, torch.Generator(), batch=1, exit_index=torch.tensor([0])))
    assert updater.stats()["skipped_losses"] == 1
    assert {head_of(k) for k in changed(before, snapshot(model))} == {1, 2}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overflowing_step_restores_last_good_heads(base, shapes):
    model = copy.deepcopy(base)
    before = snapshot(model)
    updater = HeadUpdater(model, fast_config())

    def exploding_step():
        with torch.no_grad():
            for param in collect_params(model)[0]:
                param.fill_(float("inf"))

    updater._trainer.optimizer.step = exploding_step
    for batch in batches(shapes, 1, exit_index=torch.full((32,), 3)):
        updater.observe(*batch)
    assert updater.stats()["nonfinite_params"] == 1
    assert not changed(before, snapshot(model)) and updater.stats()["buffer_fill"] == [0] * 3


def test_reset_restores_base_heads_exactly(base, shapes):
    model = copy.deepcopy(base)
    before = snapshot(model)
    updater = HeadUpdater(model, fast_config(optimizer="adam"))
    for batch in batches(shapes, 3):
        updater.observe(*batch)
    assert changed(before, snapshot(model))
    updater.reset()
    assert not changed(before, snapshot(model))
    assert updater.stats()["buffer_fill"] == [0, 0, 0]
    assert not updater._trainer.optimizer.state


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rollback_on_degrading_audit_signal(base, shapes, mode):
    model = copy.deepcopy(base)
    base_state = snapshot(model)
    config = fast_config(mode=mode, audit_baseline=20, audit_window=20, audit_margin=0.1)
    stream = iter(batches(shapes, 4, exit_index=torch.full((32,), 3)))
    final = torch.zeros(24, dtype=torch.long)

    def audit(disagreements):
        answered = final.clone()
        answered[:disagreements] = 1
        exit_index = torch.zeros(24, dtype=torch.long)
        exit_index[20:] = 3  # answered at the final exit: not audited
        exit_index[23] = -1  # an input the engine skipped
        answered[20:] = 5
        return updater.audit(exit_index, answered, final)

    with HeadUpdater(model, config) as updater:
        assert not audit(2)  # baseline: 10 % disagreement
        updater.observe(*next(stream))
        updater.flush()
        good = snapshot(model)
        assert changed(base_state, good)
        assert not audit(3)  # 15 %: healthy, the current heads become the last good ones
        updater.observe(*next(stream))
        updater.flush()
        assert changed(good, snapshot(model))
        assert audit(10)  # 50 %: degraded, back to the last good heads at once
        assert not changed(good, snapshot(model))
        updater.observe(*next(stream))
        updater.flush()
        assert updater.stats()["buffer_fill"] == [32] * 3  # emptied by the rollback
        assert audit(10)  # degraded again right after a rollback: back to the base heads
        assert not changed(base_state, snapshot(model))
        stats = updater.stats()
        assert stats["rollbacks"] == 2 and stats["healthy_windows"] == 1
        assert stats["baseline_disagreement"] == 0.1 and stats["audited"] == 80


# ---- state


def test_resume_equals_uninterrupted_run(base, shapes):
    config = fast_config(target="soft", optimizer="adam", update_every=8, batch_size=8,
                         steps_per_update=2, min_confidence=0.3, buffer_mb=0.01)
    stream = batches(shapes, 6, batch=16)
    model = copy.deepcopy(base)
    uninterrupted = HeadUpdater(model, config)
    for batch in stream:
        uninterrupted.observe(*batch)
    assert max(uninterrupted.stats()["buffer_fill"]) == uninterrupted._buffers[0].capacity

    first = HeadUpdater(copy.deepcopy(base), config)
    for batch in stream[:3]:
        first.observe(*batch)
    file = io.BytesIO()
    torch.save(first.state_dict(), file)
    file.seek(0)
    state = torch.load(file, weights_only=True)
    resumed_model = copy.deepcopy(base)
    resumed = HeadUpdater(resumed_model, config)
    resumed.load_state_dict(state)
    for batch in stream[3:]:
        resumed.observe(*batch)
    assert_same(snapshot(model), snapshot(resumed_model))
    assert_same(uninterrupted.state_dict(), resumed.state_dict())


# ---- replay buffer


def test_buffer_respects_its_memory_cap(base):
    for megabytes in (0.01, 0.1, 1.0):
        updater = HeadUpdater(copy.deepcopy(base), fast_config(buffer_mb=megabytes,
                                                               target="soft"))
        stats = updater.stats()
        assert stats["buffer_bytes"] <= megabytes * 2**20
        assert stats["buffer_bytes"] > 0.9 * megabytes * 2**20
    with pytest.raises(ValueError, match="raise buffer_mb"):
        HeadUpdater(copy.deepcopy(base), fast_config(buffer_mb=1e-5))


def test_buffer_evicts_oldest_of_the_most_frequent_class():
    buffer = ReplayBuffer(6, (1,), num_classes=3, soft_dim=0)

    def add(labels):
        labels = torch.tensor(labels)
        n = len(labels)
        buffer.add(torch.zeros(n, 1), labels, torch.zeros(n, 0), torch.ones(n, dtype=torch.int8))

    def content():
        order = torch.argsort(buffer.seq[: buffer.fill])
        return list(zip(buffer.labels[order].tolist(), buffer.seq[order].tolist()))

    add([0] * 6)
    add([1, 1, 1])
    assert content() == [(0, 3), (0, 4), (0, 5), (1, 6), (1, 7), (1, 8)]
    add([2, 2])  # classes 0 and 1 tie at 3: each loses its oldest entry
    assert content() == [(0, 4), (0, 5), (1, 7), (1, 8), (2, 9), (2, 10)]
    add([0, 0, 0])  # class 0 is the crowded one now: its own oldest go first
    assert content() == [(1, 7), (1, 8), (2, 9), (2, 10), (0, 12), (0, 13)]
    assert buffer.class_counts().tolist() == [2, 2, 2]


def naive_survivors(labels, capacity, num_classes):
    alive = [i for i, label in enumerate(labels) if label >= 0]  # index == age order
    while len(alive) > capacity:
        counts = [sum(labels[i] == c for i in alive) for c in range(num_classes)]
        crowded = max(range(num_classes), key=lambda c: (counts[c], -c))
        alive.remove(next(i for i in alive if labels[i] == crowded))
    return set(alive)


def test_vectorised_eviction_matches_one_by_one_reference():
    generator = torch.Generator().manual_seed(1)
    for trial in range(40):
        capacity = int(torch.randint(1, 12, (1,), generator=generator))
        buffer = ReplayBuffer(capacity, (2,), num_classes=4, soft_dim=0)
        labels = []
        for _ in range(3):
            n = int(torch.randint(1, 15, (1,), generator=generator))
            new = torch.randint(0, 4 if trial % 2 else 2, (n,), generator=generator)
            buffer.add(torch.randn(n, 2), new, torch.zeros(n, 0), torch.zeros(n, dtype=torch.int8))
            labels += new.tolist()
            survivors = set(buffer.seq[: buffer.fill].tolist())
            expected = naive_survivors(labels, capacity, 4)
            assert survivors == expected, (trial, labels)
            labels = [labels[i] if i in expected else -1 for i in range(len(labels))]


def test_updater_buffer_keeps_rare_pseudo_classes(base, shapes):
    updater = HeadUpdater(copy.deepcopy(base), fast_config(buffer_mb=0.02, update_every=1000))
    capacity = updater._buffers[0].capacity
    labels = torch.zeros(400, dtype=torch.long)
    labels[::20] = torch.arange(20) % 9 + 1  # 20 rare samples among 380 of class 0
    generator = torch.Generator().manual_seed(0)
    for chunk in labels.split(50):
        updater.observe(*make_batch(shapes, generator, batch=50, labels=chunk,
                                    exit_index=torch.full((50,), 3)))
    counts = updater._buffers[2].class_counts()
    assert int(counts.sum()) == capacity < 400
    assert counts[1:].tolist() == torch.bincount(labels, minlength=10)[1:].tolist()


# ---- async mode


@pytest.mark.parametrize("strategy", ["plain", "anchored"])
def test_async_with_flush_equals_sync(base, shapes, strategy):
    states = []
    for mode in ("sync", "async"):
        model = copy.deepcopy(base)
        config = fast_config(mode=mode, optimizer="adam", strategy=strategy)
        with HeadUpdater(model, config) as updater:
            for batch in batches(shapes, 3):
                updater.observe(*batch)
                updater.flush()
            assert updater.stats()["updates"] == 6 and updater.error is None
        states.append(snapshot(model))
    assert_same(states[0], states[1])


def early_values(model):
    return torch.cat([p.detach().flatten() for head in model.heads[:-1]
                      for p in head.parameters()])


def test_async_publishing_is_atomic_under_concurrent_inference(base):
    model = copy.deepcopy(base)
    with HeadUpdater(model, fast_config(mode="async", update_every=32, batch_size=32)) as updater:
        versions = 60

        def publish(version):
            with torch.no_grad():
                for tensor in updater._train_tensors:  # the shadow copy
                    tensor.fill_(version)
            assert updater._publish(updater._trainer_epoch)

        def publisher():
            for version in range(1, versions + 1):
                publish(version)
                time.sleep(0.001)

        publish(0)
        thread = threading.Thread(target=publisher)
        thread.start()
        seen, x = set(), torch.randn(2, *TINY_INPUT)
        while thread.is_alive():
            with torch.no_grad(), updater.serving():
                before = early_values(model)
                out = model.forward_exits(x)
                after = early_values(model)
            version = before[0].item()
            assert (before == version).all() and (after == version).all()
            for k in range(3):  # every early head computed with weights and biases == version
                pooled = out.features[k].mean((2, 3))
                expected = version * (pooled.sum(1, keepdim=True) + 1)
                assert torch.allclose(out.logits[k], expected.expand(-1, NUM_CLASSES))
            seen.add(version)
            time.sleep(0.0005)  # the engine does other work between steps
        thread.join()
    assert len(seen) > 3 and seen <= set(range(versions + 1))
    assert updater.stats()["published"] == versions + 1


def test_failing_background_thread_is_reported_and_serving_continues(base, shapes):
    model = copy.deepcopy(base)
    before = snapshot(model)
    updater = HeadUpdater(model, fast_config(mode="async"))

    def fail(observation):
        raise RuntimeError("injected failure")

    updater._trainer.add = fail
    stream = batches(shapes, 2)
    with pytest.warns(RuntimeWarning, match="injected failure"):
        updater.observe(*stream[0])
        updater.flush()
    assert isinstance(updater.error, RuntimeError)
    assert "injected failure" in updater.stats()["error"]
    updater.observe(*stream[1])  # dropped, never blocks
    updater.flush()
    with updater.serving(), torch.no_grad():
        model.forward_exits(torch.randn(2, *TINY_INPUT))
    assert not changed(before, snapshot(model))
    assert updater.stats()["dropped"] == 32
    updater.close()
    updater.close()
    with pytest.raises(RuntimeError, match="closed"):
        updater.observe(*stream[1])


def test_a_rollback_waits_for_the_workers_restore_of_the_last_good_heads():
    """_last_good is read by the worker (non-finite step) and replaced by a rollback: one lock.

    The worker's restore is paused after it read the last good heads; a rollback to the base
    heads from another thread must not run until that restore is done. Without the lock it
    runs at once (the test then fails on the order). On the locked code the order holds
    whatever the timing; the bounded joins only keep the old code from hanging.
    """
    from specialize.updater.health import Verdict

    updater = HeadUpdater(tiny_model(), UpdaterConfig(mode="async", strategy="plain"))
    trainer, order = updater._trainer, []
    in_restore, release = threading.Event(), threading.Event()
    restore = trainer.restore

    def paused_restore(heads_state):
        in_restore.set()
        release.wait(timeout=10)
        restore(heads_state)
        order.append("worker restored the last good heads")

    def rollback():
        updater._act_on(Verdict.ROLL_BACK_TO_BASE)
        order.append("rolled back")

    trainer.add = lambda observation: (1, False)  # every round overflows
    trainer.restore = paused_restore
    with updater:
        assert updater._worker.submit(types.SimpleNamespace(num_samples=1))
        assert in_restore.wait(timeout=10)
        other = threading.Thread(target=rollback)
        other.start()
        other.join(timeout=1.0)  # the old code rolls back now, inside the worker's restore
        release.set()
        other.join()
        updater.flush()
        assert order == ["worker restored the last good heads", "rolled back"]
        assert updater.rollback_count == 1
        base = updater._base
        for head, state in zip(updater._serving_heads, base):
            for name, value in head.state_dict().items():
                assert torch.equal(value, state[name]), name
