"""Tiny-ImageNet (200 classes, 64 x 64 RGB) read in place from its zip or an extracted folder.

The layout is the canonical archive's (``tiny-imagenet-200.zip``)::

    tiny-imagenet-200/wnids.txt                      200 WordNet ids, one a line
    tiny-imagenet-200/words.txt                      WordNet id <TAB> names
    tiny-imagenet-200/train/<wnid>/images/<wnid>_<n>.JPEG
    tiny-imagenet-200/val/images/val_<n>.JPEG
    tiny-imagenet-200/val/val_annotations.txt        file <TAB> wnid <TAB> box

Class ``k`` is the ``k``-th of the sorted wnids (the order of a folder reader on ``train/``);
its name is the first name words.txt gives the wnid. Images are decoded with Pillow;
greyscale images become RGB.

Splits (file numbers ``<n>`` of the train images; every split is deterministic):

* ``train``: every train image; ``val``: every val image.
* ``exits``: train images ``0..249`` of each class. They teach the exit heads; nothing else
  reads them. ``exits_fit`` (``0..229``) and ``exits_val`` (``230..249``) divide them into
  what the heads are fitted on and what chooses and calibrates them; ``exits_fit150``
  (``0..149``) and ``exits_val100`` (``150..249``) divide them with five times the
  labelled rows a class for choosing (the shipped model's division: the budget controller's
  estimate at a stream's class mix rests on them).
* ``pool``: train images ``250..`` and every val image. Streams and their held-out
  evaluation sets are drawn from here (``holdout_fraction`` per class), so no stream or
  evaluation sample ever taught an exit.

The location is ``root``, else ``$SPECIALIZE_TINY_IMAGENET``: the zip itself, a folder holding
``tiny-imagenet-200.zip`` or ``tiny-imagenet-200/``, or the extracted ``tiny-imagenet-200``
folder. Nothing is downloaded (ImageNet's terms: non-commercial research and education).
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from streams.datasets.base import ArrayDataset, DataFormatError, resolve_root

TINY_IMAGENET_ENV = "SPECIALIZE_TINY_IMAGENET"
TINY_IMAGENET_DEFAULT_ROOT = Path.home() / ".cache" / "specialize" / "tiny-imagenet-200.zip"
TINY_IMAGENET_SPLITS = ("train", "val", "exits", "exits_fit", "exits_val", "exits_fit150",
                        "exits_val100", "pool")
EXITS_END = 250  # train images 0..249 of each class teach the exits
EXITS_FIT_END = 230  # of those, 0..229 fit the heads and 230..249 choose and calibrate them
# The other division (the shipped model's): 0..149 fit, 150..249 (100 a class) choose,
# calibrate and give the budget controller five times the labelled rows of a class.
EXITS_FIT150_END = 150
# The images of each split in named parts (train file numbers, val): splits share images
# exactly when their parts meet (streams.datasets.shares_images).
TINY_IMAGENET_SPLIT_PARTS = {
    "train": frozenset({"train 0-149", "train 150-229", "train 230-249", "train 250-"}),
    "val": frozenset({"val"}),
    "exits": frozenset({"train 0-149", "train 150-229", "train 230-249"}),
    "exits_fit": frozenset({"train 0-149", "train 150-229"}),
    "exits_val": frozenset({"train 230-249"}),
    "exits_fit150": frozenset({"train 0-149"}),
    "exits_val100": frozenset({"train 150-229", "train 230-249"}),
    "pool": frozenset({"train 250-", "val"}),
}
_FOLDER = "tiny-imagenet-200"
_IMAGE_SIZE = 64
# Per-channel statistics of the 80,000 train images of the shared copy, pixels in [0, 1].
_MEAN = (0.4799, 0.4480, 0.3975)
_STD = (0.2766, 0.2691, 0.2818)
_TRAIN_NAME = re.compile(r"train/(n\d+)/images/\1_(\d+)\.jpe?g$", re.IGNORECASE)


class _Archive:
    """Read-only access to the files of ``tiny-imagenet-200/``, zipped or extracted."""

    def __init__(self, location: Path) -> None:
        self.location = location
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if location.is_file():
            self._zip = zipfile.ZipFile(location)
            wnids = [n for n in self._zip.namelist() if n.endswith("wnids.txt")]
            if not wnids:
                raise DataFormatError(f"{location}: no wnids.txt in this zip; expected the "
                                      f"canonical {_FOLDER}.zip layout")
            self._prefix = min(wnids, key=len).removesuffix("wnids.txt")

    def names(self) -> list[str]:
        """Every file, as a path relative to the data set folder (``train/...``)."""
        if self._zip is not None:
            size = len(self._prefix)
            return [n[size:] for n in self._zip.namelist() if n.startswith(self._prefix)]
        return [p.relative_to(self.location).as_posix()
                for p in self.location.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        """The bytes of one file (``name`` relative to the data set folder)."""
        try:
            if self._zip is not None:
                return self._zip.read(self._prefix + name)
            return (self.location / name).read_bytes()
        except (KeyError, FileNotFoundError) as err:
            raise DataFormatError(f"{self.location}: {name} is missing") from err

    def text(self, name: str) -> list[str]:
        """Non-empty lines of a text file."""
        return [line for line in self.read(name).decode().splitlines() if line.strip()]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def find_tiny_imagenet(root: str | Path | None = None) -> Path:
    """Where Tiny-ImageNet is: the zip or the ``tiny-imagenet-200`` folder.

    Args:
        root: The zip, the extracted folder, or a folder holding either; ``None``:
            ``$SPECIALIZE_TINY_IMAGENET``, else ``~/.cache/specialize/tiny-imagenet-200.zip``.

    Raises:
        FileNotFoundError: Nothing there; the message says what to pass.
    """
    path = resolve_root(root, TINY_IMAGENET_ENV, TINY_IMAGENET_DEFAULT_ROOT)
    for candidate in (path, path / _FOLDER, path / f"{_FOLDER}.zip"):
        if candidate.is_file() or (candidate / "wnids.txt").is_file():
            return candidate
    raise FileNotFoundError(
        f"Tiny-ImageNet not found at {path}; pass scenario.root=PATH or set "
        f"{TINY_IMAGENET_ENV}=PATH to tiny-imagenet-200.zip (http://cs231n.stanford.edu/"
        "tiny-imagenet-200.zip; ImageNet's terms apply) or to its extracted folder"
    )


@contextmanager
def _open(root: str | Path | None) -> Iterator[_Archive]:
    archive = _Archive(find_tiny_imagenet(root))
    try:
        yield archive
    finally:
        archive.close()


def _class_names(archive: _Archive, wnids: list[str]) -> tuple[str, ...]:
    words = dict(line.split("\t", 1) for line in archive.text("words.txt") if "\t" in line)
    return tuple(words.get(wnid, wnid).split(",")[0].strip() for wnid in wnids)


def _train_files(archive: _Archive, index: dict[str, int]) -> list[tuple[int, int, str]]:
    """``(class, file number, name)`` of every train image, sorted."""
    files = []
    for name in archive.names():
        match = _TRAIN_NAME.fullmatch(name)
        if match and match.group(1) in index:
            files.append((index[match.group(1)], int(match.group(2)), name))
    if not files:
        raise DataFormatError(f"{archive.location}: no train/<wnid>/images/<wnid>_<n>.JPEG")
    return sorted(files)


def _val_files(archive: _Archive, index: dict[str, int]) -> list[tuple[int, int, str]]:
    """``(class, file number, name)`` of every val image, by file number."""
    files = []
    for line in archive.text("val/val_annotations.txt"):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DataFormatError(f"{archive.location}: val_annotations.txt line {line!r} "
                                  "does not name a wnid of wnids.txt")
        number = int(re.sub(r"\D", "", parts[0]) or -1)
        files.append((index[parts[1]], number, f"val/images/{parts[0]}"))
    return sorted(files, key=lambda item: item[1])


def _split_files(archive: _Archive, split: str,
                 index: dict[str, int]) -> list[tuple[int, int, str]]:
    if split == "val":
        return _val_files(archive, index)
    train = _train_files(archive, index)
    ranges: dict[str, Callable[[int], bool]] = {
        "train": lambda n: True,
        "exits": lambda n: n < EXITS_END,
        "exits_fit": lambda n: n < EXITS_FIT_END,
        "exits_val": lambda n: EXITS_FIT_END <= n < EXITS_END,
        "exits_fit150": lambda n: n < EXITS_FIT150_END,
        "exits_val100": lambda n: EXITS_FIT150_END <= n < EXITS_END,
        "pool": lambda n: n >= EXITS_END,
    }
    chosen = [item for item in train if ranges[split](item[1])]
    return chosen + _val_files(archive, index) if split == "pool" else chosen


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"cannot decode a Tiny-ImageNet image ({err})") from err
    if array.shape != (_IMAGE_SIZE, _IMAGE_SIZE, 3):
        raise DataFormatError(f"a Tiny-ImageNet image has shape {array.shape}, expected "
                              f"({_IMAGE_SIZE}, {_IMAGE_SIZE}, 3)")
    return array


def _decode_all(archive: _Archive, names: list[str]) -> np.ndarray:
    """Decode in two threads (Pillow releases the GIL); zip reads stay in this one."""
    images = np.empty((len(names), _IMAGE_SIZE, _IMAGE_SIZE, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(names), 1024):
            blobs = [archive.read(name) for name in names[start:start + 1024]]
            for offset, array in enumerate(pool.map(_decode, blobs)):
                images[start + offset] = array
    return images.transpose(0, 3, 1, 2)


def load_tiny_imagenet(root: str | Path | None = None, *, split: str = "pool") -> ArrayDataset:
    """Load a split of Tiny-ImageNet (see the module docstring for splits and location).

    Args:
        root: The zip or folder (``None``: ``$SPECIALIZE_TINY_IMAGENET``).
        split: One of :data:`TINY_IMAGENET_SPLITS`.

    Returns:
        Images ``(N, 3, 64, 64)`` uint8; class ``k`` is the ``k``-th sorted wnid.

    Raises:
        FileNotFoundError: The data is not there.
        DataFormatError: A file is missing or unreadable.
        ValueError: Unknown split.
    """
    if split not in TINY_IMAGENET_SPLITS:
        raise ValueError(f"tiny_imagenet: unknown split {split!r}; allowed: "
                         f"{', '.join(TINY_IMAGENET_SPLITS)}")
    with _open(root) as archive:
        wnids = sorted(archive.text("wnids.txt"))
        index = {wnid: k for k, wnid in enumerate(wnids)}
        files = _split_files(archive, split, index)
        images = _decode_all(archive, [name for _, _, name in files])
        names = _class_names(archive, wnids)
    labels = torch.tensor([label for label, _, _ in files], dtype=torch.int64)
    return ArrayDataset(images=torch.from_numpy(np.ascontiguousarray(images)), labels=labels,
                        class_names=names, mean=_MEAN, std=_STD, name=f"tiny_imagenet/{split}",
                        class_ids=tuple(wnids))
