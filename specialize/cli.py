"""The ``specialize`` command: one sub-command per job; each handler calls the library API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from specialize.config import ConfigError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (e.g. configs/scenarios/footwear.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of config fields, e.g. seed=3 classes=[2,4,6] updater.lr=0.01",
    )


def _cmd_streams_describe(args: argparse.Namespace) -> int:
    import json

    from streams.replay import build_stream, format_description
    from streams.scenarios import load_scenario

    stream = build_stream(load_scenario(args.config, args.overrides))
    summary = stream.describe(windows=args.windows)
    print(json.dumps(summary) if args.json else format_description(summary))
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``specialize`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"specialize: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
