import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backbones import create_backbone
from backbones.checkpoint import read_checkpoint
from backbones.train import (
    NonFiniteLossError,
    TrainConfig,
    augment_batch,
    gate_l1,
    lr_factor,
    train,
    training_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")



@dataclass
class Data:
    """The duck-typed data train() needs (what streams.datasets.ArrayDataset provides)."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple = (0.5,)
    std: tuple = (0.25,)


def make_data(n=128, seed=0, classes=4):
    """Learnable 16x16 images: a bright horizontal band per class (flip-invariant), noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 90, (n, 1, 16, 16), generator=g)
    for c in range(classes):
        images[labels == c, :, 4 * c:4 * c + 4, :] += 150
    return Data(images.clamp(0, 255).to(torch.uint8), labels)


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_backbone("tiny_resnet", num_classes=4, input_size=(1, 16, 16), **kwargs)


def config(**kwargs):
    defaults = {"epochs": 2, "batch_size": 32, "lr": 0.1, "gate_lr": 0.05, "crop_padding": 0,
                "hflip": False, "eval_batch_size": 64, "warmup_epochs": 0.5}
    return TrainConfig(**{**defaults, **kwargs})


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_augment_batch_is_seeded_and_keeps_shapes():
    images = make_data(16).images
    a, b = (augment_batch(images, crop_padding=3, hflip=True,
                          generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, images)
    same = augment_batch(images, crop_padding=0, hflip=False, generator=torch.Generator())
    assert torch.equal(same, images)
    # A crop of a padded image: every output pixel is an input pixel or padding (zero).
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4)
    out = augment_batch(x, crop_padding=1, hflip=False, generator=torch.Generator().manual_seed(0))
    assert set(out.flatten().tolist()) <= set(range(0, 17))
    flipped = augment_batch(x.expand(64, 1, 4, 4), crop_padding=0, hflip=True,
                            generator=torch.Generator().manual_seed(0))
    n_flipped = sum(torch.equal(f, x[0].flip(2)) for f in flipped)
    assert 16 < n_flipped < 48


def test_lr_schedules():
    def factors(cfg, total=100, per_epoch=10):
        return [lr_factor(s, total_steps=total, steps_per_epoch=per_epoch, config=cfg)
                for s in range(total)]

    cosine = factors(config(warmup_epochs=1.0))
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[10] == pytest.approx(1.0) and cosine[-1] < 0.001
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    step = factors(config(schedule="step", warmup_epochs=0.0, step_milestones=[0.5, 0.8]))
    assert step[49] == 1.0 and step[50] == pytest.approx(0.1) and step[80] == pytest.approx(0.01)
    assert set(factors(config(schedule="constant", warmup_epochs=0))) == {1.0}


def test_loss_parts_and_l1_normalisation():
    model = tiny()
    x = torch.randn(6, 1, 16, 16)
    out = model.forward_exits(x)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    count = sum(g.block_salience.numel() + g.channel_salience.numel() for g in out.gates)
    total = sum(g.block_salience.abs().sum() + g.channel_salience.abs().sum() for g in out.gates)
    torch.testing.assert_close(gate_l1(out.gates), total / count)
    base, parts = training_loss(out.logits, out.gates, labels, config())
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(base, sum(ce(z, labels) for z in out.logits))  # weighted sum
    with_l1, _ = training_loss(out.logits, out.gates, labels, config(l1_weight=2.0))
    torch.testing.assert_close(with_l1 - base, 2.0 * parts["l1"])
    distilled, parts = training_loss(out.logits, out.gates, labels, config(distill_weight=1.0))
    assert parts["distill"] > 0 and distilled > base
    only_last, _ = training_loss(out.logits, out.gates, labels, config(exit_weights=[0, 0, 0, 1]))
    torch.testing.assert_close(only_last, ce(out.logits[-1], labels))
    with pytest.raises(ValueError, match="exit_weights has 2 values"):
        training_loss(out.logits, out.gates, labels, config(exit_weights=[1, 1]))


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    assert TrainConfig(step_milestones=[1, 2]).step_milestones == (1.0, 2.0)
    assert TrainConfig().fingerprint() == TrainConfig(num_threads=2).fingerprint()
    assert TrainConfig().fingerprint() != TrainConfig(l1_weight=0.1).fingerprint()


