"""Crash-safe runs: the whole state of ``specialize run ... state=DIR``, saved and resumed.

A run goes through phases: ``curves_before``, ``stream_frozen``, ``stream_specializing``,
``curves_after``, then the report. :class:`RunSession` keeps what each finished phase
produced, the progress of the replay under way (specializer, engine aggregates, online
score), the run folder and the seconds spent, and writes it all to ``DIR/run_state.pt``
atomically (``backbones.checkpoint.atomic_torch_save``: temp file, fsync, rename, folder
fsync) at every phase end and every ``save_every`` samples of a replay. Running the same
command again resumes from the file; a file saved for another config, stream, backbone
(weights hash) or drift setting is refused with a message that names the difference.

SIGINT and SIGTERM (:meth:`RunSession.signals`) end the run cleanly: during a replay the
engine stops after its current step and the state is saved; elsewhere the phase under way
is abandoned (its start is already on disk). Either way :class:`RunInterrupted` carries the
exit code (128 + the signal number: 130, 143).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from backbones.checkpoint import atomic_torch_save

__all__ = [
    "RUNTIME_FIELDS",
    "STATE_FILE",
    "RunInterrupted",
    "RunSession",
    "StateMismatchError",
    "run_identity",
    "weights_hash",
]

STATE_FILE = "run_state.pt"
RUN_STATE_FORMAT = 1
# run config fields that change how a run is watched or kept, never what it computes
RUNTIME_FIELDS = ("out", "progress", "state", "save_every")
T = TypeVar("T")


class RunInterrupted(Exception):  # noqa: N818 - not an error: a requested stop
    """SIGINT or SIGTERM stopped the run; the state on disk resumes it.

    Attributes:
        signum: The signal received.
        exit_code: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
        state: The state file, or ``None`` when the run keeps no state.
    """

    def __init__(self, signum: int, state: Path | None = None) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.state = state
        name = signal.Signals(self.signum).name
        where = (f"state saved in {state.parent}; run the same command to resume" if state
                 else "no state=DIR was given, nothing was saved")
        super().__init__(f"interrupted by {name}: {where}")


class StateMismatchError(ValueError):
    """A saved run state belongs to another config, stream, backbone or drift setting."""


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes and bytes of its state dict)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_identity(config: Mapping[str, Any], fingerprint: str, backbone: str) -> dict[str, Any]:
    """What a saved run state must match: config (runtime fields aside), stream, backbone.

    Args:
        config: The run config as plain data (``configkit.to_dict``), the scenario resolved.
        fingerprint: The stream's fingerprint.
        backbone: :func:`weights_hash` of the loaded model.
    """
    settings = {key: value for key, value in config.items() if key not in RUNTIME_FIELDS}
    return {"config": json.loads(json.dumps(settings, sort_keys=True, default=str)),
            "stream": fingerprint, "backbone": backbone}


class RunSession:
    """The state of one run: finished phases, the replay under way, timings, run folder.

    Without a folder the session lives in memory only (nothing is saved, signals keep
    their default handling), so the run pipeline is the same with and without ``state``.

    Args:
        folder: The state folder (``state=DIR``), or ``None``.
        identity: :func:`run_identity` of the run.
    """

    def __init__(self, folder: str | Path | None, identity: dict[str, Any]) -> None:
        self.path = None if folder is None else Path(folder) / STATE_FILE
        self.identity = identity
        self.data: dict[str, Any] = {"format": RUN_STATE_FORMAT,
                                     "identity": json.dumps(identity, sort_keys=True),
                                     "out": None, "timings": {}, "done": {}, "current": {}}
        self.signum: int | None = None
        self._deferred = False
        self.resumed = False

    @classmethod
    def open(cls, folder: str | Path | None, identity: dict[str, Any]) -> RunSession:
        """A session, resumed from ``folder``'s state file when there is one.

        Raises:
            StateMismatchError: The state was saved for another run (the message names
                what differs) or cannot be read.
        """
        session = cls(folder, identity)
        if session.path is not None:
            for stale in session.path.parent.glob(f".{STATE_FILE}.*.tmp"):
                stale.unlink(missing_ok=True)  # left by a save that was killed
            if session.path.exists():
                session._load()
        return session

    @property
    def persistent(self) -> bool:
        """Whether the session saves to a state folder."""
        return self.path is not None

    def _load(self) -> None:
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported alike
            raise StateMismatchError(
                f"cannot read the run state {self.path} ({type(err).__name__}: {err}); "
                f"delete {self.path.parent} to start afresh") from err
        if not isinstance(data, dict) or data.get("format") != RUN_STATE_FORMAT:
            raise StateMismatchError(
                f"{self.path} is not a run state of format {RUN_STATE_FORMAT}; delete "
                f"{self.path.parent} to start afresh")
        differences = _differences(json.loads(data["identity"]), self.identity)
        if differences:
            raise StateMismatchError(
                f"{self.path} was saved for {'; '.join(differences)}. Run the command it was "
                f"saved by to resume, or delete {self.path.parent} (or choose another "
                "state=DIR) to start afresh")
        self.data = data
        self.resumed = True

    def save(self) -> None:
        """Write the state file atomically (no-op without a folder)."""
        if self.path is not None:
            atomic_torch_save(self.data, self.path)

    # ---- run folder and timings

    def out_dir(self, choose: Callable[[], Path]) -> Path:
        """The run folder chosen when the run started (``choose()`` then), kept in the state."""
        if self.data["out"] is None:
            self.data["out"] = str(choose())
        return Path(self.data["out"])

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase, summed over every process that worked on the run."""
        return self.data["timings"]

    def add_time(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to phase ``name``'s timing."""
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    # ---- phases

    def phase(self, name: str, compute: Callable[[], T], encode: Callable[[T], Any],
              decode: Callable[[Any], T]) -> T:
        """Phase ``name``'s result: read back from the state, or computed and saved.

        Args:
            name: The phase.
            compute: Runs the phase (it may call :meth:`save_progress`).
            encode: The result as tensors and plain data (what the state file holds).
            decode: The inverse of ``encode``.
        """
        if name in self.data["done"]:
            return decode(self.data["done"][name])
        start = time.perf_counter()
        result = compute()
        self.add_time(name, time.perf_counter() - start)
        self.data["done"][name] = encode(result)
        self.data["current"].pop(name, None)
        self.save()
        return result

    def progress(self, name: str) -> Any:
        """The saved progress of phase ``name`` under way, or ``None``."""
        return self.data["current"].get(name)

    def save_progress(self, name: str, payload: Any) -> None:
        """Record and save the progress of phase ``name``."""
        self.data["current"] = {name: payload}
        self.save()

    # ---- signals

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM as clean stops while inside (with a state folder only)."""
        if self.path is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signum = signum
        if not self._deferred:
            raise RunInterrupted(signum, self.path)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a signal only sets :meth:`stop_requested` (the replay stops and saves)."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def stop_requested(self) -> bool:
        """Whether SIGINT or SIGTERM arrived."""
        return self.signum is not None

    def raise_if_stopped(self) -> None:
        """Raise :class:`RunInterrupted` if a signal arrived."""
        if self.signum is not None:
            raise RunInterrupted(self.signum, self.path)


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two identities, in words."""
    found = []
    if saved.get("backbone") != current["backbone"]:
        found.append(f"another backbone (weights sha256 {str(saved.get('backbone'))[:12]} "
                     f"!= {current['backbone'][:12]})")
    if saved.get("stream") != current["stream"]:
        found.append(f"another stream (fingerprint {str(saved.get('stream'))[:12]} != "
                     f"{current['stream'][:12]})")
    changed = _changed_keys(saved.get("config", {}), current["config"])
    for kind, keys in (("drift setting", [k for k in changed if k.startswith("drift.")]),
                       ("config", [k for k in changed if not k.startswith("drift.")])):
        if keys:
            found.append(f"another {kind} ({', '.join(f'{k}: {changed[k]}' for k in keys)})")
    return found


def _changed_keys(saved: Any, current: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys whose values differ, each with ``saved -> current``."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: dict[str, str] = {}
        for key in sorted(set(saved) | set(current)):
            out.update(_changed_keys(saved.get(key), current.get(key), f"{prefix}{key}."))
        return out
    if saved == current:
        return {}
    return {prefix.rstrip("."): f"saved {_text(saved)}, now {_text(current)}"}


def _text(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
