"""The README's own front door: its "your own model and data" lines run as written, and its
headline table and docs/results.md are what benchmarks/results_doc.py generates."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"<!-- own-model: start -->\n```bash\n(.*?)```\n<!-- own-model: end -->", re.S)

# only to make the lines fast here: fewer epochs and learning rates, 32 px, a short stream
TRAIN_SPEEDUPS = ["epochs=2", "lrs=[0.003]", "num_threads=1", "model_args.input_size=[3,32,32]",
                  "--no-progress"]
RUN_SPEEDUPS = ["length=120", "updater.update_every=16", "updater.batch_size=32",
                "progress=false", "out=run"]


def readme_commands() -> list[str]:
    """The example's command lines (comments dropped), in order."""
    match = BLOCK.search(README.read_text())
    assert match, "README.md: the own-model block is missing"
    return [line for line in match[1].splitlines() if line and not line.startswith("#")]


def write_image_folder(root: Path) -> None:
    """Three colour classes in train/val/test, small noisy PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"apple": (200, 30, 30), "leaf": (30, 160, 40), "sky": (40, 80, 210)}
    for split, count in (("train", 12), ("val", 8), ("test", 16)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.normal(0, 40, (24, 24, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _run(line: str) -> None:
    from specialize.cli import main

    words = shlex.split(line)
    if words[0] == "python":
        assert words[1] == "-c"
        exec(compile(words[2], "<README>", "exec"), {})  # noqa: S102 - the README's own line
        return
    assert words[0] == "specialize", line
    args = [str(REPO / w) if w.startswith("configs/") else w for w in words[1:]]
    args += TRAIN_SPEEDUPS if args[0] == "train" else RUN_SPEEDUPS
    assert main(args) == 0, line


def test_the_own_model_example_runs_as_the_readme_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "my_data")
    lines = readme_commands()
    assert [shlex.split(line)[:2] for line in lines] == [
        ["python", "-c"], ["specialize", "train"], ["specialize", "run"]]
    for line in lines:
        _run(line)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["scenario"]["classes"] == [0, 1]
    assert summary["model"]["trained_on"] == ["image_folder/train", "image_folder/val"]
    assert summary["updater"]["updates"] > 0 and summary["updater"]["error"] is None
    assert summary["budget"]["budget"] == 0.5
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.fixture(scope="module")
def results_doc():
    spec = importlib.util.spec_from_file_location("results_doc",
                                                  REPO / "benchmarks" / "results_doc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_docs_results_and_the_readme_headline_are_generated_from_the_saved_records(results_doc):
    assert results_doc.main(["--check"]) == 0, "run python benchmarks/results_doc.py"


def test_a_stale_table_is_caught(results_doc, tmp_path):
    for name in (results_doc.TEMPLATE, results_doc.OUTPUT, results_doc.README):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((REPO / name).read_text())
    (tmp_path / results_doc.RESULTS).parent.mkdir(parents=True)
    (tmp_path / results_doc.RESULTS).symlink_to(REPO / results_doc.RESULTS)
    assert results_doc.stale_files(tmp_path) == []
    readme = tmp_path / results_doc.README
    readme.write_text(readme.read_text().replace("| dogs |", "| dogs (edited) |", 1))
    assert results_doc.stale_files(tmp_path) == [readme]


def test_the_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 250
