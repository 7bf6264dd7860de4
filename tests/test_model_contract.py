"""The multi-exit model contract, run over every registered backbone plus one timm model.

One model per name, built tiny and shared by the checks (timm's tests/test_models.py does the
same over its registry). A backbone registered later is covered without editing this file;
give it tiny arguments in TINY_ARGS if its defaults are large.
"""

import copy

import pytest
import torch

from backbones import MultiExitModel, check_multi_exit_model, list_backbones
from backbones.contract import EXIT_INFO_KEYS
from tests.conftest import tiny_model
from tests.test_multi_exit import _counted_flops

# timm ResNet-family backbones at CIFAR-style stride 1 with narrow stages (ResNeXt's grouped
# width needs planes >= 16); inputs are tiny_model's 1x16x16.
_TIMM_RESNET = {"small_input": True, "channels": (16, 32, 64, 128), "stem_width": 16}
TINY_ARGS = {
    "resnet18": _TIMM_RESNET,
    "resnet34": _TIMM_RESNET,
    "resnet50": _TIMM_RESNET,
    "wide_resnet50_2": _TIMM_RESNET,
    "resnext50_32x4d": _TIMM_RESNET,
    "timm:resnet10t": {"input_size": (3, 32, 32), "num_classes": 5},
}
NAMES = [*list_backbones(), "timm:resnet10t"]
BATCH = 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(one_thread):
    """Build each model once, on first use (one torch thread: these tensors are small)."""
    built = {}

    def get(name: str):
        if name not in built:
            torch.manual_seed(0)
            built[name] = tiny_model(name, **TINY_ARGS.get(name, {}))
        return built[name]

    return get


@pytest.fixture(params=NAMES)
def model(request, models):
    return models(request.param)


def _inputs(model) -> torch.Tensor:
    return torch.randn(BATCH, *model.input_size)


def test_every_registered_backbone_is_covered():
    assert set(list_backbones()) <= set(NAMES)
    assert any(name.startswith("timm:") for name in NAMES)


def test_keeps_the_protocol(model):
    assert isinstance(model, MultiExitModel)
    check_multi_exit_model(model)
    assert model.num_exits == len(model.heads) == len(model.exit_info)
    assert isinstance(model.heads, torch.nn.ModuleList)
    for info in model.exit_info:
        assert set(EXIT_INFO_KEYS) <= set(info)
    flops = [info["flops"] for info in model.exit_info]
    assert flops == sorted(flops) and flops[0] > 0


def test_last_exit_flops_equal_the_flop_counter(model):
    # The reference forward computes every block and multiplies by the gate outputs, so what
    # FlopCounterMode counts is the cost with every gate open.
    x = torch.randn(1, *model.input_size)
    assert model.exit_info[-1]["flops"] == _counted_flops(lambda: model(x))


def test_forward_exits_stops_at_the_exit_asked_for(model):
    x = _inputs(model)
    with torch.no_grad():
        for k in range(model.num_exits):
            logits = model.forward_exits(x, last_exit=k).logits
            assert [z.shape for z in logits] == [(BATCH, model.num_classes)] * (k + 1)
        full = model(x)
    assert isinstance(full, list) and len(full) == model.num_exits


def test_iter_exits_yields_one_more_exit_per_step(model):
    x = _inputs(model)
    with torch.no_grad():
        reference = model.forward_exits(x)
        steps = []
        for out in model.iter_exits(x):
            steps.append(len(out.logits))
    assert steps == list(range(1, model.num_exits + 1))
    assert len(out.features) == model.num_exits
    for lazy, full in zip(out.logits, reference.logits):
        assert torch.allclose(lazy, full, atol=1e-5)


def test_refresh_cost_profile_keeps_exit_info_flops(model):
    before = [dict(info) for info in model.exit_info]
    profile = model.cost_profile
    model.refresh_cost_profile()
    assert model.exit_info == before
    assert model.cost_profile == profile


def test_check_says_what_to_fix(models):
    with pytest.raises(TypeError, match="nn.Module.*create_backbone"):
        check_multi_exit_model(object())
    with pytest.raises(TypeError, match="lacks .*heads"):
        check_multi_exit_model(torch.nn.Linear(2, 2))
    model = copy.deepcopy(models("tiny_resnet"))
    del model.exit_info[-1]
    with pytest.raises(ValueError, match="exit_info .* must agree"):
        check_multi_exit_model(model)
