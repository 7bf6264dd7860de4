import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from backbones import create_backbone


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("timm:convnext_atto", {"input_size": (3, 32, 32)}),
        ("timm:vit_tiny_patch16_224", {"img_size": 32, "input_size": (3, 32, 32),
                                       "exit_stages": [3, 7, 11]}),
    ],
)
def test_exits_on_forward_intermediates_models(name, kwargs):
    model = create_backbone(name, num_classes=5, **kwargs).eval()
    x = torch.randn(1, *model.input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        logits = model(x)
    assert [t.shape for t in logits] == [(1, 5)] * model.num_exits
    assert model.exit_info[-1]["flops"] == counter.get_total_flops()
    with torch.no_grad():
        lazy = model.forward_exits(x, last_exit=0)
    assert len(lazy.logits) == 1 and torch.allclose(lazy.logits[0], logits[0], atol=1e-5)


def test_timm_exits_refuse_gating():
    with pytest.raises(ValueError, match="no LC-Net gates"):
        create_backbone("timm:convnext_atto", gating=True, input_size=(3, 32, 32))


LITE0 = {"num_classes": 7, "input_size": (3, 64, 64), "head_pool": [2, 2, 1],
         "exit_modules": ["blocks.2", "blocks.4", "conv_head"]}


def _lite0():
    torch.manual_seed(0)
    return create_backbone("timm:efficientnet_lite0", **LITE0).eval()


def test_exit_modules_place_exits_by_stage_name():
    model = _lite0()
    assert model.staged
    assert [info["module"] for info in model.exit_info] == LITE0["exit_modules"]
    assert [info["num_chs"] for info in model.exit_info] == [40, 112, 1280]
    assert model.heads[0][0].output_size == 2 and model.heads[2][0].output_size == 1
    x = torch.randn(2, *model.input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert model.exit_info[-1]["flops"] * 2 == counter.get_total_flops()


@pytest.mark.parametrize("name", ["timm:efficientnet_lite0", "timm:resnet10t",
                                  "timm:convnext_atto"])
def test_staged_families_compute_nothing_beyond_the_exit_asked_for(name):
    model = create_backbone(name, num_classes=5, input_size=(3, 32, 32)).eval()
    assert model.staged
    last_stage = model.stages[-1][0]
    calls = []
    last_stage.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model.forward_exits(torch.randn(1, 3, 32, 32), last_exit=0)
    assert calls == []
    with torch.no_grad():
        full = model(torch.randn(1, 3, 32, 32))
    assert calls == [1] and len(full) == model.num_exits


def test_staged_model_serves_through_the_executor():
    from backbones.executor import DynamicExecutor, reference_result

    model = _lite0()
    executor = DynamicExecutor(model)
    x = torch.randn(6, *model.input_size)
    with torch.no_grad():
        confidences = torch.stack([z.softmax(1).amax(1) for z in model(x)], 1)
    middle = confidences[:, 0].sort().values[2:4]
    threshold = float(middle.mean())  # half answer at exit 0, no confidence near the threshold
    batched = executor.run(x, threshold)
    reference = reference_result(model, x, threshold)
    assert torch.equal(batched.exit_index, reference.exit_index)
    assert torch.equal(batched.flops, reference.flops)
    assert torch.allclose(batched.logits, reference.logits, atol=1e-4)
    assert [len(rows) for rows in batched.evaluated][1] < 6  # compaction: fewer rows go on
    for i in range(6):
        with FlopCounterMode(display=False) as counter:
            single = executor.run(x[i:i + 1], threshold)
        assert counter.get_total_flops() == int(single.flops)
        assert int(single.exit_index) == int(reference.exit_index[i])


def test_unstaged_models_refuse_exit_modules_and_the_executor():
    from backbones.executor import DynamicExecutor

    kwargs = {"img_size": 32, "input_size": (3, 32, 32)}
    with pytest.raises(ValueError, match="exit_stages"):
        create_backbone("timm:vit_tiny_patch16_224", exit_modules=["blocks.3"], **kwargs)
    model = create_backbone("timm:vit_tiny_patch16_224", exit_stages=[3, 11], **kwargs).eval()
    assert not model.staged
    with pytest.raises(NotImplementedError, match="reference path"):
        DynamicExecutor(model)


def test_exit_module_errors_name_the_choices():
    with pytest.raises(ValueError, match="blocks.0, blocks.1"):
        create_backbone("timm:efficientnet_lite0", input_size=(3, 32, 32),
                        exit_modules=["blocks.4", "blocks.2"])
    with pytest.raises(ValueError, match="not both"):
        create_backbone("timm:efficientnet_lite0", input_size=(3, 32, 32),
                        exit_modules=["blocks.2"], exit_stages=[2])
    with pytest.raises(ValueError, match="head_pool has 2 entries for 3 exits"):
        create_backbone("timm:efficientnet_lite0", input_size=(3, 32, 32),
                        exit_modules=["blocks.2", "blocks.4", "conv_head"], head_pool=[1, 2])


def test_preprocessing_is_recorded_for_the_stream():
    model = create_backbone("timm:efficientnet_lite0", input_size=(3, 32, 32),
                            input_mean=[0.5] * 3, input_std=[0.5] * 3, interpolation="bicubic")
    assert model.preprocessing == {"mean": (0.5,) * 3, "std": (0.5,) * 3,
                                   "interpolation": "bicubic"}
    assert create_backbone("timm:resnet10t", input_size=(3, 32, 32)).preprocessing is None
