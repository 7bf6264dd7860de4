import copy
import io

import pytest
import torch

from specialize.updater import HeadUpdater
from specialize.updater.prior import ClassPrior
from tests.test_updater import assert_same, batches, fast_config, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def test_counts_decay_like_one_sample_at_a_time():
    batched, single = ClassPrior(5, window=7), ClassPrior(5, window=7)
    predictions = torch.tensor([3, 1, 3, 3, 0, 4, 3])
    batched.update(predictions)
    for p in predictions:
        single.update(p.view(1))
    assert torch.allclose(batched.counts, single.counts)
    assert batched.probabilities().argmax().item() == 3
    assert float(batched.probabilities().sum()) == pytest.approx(1.0)


def test_a_uniform_prior_changes_no_label():
    prior = ClassPrior(4, window=10)
    logits = torch.randn(50, 4)
    assert torch.equal(prior.correct(logits).argmax(1), logits.argmax(1))


def test_the_prior_moves_doubtful_labels_to_the_stream_classes():
    prior = ClassPrior(10, window=1000)
    prior.update(torch.tensor([2, 5] * 200))
    doubtful = torch.zeros(1, 10)
    doubtful[0, 7] = 0.5  # slightly prefers a class the stream never showed
    doubtful[0, 5] = 0.2
    assert prior.correct(doubtful).argmax(1).item() == 5
    sure = torch.zeros(1, 10)
    sure[0, 7] = 12.0  # strong evidence still wins over the prior
    assert prior.correct(sure).argmax(1).item() == 7


def test_an_absent_class_fades_within_the_window():
    prior = ClassPrior(3, window=50)
    prior.update(torch.zeros(500, dtype=torch.long))
    prior.update(torch.ones(250, dtype=torch.long))
    p = prior.probabilities()
    assert p[0] < 1.5 * p[2]  # about as unlikely as a class never seen
    assert p[1] > 0.9


def test_prior_pseudo_labels_teach_other_targets(base, shapes):
    # a stream whose answers lean to classes 0 and 1: the prior relabels doubtful samples
    stream = batches(shapes, 8, batch=32, exit_index=torch.full((32,), 3))
    for _, _, logits, _ in stream:
        logits[:, :2] += 1.0
    plain = HeadUpdater(copy.deepcopy(base), fast_config(pseudo_label="selected"))
    prior = HeadUpdater(copy.deepcopy(base), fast_config(pseudo_label="prior"))
    for batch in stream:
        plain.observe(*batch)
        prior.observe(*batch)
    labels = [u._buffers[0].labels[: u._buffers[0].fill] for u in (plain, prior)]
    assert not torch.equal(labels[0], labels[1])
    share = [float((lab < 2).double().mean()) for lab in labels]
    assert share[1] > share[0]


def test_prior_is_saved_resumed_and_forgotten_on_reset(base, shapes):
    config = fast_config(pseudo_label="prior", prior_window=64)
    stream = batches(shapes, 6, batch=16)
    whole_model = copy.deepcopy(base)
    whole = HeadUpdater(whole_model, config)
    for batch in stream:
        whole.observe(*batch)
    first = HeadUpdater(copy.deepcopy(base), config)
    for batch in stream[:3]:
        first.observe(*batch)
    file = io.BytesIO()
    torch.save(first.state_dict(), file)
    file.seek(0)
    resumed_model = copy.deepcopy(base)
    resumed = HeadUpdater(resumed_model, config)
    resumed.load_state_dict(torch.load(file, weights_only=True))
    for batch in stream[3:]:
        resumed.observe(*batch)
    assert_same(snapshot(whole_model), snapshot(resumed_model))
    assert_same(whole.state_dict(), resumed.state_dict())
    assert whole.state_dict()["prior"]["counts"].sum() > 0
    whole.reset()
    assert whole.state_dict()["prior"]["counts"].sum() == 0
