"""Fashion-MNIST: its IDX files (Debian's ``dataset-fashion-mnist``) and their download."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from streams.datasets.base import SPLITS, ArrayDataset, check_split, resolve_root
from streams.datasets.download import download_verified
from streams.datasets.idx import check_idx_pair, find_idx, read_idx

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Statistics of the training split, pixel values scaled to [0, 1].
_FASHION_MNIST_MEAN, _FASHION_MNIST_STD = (0.2860,), (0.3530,)

FASHION_MNIST_ENV = "SPECIALIZE_FASHION_MNIST"
FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MIRRORS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
# MD5 of the gzipped files as published by Zalando Research (and used by torchvision).
_FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _fashion_mnist_stems(split: str) -> tuple[str, str]:
    prefix = _FASHION_MNIST_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _fashion_mnist_missing(root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"Fashion-MNIST not found in {root} (looked for train-/t10k-images-idx3-ubyte[.gz] and "
        "train-/t10k-labels-idx1-ubyte[.gz]); install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass data.root=... (root=... in a scenario) "
        f"/ set {FASHION_MNIST_ENV}, or download=True on a machine with internet"
    )


def load_fashion_mnist(
    root: str | Path | None = None, *, split: str = "train", download: bool = False
) -> ArrayDataset:
    """Load Fashion-MNIST from its IDX files (gzipped or raw).

    The folder is ``root`` if given, else ``$SPECIALIZE_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

    Args:
        root: Folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        download: Fetch missing files from Zalando's mirrors into the folder (checksummed).
            Off by default: nothing is ever downloaded unless asked.

    Returns:
        The split with images ``(N, 1, 28, 28)`` and the ten class names.

    Raises:
        FileNotFoundError: The files are missing; the message says how to get them.
        DataFormatError: A file is corrupt or truncated, or images and labels disagree.
    """
    check_split("fashion_mnist", split)
    folder = resolve_root(root, FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_ROOT)
    image_stem, label_stem = _fashion_mnist_stems(split)
    missing = find_idx(folder, image_stem) is None or find_idx(folder, label_stem) is None
    if download and missing:
        download_fashion_mnist(folder, split=split)
    image_path, label_path = find_idx(folder, image_stem), find_idx(folder, label_stem)
    if image_path is None or label_path is None:
        raise _fashion_mnist_missing(folder)
    images, labels = read_idx(image_path), read_idx(label_path)
    check_idx_pair(image_path, images, label_path, labels, len(FASHION_MNIST_CLASSES))
    return ArrayDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=FASHION_MNIST_CLASSES,
        mean=_FASHION_MNIST_MEAN,
        std=_FASHION_MNIST_STD,
        name=f"fashion_mnist/{split}",
    )


def download_fashion_mnist(
    root: str | Path | None = None,
    *,
    split: str | None = None,
    mirrors: Sequence[str] | None = None,
) -> Path:
    """Download the gzipped Fashion-MNIST IDX files that are missing from ``root``.

    Each file is written to a temporary file in ``root``, its MD5 checked against the
    published checksum, then moved into place with ``os.replace``: an interrupted or corrupt
    download never leaves a half-written file behind.

    Args:
        root: Target folder (resolved like :func:`load_fashion_mnist`); created if missing.
        split: ``"train"``, ``"test"`` or ``None`` for both.
        mirrors: Base URLs tried in order, each ending with ``/`` (``None``:
            ``FASHION_MNIST_MIRRORS``).

    Returns:
        The folder the files are in.

    Raises:
        DataFormatError: No mirror delivered a file with the right checksum.
        PermissionError: The folder cannot be written; pass a writable ``root``.
    """
    folder = resolve_root(root, FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_ROOT)
    mirrors = FASHION_MNIST_MIRRORS if mirrors is None else tuple(mirrors)
    splits = SPLITS if split is None else (split,)
    for name in splits:
        check_split("fashion_mnist", name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"cannot download Fashion-MNIST into {folder} ({err}); pass data.root=... (root=...) "
            "pointing to a writable folder"
        ) from err
    for name in splits:
        for stem in _fashion_mnist_stems(name):
            if find_idx(folder, stem) is None:
                file_name = f"{stem}.gz"
                urls = [base + file_name for base in mirrors]
                download_verified(urls, folder / file_name, _FASHION_MNIST_MD5[file_name])
    return folder
