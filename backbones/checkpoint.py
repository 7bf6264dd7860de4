"""Checkpoints of multi-exit backbones: what rebuilds the model, its weights and its history.

A checkpoint is one ``torch.save`` file holding a dict of plain data and tensors, so that it
loads with ``torch.load(weights_only=True)`` (no pickled code is ever executed)::

    format, format_version   "specialize.backbone", 1
    arch, build_args         create_backbone(arch, **build_args) rebuilds the network
    state_dict               the weights (and BatchNorm statistics)
    train_config             the training config as a plain dict (None if not trained here)
    metrics, history         evaluation of the last epoch; one entry per epoch
    epoch                    epochs completed (0: not trained)
    optimizer, scheduler     their state_dicts, for resuming (None in exported files)
    data                     what the model was trained on: name, mean, std, class_names

Files are written atomically (:func:`atomic_write`: a temporary file in the same folder,
fsync, ``os.replace``, folder fsync), so a crash never leaves a half-written checkpoint under
the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from backbones.multi_exit import MultiExitNet
from backbones.registry import create_backbone

CHECKPOINT_FORMAT = "specialize.backbone"
CHECKPOINT_FORMAT_VERSION = 1

# Entries of a checkpoint that are large or only needed to resume; ``meta`` leaves them out.
_BULK_KEYS = ("state_dict", "optimizer", "scheduler")
# Build arguments that only decide whether gates exist and how they are accounted for.
_GATE_BUILD_ARGS = ("gating", "gate_mode", "gate_negative_slope")


class CheckpointError(ValueError):
    """A checkpoint is unreadable or corrupt, or does not fit the model it is loaded into."""


def save_checkpoint(
    path: str | Path,
    model: MultiExitNet,
    *,
    train_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    history: list[Mapping[str, Any]] | None = None,
    epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``model`` atomically.

    Args:
        path: Destination file; its folder is created if needed.
        model: The network; its ``name`` and ``build_args`` must rebuild it.
        train_config: The training config as a plain dict.
        metrics: Evaluation of the last epoch (per-exit accuracy, mean FLOPs ...).
        history: One metrics dict per completed epoch.
        epoch: Number of completed epochs.
        optimizer: Saved for resuming.
        scheduler: Learning-rate scheduler, saved for resuming.
        data: What the model was trained on (``name``, ``mean``, ``std``, ``class_names``).

    Returns:
        The path written.
    """
    if not model.name:
        raise ValueError("model.name is empty; build the model with create_backbone(name, ...)")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "arch": model.name,
        "build_args": dict(model.build_args),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "train_config": None if train_config is None else dict(train_config),
        "metrics": None if metrics is None else dict(metrics),
        "history": [dict(h) for h in history or []],
        "epoch": int(epoch),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "data": None if data is None else dict(data),
        "torch_version": str(torch.__version__),
    }
    return atomic_torch_save(payload, path)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file so that a crash leaves either the old version or the new one, whole.

    ``write`` fills a temporary file in the destination folder; the file is flushed and
    fsynced, renamed over ``path`` (``os.replace``, atomic on POSIX), and the folder is
    fsynced so that the rename itself survives a power loss. The file gets the usual
    permissions (``0o666`` minus the umask). The one atomic-write routine of the project.

    Args:
        path: Destination file; its folder is created if needed.
        write: Writes the content into the binary file object it is given.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def _fsync_folder(folder: Path) -> None:
    """Persist a folder's entries (a rename); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened (nor need to be)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint file with ``torch.load(weights_only=True)``.

    Args:
        path: The checkpoint file.
        map_location: Where to put the tensors.

    Returns:
        The full checkpoint dict (see the module docstring).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is truncated, corrupt, not a backbone checkpoint, or written
            by a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path}; train one with `specialize train CONFIG --out {path}`"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: the file holds Python objects other than tensors and plain data, so "
                "it was not written by backbones.checkpoint and is not loaded (weights_only); "
                "re-run `specialize train` to write a checkpoint"
            ) from err
        raise CheckpointError(
            f"{path}: cannot read the checkpoint, the file is truncated or corrupt "
            f"({type(err).__name__}: {_first_line(err)}); delete it and re-run `specialize "
            "train` (a default-model cache entry is retrained on next use once deleted)"
        ) from err
    _validate(ckpt, path)
    return ckpt


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def _validate(ckpt: Any, path: Path) -> None:
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a backbone checkpoint (expected a dict with format="
            f"{CHECKPOINT_FORMAT!r}); re-run `specialize train` to write one"
        )
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this library's "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade the library or re-run `specialize train`"
        )
    missing = [k for k in ("arch", "build_args", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks {', '.join(missing)}; the file is corrupt: delete it "
            "and re-run `specialize train`"
        )


def checkpoint_meta(ckpt: Mapping[str, Any], path: str | Path | None = None) -> dict:
    """Everything in a checkpoint except the weights and the optimizer/scheduler state."""
    meta = {k: v for k, v in ckpt.items() if k not in _BULK_KEYS}
    meta["path"] = None if path is None else str(path)
    return meta


def load_checkpoint(
    path: str | Path,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[MultiExitNet, dict]:
    """Rebuild the model a checkpoint describes and load its weights.

    Args:
        path: The checkpoint file.
        num_classes: If given, the number of classes the caller needs; must match.
        in_chans: If given, the input channels the caller feeds; must match.
        map_location: Where to put the tensors.

    Returns:
        ``(model, meta)``: the model in eval mode, and the checkpoint without its tensors
        (``arch``, ``build_args``, ``train_config``, ``metrics``, ``history``, ``epoch``,
        ``data``, ``format_version``, ``path``).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Corrupt file, or ``num_classes`` / ``in_chans`` differ from the
            checkpoint's.
    """
    ckpt = read_checkpoint(path, map_location=map_location)
    build_args = dict(ckpt["build_args"])
    _check_io(path, build_args, num_classes=num_classes, in_chans=in_chans)
    try:
        model = create_backbone(ckpt["arch"], **build_args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot rebuild {ckpt['arch']!r} from the checkpoint's build_args "
            f"{build_args} ({err}); re-run `specialize train` with this library version"
        ) from err
    _load_state(model, ckpt["state_dict"], path)
    model.to(map_location).eval()
    return model, checkpoint_meta(ckpt, path)


def load_weights(
    model: MultiExitNet,
    path: str | Path,
    *,
    allow_missing_gates: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load a checkpoint's weights into an existing model of the same architecture.

    Args:
        model: The model to fill.
        path: The checkpoint file.
        allow_missing_gates: Accept a checkpoint with or without LC-Net gates where the model
            differs (a pretrained ungated backbone for a gated model: the gates keep their
            initialisation, all open; or the reverse: the checkpoint's gates are dropped).
        map_location: Where to put the tensors while loading.

    Returns:
        The checkpoint's meta (see :func:`load_checkpoint`).

    Raises:
        CheckpointError: Another architecture, different ``num_classes`` / ``in_chans``, or
            weights whose names or shapes do not fit the model.
    """
    ckpt = read_checkpoint(path, map_location=map_location)
    if ckpt["arch"] != model.name:
        raise CheckpointError(
            f"{path}: checkpoint holds architecture {ckpt['arch']!r}, the model is "
            f"{model.name!r}; load it with load_checkpoint() or train a {model.name!r}"
        )
    args = model.build_args
    _check_io(path, ckpt["build_args"], num_classes=args.get("num_classes"),
              in_chans=args.get("in_chans"))
    ignore_gates = allow_missing_gates
    _load_state(model, ckpt["state_dict"], path, ignore_gates=ignore_gates,
                build_args=(ckpt["build_args"], args))
    return checkpoint_meta(ckpt, path)


