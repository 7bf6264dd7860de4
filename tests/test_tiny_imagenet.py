import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from streams.datasets import DataFormatError, load_dataset
from streams.datasets.tiny_imagenet import (
    TINY_IMAGENET_ENV,
    find_tiny_imagenet,
    load_tiny_imagenet,
)

WNIDS = ["n02", "n01", "n03"]  # sorted: n01 -> 0, n02 -> 1, n03 -> 2
NUMBERS = [0, 1, 229, 230, 249, 250, 399]
REPO = Path(__file__).resolve().parents[1]


def _jpeg(value: int, mode: str = "RGB") -> bytes:
    image = Image.new(mode, (64, 64), value if mode == "L" else (value, 0, 255 - value))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def _files() -> dict[str, bytes]:
    files = {
        "wnids.txt": "\n".join(WNIDS).encode(),
        "words.txt": b"n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\n"
                     b"n03\tbus\nn99\tunused\n",
    }
    for k, wnid in enumerate(sorted(WNIDS)):
        for n in NUMBERS:
            mode = "L" if (k, n) == (1, 0) else "RGB"  # one greyscale image
            files[f"train/{wnid}/images/{wnid}_{n}.JPEG"] = _jpeg(10 * k + n % 7, mode)
        files[f"train/{wnid}/{wnid}_boxes.txt"] = b""
    lines = []
    for v in range(6):
        wnid = sorted(WNIDS)[v % 3]
        files[f"val/images/val_{v}.JPEG"] = _jpeg(200 + v)
        lines.append(f"val_{v}.JPEG\t{wnid}\t0\t0\t63\t63")
    files["val/val_annotations.txt"] = "\n".join(lines).encode()
    return files


@pytest.fixture
def tiny_zip(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in _files().items():
            archive.writestr(f"tiny-imagenet-200/{name}", data)
    return path


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    root = tmp_path / "extracted" / "tiny-imagenet-200"
    for name, data in _files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize(("split", "numbers"), [
    ("train", NUMBERS), ("exits", [0, 1, 229, 230, 249]), ("exits_fit", [0, 1, 229]),
    ("exits_val", [230, 249]), ("exits_fit150", [0, 1]), ("exits_val100", [229, 230, 249]),
])
def test_train_splits_follow_file_numbers(tiny_zip, split, numbers):
    data = load_tiny_imagenet(tiny_zip, split=split)
    assert data.labels.tolist() == [k for k in range(3) for _ in numbers]
    assert data.images.shape == (3 * len(numbers), 3, 64, 64)
    assert data.images.dtype == torch.uint8
    assert data.name == f"tiny_imagenet/{split}"


def test_pool_is_the_rest_of_train_plus_val(tiny_zip):
    pool = load_tiny_imagenet(tiny_zip, split="pool")
    val = load_tiny_imagenet(tiny_zip, split="val")
    assert len(pool) == 3 * 2 + 6
    assert pool.labels.tolist() == [0, 0, 1, 1, 2, 2] + val.labels.tolist()
    assert val.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(pool.images[6:], val.images)


def test_class_index_is_sorted_wnid_and_names_come_from_words(tiny_zip):
    data = load_tiny_imagenet(tiny_zip, split="val")
    assert data.class_names == ("goldfish", "tabby", "bus")
    assert data.class_ids == ("n01", "n02", "n03")
    assert data.num_classes == 3


def test_greyscale_becomes_rgb(tiny_zip):
    data = load_tiny_imagenet(tiny_zip, split="train")
    grey = data.images[len(NUMBERS)]  # class 1, file 0
    assert grey.shape == (3, 64, 64)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_zip_and_folder_read_the_same(tiny_zip, tiny_folder):
    for split in ("exits", "pool"):
        a = load_tiny_imagenet(tiny_zip, split=split)
        b = load_tiny_imagenet(tiny_folder.parent, split=split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_location_from_environment(tiny_zip, monkeypatch):
    monkeypatch.setenv(TINY_IMAGENET_ENV, str(tiny_zip.parent))
    assert find_tiny_imagenet() == tiny_zip
    assert len(load_dataset("tiny_imagenet", split="val")) == 6


def test_missing_data_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.delenv(TINY_IMAGENET_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=TINY_IMAGENET_ENV):
        load_tiny_imagenet(tmp_path / "nowhere", split="val")


def test_unknown_split_lists_the_allowed(tiny_zip):
    with pytest.raises(ValueError, match="exits_fit"):
        load_tiny_imagenet(tiny_zip, split="test")


def test_corrupt_image_is_a_data_format_error(tmp_path):
    files = _files()
    files["val/images/val_3.JPEG"] = b"not a jpeg"
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"tiny-imagenet-200/{name}", data)
    with pytest.raises(DataFormatError, match="decode"):
        load_tiny_imagenet(path, split="val")


def _shared_zip() -> Path | None:
    path = os.environ.get(TINY_IMAGENET_ENV)
    return Path(path) if path and Path(path).exists() else None


@pytest.mark.tiny_imagenet
@pytest.mark.skipif(_shared_zip() is None,
                    reason=f"real Tiny-ImageNet absent: set {TINY_IMAGENET_ENV} to the zip")
def test_real_archive_has_the_documented_splits():
    data = load_tiny_imagenet(_shared_zip(), split="exits_val")
    assert len(data) == 200 * 20
    assert np.array_equal(data.class_counts().numpy(), np.full(200, 20))
    assert data.class_names[24] == "Chihuahua"


@pytest.mark.tiny_imagenet
@pytest.mark.skipif(_shared_zip() is None,
                    reason=f"real Tiny-ImageNet absent: set {TINY_IMAGENET_ENV} to the zip")
def test_small_end_to_end_run_on_the_shared_data(tmp_path, one_thread):
    """Prepare a small Lite0 with exits (64 px, 8 images a class), then specialize on dogs."""
    from specialize.cli import main

    checkpoint = tmp_path / "lite0.pt"
    config = REPO / "configs" / "backbones" / "tiny_imagenet_lite0.yaml"
    small = ["per_class_limit=8", "model_args.input_size=[3,64,64]", "epochs=2", "lrs=[0.003]",
             "num_threads=1", f"data_root={_shared_zip()}"]
    assert main(["train", str(config), *small, "--out", str(checkpoint), "--no-progress"]) == 0
    scenario = REPO / "configs" / "scenarios" / "tiny-imagenet" / "dogs.yaml"
    out = tmp_path / "run"
    assert main(["run", str(scenario), f"model.checkpoint={checkpoint}", "length=120",
                 "eval_out_per_class=1", "policy.thresholds=0.3", "updater.update_every=16",
                 "updater.batch_size=32", "progress=false", f"out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["stream"]["specializing"]["exit_histogram"]) == 120
    assert summary["updater"]["updates"] > 0 and summary["updater"]["error"] is None
    assert summary["model"]["trained_on"] == ["tiny_imagenet/exits_fit150",
                                              "tiny_imagenet/exits_val100"]
    assert summary["model"]["stream_shares_training_images"] is False
    assert "no stream or held-out sample is one of them" in (out / "report.md").read_text()


def test_the_two_divisions_of_the_exit_images_share_exactly_what_they_should():
    from streams.datasets import shares_images

    assert not shares_images("tiny_imagenet", "exits_fit150", "exits_val100")
    assert not shares_images("tiny_imagenet", "pool", "exits_val100")
    assert shares_images("tiny_imagenet", "exits_fit", "exits_val100")  # images 150-229
    assert shares_images("tiny_imagenet", "exits_val", "exits_val100")
    assert not shares_images("tiny_imagenet", "exits_fit150", "exits_val")
