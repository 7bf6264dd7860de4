"""Crash-safe `specialize run ... state=DIR`: SIGKILL at random points, SIGTERM, refusals.

Every run here is a whole `specialize run` (curves, frozen and specializing replays, report)
on a briefly trained tiny model and a two-phase synthetic stream whose switch fires the
drift alarm: a resumed run must restore the heads, optimizer, buffers, tracker, drift
detector and online score exactly to end with the same summary.json.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specialize.cli import main
from specialize.run.state import STATE_FILE
from tests.runs import RUN_OVERRIDES, synthetic_scenario, trained_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
WALL_CLOCK_KEYS = ("timings", "samples_per_second")
# small caps, so that resuming also covers merged tracker windows and truncated alarms
OVERRIDES = [*RUN_OVERRIDES, "drift.max_windows=4", "drift.max_alarms=1",
             "drift.alarm_threshold=0.15"]

pytestmark = pytest.mark.usefixtures("one_thread")


def strip_wall_clock(value):
    if isinstance(value, dict):
        return {k: strip_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(value, list):
        return [strip_wall_clock(v) for v in value]
    return value


def read_summary(folder: Path) -> dict:
    return strip_wall_clock(json.loads((folder / "summary.json").read_text()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoint, scenario and the summary of an uninterrupted run without state."""
    root = tmp_path_factory.mktemp("resume")
    checkpoint = trained_tiny_checkpoint(root / "tiny.pt")
    scenario = synthetic_scenario(root / "scenario.yaml")
    args = ["run", str(scenario), f"model.checkpoint={checkpoint}", *OVERRIDES]
    assert main([*args, f"out={root / 'reference'}"]) == 0
    summary = read_summary(root / "reference")
    assert summary["drift"]["alarm_count"] > len(summary["drift"]["alarms"]) == 1
    assert len(summary["drift"]["history"]) == 4  # 8 windows merged down to the cap
    assert summary["updater"]["resets"] >= 1 and summary["updater"]["updates"] > 0
    return {"root": root, "args": args, "summary": summary}


def command(setup, out: Path, state: Path, save_every: int = 25) -> list[str]:
    return [sys.executable, "-m", "specialize.cli", *setup["args"], f"out={out}",
            f"state={state}", f"save_every={save_every}"]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def progress(path: Path) -> int:
    """How far a saved run got: frozen replay 0-300, specializing 300-600, 601 after both."""
    state = torch.load(path, weights_only=True)
    if "curves_after" in state["done"]:
        return 601
    offset = 300 if "stream_frozen" in state["done"] else 0
    return offset + sum(p["specializer"]["position"] for p in state["current"].values())


def wait_for_saves(proc: subprocess.Popen, path: Path, reached=lambda path: True,
                   count: int = 1, timeout: float = 120) -> bool:
    """Wait for ``count`` saves of ``path`` after which ``reached(path)``; ``False`` if
    ``proc`` ended first."""
    def version():
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    last = version()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        current = version()
        if current is not None and current != last:
            last = current
            count -= 1
            if count <= 0 and reached(path):
                return True
        time.sleep(0.002)
    raise TimeoutError(f"{path} was not saved as expected in {timeout} s")


