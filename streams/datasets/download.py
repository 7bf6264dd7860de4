"""Checksummed downloads that never leave a half-written file behind."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from streams.datasets.base import DataFormatError


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


def download_verified(urls: Sequence[str], dest: Path, md5: str) -> None:
    """Fetch the first of ``urls`` whose content has checksum ``md5``; write ``dest`` atomically.

    Each try is written to a temporary file next to ``dest``, its MD5 checked, then moved into
    place with ``os.replace``.

    Raises:
        DataFormatError: No URL delivered a file with the right checksum; the message lists
            what went wrong with each.
    """
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
