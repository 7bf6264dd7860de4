"""Image classification data sets held in memory as uint8 tensors.

Every reader returns an :class:`ArrayDataset`: ``images`` uint8 ``(N, C, H, W)``, ``labels``
int64 ``(N,)``, the class names and the per-channel normalisation statistics. Files are read
with vectorised ``numpy.frombuffer`` (no pickle) and validated: a corrupt or truncated file
raises :class:`DataFormatError` naming the file and what was expected.

Readers:
    * ``fashion_mnist``: IDX files, gzipped or raw (Debian's ``dataset-fashion-mnist``).
    * ``cifar10``: the binary version (``data_batch_1.bin`` .. ``test_batch.bin``).
    * ``image_folder``: one sub-folder per class, read with PIL and resized.
    * ``synthetic``: seeded class-conditional images whose difficulty grows with the class id.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "ArrayDataset",
    "DataFormatError",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "FASHION_MNIST_MIRRORS",
    "read_idx",
    "read_cifar10_batch",
    "load_fashion_mnist",
    "download_fashion_mnist",
    "load_cifar10",
    "load_image_folder",
    "make_synthetic",
    "load_dataset",
    "list_datasets",
]

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

# Statistics of the training splits, pixel values scaled to [0, 1].
_FASHION_MNIST_MEAN, _FASHION_MNIST_STD = (0.2860,), (0.3530,)
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

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

CIFAR10_ENV = "SPECIALIZE_CIFAR10"
CIFAR10_DEFAULT_ROOT = Path.home() / ".cache" / "specialize" / "cifar-10-batches-bin"
_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR10_RECORD = 1 + 3 * 32 * 32

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_SPLITS = ("train", "test")


class DataFormatError(ValueError):
    """A data file is corrupt, truncated or not in the expected format; the message names it."""


@dataclass(frozen=True, eq=False, repr=False)
class ArrayDataset:
    """An in-memory image classification data set.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)`` with values in ``[0, len(class_names))``.
        class_names: One name per class id.
        mean: Per-channel mean of the pixel values scaled to [0, 1] (for normalisation).
        std: Per-channel standard deviation, same scale.
        name: What the data is, e.g. ``"fashion_mnist/test"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be a uint8 tensor (N, C, H, W), "
                f"got {images.dtype} of shape {tuple(images.shape)}"
            )
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"{self.name}: labels must be an int64 tensor ({images.shape[0]},), "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        channels = images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: mean and std need one value per channel ({channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {len(self.class_names)}), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, size={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``), whether or not all are present."""
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        """Number of image channels ``C``."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width ``(H, W)``."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def class_counts(self) -> torch.Tensor:
        """Number of samples of each class, int64 ``(num_classes,)``."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, *, name: str | None = None
    ) -> ArrayDataset:
        """Return the samples at ``indices`` (in that order) as a new data set.

        Args:
            indices: Positions into this data set.
            name: Name of the subset; defaults to this data set's name.

        Returns:
            A data set sharing class names and normalisation statistics with this one.
        """
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayDataset(
            images=self.images[index],
            labels=self.labels[index],
            class_names=self.class_names,
            mean=self.mean,
            std=self.std,
            name=self.name if name is None else name,
        )


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``(N, C, H, W)`` scaled to [0, 1]."""
    if images.shape[0] == 0:
        channels = images.shape[1]
        return (0.5,) * channels, (0.25,) * channels
    scaled = images.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _check_split(dataset: str, split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"{dataset}: unknown split {split!r}; allowed: {', '.join(_SPLITS)}")


def _read_file_bytes(path: Path) -> bytes:
    """Read ``path``, transparently decompressing gzip (detected by its magic bytes)."""
    with path.open("rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    if not gzipped:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (EOFError, OSError, zlib.error) as err:
        raise DataFormatError(
            f"{path}: corrupt or truncated gzip file ({err}); delete it and fetch it again"
        ) from err


# --------------------------------------------------------------------------------------- IDX


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST / Fashion-MNIST format), gzipped or raw.

    Args:
        path: The file; gzip compression is detected from its content, not its name.

    Returns:
        A uint8 array whose shape is given by the file header.

    Raises:
        FileNotFoundError: The file does not exist.
        DataFormatError: Bad magic number, unsupported element type, or a data size that does
            not match the header (truncated file or trailing bytes).
    """
    path = Path(path)
    data = _read_file_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataFormatError(
            f"{path}: not an IDX file (magic number must start with two zero bytes, "
            f"got {data[:4].hex() or 'an empty file'})"
        )
    if data[2] != 0x08:
        raise DataFormatError(
            f"{path}: unsupported IDX element type 0x{data[2]:02x}; only unsigned bytes (0x08) "
            "are supported"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataFormatError(f"{path}: IDX header truncated or with 0 dimensions (ndim={ndim})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataFormatError(
            f"{path}: file {what}: header {'x'.join(map(str, dims))} needs {expected} data bytes, "
            f"found {found}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


# ----------------------------------------------------------------------------- Fashion-MNIST


def _resolve_root(root: str | Path | None, env: str, default: Path) -> Path:
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return default


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


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
    _check_split("fashion_mnist", split)
    folder = _resolve_root(root, FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_ROOT)
    image_stem, label_stem = _fashion_mnist_stems(split)
    missing = _find_idx(folder, image_stem) is None or _find_idx(folder, label_stem) is None
    if download and missing:
        download_fashion_mnist(folder, split=split)
    image_path, label_path = _find_idx(folder, image_stem), _find_idx(folder, label_stem)
    if image_path is None or label_path is None:
        raise _fashion_mnist_missing(folder)
    images, labels = read_idx(image_path), read_idx(label_path)
    _check_idx_pair(image_path, images, label_path, labels, len(FASHION_MNIST_CLASSES))
    return ArrayDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=FASHION_MNIST_CLASSES,
        mean=_FASHION_MNIST_MEAN,
        std=_FASHION_MNIST_STD,
        name=f"fashion_mnist/{split}",
    )


def _check_idx_pair(
    image_path: Path, images: np.ndarray, label_path: Path, labels: np.ndarray, num_classes: int
) -> None:
    if images.ndim != 3:
        raise DataFormatError(f"{image_path}: expected 3 dimensions (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise DataFormatError(f"{label_path}: expected 1 dimension (N,), got {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels; the counts must match"
        )
    if labels.size and labels.max() >= num_classes:
        raise DataFormatError(
            f"{label_path}: label {int(labels.max())} out of range; allowed 0..{num_classes - 1}"
        )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Copy ``url`` (http, https or file) into ``dest``."""
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)


