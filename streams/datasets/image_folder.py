"""Images laid out as ``root/[split/]<class name>/<image>``, read with PIL and resized."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from streams.datasets.base import ArrayDataset, DataFormatError, channel_stats, size_pair

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


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
    height_width = size_pair(size, "image_folder size")
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
    mean, std = channel_stats(array)
    return ArrayDataset(
        images=torch.from_numpy(array),
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=tuple(path.name for path in class_dirs),
        mean=mean,
        std=std,
        name=f"image_folder/{folder.name}",
    )