def test_training_lowers_the_loss_and_reports_every_exit(tmp_path):
    data, held_out = make_data(128), make_data(64, seed=1)
    model = tiny()
    result = train(model, data, held_out, config(epochs=3), checkpoint_path=tmp_path / "m.pt",
                   progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.15
    assert result.history[-1]["train_accuracy"] > 0.8
    metrics = result.metrics
    assert len(metrics["exit_accuracy"]) == model.num_exits == len(metrics["exit_flops"])
    assert all(0 <= a <= 1 for a in metrics["exit_accuracy"]) and metrics["eval_size"] == 64
    assert metrics["exit_flops_open"] == [info["flops"] for info in model.exit_info]
    assert all(0 < f <= o for f, o in zip(metrics["exit_flops"], metrics["exit_flops_open"]))
    assert 0 <= metrics["skipped_blocks"] <= 1 and 0 <= metrics["skipped_channels"] <= 1
    assert result.epochs_completed == 3 and result.checkpoint_path == tmp_path / "m.pt"
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt["epoch"] == 3 and ckpt["metrics"]["exit_accuracy"] == metrics["exit_accuracy"]
    assert ckpt["train_config"]["epochs"] == 3 and len(ckpt["history"]) == 3
    assert ckpt["data"]["mean"] == [0.5]


def test_l1_pushes_gate_values_down():
    data = make_data(128)
    probe = make_data(32, seed=2)

    def mean_gate(l1_weight):
        model = tiny()
        train(model, data, None, config(epochs=2, l1_weight=l1_weight, gate_lr=0.2),
              progress=False)
        model.train()  # leaky ReLU-1: the values the penalty sees
        with torch.no_grad():
            return float(gate_l1(model.forward_exits((probe.images.float() / 255 - 0.5) / 0.25)
                                 .gates))

    assert mean_gate(5.0) < mean_gate(0.0) - 0.1


def test_l1_shuts_gates_and_saves_flops():
    data = make_data(128)
    model = tiny()
    result = train(model, data, data, config(epochs=3, l1_weight=20.0, gate_lr=0.5),
                   progress=False)
    metrics = result.metrics
    assert metrics["skipped_channels"] > 0.2
    assert metrics["exit_flops"][-1] < metrics["exit_flops_open"][-1]


def test_resume_equals_uninterrupted(tmp_path):
    data, held_out = make_data(96), make_data(32, seed=1)
    cfg = config(epochs=2, l1_weight=1.0, distill_weight=0.5, label_smoothing=0.1,
                 crop_padding=2, hflip=True)
    whole = tiny()
    full = train(whole, data, held_out, cfg, progress=False)

    first = tiny()
    train(first, data, held_out, cfg, checkpoint_path=tmp_path / "m.pt", progress=False,
          stop_after_epoch=1)
    assert read_checkpoint(tmp_path / "m.pt")["epoch"] == 1
    resumed_model = tiny(seed=123)  # weights come from the checkpoint
    resumed = train(resumed_model, data, held_out, cfg, checkpoint_path=tmp_path / "m.pt",
                    resume_from=tmp_path / "m.pt", progress=False)
    assert states_equal(whole, resumed_model)
    assert resumed.epochs_completed == 2
    strip = ("train_time_s", "eval_time_s")
    assert [{k: v for k, v in h.items() if k not in strip} for h in full.history] == \
        [{k: v for k, v in h.items() if k not in strip} for h in resumed.history]
    with pytest.raises(ValueError, match="differs in lr"):
        train(tiny(), data, None, dataclasses.replace(cfg, lr=0.5), resume_from=tmp_path / "m.pt",
              progress=False)


class NaNAfter:
    """A transform that starts returning NaN after ``calls`` batches."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, images):
        self.calls -= 1
        x = (images.float() / 255 - 0.5) / 0.25
        return x * float("nan") if self.calls < 0 else x


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_data(64)
    path = tmp_path / "m.pt"
    model = tiny()
    steps_per_epoch = 64 // 32
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2/2.*m\.pt \(epoch 1\)"):
        train(model, data, None, config(epochs=3), checkpoint_path=path,
              transform=NaNAfter(steps_per_epoch + 1), progress=False)
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
               if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not taken
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        train(tiny(), data, None, config(), transform=NaNAfter(0), progress=False)


def test_pretrained_backbone_initialises_a_gated_model(tmp_path):
    data = make_data(64)
    plain = tiny(gating=False)
    train(plain, data, None, config(epochs=1), checkpoint_path=tmp_path / "plain.pt",
          progress=False)
    gated = tiny(seed=9)
    cfg = config(epochs=1, init_checkpoint=str(tmp_path / "plain.pt"))
    train(gated, data, None, cfg, progress=False, stop_after_epoch=0)  # load, train nothing
    state = {k: v.clone() for k, v in gated.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    x = (data.images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():  # gates start (nearly) open: the gated model computes what the plain
        # one does, up to the gates' small random weights
        torch.testing.assert_close(gated.eval()(x)[-1], plain.eval()(x)[-1], rtol=0.02, atol=1e-3)
    train(gated, data, None, cfg, progress=False)
    assert not torch.equal(gated.state_dict()["heads.3.2.weight"], state["heads.3.2.weight"])


def test_bad_data_is_refused():
    data = make_data(16)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(tiny(), data, None, config(batch_size=32), progress=False)
    bad = Data(data.images, data.labels + 4)
    with pytest.raises(ValueError, match="num_classes=8"):
        train(tiny(), bad, None, config(batch_size=8), progress=False)


# ------------------------------------------------------------------------------------ DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny(seed=rank)  # different inits: DDP must broadcast rank 0's
        result = train(model, make_data(64), make_data(32, seed=1), config(epochs=2),
                       checkpoint_path=Path(out_dir) / f"rank{rank}.pt", progress=False)
        torch.save({"state": model.state_dict(), "metrics": result.metrics,
                    "losses": [h["train_loss"] for h in result.history]},
                   Path(out_dir) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes(tmp_path):
    start = time.perf_counter()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert r0["metrics"]["exit_accuracy"] == r1["metrics"]["exit_accuracy"]
    assert r0["metrics"]["eval_size"] == 32
    assert r0["losses"] == r1["losses"] and r0["losses"][-1] < r0["losses"][0]
    assert (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------------------- CLI and zoo


SYNTHETIC_CONFIG = """
arch: tiny_resnet
dataset: synthetic
dataset_args: {num_classes: 4, samples_per_class: 16, image_size: 16}
epochs: 1
batch_size: 32
eval_batch_size: 64
l1_weight: 1.0
"""


def test_cli_train_and_default_checkpoint_cache(tmp_path, monkeypatch, capsys):
    from specialize.cli import main
    from specialize.models import zoo

    monkeypatch.setenv("SPECIALIZE_CACHE", str(tmp_path / "cache"))
    cfg_path = tmp_path / "synthetic_tiny.yaml"
    cfg_path.write_text(SYNTHETIC_CONFIG)
    out = tmp_path / "m.pt"
    assert main(["train", str(cfg_path), "seed=1", "--out", str(out), "--no-progress",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint"] == str(out) and summary["epochs"] == 1
    assert len(summary["exit_accuracy"]) == 4 and summary["exit_flops"][-1] > 0
    assert read_checkpoint(out)["train_config"]["seed"] == 1
    assert main(["train", str(cfg_path), "seed=2", "--out", str(out), "--no-progress"]) == 2
    assert "another config" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="specialize train"):
        zoo.default_checkpoint(cfg_path, train_if_missing=False)
    path = zoo.default_checkpoint(cfg_path, progress=False)
    assert path.parent == tmp_path / "cache" / "backbones" and path.name.startswith("synthetic")
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(zoo, "train_from_config", lambda *a, **k: pytest.fail("retrained"))
    assert zoo.default_checkpoint(cfg_path, progress=False) == path
    assert path.stat().st_mtime_ns == stamp
    assert zoo.default_checkpoint(cfg_path, overrides=["num_threads=1"]) == path
    assert zoo.cache_path(zoo.load_train_config(cfg_path, ["l1_weight=2"]), "x").name != \
        zoo.cache_path(zoo.load_train_config(cfg_path), "x").name


def test_default_configs_load():
    from specialize.models.zoo import DEFAULT_CONFIG, load_train_config

    gated = load_train_config(DEFAULT_CONFIG)
    ungated = load_train_config(DEFAULT_CONFIG.with_name("fashion_mnist_tiny_ungated.yaml"))
    assert gated.arch == ungated.arch == "tiny_resnet"
    assert gated.gating and not ungated.gating and gated.gate_mode == "parallel"
    assert gated.fingerprint() != ungated.fingerprint()
    assert math.isclose(gated.lr, ungated.lr) and gated.epochs == ungated.epochs