def _check_io(
    path: str | Path, build_args: Mapping[str, Any], *, num_classes: int | None,
    in_chans: int | None,
) -> None:
    for name, wanted in (("num_classes", num_classes), ("in_chans", in_chans)):
        stored = build_args.get(name)
        if wanted is not None and stored is not None and int(wanted) != int(stored):
            raise CheckpointError(
                f"{path}: the checkpoint was trained with {name}={stored}, but {name}={wanted} "
                f"was asked for; use a checkpoint trained with {name}={wanted} (specialize "
                f"train CONFIG model_args.{name}={wanted} ...) or adapt the data to {stored}"
            )


def _load_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    ignore_gates: bool = False,
    build_args: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if ignore_gates:
        missing = [k for k in missing if ".gate." not in k]
        unexpected = [k for k in unexpected if ".gate." not in k]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch (checkpoint vs model)", wrong_shape)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                problems.append(f"{label}: {', '.join(keys[:3])}{more}")
        hint = _build_args_diff(build_args) if build_args else ""
        gate_hint = "" if ignore_gates else (
            "; pass allow_missing_gates=True to load a backbone with/without gates"
            if any(".gate." in k for k in missing + unexpected) else ""
        )
        raise CheckpointError(
            f"{path}: the checkpoint's weights do not fit the model, it is another "
            f"architecture ({'; '.join(problems)}){hint}{gate_hint}"
        )
    filtered = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(filtered, strict=not ignore_gates)


def _build_args_diff(pair: tuple[Mapping[str, Any], Mapping[str, Any]]) -> str:
    stored, wanted = pair
    diffs = [
        f"{k}: checkpoint {stored.get(k)!r} vs model {wanted.get(k)!r}"
        for k in sorted(set(stored) | set(wanted))
        if stored.get(k) != wanted.get(k) and k not in _GATE_BUILD_ARGS
    ]
    return f"; build_args differ: {', '.join(diffs)}" if diffs else ""
