"""IDX files of unsigned bytes (the MNIST / Fashion-MNIST format), gzipped or raw."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from streams.datasets.base import DataFormatError


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


def find_idx(root: Path, stem: str) -> Path | None:
    """``root/<stem>.gz`` or else ``root/<stem>`` if it is a file, or ``None``."""
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def check_idx_pair(
    image_path: Path, images: np.ndarray, label_path: Path, labels: np.ndarray, num_classes: int
) -> None:
    """Check that IDX images ``(N, H, W)`` and labels ``(N,)`` belong together.

    Raises:
        DataFormatError: Wrong dimensions, other counts, or a label ``>= num_classes``.
    """
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