def kill_and_resume(setup: dict, tmp_path: Path, targets: list[int], seed: int) -> Path:
    """Kill the run with SIGKILL at each target progress, resume it each time; its folder."""
    rng = random.Random(seed)
    out, state = tmp_path / "out", tmp_path / "state"
    kills, launches = 0, 0
    while True:
        launches += 1
        assert launches <= len(targets) + 1, "a restart made no progress"
        proc = subprocess.Popen(command(setup, out, state), env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kills < len(targets) and wait_for_saves(
                proc, state / STATE_FILE, lambda path, goal=targets[kills]: progress(path) >= goal):
            time.sleep(rng.uniform(0.0, 0.02))
            proc.kill()
            proc.communicate()
            kills += 1
            continue
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        break
    assert kills == len(targets)
    return out


def test_sigkill_at_random_points_then_resume_gives_the_same_summary(setup, tmp_path):
    rng = random.Random(13)
    # kill once in each replay and once while the report is written (see progress())
    targets = [rng.randint(25, 275), 300 + rng.randint(25, 275), 601]
    out = kill_and_resume(setup, tmp_path, targets, seed=13)
    state = tmp_path / "state"
    assert not list(state.glob(".*.tmp"))  # temp files of killed saves are cleaned up
    assert read_summary(out) == setup["summary"]
    saved = torch.load(out / "specialized_heads.pt", weights_only=True)
    reference = torch.load(setup["root"] / "reference" / "specialized_heads.pt",
                           weights_only=True)
    assert saved["anchor_weights"] == reference["anchor_weights"]
    assert all(torch.equal(v, reference["heads"][k]) for k, v in saved["heads"].items())


@pytest.fixture(scope="module")
def budget_setup(tmp_path_factory):
    """The same run under a budget (controller, audits, validation pass, hindsight)."""
    root = tmp_path_factory.mktemp("resume-budget")
    checkpoint = trained_tiny_checkpoint(root / "tiny.pt", val_size=100)
    scenario = synthetic_scenario(root / "scenario.yaml")
    args = ["run", str(scenario), f"model.checkpoint={checkpoint}", *OVERRIDES,
            "policy.budget=1.0", "policy.retune_every=50", "engine.audit_rate=0.1"]
    assert main([*args, f"out={root / 'reference'}"]) == 0
    summary = read_summary(root / "reference")
    assert len(summary["budget"]["specializing"]["history"]) > 2  # it re-chose on the way
    assert summary["budget"]["specializing"]["audits"] > 0
    return {"root": root, "args": args, "summary": summary}


def test_sigkill_of_a_budget_run_then_resume_gives_the_same_summary(budget_setup, tmp_path):
    rng = random.Random(7)
    out = kill_and_resume(budget_setup, tmp_path, [rng.randint(60, 240),
                                                   300 + rng.randint(60, 240)], seed=7)
    assert read_summary(out) == budget_setup["summary"]


def test_sigterm_saves_exits_143_and_the_same_command_resumes(setup, tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    proc = subprocess.Popen(command(setup, out, state, save_every=10), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_saves(proc, state / STATE_FILE, count=4), "the run ended before SIGTERM"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "run the same command to resume" in stderr
    saved = torch.load(state / STATE_FILE, weights_only=True)
    assert saved["done"] or saved["current"]  # progress was written
    assert not (out / "summary.json").exists()
    argv = command(setup, out, state, save_every=10)[3:]  # the same command, in process
    assert main(argv) == 0
    assert read_summary(out) == setup["summary"]
    assert main(argv) == 0  # a finished state writes the report again
    assert read_summary(out) == setup["summary"]


@pytest.fixture(scope="module")
def saved_state(setup, tmp_path_factory):
    """A finished run's state, and the arguments that made it (its own checkpoint copy)."""
    root = tmp_path_factory.mktemp("saved")
    checkpoint = root / "tiny.pt"
    checkpoint.write_bytes(Path(setup["args"][2].split("=", 1)[1]).read_bytes())
    args = ["run", setup["args"][1], f"model.checkpoint={checkpoint}", *OVERRIDES,
            "evaluation.frozen_replay=false", f"state={root / 'state'}", f"out={root / 'out'}"]
    assert main(args) == 0
    return {"args": args, "checkpoint": checkpoint}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["drift.alarm_window=20"], "another drift setting (drift.alarm_window: saved 30, now 20)"),
        (["updater.lr=0.01"], "another config (updater.lr: saved 0.001, now 0.01)"),
        (["seed=1"], "another stream (fingerprint"),
        (None, "another backbone (weights sha256"),
    ],
)
def test_a_state_of_another_run_is_refused_naming_what_differs(saved_state, capsys, change,
                                                                message):
    checkpoint = saved_state["checkpoint"]
    original = checkpoint.read_bytes()
    if change is None:  # the same file name, other weights
        trained_tiny_checkpoint(checkpoint, steps=1)
    capsys.readouterr()
    try:
        assert main([*saved_state["args"], *(change or [])]) == 2
    finally:
        checkpoint.write_bytes(original)
    err = capsys.readouterr().err
    assert message in err and "to start afresh" in err


def test_runtime_fields_do_not_count_as_another_run(saved_state, tmp_path):
    assert main([*saved_state["args"], "save_every=7", "progress=true",
                 f"out={tmp_path / 'elsewhere'}"]) == 0
    assert (tmp_path / "elsewhere" / "summary.json").exists()


def test_save_points_keep_the_batches_of_an_uninterrupted_run():
    from configkit import ConfigError
    from specialize.run import load_run_config

    assert load_run_config("tops", ["engine.batch_size=64"]).save_interval == 1024
    assert load_run_config("tops", ["engine.batch_size=8", "save_every=40"]).save_interval == 40
    with pytest.raises(ConfigError, match="save_every: must be a multiple of engine.batch_size"):
        load_run_config("tops", ["engine.batch_size=64", "save_every=100"])
