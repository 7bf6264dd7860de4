import copy

import pytest
import torch

from specialize.evaluation.passes import exit_pass, rerun_heads
from specialize.updater.anchoring import anchor_heads
from tests.conftest import TINY_INPUT

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(count=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, *TINY_INPUT), generator=generator, dtype=torch.uint8)
    return images, torch.randint(0, 10, (count,), generator=generator)


def _transform(images):
    return images.float() / 255.0


def _same(a, b):
    return (torch.equal(a.confidence, b.confidence) and torch.equal(a.pred, b.pred)
            and torch.equal(a.flops, b.flops))


def test_rerun_of_changed_heads_equals_a_full_pass(base):
    model = copy.deepcopy(base).eval()
    images, labels = _images()
    before = exit_pass(model, images, labels, _transform, batch_size=16, keep_head_inputs=True)
    assert _same(rerun_heads(model, before), before)
    anchor_heads(model, 0.5)  # heads change, and so does their cost
    with torch.no_grad():
        for head in model.heads[:-1]:
            head.spec[-1].weight.add_(torch.randn_like(head.spec[-1].weight))
    full = exit_pass(model, images, labels, _transform, batch_size=16)
    rerun = rerun_heads(model, before)
    assert rerun is not None and _same(rerun, full)
    assert not torch.equal(full.flops, before.flops)  # the anchored heads' extra linear


def test_rerun_refuses_what_it_cannot_reproduce(base):
    model = copy.deepcopy(base).eval()
    images, labels = _images(8)
    plain = exit_pass(model, images, labels, _transform)
    assert rerun_heads(model, plain) is None  # no head inputs kept
    kept = exit_pass(model, images, labels, _transform, keep_head_inputs=True)
    model.heads[0] = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                         torch.nn.LazyLinear(10))
    assert rerun_heads(model, kept) is None  # the head pools differently now
