"""Small whole runs for tests: a briefly trained tiny checkpoint and a synthetic scenario.

The model trains for a few seconds on the synthetic data set, so its exits disagree in
confidence (an untrained model answers everything at one exit) and a run exercises every
part: early and late exits, head updates, drift windows.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from backbones import create_backbone
from backbones.checkpoint import save_checkpoint
from specialize.models.runtime import input_transform
from streams.datasets.synthetic import make_synthetic

DATASET_OPTIONS = {"num_classes": 10, "samples_per_class": 40, "image_size": 16}
# overrides of a small, quick run: exits spread over all four at these thresholds
RUN_OVERRIDES = ["policy.thresholds=0.4", "updater.update_every=8", "updater.batch_size=16",
                 "drift.window=40", "drift.alarm_window=30", "progress=false"]


def trained_tiny_checkpoint(path: Path, steps: int = 30, val_size: int | None = None) -> Path:
    """Train a tiny 16x16 multi-exit model on synthetic data for ``steps`` steps; save it.

    With ``val_size`` the checkpoint's recipe says that the last ``val_size`` train images
    were held out (its validation data, which a budget needs); training still sees them all,
    which a test may accept. It trains on one thread: float sums split across threads differ
    in their last bits, so the same seed gave a different model at another thread count (the
    count an earlier test or the host left set).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_tiny(path, steps, val_size)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(path: Path, steps: int, val_size: int | None) -> Path:
    torch.manual_seed(0)
    model = create_backbone("tiny_resnet", num_classes=10, in_chans=1, input_size=(1, 16, 16))
    data = make_synthetic(split="train", **DATASET_OPTIONS)
    x = input_transform(model, data)(data.images)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(data.labels), (32,), generator=generator)
        logits = model.forward_exits(x[rows]).logits
        loss = sum(F.cross_entropy(z, data.labels[rows]) for z in logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recipe = None if val_size is None else {
        "arch": "tiny_resnet", "dataset": "synthetic", "dataset_args": DATASET_OPTIONS,
        "val_size": val_size}
    return save_checkpoint(path, model.eval(), train_config=recipe)


def synthetic_scenario(path: Path, length: int = 150) -> Path:
    """Write a two-phase scenario on the synthetic data set (classes 0-3, then 5-8).

    The switch makes the drift alarm fire (and reset the heads) once after it.
    """
    phases = [{"scenario": "subset", "name": name, "classes": classes, "length": length}
              for name, classes in (("low", [0, 1, 2, 3]), ("high", [5, 6, 7, 8]))]
    scenario = {"scenario": "phases", "dataset": "synthetic", "split": "test", "seed": 0,
                "holdout_fraction": 0.25, "dataset_options": DATASET_OPTIONS, "phases": phases}
    path.write_text(yaml.safe_dump(scenario))
    return path