def _download_verified(urls: Sequence[str], dest: Path, md5: str) -> None:
    """Fetch the first of ``urls`` whose content has checksum ``md5``; write ``dest`` atomically."""
    failures = []
    for url in urls:
        handle, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(handle)
        tmp = Path(tmp_name)
        try:
            _fetch_url(url, tmp)
            found = _md5(tmp)
            if found != md5:
                failures.append(f"{url}: checksum mismatch (md5 {found}, expected {md5})")
                continue
            tmp.chmod(0o644)
            os.replace(tmp, dest)
            return
        except OSError as err:
            failures.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataFormatError(f"could not download {dest.name}; " + "; ".join(failures))


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
    folder = _resolve_root(root, FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_ROOT)
    mirrors = FASHION_MNIST_MIRRORS if mirrors is None else tuple(mirrors)
    splits = _SPLITS if split is None else (split,)
    for name in splits:
        _check_split("fashion_mnist", name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"cannot download Fashion-MNIST into {folder} ({err}); pass data.root=... (root=...) "
            "pointing to a writable folder"
        ) from err
    for name in splits:
        for stem in _fashion_mnist_stems(name):
            if _find_idx(folder, stem) is None:
                file_name = f"{stem}.gz"
                urls = [base + file_name for base in mirrors]
                _download_verified(urls, folder / file_name, _FASHION_MNIST_MD5[file_name])
    return folder


# ---------------------------------------------------------------------------------- CIFAR-10


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
    _check_split("cifar10", split)
    folder = _cifar10_folder(_resolve_root(root, CIFAR10_ENV, CIFAR10_DEFAULT_ROOT))
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


# ------------------------------------------------------------------------------ image folder


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{what}: expected a positive int or [height, width], got {size!r}")
    return int(pair[0]), int(pair[1])


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES
    )


def _read_image(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"{path}: cannot read image ({err})") from err
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(
    root: str | Path | None,
    *,
    split: str | None = None,
    size: int | Sequence[int] = 32,
    grayscale: bool = False,
) -> ArrayDataset:
    """Load images laid out as ``root/[split/]<class name>/<image>``.

    Class ids follow the sorted sub-folder names. If ``root/split`` is a folder it is used,
    otherwise ``root`` itself is the split. Normalisation statistics are computed from the
    loaded images.

    Args:
        root: The folder (required).
        split: Optional sub-folder, e.g. ``"train"`` or ``"test"``.
        size: Output size, an int or ``[height, width]``; images are resized bilinearly.
        grayscale: Convert to one channel (``L``) instead of three (``RGB``).

    Returns:
        The images ``(N, 1 or 3, H, W)`` and the class names.

    Raises:
        FileNotFoundError: The folder does not exist.
        DataFormatError: No class folders, a class folder with no images, or an unreadable image.
    """
    if root is None:
        raise ValueError("image_folder: pass root=... (data.root=...) naming the image folder")
    folder = Path(root).expanduser()
    if split is not None and (folder / split).is_dir():
        folder = folder / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    height_width = _pair(size, "image_folder size")
    class_dirs = sorted(path for path in folder.iterdir() if path.is_dir())
    if not class_dirs:
        raise DataFormatError(
            f"{folder}: no class sub-folders; expected one sub-folder per class holding "
            f"images ({', '.join(_IMAGE_SUFFIXES)})"
        )
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            raise DataFormatError(
                f"{class_dir}: no images in this class folder; allowed suffixes: "
                f"{', '.join(_IMAGE_SUFFIXES)}"
            )
        mode = "L" if grayscale else "RGB"
        images.extend(_read_image(path, height_width, mode) for path in files)
        labels.extend([label] * len(files))
    array = np.stack(images)
    mean, std = _channel_stats(array)
    return ArrayDataset(
        images=torch.from_numpy(array),
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=tuple(path.name for path in class_dirs),
        mean=mean,
        std=std,
        name=f"image_folder/{folder.name}",
    )


