"""Checks that need the data or the checkpoint fail before any model loads, as one ConfigError."""

from __future__ import annotations

import pytest
import yaml

from backbones.checkpoint import save_checkpoint
from configkit import ConfigError
from specialize.cli import main
from specialize.run import load_run_config, run_experiment
from specialize.run.checks import check_run_inputs
from tests.conftest import tiny_model

SCENARIO = {"scenario": "subset", "name": "s", "dataset": "synthetic", "classes": [0, 2, 4],
            "length": 32, "dataset_options": {"num_classes": 6, "samples_per_class": 10,
                                              "image_size": 16}}


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory):
    """A synthetic-data run config, with a 6-class tiny checkpoint and a 10-class one."""
    root = tmp_path_factory.mktemp("run_checks")
    save_checkpoint(root / "tiny6.pt", tiny_model(num_classes=6))
    save_checkpoint(root / "tiny10.pt", tiny_model(num_classes=10))
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump({"scenario": SCENARIO, "progress": False,
                                    "model": {"checkpoint": str(root / "tiny6.pt")}}))
    return path


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load before the run's inputs are checked")

    monkeypatch.setattr("specialize.run.experiment.load_model", refuse)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["classes=[0, 9]"],
         "scenario.classes: class id 9 out of range for synthetic (6 classes: 0..5)"),
        (["scenario.dataset_options.bogus=1"], "scenario: dataset 'synthetic' does not take "
                                               "option 'bogus'; allowed: image_size, in_chans"),
        (["scenario.root=/data"], "scenario: dataset 'synthetic' is generated and takes no root"),
        (["holdout_fraction=0.01"], "scenario.holdout_fraction: 0.01 holds out no sample of the "
                                    "stream's classes [0, 2, 4]; raise it"),
        (["model.checkpoint=/no/such.pt"], "model.checkpoint: no such file '/no/such.pt'"),
        (["model.checkpoint=null", "model.train_config=/no/such.yaml"],
         "model.train_config: no such file '/no/such.yaml'"),
        (["policy.thresholds=[0.9, 0.9, 0.9, 0.9, 0.9]"],
         "policy.thresholds: the model has 4 exits, so give one number, 3 (one per early "
         "exit) or 4 (the last is ignored); got [0.9, 0.9, 0.9, 0.9, 0.9]"),
        (["model.checkpoint={tiny10}"], "model.checkpoint: the model predicts 10 classes, but "
                                        "the scenario's data set synthetic has 6"),
    ],
)
def test_what_needs_the_data_fails_before_the_model_loads(run_yaml, no_model, capsys,
                                                          overrides, message):
    overrides = [text.format(tiny10=run_yaml.parent / "tiny10.pt") for text in overrides]
    assert main(["run", str(run_yaml), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"specialize: error: ConfigError: {message}"), err


def test_a_valid_config_passes_and_gives_the_stream(run_yaml):
    stream = check_run_inputs(load_run_config(run_yaml))
    assert len(stream) == 32 and stream.classes == (0, 2, 4) and stream.eval_in is not None


def test_a_model_prepared_during_the_run_is_checked_before_it_is_used(run_yaml, monkeypatch):
    # the default model is not prepared yet: its exits are known only once it is loaded
    monkeypatch.setattr("specialize.run.checks._checkpoint_shape", lambda config: None)
    monkeypatch.setattr("specialize.run.experiment.load_model",
                        lambda *args, **kwargs: (tiny_model(num_classes=6), "prepared.pt"))

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be evaluated with thresholds that do not fit")

    monkeypatch.setattr("specialize.run.experiment._eval_sets", refuse)
    config = load_run_config(run_yaml, ["policy.thresholds=[0.9, 0.8]"])
    with pytest.raises(ConfigError, match="^policy.thresholds: the model has 4 exits"):
        run_experiment(config)
