"""The ``specialize`` command: one sub-command per job; each handler calls the library API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from configkit import ConfigError

# exit codes of the `specialize` command (README, "Commands")
EXIT_ERROR = 1  # a run failed (e.g. training diverged)
EXIT_USAGE = 2  # bad arguments, config, input or saved state
EXIT_UPDATER_FAILED = 3  # the run finished, but its background updater failed
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # interrupted (a run with state=DIR saved it first)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (e.g. configs/scenarios/footwear.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of config fields, e.g. seed=3 classes=[2,4,6] updater.lr=0.01",
    )


def _add_config_command(
    commands: argparse._SubParsersAction, name: str, *, help: str, description: str
) -> argparse.ArgumentParser:
    """A sub-command that reads a YAML config and ``key=value`` overrides (train, run)."""
    parser = commands.add_parser(name, help=help, description=description)
    _add_config_args(parser)
    return parser


def _cmd_streams_describe(args: argparse.Namespace) -> int:
    import json

    from streams.replay import build_stream, format_description
    from streams.scenarios import load_scenario

    stream = build_stream(load_scenario(args.config, args.overrides))
    summary = stream.describe(windows=args.windows)
    print(json.dumps(summary) if args.json else format_description(summary))
    return 0


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = _add_config_command(
        commands, "train",
        help="train a multi-exit backbone: every exit and LC-Net gate jointly",
        description="Train the backbone a config describes (configs/backbones/*.yaml), "
        "evaluating every exit after each epoch. Overrides use TrainConfig's field names, e.g. "
        "epochs=2 l1_weight=0.5 train_limit=5000. Runs under torchrun --nproc_per_node=N too.",
    )
    train.add_argument("--out", default=None, help="checkpoint file (default: the model cache, "
                       "$SPECIALIZE_CACHE or ~/.cache/specialize, keyed by the config's hash)")
    train.add_argument("--resume", default=None, help="continue an interrupted run from this "
                       "checkpoint (default: resume --out automatically if it is unfinished)")
    train.add_argument("--force", action="store_true",
                       help="train from scratch even if --out holds a checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--json", action="store_true", help="print the result as one JSON object")
    train.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from backbones.checkpoint import read_checkpoint
    from backbones.train import NonFiniteLossError
    from backbones.train_metrics import format_metrics
    from specialize.models.zoo import (
        cache_path,
        checkpoint_status,
        load_train_config,
        prepare_model,
    )

    config = load_train_config(args.config, args.overrides)
    out = Path(args.out) if args.out else cache_path(config, Path(args.config).stem)
    resume = args.resume
    status = checkpoint_status(out, config)
    if resume is None and not args.force:
        if status == "other":
            raise ValueError(f"{out} holds a checkpoint of another config; pass --force to "
                             "overwrite it or choose another --out")
        if status == "complete":
            print(f"{out} already holds this config, trained (--force retrains)",
                  file=sys.stderr)
        resume = out if status == "partial" else None
    if status != "complete" or args.force or args.resume:
        try:
            prepare_model(config, out, resume=resume, progress=not args.no_progress)
        except NonFiniteLossError as err:
            print(f"specialize: error: {err}", file=sys.stderr)
            return EXIT_ERROR
    if os.environ.get("RANK", "0") != "0":
        return 0
    meta = read_checkpoint(out)
    metrics = meta["metrics"]
    history = meta["history"]
    wall = sum(h.get("train_time_s", 0.0) + h.get("eval_time_s", 0.0) for h in history)
    wall = metrics.get("seconds", {}).get("total", wall)  # a fitted frozen backbone's time
    summary = {"checkpoint": str(out), "epochs": meta["epoch"], "wall_time_s": round(wall, 1),
               **metrics}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{format_metrics(metrics)}\n{meta['epoch']} epochs, "
              f"{wall / 60:.1f} min of training and evaluation; checkpoint: {out}")
    return 0


def _add_run_parsers(commands: argparse._SubParsersAction) -> None:
    run = _add_config_command(
        commands, "run",
        help="specialize a model on a stream and write the report (summary.json, report.md, PNGs)",
        description="Run an experiment. CONFIG is a run config (configs/runs/*.yaml) or just a "
        "scenario file (configs/scenarios/*.yaml; defaults fill in model, policy and updater). "
        "Dotted overrides reach every field (updater.mode=async policy.thresholds=0.8); a "
        "scenario's own fields are overridable by their plain names (classes=[2,4,6] seed=3 "
        "length=2000); out=DIR chooses the run folder. state=DIR saves the whole run every "
        "save_every=N samples and at SIGINT/SIGTERM; the same command resumes it. Exit codes: 0 "
        "done, 1 failed, 2 bad config/input/state, 3 done but the background updater failed, "
        "130/143 interrupted by SIGINT/SIGTERM.",
    )
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    run.set_defaults(handler=_cmd_run)
    demo = commands.add_parser(
        "demo",
        help="the default end to end on Fashion-MNIST (trains and caches the model once)",
        description="Train the default model if it is not cached, specialize it on the "
        "default scenario (configs/runs/demo.yaml), write the full report and print where it is.",
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="optional overrides, as for `specialize run`")
    demo.set_defaults(handler=_cmd_demo, config="demo")
    curves = commands.add_parser(
        "curves",
        help="cost/accuracy curves of a checkpoint on an evaluation set",
        description="Evaluate every exit of a checkpoint once on a held-out set and print the "
        "Pareto front of the threshold sweep and the oracle curve.",
    )
    curves.add_argument("checkpoint", nargs="?", default=None,
                        help="checkpoint file (default: the cached default model)")
    curves.add_argument("--dataset", default="fashion_mnist", help="data set name")
    curves.add_argument("--split", default="test", help="data set split")
    curves.add_argument("--measure", default="max_softmax", help="confidence measure")
    curves.add_argument("--json", action="store_true", help="print one JSON object")
    curves.set_defaults(handler=_cmd_curves)


def _cmd_run(args: argparse.Namespace) -> int:
    import json

    from specialize.report import to_jsonable
    from specialize.run import headline, load_run_config, run_experiment
    from specialize.run.state import RunInterrupted

    config = load_run_config(args.config, args.overrides)
    try:
        summary, out_dir = run_experiment(config)
    except RunInterrupted as stop:
        print(f"specialize: {stop}", file=sys.stderr)
        return stop.exit_code
    if getattr(args, "json", False):
        print(json.dumps(to_jsonable(summary)))
    else:
        print(headline(summary, out_dir))
    if summary.updater is not None and summary.updater.error:
        print(f"specialize: error: the background updater failed ({summary.updater.error}); "
              f"see {out_dir / 'report.md'}", file=sys.stderr)
        return EXIT_UPDATER_FAILED
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return _cmd_run(args)


def _cmd_curves(args: argparse.Namespace) -> int:
    import json

    from backbones.checkpoint import load_checkpoint
    from backbones.cost import flops_unit
    from specialize.evaluation import curves
    from specialize.evaluation.passes import exit_pass
    from specialize.models.runtime import input_transform
    from specialize.models.zoo import default_checkpoint
    from streams.datasets import load_dataset

    model, _ = load_checkpoint(args.checkpoint or default_checkpoint())
    data = load_dataset(args.dataset, split=args.split)
    transform = input_transform(model, data)
    result = exit_pass(model, data.images, data.labels, transform, measure=args.measure,
                       progress=True)
    arrays = (result.confidence.numpy(), result.correct.numpy(), result.flops.numpy())
    front = curves.pareto_front(curves.sweep(*arrays))
    grid = curves.grid_sweep(*arrays)
    oracle = curves.oracle_point(arrays[1], arrays[2])
    exit_accuracy = (100.0 * result.correct.double().mean(0)).tolist()
    if args.json:
        print(json.dumps({"pareto": front.to_list(), "grid": grid.to_list(),
                          "oracle": {"accuracy": oracle[0], "flops": oracle[1]},
                          "exit_accuracy": exit_accuracy}))
        return 0
    print("exit accuracy (%): " + ", ".join(f"{a:.2f}" for a in exit_accuracy))
    points = grid.to_list()
    unit = flops_unit([*(point["flops"] for point in points), oracle[1]])
    print(f"{'threshold':>10} {'accuracy %':>11} {unit.name:>9}   (FLOPs: a multiply-add counts 2)")
    for point in points:
        threshold = "none" if point["threshold"] is None else f"{point['threshold']:.2f}"
        print(f"{threshold:>10} {point['accuracy']:>11.2f} {unit.format(point['flops']):>9}")
    print(f"{'oracle':>10} {oracle[0]:>11.2f} {unit.format(oracle[1]):>9}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``specialize`` command."""
    parser = argparse.ArgumentParser(
        prog="specialize",
        description="Online test-time specialization of early-exit networks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    streams = commands.add_parser("streams", help="inspect class-skewed data streams")
    streams_commands = streams.add_subparsers(dest="streams_command", required=True)
    describe = streams_commands.add_parser(
        "describe",
        help="class histogram over time, held-out set sizes and the stream's fingerprint",
        description="Describe the stream a scenario config builds. Overrides use the "
        "scenario's field names, e.g. classes=[2,4,6] seed=1234 length=2500.",
    )
    _add_config_args(describe)
    describe.add_argument("--json", action="store_true", help="print one JSON object")
    describe.add_argument("--windows", type=int, default=10, help="time windows in the table")
    describe.set_defaults(handler=_cmd_streams_describe)
    _add_train_parser(commands)
    _add_run_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``specialize`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow flags (``CONFIG --json seed=3``).
    stray = [token for token in extra if token.startswith("-") or "=" not in token]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # output piped into e.g. head
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("specialize: interrupted (SIGINT)", file=sys.stderr)
        return EXIT_SIGINT
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"specialize: error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
