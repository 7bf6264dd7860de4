"""CIFAR-10, binary version (``data_batch_1.bin`` .. ``test_batch.bin``), read without pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from streams.datasets.base import ArrayDataset, DataFormatError, check_split, resolve_root

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Statistics of the training split, pixel values scaled to [0, 1].
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

CIFAR10_ENV = "SPECIALIZE_CIFAR10"
CIFAR10_DEFAULT_ROOT = Path.home() / ".cache" / "specialize" / "cifar-10-batches-bin"
_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR10_RECORD = 1 + 3 * 32 * 32


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: records of 1 label byte followed by 3072 pixel bytes.

    Args:
        path: A ``*.bin`` file of the binary version of CIFAR-10.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and uint8 ``(N,)``.

    Raises:
        FileNotFoundError: The file does not exist.
        DataFormatError: The size is not a positive multiple of 3073 bytes, or a label is > 9.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data or len(data) % _CIFAR10_RECORD:
        raise DataFormatError(
            f"{path}: size {len(data)} bytes is not a positive multiple of the {_CIFAR10_RECORD}"
            "-byte CIFAR-10 record (1 label byte + 3072 pixel bytes); the file is truncated or "
            "not from the binary version (cifar-10-binary.tar.gz)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR10_RECORD)
    labels = records[:, 0].copy()
    if labels.max() >= len(CIFAR10_CLASSES):
        raise DataFormatError(
            f"{path}: label {int(labels.max())} out of range; allowed 0..9 "
            "(is this the CIFAR-100 binary version?)"
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _cifar10_folder(root: Path) -> Path:
    for folder in (root, root / "cifar-10-batches-bin"):
        if (folder / "test_batch.bin").is_file() or (folder / "data_batch_1.bin").is_file():
            return folder
    return root


def _cifar10_class_names(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta.txt"
    if meta.is_file():
        names = tuple(line.strip() for line in meta.read_text().splitlines() if line.strip())
        if len(names) == len(CIFAR10_CLASSES):
            return names
    return CIFAR10_CLASSES


def load_cifar10(root: str | Path | None = None, *, split: str = "train") -> ArrayDataset:
    """Load CIFAR-10 from its binary batches (no pickle).

    The folder is ``root`` if given, else ``$SPECIALIZE_CIFAR10``, else
    ``~/.cache/specialize/cifar-10-batches-bin``; a parent folder that holds
    ``cifar-10-batches-bin/`` is accepted too.

    Args:
        root: Folder holding ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``.
        split: ``"train"`` (the five data batches) or ``"test"`` (``test_batch.bin``).

    Returns:
        The split with images ``(N, 3, 32, 32)``.

    Raises:
        FileNotFoundError: A batch file is missing; the message says where to get it.
        DataFormatError: A batch file has the wrong size or an out-of-range label.
    """
    check_split("cifar10", split)
    folder = _cifar10_folder(resolve_root(root, CIFAR10_ENV, CIFAR10_DEFAULT_ROOT))
    paths = [folder / name for name in _CIFAR10_FILES[split]]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 binary batches not found in {folder} (missing {', '.join(missing)}); "
            "download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
            f"extract it and pass data.root=... or set {CIFAR10_ENV}"
        )
    batches = [read_cifar10_batch(path) for path in paths]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches]).astype(np.int64)
    return ArrayDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        class_names=_cifar10_class_names(folder),
        mean=_CIFAR10_MEAN,
        std=_CIFAR10_STD,
        name=f"cifar10/{split}",
    )
