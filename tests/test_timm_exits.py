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