# --------------------------------------------------------------------------------- synthetic


def make_synthetic(
    *,
    split: str = "train",
    num_classes: int = 10,
    samples_per_class: int = 200,
    image_size: int | Sequence[int] = 16,
    in_chans: int = 1,
    noise_min: float = 0.05,
    noise_max: float = 0.6,
    seed: int = 0,
) -> ArrayDataset:
    """Generate a seeded class-conditional data set for fast tests and demos.

    Each class has a random prototype image (shared by all splits of the same ``seed``);
    a sample is its prototype plus Gaussian noise whose standard deviation grows linearly
    with the class id, from ``noise_min`` (class 0, easy) to ``noise_max`` (last class, hard).
    Samples are shuffled; the train and test splits use independent noise.

    Args:
        split: ``"train"`` or ``"test"``.
        num_classes: Number of classes (>= 1).
        samples_per_class: Samples of each class (>= 1).
        image_size: Height and width, an int or ``[height, width]``.
        in_chans: Number of channels (>= 1).
        noise_min: Noise standard deviation of class 0, in [0, 1] pixel units.
        noise_max: Noise standard deviation of the last class.
        seed: Identity of the data set (prototypes and noise).

    Returns:
        ``num_classes * samples_per_class`` images with class names ``class_0``, ....
    """
    _check_split("synthetic", split)
    height, width = _pair(image_size, "synthetic image_size")
    for name, value in (
        ("num_classes", num_classes),
        ("samples_per_class", samples_per_class),
        ("in_chans", in_chans),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"synthetic {name}: must be an integer >= 1, got {value!r}")
    if not 0 <= noise_min <= noise_max:
        raise ValueError(
            f"synthetic noise: need 0 <= noise_min <= noise_max, got {noise_min} and {noise_max}"
        )
    proto_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,))))
    prototypes = proto_rng.uniform(0.15, 0.85, size=(num_classes, in_chans, height, width))
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(1 + _SPLITS.index(split),)))
    )
    labels = rng.permutation(np.repeat(np.arange(num_classes), samples_per_class))
    noise_std = np.linspace(noise_min, noise_max, num_classes) if num_classes > 1 else [noise_min]
    sigma = np.asarray(noise_std)[labels][:, None, None, None]
    pixels = prototypes[labels] + sigma * rng.standard_normal(prototypes[labels].shape)
    images = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    mean, std = _channel_stats(images)
    return ArrayDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=tuple(f"class_{k}" for k in range(num_classes)),
        mean=mean,
        std=std,
        name=f"synthetic/{split}",
    )


# ---------------------------------------------------------------------------------- dispatch


def _load_synthetic(root: str | Path | None = None, **kwargs: Any) -> ArrayDataset:
    if root is not None:
        raise ValueError("dataset 'synthetic' is generated and takes no root; remove data.root")
    return make_synthetic(**kwargs)


_LOADERS: dict[str, Callable[..., ArrayDataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "image_folder": load_image_folder,
    "synthetic": _load_synthetic,
}
_SIGNATURES: dict[str, Callable[..., ArrayDataset]] = {**_LOADERS, "synthetic": make_synthetic}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_LOADERS)


def _check_options(name: str, options: dict[str, Any]) -> None:
    parameters = inspect.signature(_SIGNATURES[name]).parameters
    allowed = sorted(p for p in parameters if p not in ("root", "split"))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"dataset {name!r} does not take option {unknown[0]!r}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )


def load_dataset(
    name: str, *, split: str, root: str | Path | None = None, **kwargs: Any
) -> ArrayDataset:
    """Load a data set split by name.

    Args:
        name: One of :func:`list_datasets`: ``fashion_mnist``, ``cifar10``, ``image_folder``,
            ``synthetic``.
        split: Which split, e.g. ``"train"`` or ``"test"``.
        root: Data folder (``None``: the reader's default); not allowed for ``synthetic``.
        **kwargs: Reader options, e.g. ``download=True`` (fashion_mnist), ``size=64``
            (image_folder) or ``num_classes=5`` (synthetic).

    Returns:
        The loaded split.

    Raises:
        ValueError: Unknown name or option; the message lists the allowed ones.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    _check_options(name, kwargs)
    return _LOADERS[name](root, split=split, **kwargs)
