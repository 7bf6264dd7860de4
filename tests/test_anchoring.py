"""The anchored strategy: mixture heads, what trains, reset, state and cost accounting."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from specialize.updater import HeadUpdater, UpdaterConfig, check_model
from specialize.updater.anchoring import AnchoredHead, anchor_heads, is_anchored, unanchor_heads
from tests.conftest import TINY_INPUT
from tests.test_updater import assert_same, batches, changed, snapshot

NUM_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def anchored_config(**kwargs):
    kwargs = {"strategy": "anchored", "update_every": 16, "batch_size": 16, "buffer_mb": 1.0,
              "lr": 0.5, **kwargs}
    return UpdaterConfig(**kwargs)


def exit_probs(model, x):
    with torch.no_grad():
        return [F.softmax(logits, 1) for logits in model.forward_exits(x).logits]


def test_mixture_is_the_weighted_average_of_both_heads():
    torch.manual_seed(1)
    spec, frozen = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    head = AnchoredHead(spec, frozen, 0.3)
    x = torch.randn(5, 6)
    expected = 0.7 * F.softmax(frozen(x), 1) + 0.3 * F.softmax(spec(x), 1)
    torch.testing.assert_close(F.softmax(head(x), 1), expected)
    torch.testing.assert_close(head(x).exp().sum(1), torch.ones(5))  # log-probabilities
    for weight in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match="anchor weight must lie in"):
            AnchoredHead(spec, frozen, weight)


def test_anchoring_serves_the_original_distribution_until_training(base):
    model = copy.deepcopy(base)
    x = torch.randn(3, *TINY_INPUT)
    original = exit_probs(model, x)
    flops = [info["flops"] for info in model.exit_info]
    HeadUpdater(model, anchored_config())
    assert is_anchored(model) and not isinstance(model.heads[-1], AnchoredHead)
    for before, after in zip(original, exit_probs(model, x)):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    # the extra linear layer of every early head is counted, nothing else changes
    anchored = [info["flops"] for info in model.exit_info]
    extra = [a - b for a, b in zip(anchored, flops)]
    assert all(e > 0 for e in extra) and extra == sorted(extra)
    assert model.cost_profile.exit_flops() == anchored
    unanchor_heads(model)
    assert not is_anchored(model) and [i["flops"] for i in model.exit_info] == flops


def test_only_the_specialized_parts_train(base, shapes):
    model = copy.deepcopy(base)
    updater = HeadUpdater(model, anchored_config())
    check_model(model)
    before = snapshot(model)
    for batch in batches(shapes, 3):
        updater.observe(*batch)
    moved = changed(before, snapshot(model))
    assert moved and all(".spec." in key for key in moved)
    assert {int(k.split(".")[1]) for k in moved} == {0, 1, 2}
    assert not any(p.requires_grad for h in model.heads[:-1] for p in h.base.parameters())


def test_anchored_heads_are_more_cautious_than_plain_ones(base, shapes):
    """Trained alike, the mixture's confidence is never above the plain head's maximum."""
    x = torch.randn(64, *TINY_INPUT, generator=torch.Generator().manual_seed(3))
    confidences = {}
    for strategy in ("plain", "anchored"):
        model = copy.deepcopy(base)
        updater = HeadUpdater(model, anchored_config(strategy=strategy))
        for batch in batches(shapes, 4):
            updater.observe(*batch)
        confidences[strategy] = [p.amax(1) for p in exit_probs(model, x)[:-1]]
        if strategy == "anchored":
            spec_probs = []
            with torch.no_grad():
                features = model.forward_exits(x).features
                for head, f in zip(model.heads[:-1], features):
                    mix = F.softmax(head(f), 1)
                    spec, orig = F.softmax(head.spec(f), 1), F.softmax(head.base(f), 1)
                    assert bool((mix.amax(1) <= torch.maximum(spec.amax(1), orig.amax(1))
                                 + 1e-6).all())
                    spec_probs.append(spec)
            # the specialized parts trained exactly like the plain heads (same batches, seed)
            for plain, spec in zip(confidences["plain"], spec_probs):
                torch.testing.assert_close(spec.amax(1), plain, atol=1e-5, rtol=0)


def test_reset_restores_the_original_distribution_exactly(base, shapes):
    model = copy.deepcopy(base)
    x = torch.randn(8, *TINY_INPUT)
    original = exit_probs(model, x)
    updater = HeadUpdater(model, anchored_config())
    state = snapshot(model)
    for batch in batches(shapes, 3):
        updater.observe(*batch)
    assert changed(state, snapshot(model))
    updater.reset()
    assert not changed(state, snapshot(model))
    for before, after in zip(original, exit_probs(model, x)):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_anchored_state_resumes_and_plain_refuses_an_anchored_model(base, shapes):
    stream = batches(shapes, 4)
    model = copy.deepcopy(base)
    uninterrupted = HeadUpdater(model, anchored_config())
    for batch in stream:
        uninterrupted.observe(*batch)
    first = HeadUpdater(copy.deepcopy(base), anchored_config())
    for batch in stream[:2]:
        first.observe(*batch)
    file = io.BytesIO()
    torch.save(first.state_dict(), file)
    file.seek(0)
    resumed_model = copy.deepcopy(base)
    resumed = HeadUpdater(resumed_model, anchored_config())
    resumed.load_state_dict(torch.load(file, weights_only=True))
    for batch in stream[2:]:
        resumed.observe(*batch)
    assert_same(snapshot(model), snapshot(resumed_model))
    with pytest.raises(ValueError, match="anchored.*unanchor_heads"):
        HeadUpdater(resumed_model, UpdaterConfig(strategy="plain"))
    anchor_heads(resumed_model, 0.25)  # re-anchoring keeps the frozen originals
    assert_same(snapshot(model), snapshot(resumed_model))
    assert resumed_model.heads[0].weight == 0.25


def test_config_rejects_unknown_strategies_and_weights():
    with pytest.raises(ValueError, match="strategy: unknown value 'magic'; allowed: plain"):
        UpdaterConfig(strategy="magic")
    with pytest.raises(ValueError, match="anchor_weight"):
        UpdaterConfig(anchor_weight=1.0)
