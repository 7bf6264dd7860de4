from pathlib import Path

import pytest
import torch

from backbones import create_backbone
from backbones.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")



def tiny(**kwargs):
    torch.manual_seed(kwargs.pop("seed", 0))
    kwargs.setdefault("num_classes", 4)
    kwargs.setdefault("input_size", (kwargs.get("in_chans", 1), 16, 16))
    return create_backbone(kwargs.pop("arch", "tiny_resnet"), **kwargs)


def warmed(model):
    """Move BatchNorm statistics and gates away from their initial values."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *model.input_size, generator=torch.Generator().manual_seed(1)))
        for p in model.gate_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_round_trip_is_exact(tmp_path):
    model = warmed(tiny())
    path = save_checkpoint(tmp_path / "m.pt", model, train_config={"lr": 0.1},
                           metrics={"exit_accuracy": [0.5] * 4}, epoch=3,
                           data={"name": "synthetic/train", "mean": [0.5], "std": [0.2]})
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(model.forward_exits(x).logits, loaded.forward_exits(x).logits):
            assert torch.equal(a, b)
    assert meta["arch"] == "tiny_resnet" and meta["epoch"] == 3
    assert meta["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert meta["build_args"] == model.build_args
    assert meta["train_config"] == {"lr": 0.1} and meta["path"] == str(path)
    assert "state_dict" not in meta and "optimizer" not in meta
    assert create_backbone(meta["arch"], **meta["build_args"]).exit_info == model.exit_info


def test_round_trip_of_ungated_and_sequential_models(tmp_path):
    for kwargs in ({"gating": False}, {"gate_mode": "sequential"},
                   {"arch": "tiny_resnet_bottleneck", "exit_stages": [1, 3]}):
        model = warmed(tiny(**kwargs))
        loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
        assert loaded.gating == model.gating and loaded.gate_mode == model.gate_mode
        assert loaded.exit_stages == model.exit_stages
        assert all(torch.equal(a, b) for a, b in
                   zip(model.state_dict().values(), loaded.state_dict().values()))


def test_write_is_atomic(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.pt", tiny(), epoch=1)
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny(seed=1), epoch=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_num_classes_and_in_chans_must_match(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny())
    with pytest.raises(CheckpointError, match=r"num_classes=4.*num_classes=10"):
        load_checkpoint(path, num_classes=10)
    with pytest.raises(CheckpointError, match=r"in_chans=1.*in_chans=3"):
        load_checkpoint(path, in_chans=3)
    model, _ = load_checkpoint(path, num_classes=4, in_chans=1)
    assert model.num_classes == 4
    with pytest.raises(CheckpointError, match=r"num_classes=4.*num_classes=7"):
        load_weights(tiny(num_classes=7), path)


def test_loading_another_architecture_into_a_model(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny(arch="tiny_resnet_bottleneck"))
    with pytest.raises(CheckpointError, match="'tiny_resnet_bottleneck'.*'tiny_resnet'"):
        load_weights(tiny(), path)
    other = save_checkpoint(tmp_path / "o.pt", tiny(head="pool_mlp"))
    with pytest.raises(CheckpointError, match=r"another architecture.*head: checkpoint 'pool_mlp'"):
        load_weights(tiny(), other)


def test_gates_may_be_missing_when_asked(tmp_path):
    plain = warmed(tiny(gating=False))
    path = save_checkpoint(tmp_path / "plain.pt", plain)
    gated = tiny(seed=5)
    gate_before = {k: v.clone() for k, v in gated.state_dict().items() if ".gate." in k}
    with pytest.raises(CheckpointError, match="allow_missing_gates=True"):
        load_weights(gated, path)
    load_weights(gated, path, allow_missing_gates=True)
    state = gated.state_dict()
    assert all(torch.equal(state[k], v) for k, v in gate_before.items())
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    # Gates at their initial (open) state: the gated model computes what the plain one does.
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(gated.eval()(x)[-1], plain(x)[-1], rtol=1e-5, atol=1e-5)


def test_truncated_or_corrupt_files_say_what_to_do(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.pt.*truncated or corrupt.*specialize train"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"m\.pt.*re-run `specialize train`"):
        read_checkpoint(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a backbone checkpoint"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="specialize train"):
        load_checkpoint(tmp_path / "missing.pt")


def test_newer_format_and_foreign_objects_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny())
    ckpt = torch.load(path, weights_only=True)
    ckpt["format_version"] = CHECKPOINT_FORMAT_VERSION + 1
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="newer"):
        read_checkpoint(path)
    ckpt["format_version"] = CHECKPOINT_FORMAT_VERSION
    ckpt["data"] = Path("/somewhere")  # a pickled Python object, not plain data
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(path)
