"""Readers (IDX, CIFAR-10 binary, image folder, synthetic), ArrayDataset and InputTransform."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from streams.datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    DataFormatError,
    download,
    download_fashion_mnist,
    fashion_mnist,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    make_synthetic,
    read_idx,
)
from streams.transforms import InputTransform

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
HAS_FMNIST = all(
    (FMNIST_ROOT / f"{prefix}-{kind}.gz").is_file()
    for prefix in ("train", "t10k")
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_fmnist(root: Path, *, n: int = 20, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        arrays[prefix] = (images, labels)
    return arrays


# --------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, gz=gz)
    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "not an IDX file"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"ab", "unsupported IDX element type 0x0d"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"ab", "truncated.*needs 5 data bytes"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"ab", "longer than its header"),
        (b"\x00\x00\x08\x03\x00", "header truncated"),
        (b"", "empty file"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataFormatError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28), np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataFormatError, match="corrupt or truncated gzip"):
        read_idx(path)


# ----------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_small_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_fmnist(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_fashion_mnist(tmp_path, split=split)
        images, labels = arrays[prefix]
        assert data.images.dtype == torch.uint8 and data.images.shape == (20, 1, 28, 28)
        assert data.labels.dtype == torch.int64
        np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(data.labels.numpy(), labels)
        assert data.class_names == FASHION_MNIST_CLASSES
        assert data.name == f"fashion_mnist/{split}"
        assert len(data.mean) == len(data.std) == 1


def test_fashion_mnist_class_names() -> None:
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert FASHION_MNIST_CLASSES[5:8] == ("Sandal", "Shirt", "Sneaker")


def test_load_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(19, np.uint8), gz=True)
    with pytest.raises(DataFormatError, match="20 images but .* 19 labels"):
        load_fashion_mnist(tmp_path, split="test")


def test_load_fashion_mnist_label_out_of_range(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, np.uint8), gz=True)
    with pytest.raises(DataFormatError, match="label 10 out of range"):
        load_fashion_mnist(tmp_path, split="test")


def test_load_fashion_mnist_truncated_images(tmp_path: Path) -> None:
    write_fmnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte: file truncated"):
        load_fashion_mnist(tmp_path, split="train")


def test_missing_files_explain_and_never_download(tmp_path: Path, monkeypatch) -> None:
    def no_fetch(*args, **kwargs):
        raise AssertionError("download attempted without download=True")

    monkeypatch.setattr(download, "_fetch_url", no_fetch)
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path / "empty", split="test")
    message = str(info.value)
    for needle in (
        str(tmp_path / "empty"),
        "apt-get install dataset-fashion-mnist",
        "data.root=",
        "SPECIALIZE_FASHION_MNIST",
        "download=True",
    ):
        assert needle in message


def test_root_from_environment(tmp_path: Path, monkeypatch) -> None:
    write_fmnist(tmp_path / "env", n=10)
    monkeypatch.setenv("SPECIALIZE_FASHION_MNIST", str(tmp_path / "env"))
    assert len(load_fashion_mnist(split="train")) == 10
    assert len(load_dataset("fashion_mnist", split="test")) == 10


def test_unknown_split_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'val'; allowed: train, test"):
        load_fashion_mnist(tmp_path, split="val")


def _mirror(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    mirror = tmp_path / "mirror"
    write_fmnist(mirror)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    return mirror, md5


def test_download_rejects_checksum_mismatch(tmp_path: Path) -> None:
    mirror, _ = _mirror(tmp_path)
    target = tmp_path / "target"
    with pytest.raises(DataFormatError, match="checksum mismatch"):
        download_fashion_mnist(target, split="test", mirrors=[mirror.as_uri() + "/"])
    assert list(target.iterdir()) == []  # nothing half-written left behind


def test_download_verifies_and_writes_atomically(tmp_path: Path, monkeypatch) -> None:
    mirror, md5 = _mirror(tmp_path)
    monkeypatch.setattr(fashion_mnist, "_FASHION_MNIST_MD5", md5)
    mirrors = ("file:///nonexistent/", mirror.as_uri() + "/")  # the first one fails
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_MIRRORS", mirrors)
    data = load_fashion_mnist(tmp_path / "target", split="test", download=True)
    assert len(data) == 20
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]


@pytest.mark.fmnist
@pytest.mark.skipif(
    not HAS_FMNIST,
    reason="Fashion-MNIST not installed in "
    "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    for split, size in (("train", 60_000), ("test", 10_000)):
        data = load_fashion_mnist(FMNIST_ROOT, split=split)
        assert data.images.shape == (size, 1, 28, 28)
        assert data.class_counts().tolist() == [size // 10] * 10
        assert data.class_names == FASHION_MNIST_CLASSES


# ---------------------------------------------------------------------------- CIFAR-10


def write_cifar(folder: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = {}
    for name, count in sizes.items():
        record = rng.integers(0, 256, size=(count, 3073), dtype=np.uint8)
        record[:, 0] = rng.integers(0, 10, size=count)
        (folder / name).write_bytes(record.tobytes())
        records[name] = record
    return records


def test_cifar10_round_trip(tmp_path: Path) -> None:
    names = {f"data_batch_{i}.bin": 3 for i in range(1, 6)} | {"test_batch.bin": 4}
    records = write_cifar(tmp_path / "cifar-10-batches-bin", names)
    train = load_cifar10(tmp_path, split="train")  # the parent folder is accepted too
    assert train.images.shape == (15, 3, 32, 32) and train.class_names == CIFAR10_CLASSES
    first = records["data_batch_1.bin"][0]
    assert train.labels[0] == first[0]
    np.testing.assert_array_equal(train.images[0, 1].numpy().ravel(), first[1 + 1024 : 1 + 2048])
    test = load_cifar10(tmp_path / "cifar-10-batches-bin", split="test")
    np.testing.assert_array_equal(test.labels.numpy(), records["test_batch.bin"][:, 0])


def test_cifar10_rejects_truncated_and_bad_labels(tmp_path: Path) -> None:
    write_cifar(tmp_path, {"test_batch.bin": 2})
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataFormatError, match="test_batch.bin: size 6145 bytes is not a positive"):
        load_cifar10(tmp_path, split="test")
    record = np.zeros((1, 3073), np.uint8)
    record[0, 0] = 42
    path.write_bytes(record.tobytes())
    with pytest.raises(DataFormatError, match="label 42 out of range"):
        load_cifar10(tmp_path, split="test")


def test_cifar10_missing_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path, {"data_batch_1.bin": 1})
    with pytest.raises(FileNotFoundError, match="missing data_batch_2.bin, .*data_batch_5.bin"):
        load_cifar10(tmp_path, split="train")


# ------------------------------------------------------------------------ image folder


def write_folder(root: Path, counts: dict[str, int], size=(12, 10)) -> None:
    from PIL import Image

    for index, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            array = np.full((*size, 3), 40 * index + i, np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")


def test_image_folder_round_trip(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", {"cat": 2, "dog": 3})
    data = load_image_folder(tmp_path, split="train", size=8)
    assert data.images.shape == (5, 3, 8, 8) and data.class_names == ("cat", "dog")
    assert data.labels.tolist() == [0, 0, 1, 1, 1]
    assert int(data.images[3, 0, 0, 0]) == 41
    gray = load_dataset("image_folder", split="train", root=tmp_path, size=[4, 6], grayscale=True)
    assert gray.images.shape == (5, 1, 4, 6) and len(gray.mean) == 1


def test_image_folder_without_split_uses_root(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 1, "b": 1})
    assert len(load_image_folder(tmp_path, split="test")) == 2


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataFormatError, match="empty_class: no images"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match="broken.png: cannot read image"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="pass root="):
        load_dataset("image_folder", split="train")


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_shaped() -> None:
    a = make_synthetic(
        split="test", num_classes=4, samples_per_class=5, image_size=(6, 7), in_chans=3, seed=1
    )
    b = make_synthetic(
        split="test", num_classes=4, samples_per_class=5, image_size=(6, 7), in_chans=3, seed=1
    )
    assert a.images.shape == (20, 3, 6, 7) and a.class_counts().tolist() == [5] * 4
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = make_synthetic(
        split="train", num_classes=4, samples_per_class=5, image_size=(6, 7), in_chans=3, seed=1
    )
    assert not torch.equal(a.images, other.images)


def test_synthetic_difficulty_grows_with_class() -> None:
    data = make_synthetic(split="train", num_classes=5, samples_per_class=100, image_size=8)
    spread = [data.images[data.labels == k].float().std(dim=0).mean().item() for k in range(5)]
    assert spread == sorted(spread)


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes: must be an integer >= 1"):
        make_synthetic(num_classes=0)
    with pytest.raises(ValueError, match="takes no root"):
        load_dataset("synthetic", split="train", root="/tmp")


# ---------------------------------------------------------------------------- dispatch


def test_load_dataset_errors() -> None:
    with pytest.raises(
        ValueError,
        match="unknown dataset 'mnist'; known: cifar10, fashion_mnist, image_folder, synthetic",
    ):
        load_dataset("mnist", split="train")
    with pytest.raises(ValueError, match="does not take option 'colour'; allowed: download"):
        load_dataset("fashion_mnist", split="train", colour=True)


# ------------------------------------------------------------------------ ArrayDataset


def test_array_dataset_subset_and_validation() -> None:
    data = make_synthetic(num_classes=3, samples_per_class=4, image_size=4)
    part = data.subset([5, 0, 5])
    assert len(part) == 3 and torch.equal(part.images[1], data.images[0])
    assert part.class_names == data.class_names and part.mean == data.mean
    assert "size=12" in repr(data)
    with pytest.raises(ValueError, match="images must be a uint8 tensor"):
        ArrayDataset(
            torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), ("a",), (0.5,), (0.2,), "x"
        )
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        ArrayDataset(
            torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
            torch.ones(2, dtype=torch.int64),
            ("a",),
            (0.5,),
            (0.2,),
            "x",
        )
    with pytest.raises(ValueError, match="one value per channel"):
        ArrayDataset(
            torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            ("a",),
            (0.5,),
            (0.2,),
            "x",
        )


# ---------------------------------------------------------------------- InputTransform


def test_input_transform_normalises() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 3, 3)
    out = InputTransform((0.5,), (0.25,))(images)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 3, 3)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([-2.0, 2.0]))


def test_input_transform_adapts_channels_and_size() -> None:
    gray = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = InputTransform((0.3,), (0.4,), in_chans=3, size=32)(gray)
    assert out.shape == (4, 3, 32, 32) and torch.equal(out[:, 0], out[:, 2])
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    transform = InputTransform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), in_chans=1, size=(4, 6))
    assert transform(rgb).shape == (2, 1, 4, 6)
    same = InputTransform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), in_chans=1)(rgb)
    expected = ((rgb.float() / 255 - 0.5) / 0.5).mean(dim=1, keepdim=True)
    assert torch.allclose(same, expected)


def test_input_transform_errors() -> None:
    with pytest.raises(ValueError, match="cannot adapt 3 channels to in_chans=2"):
        InputTransform((0.5,) * 3, (0.5,) * 3, in_chans=2)
    with pytest.raises(ValueError, match="std must be > 0"):
        InputTransform((0.5,), (0.0,))
    with pytest.raises(ValueError, match=r"expects a uint8 batch \(N, 1, H, W\)"):
        InputTransform((0.5,), (0.5,))(torch.zeros(1, 1, 4, 4))
