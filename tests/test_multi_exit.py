import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from backbones import create_backbone, list_backbones
from backbones.cost import flops_at_exits, flops_per_sample
from tests.conftest import randomize_gates, tiny_model


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("tiny_resnet", {}),
        ("tiny_resnet", {"gating": False}),
        ("tiny_resnet_bottleneck", {}),
        ("tiny_resnet", {"head": "pool_mlp"}),
        ("tiny_resnet", {"head": "conv_pool_fc", "head_hidden": 16}),
        ("tiny_resnet", {"exit_stages": [1, 3]}),
        ("tiny_resnet", {"head_pool": 4}),
        ("resnet18", {"small_input": True, "input_size": (3, 32, 32)}),
        ("resnet50", {"input_size": (3, 64, 64)}),
    ],
)
def test_full_path_flops_equal_flop_counter(name, kwargs):
    model = tiny_model(name, **kwargs)
    x = torch.randn(1, *model.input_size)
    assert model.exit_info[-1]["flops"] == _counted_flops(lambda: model(x))


def test_exit_info_matches_lazy_forward_flops_and_shapes():
    model = tiny_model()
    x = torch.randn(1, *model.input_size)
    for k, info in enumerate(model.exit_info):
        out = model.forward_exits(x, last_exit=k)
        assert len(out.logits) == k + 1
        assert out.features[-1].shape[1] == info["num_chs"]
        assert _counted_flops(lambda k=k: model.forward_exits(x, last_exit=k)) == info["flops"]


def test_lazy_forward_stops_after_the_requested_exit():
    model = tiny_model()
    ran = []
    for index, stage in enumerate(model.stages):
        stage[0].conv1.register_forward_pre_hook(lambda *_, index=index: ran.append(index))
    with torch.no_grad():
        model.forward_exits(torch.randn(2, *model.input_size), last_exit=1)
    assert ran == [0, 1]


def test_forward_returns_every_exit_and_matches_lazy_logits():
    model = tiny_model()
    x = torch.randn(3, *model.input_size)
    with torch.no_grad():
        full = model(x)
        lazy = model.forward_exits(x, last_exit=2).logits
    assert len(full) == model.num_exits == 4
    for a, b in zip(full[:3], lazy):
        assert torch.equal(a, b)


def test_gated_flops_are_monotone_and_bounded_by_the_open_path():
    model = tiny_model()
    randomize_gates(model, seed=3)
    with torch.no_grad():
        out = model.forward_exits(torch.randn(8, *model.input_size))
    table = flops_at_exits(model.cost_profile, out.gates, model.gate_mode, 8)
    open_flops = torch.tensor([info["flops"] for info in model.exit_info])
    assert (table <= open_flops).all()
    assert (table[:, 1:] >= table[:, :-1]).all()
    assert (table[:, -1] < open_flops[-1]).any(), "random gates should skip something"


def test_sequential_mode_is_never_more_expensive_than_parallel():
    parallel = tiny_model(gate_mode="parallel")
    sequential = tiny_model(gate_mode="sequential")
    sequential.load_state_dict(parallel.state_dict())
    randomize_gates(parallel, seed=1)
    randomize_gates(sequential, seed=1)
    x = torch.randn(6, *parallel.input_size)
    with torch.no_grad():
        gates_p = parallel.forward_exits(x).gates
        gates_s = sequential.forward_exits(x).gates
    exits = torch.full((6,), 3)
    sequential_flops = flops_per_sample(sequential, gates_s, exits)
    assert (sequential_flops <= flops_per_sample(parallel, gates_p, exits)).all()


def test_gating_off_has_no_gates_and_open_flops():
    model = tiny_model(gating=False)
    assert not model.gating and model.gate_parameters() == []
    with torch.no_grad():
        out = model.forward_exits(torch.randn(2, *model.input_size))
    assert out.gates == []
    flops = flops_per_sample(model, out.gates, torch.tensor([0, 3]))
    assert flops.tolist() == [model.exit_info[0]["flops"], model.exit_info[3]["flops"]]


def test_registry_lists_and_rejects_unknown_names():
    assert {"tiny_resnet", "resnet18", "resnet50"} <= set(list_backbones())
    with pytest.raises(ValueError, match="known backbones: .*tiny_resnet"):
        create_backbone("resnet9000")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit_stages": [2, 1]}, "sorted and unique"),
        ({"exit_stages": [4]}, r"\[0, 3\]"),
        ({"gate_mode": "diagonal"}, "gate_mode"),
        ({"head": "transformer"}, "unknown head kind"),
        ({"input_size": (3, 16, 16), "in_chans": 1}, "in_chans"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)
